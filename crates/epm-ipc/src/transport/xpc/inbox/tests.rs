//! The protocol over the XPC transport's portable half: two in-memory
//! links that behave like XPC connections (each message is delivered whole
//! to the peer's handler side, descriptors travel in the message, a peer
//! that goes away delivers the end), driven by the same `Client` and
//! `ServerConnection` code the Mac runs.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::*;
use crate::message::{ErrorCode, Message, Request, Response};
use crate::protocol::{Arrival, Client, ClientError, Incoming, ServerConnection, ServerError};
use crate::transport::link::Link;
use crate::transport::link::PeerCredentials;
use crate::transport::xpc::frame::{Received, XpcErrorKind, triage};

/// One end of an in-memory XPC-like connection.
#[derive(Debug)]
struct MemoryLink {
    inbound: Inbound,
    /// The other end's handler side.
    peer: Arc<Deliverer>,
    peer_uid: u32,
}

impl Drop for MemoryLink {
    fn drop(&mut self) {
        // As XPC tells the other side when a connection is cancelled.
        self.peer.deliver(
            triage(Received::Error(XpcErrorKind::ConnectionInvalid)),
            Vec::new,
        );
    }
}

impl Link for MemoryLink {
    fn send_frame(&mut self, body: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), FrameError> {
        if self.inbound.over() {
            return Err(FrameError::Io(std::io::ErrorKind::BrokenPipe.into()));
        }
        let dups = fds
            .iter()
            .map(|fd| fd.try_clone_to_owned())
            .collect::<Result<Vec<_>, _>>()?;
        self.peer
            .deliver(triage(Received::Dictionary(Some(body))), || dups);
        Ok(())
    }

    fn recv_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        self.inbound.recv_frame()
    }

    fn recv_fds(&mut self, expected: usize) -> Result<Vec<OwnedFd>, FdError> {
        self.inbound.recv_fds(expected)
    }

    fn set_timeouts(&mut self, read: Option<Duration>, _: Option<Duration>) -> std::io::Result<()> {
        self.inbound.set_read_timeout(read);
        Ok(())
    }

    fn read_timeout(&self) -> Option<Duration> {
        self.inbound.read_timeout()
    }

    fn readiness(&self) -> BorrowedFd<'_> {
        self.inbound.readiness()
    }

    fn peer(&self) -> std::io::Result<PeerCredentials> {
        Ok(PeerCredentials {
            uid: self.peer_uid,
            gid: self.peer_uid,
            pid: None,
        })
    }
}

/// A connected pair: (client end, daemon end); the daemon sees uid 501.
fn pair() -> (MemoryLink, MemoryLink) {
    let (client_deliverer, client_inbound) = inbox().unwrap();
    let (daemon_deliverer, daemon_inbound) = inbox().unwrap();
    (
        MemoryLink {
            inbound: client_inbound,
            peer: Arc::new(daemon_deliverer),
            peer_uid: 0,
        },
        MemoryLink {
            inbound: daemon_inbound,
            peer: Arc::new(client_deliverer),
            peer_uid: 501,
        },
    )
}

fn connect(link: MemoryLink) -> Result<Client, ClientError> {
    Client::handshake(Box::new(link), "test", || {
        ClientError::ServiceUnavailable("com.epm.epmd.xpc".into())
    })
}

fn accept(link: MemoryLink) -> Result<ServerConnection, ServerError> {
    let peer = link.peer().unwrap();
    Arrival::from_link(Box::new(link), peer).accept("9.9.9", |peer| peer.uid == 0)
}

fn readable(fd: BorrowedFd<'_>, wait: PollTimeout) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    poll(&mut fds, wait).unwrap() > 0
}

