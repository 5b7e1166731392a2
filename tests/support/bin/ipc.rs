//! `epm-e2e-ipc`: the end-to-end tests' raw IPC client, run as any user
//! (the daemon authorizes by the uid the kernel reports, so a test that
//! checks one user against another needs a process of each).
//!
//! - `epm-e2e-ipc SOCKET subscribe`: prints every message as a JSON line.
//! - `epm-e2e-ipc SOCKET call JSON`: sends one request, prints the answer
//!   (errors too) as one JSON line.
//! - `epm-e2e-ipc SOCKET flood COUNT BYTES`: sends COUNT `run` requests
//!   of `/usr/bin/true` whose arguments total about BYTES (up to the frame
//!   limit), one after the other, and prints how many were answered: a
//!   user flooding the daemon's audit.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::os::fd::AsFd;
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
    if command == "flood" {
        let count: usize = args[3].parse().unwrap();
        let bytes: usize = args[4].parse().unwrap();
        // Arguments of up to 8 KiB each (what a record keeps of one).
        let piece = bytes.clamp(16, 8 * 1024);
        let argv: Vec<String> = std::iter::once("true".to_owned())
            .chain((0..bytes / piece).map(|i| format!("{i:08}{}", "a".repeat(piece - 8))))
            .collect();
        let mut answered = 0;
        for _ in 0..count {
            // `run`, as `epmctl run` sends it: the one request a user's own
            // client may send with arguments that reach the audit (no
            // elevation rule allows `true` here, so each is refused and
            // recorded with its arguments).
            let request = Request::Run {
                command: epm_ipc::Command {
                    program: "/usr/bin/true".into(),
                    argv: argv.clone(),
                    run_as: "root".into(),
                },
                cwd: "/".into(),
                env: Default::default(),
                reason: None,
                window: None,
                tty: None,
            };
            let stdio = [std::io::stdin(), std::io::stdin(), std::io::stdin()];
            let fds: Vec<_> = stdio.iter().map(|s| s.as_fd()).collect();
            if connection.send(&request).is_err() || connection.send_fds(&fds).is_err() {
                break;
            }
            match connection.recv::<Response>() {
                Ok(Some(_)) => answered += 1,
                _ => break,
            }
        }
        println!("{answered}");
        return;
    }
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
