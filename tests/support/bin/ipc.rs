//! `epm-e2e-ipc`: the end-to-end tests' raw IPC client, run as any user
//! (the daemon authorizes by the uid the kernel reports, so a test that
//! checks one user against another needs a process of each).
//!
//! - `epm-e2e-ipc SOCKET subscribe`: prints every message as a JSON line.
//! - `epm-e2e-ipc SOCKET call JSON`: sends one request, prints the answer
//!   (errors too) as one JSON line.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::Path;

use epm_ipc::{Connection, Request, Response};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (socket, command) = (Path::new(&args[1]), args[2].as_str());
    let stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    let mut connection = Connection::new(stream);
    connection
        .send(&Request::Hello {
            protocol: epm_ipc::PROTOCOL_VERSION,
            client: "epm-e2e-ipc".into(),
        })
        .unwrap();
    let _welcome: Option<Response> = connection.recv().unwrap();
    let request: Request = match command {
        "subscribe" => Request::Subscribe,
        "call" => serde_json::from_str(&args[3]).unwrap(),
        other => panic!("unknown command {other}"),
    };
    connection.send(&request).unwrap();
    let mut out = std::io::stdout();
    while let Ok(Some(response)) = connection.recv::<Response>() {
        writeln!(out, "{}", serde_json::to_string(&response).unwrap()).unwrap();
        out.flush().unwrap();
        if command == "call" {
            return;
        }
    }
}