#[test]
fn the_handshake_and_requests_work_as_on_the_socket() {
    let (client_end, daemon_end) = pair();
    let to_daemon = client_end.peer.clone();
    let daemon = thread::spawn(move || -> Result<Vec<String>, ServerError> {
        let mut connection = accept(daemon_end)?;
        assert_eq!(connection.peer.uid, 501);
        assert!(!connection.is_admin);
        assert_eq!(connection.client, "test");
        let mut seen = Vec::new();
        while let Some(incoming) = connection.next_request()? {
            match incoming {
                Incoming::Request(Request::Status) => {
                    seen.push("status".to_owned());
                    connection.send(&Response::End)?;
                }
                Incoming::Request(other) => {
                    seen.push(other.type_name().to_owned());
                    connection.send(&Response::error(ErrorCode::Forbidden, "no"))?;
                }
                Incoming::Unsupported(kind) => {
                    seen.push(format!("unsupported {kind}"));
                    connection.send(&Response::error(ErrorCode::Unsupported, kind))?;
                }
            }
        }
        Ok(seen)
    });
    let mut client = connect(client_end).unwrap();
    assert_eq!(client.uid, 501);
    assert_eq!(client.daemon_version, "9.9.9");
    assert_eq!(client.call(&Request::Status).unwrap(), Response::End);
    let err = client.call(&Request::PolicyShow).unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Daemon {
                code: ErrorCode::Forbidden,
                ..
            }
        ),
        "{err}"
    );
    // A newer client's request: answered, and the connection stays.
    let newer = br#"{"type":"grant_sudo","minutes":5}"#;
    to_daemon.deliver(triage(Received::Dictionary(Some(newer))), Vec::new);
    let err = client.recv().unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Daemon {
                code: ErrorCode::Unsupported,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(client.call(&Request::Status).unwrap(), Response::End);
    drop(client);
    assert_eq!(
        daemon.join().unwrap().unwrap(),
        ["status", "policy_show", "unsupported grant_sudo", "status"]
    );
}

#[test]
fn descriptors_travel_in_the_message() {
    let (client_end, daemon_end) = pair();
    let daemon = thread::spawn(move || {
        let mut connection = accept(daemon_end).unwrap();
        let Some(Incoming::Request(Request::Status)) = connection.next_request().unwrap() else {
            panic!("expected status");
        };
        // Asking for descriptors a message did not carry is an error.
        let error = connection.recv_fds(3).unwrap_err();
        assert!(error.to_string().contains("no file descriptors"), "{error}");
        connection
    });
    let mut client = connect(client_end).unwrap();
    client.send(&Request::Status).unwrap();
    // The daemon told the client why, then gave up on the connection.
    let told = client.recv().unwrap_err();
    assert!(
        matches!(
            told,
            ClientError::Daemon {
                code: ErrorCode::BadRequest,
                ..
            }
        ),
        "{told}"
    );
    drop(daemon.join().unwrap());

    let (client_end, daemon_end) = pair();
    let daemon = thread::spawn(move || {
        let mut connection = accept(daemon_end).unwrap();
        let incoming = connection.next_request().unwrap();
        assert!(matches!(
            incoming,
            Some(Incoming::Request(Request::Signal { .. }))
        ));
        let [stdin, stdout, stderr]: [OwnedFd; 3] =
            connection.recv_fds(3).unwrap().try_into().unwrap();
        let mut stdout = UnixStream::from(stdout);
        stdout.write_all(b"from the daemon").unwrap();
        drop((stdin, stderr));
    });
    let mut client = connect(client_end).unwrap();
    let (mut mine, theirs) = UnixStream::pair().unwrap();
    let request = Request::Signal {
        signal: "INT".into(),
    };
    client
        .send_with_fds(&request, &[theirs.as_fd(), theirs.as_fd(), theirs.as_fd()])
        .unwrap();
    drop(theirs);
    daemon.join().unwrap();
    let mut got = String::new();
    mine.read_to_string(&mut got).unwrap();
    assert_eq!(got, "from the daemon");
}

