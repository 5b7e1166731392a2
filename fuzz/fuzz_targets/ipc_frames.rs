//! IPC frames and messages, as both transports receive them.
//!
//! The first byte picks the transport. Unix socket: the rest is a byte
//! stream of length-prefixed frames (`read_frame` until the end or an
//! error), each body decoded as a request (the daemon's side) and as a
//! response (a client's side). XPC: the rest is one dictionary's frame
//! data (`xpc_frame::triage`), decoded the same way. A decoded message
//! must encode again and decode to an equal value.
#![no_main]

use std::io::Cursor;

use epm_ipc::xpc_frame::{Received, Triage, triage};
use epm_ipc::{MAX_FRAME_BYTES, Message, Request, Response, decode, encode, read_frame};
use libfuzzer_sys::fuzz_target;

/// Decodes `body` as a `T`; what decodes encodes and decodes again.
fn round_trip<T: Message>(body: &[u8]) -> Option<(T, T)> {
    let message = match decode::<T>(body) {
        Ok(message) => message,
        Err(error) => {
            // Every refusal has words for the log and the peer.
            assert!(!error.to_string().is_empty());
            return None;
        }
    };
    let _ = message.type_name();
    let again = encode(&message).expect("a decoded message encodes");
    let back: T = decode(&again).expect("an encoded message decodes");
    Some((message, back))
}

fn body(body: &[u8]) {
    assert!(body.len() <= MAX_FRAME_BYTES);
    if let Some((request, back)) = round_trip::<Request>(body) {
        assert_eq!(request, back, "a request changed on a round trip");
    }
    // Responses carry floats (latencies), which JSON need not give back to
    // the last bit: decoding again is the promise.
    let _ = round_trip::<Response>(body);
}

fuzz_target!(|data: &[u8]| {
    let Some((&transport, rest)) = data.split_first() else {
        return;
    };
    match transport % 3 {
        0 => {
            let mut stream = Cursor::new(rest);
            // Each frame consumes at least its 4-byte prefix: this ends.
            while let Ok(Some(frame)) = read_frame(&mut stream) {
                body(&frame);
            }
        }
        1 => match triage(Received::Dictionary(Some(rest))) {
            Triage::Frame(frame) => body(frame),
            Triage::Garbage(why) => assert!(!why.is_empty()),
            Triage::PeerGone(_) => panic!("data is never the peer going away"),
        },
        _ => {
            // A frame written and read back is the same frame.
            let mut wire = Vec::new();
            if epm_ipc::write_frame(&mut wire, rest).is_ok() {
                let read = read_frame(&mut Cursor::new(&wire)).expect("a written frame reads");
                assert_eq!(read.as_deref(), Some(rest));
            }
            body(rest);
        }
    }
});