#[test]
fn readiness_wakes_a_poller_for_a_request_and_for_the_end() {
    let (client_end, daemon_end) = pair();
    let daemon = thread::spawn(move || {
        let mut connection = accept(daemon_end).unwrap();
        // As the runner waits: for the client, or something else.
        assert!(readable(connection.readiness(), PollTimeout::from(5000u16)));
        assert!(matches!(
            connection.next_request().unwrap(),
            Some(Incoming::Request(Request::Status))
        ));
        assert!(!readable(connection.readiness(), PollTimeout::ZERO));
        // As a follower notices that its client left.
        assert!(readable(connection.readiness(), PollTimeout::from(5000u16)));
        assert_eq!(connection.next_request().unwrap(), None);
    });
    let mut client = connect(client_end).unwrap();
    thread::sleep(Duration::from_millis(50));
    client.send(&Request::Status).unwrap();
    thread::sleep(Duration::from_millis(50));
    drop(client);
    daemon.join().unwrap();
}

#[test]
fn garbage_ends_that_connection_and_says_why() {
    let (client_end, daemon_end) = pair();
    let to_daemon = client_end.peer.clone();
    let daemon = thread::spawn(move || {
        let mut connection = accept(daemon_end).unwrap();
        connection.next_request()
    });
    let mut client = connect(client_end).unwrap();
    // A dictionary without a frame.
    assert_eq!(
        to_daemon.deliver(triage(Received::Dictionary(None)), Vec::new),
        After::Cancel
    );
    assert!(
        to_daemon.over.load(Ordering::Acquire),
        "the link knows it is over"
    );
    let error = daemon.join().unwrap().unwrap_err();
    assert!(
        error.to_string().contains("no data under \"frame\""),
        "{error}"
    );
    // The handler cancelled the connection at once (unlike the socket,
    // where the daemon can still say why): the peer sees its end.
    let told = client.recv().unwrap_err();
    assert!(matches!(told, ClientError::Closed), "{told}");
}

#[test]
fn a_flooding_peer_is_cut_off_after_the_queue() {
    let (client_end, daemon_end) = pair();
    // Not reading: the daemon end's queue fills.
    let flood = client_end.peer.clone();
    for _ in 0..QUEUE_DEPTH {
        assert_eq!(
            flood.deliver(triage(Received::Dictionary(Some(b"{}"))), Vec::new),
            After::Keep
        );
    }
    assert_eq!(
        flood.deliver(triage(Received::Dictionary(Some(b"{}"))), Vec::new),
        After::Cancel
    );
    let mut daemon_end = daemon_end;
    for _ in 0..QUEUE_DEPTH {
        assert!(daemon_end.recv_frame().unwrap().is_some());
    }
    let error = daemon_end.recv_frame().unwrap_err();
    assert!(
        error.to_string().contains("more than 64 messages"),
        "{error}"
    );
    assert_eq!(daemon_end.recv_frame().unwrap(), None);
    drop(client_end);
}

#[test]
fn a_refused_client_is_told_why() {
    let (client_end, daemon_end) = pair();
    let daemon = thread::spawn(move || {
        let peer = daemon_end.peer().unwrap();
        Arrival::from_link(Box::new(daemon_end), peer)
            .refuse(ErrorCode::TryLater, "too many connections");
    });
    let error = connect(client_end).unwrap_err();
    daemon.join().unwrap();
    assert!(
        matches!(&error, ClientError::Daemon { code: ErrorCode::TryLater, message } if message == "too many connections"),
        "{error}"
    );
}

#[test]
fn a_service_that_never_answers_is_unavailable() {
    let (client_end, daemon_end) = pair();
    drop(daemon_end);
    let error = connect(client_end).unwrap_err();
    assert!(
        matches!(error, ClientError::ServiceUnavailable(_)),
        "{error}"
    );
    assert!(
        error
            .to_string()
            .contains("launchctl print system/com.epm.epmd"),
        "{error}"
    );
}

#[test]
fn a_peer_that_does_not_read_is_cut_off_after_the_in_flight_limit() {
    let in_flight = InFlight::default();
    for _ in 0..IN_FLIGHT_LIMIT {
        assert!(in_flight.start());
    }
    assert!(!in_flight.start(), "the limit holds");
    in_flight.done();
    assert!(in_flight.start(), "room again once one is handed on");
    let empty = InFlight::default();
    empty.done();
    assert!(empty.start(), "never below zero");
}
