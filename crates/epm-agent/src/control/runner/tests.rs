#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::thread;

use epm_ipc::{Connection, PROTOCOL_VERSION};

use super::*;

fn root() -> RunAs {
    RunAs::resolve("root").unwrap()
}

#[test]
fn only_safe_variables_pass_and_the_user_is_set() {
    let caller: BTreeMap<String, String> = [
        ("TERM", "xterm-256color"),
        ("LANG", "C.UTF-8"),
        ("LC_ALL", "de_DE.UTF-8"),
        ("LC_", "x"),
        ("LC_x", "x"),
        ("TZ", "Europe/Paris"),
        ("COLORTERM", "truecolor"),
        ("NO_COLOR", "1"),
        ("LD_PRELOAD", "/tmp/evil.so"),
        ("PATH", "/tmp/evil:/usr/bin"),
        ("HOME", "/home/alice"),
        ("BASH_ENV", "/tmp/x"),
        ("TERM_PROGRAM", "x"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let run_as = RunAs {
        name: "root".into(),
        uid: 0,
        gid: 0,
        groups: vec![0],
        home: "/root".into(),
        shell: "/bin/bash".into(),
    };
    let env = command_env(&caller, &run_as);
    let names: Vec<&str> = env.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "COLORTERM",
            "HOME",
            "LANG",
            "LC_ALL",
            "LOGNAME",
            "NO_COLOR",
            "PATH",
            "SHELL",
            "TERM",
            "TZ",
            "USER"
        ]
    );
    assert_eq!(env["PATH"], SECURE_PATH);
    assert_eq!(env["HOME"], "/root");
    assert_eq!(env["USER"], "root");
    assert_eq!(env["SHELL"], "/bin/bash");
}

#[test]
fn signal_names() {
    assert_eq!(signal_named("INT"), Some(Signal::SIGINT));
    assert_eq!(signal_named("WINCH"), Some(Signal::SIGWINCH));
    assert_eq!(signal_named("USR2"), Some(Signal::SIGUSR2));
    assert_eq!(signal_named("KILL"), None, "not on the list");
    assert_eq!(signal_named("SIGINT"), None, "names come without SIG");
    assert_eq!(signal_named("STOP"), None);
}

#[test]
fn an_unknown_user_is_refused() {
    let command = Command {
        program: "/bin/true".into(),
        argv: vec!["x".into()],
        run_as: "no-such-user-epm".into(),
    };
    let root = crate::grants::program::Caller {
        uid: 0,
        gid: 0,
        groups: vec![0],
    };
    let program = Program::for_elevation("/bin/true", &root).unwrap();
    let none = BTreeMap::new();
    let error = RunSpec::new(&command, program, "/".into(), &none, None, None).unwrap_err();
    assert!(matches!(error, RunError::UnknownUser(_)), "{error}");
    assert!(matches!(
        error.response(),
        Response::Error {
            code: ErrorCode::NotFound,
            ..
        }
    ));
}

/// Whether the spawn tests can run (they change user ids: root only).
fn as_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        true
    } else {
        eprintln!("skipped: starting commands as another user needs root");
        false
    }
}

fn spec(argv: &[&str], tty: Option<TermSize>) -> RunSpec {
    RunSpec {
        program: argv[0].into(),
        checked: None,
        script: false,
        argv: argv.iter().map(|&a| a.into()).collect(),
        run_as: root(),
        cwd: "/".into(),
        env: command_env(&BTreeMap::new(), &root()),
        tty,
        rule_id: Some("test-rule".into()),
    }
}

/// A daemon side and a client side that has said hello.
fn connected() -> (ServerConnection, Connection) {
    let (client, server) = UnixStream::pair().unwrap();
    let hello = thread::spawn(move || {
        let mut client = Connection::new(client);
        client
            .send(&Request::Hello {
                protocol: PROTOCOL_VERSION,
                client: "test".into(),
            })
            .unwrap();
        assert!(matches!(
            client.recv::<Response>().unwrap(),
            Some(Response::Welcome { .. })
        ));
        client
    });
    let server = ServerConnection::accept(server, "test", |_| true).unwrap();
    (server, hello.join().unwrap())
}

/// stdin (nothing), and stdout/stderr socket pairs: (stdio, out, err).
fn piped() -> (Vec<OwnedFd>, UnixStream, UnixStream) {
    let (stdin_keep, stdin) = UnixStream::pair().unwrap();
    drop(stdin_keep);
    let (out, out_child) = UnixStream::pair().unwrap();
    let (err, err_child) = UnixStream::pair().unwrap();
    (
        vec![stdin.into(), out_child.into(), err_child.into()],
        out,
        err,
    )
}

fn read_all(mut stream: UnixStream) -> String {
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text
}

#[test]
fn a_command_runs_and_its_status_and_output_come_back() {
    if !as_root() {
        return;
    }
    let (mut server, mut client) = connected();
    let (stdio, out, err) = piped();
    let client = thread::spawn(move || {
        let started = client.recv::<Response>().unwrap().unwrap();
        let exited = client.recv::<Response>().unwrap().unwrap();
        (started, exited)
    });
    let end = run(
        &mut server,
        spec(
            &["/bin/sh", "-c", "echo out; echo err >&2; pwd; exit 3"],
            None,
        ),
        stdio,
        |_| {},
    )
    .unwrap();
    let (started, exited) = client.join().unwrap();
    assert_eq!(
        started,
        Response::Started {
            pid: end.pid,
            rule_id: Some("test-rule".into())
        }
    );
    let status = ExitStatus {
        code: Some(3),
        signal: None,
    };
    assert_eq!(exited, Response::Exited(status));
    assert_eq!(end.status, status);
    assert!(!end.caller_left && !end.on_pty);
    assert_eq!(read_all(out), "out\n/\n");
    assert_eq!(read_all(err), "err\n");
}

/// Runs `spec` to its end; its stdout.
fn output_of(spec: RunSpec) -> String {
    let (mut server, mut client) = connected();
    let (stdio, out, _err) = piped();
    let client = thread::spawn(move || {
        let _started = client.recv::<Response>().unwrap();
        let _exited = client.recv::<Response>().unwrap();
    });
    run(&mut server, spec, stdio, |_| {}).unwrap();
    client.join().unwrap();
    read_all(out)
}

#[test]
fn the_checked_descriptor_runs_whatever_the_path_names_by_then() {
    if !as_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tool");
    for (checked, swapped, script, expected) in [
        (
            "#!/bin/sh\necho checked\n",
            "#!/bin/sh\necho swapped\n",
            true,
            "checked\n",
        ),
        ("/usr/bin/echo", "/usr/bin/true", false, "checked\n"),
    ] {
        let write = |what: &str| {
            let staged = dir.path().join("staged");
            if what.starts_with('/') {
                std::fs::copy(what, &staged).unwrap();
            } else {
                std::fs::write(&staged, what).unwrap();
            }
            std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o755)).unwrap();
            std::fs::rename(&staged, &path).unwrap();
        };
        write(checked);
        let file = std::fs::File::open(&path).unwrap();
        write(swapped);
        let mut spec = spec(&[path.to_str().unwrap(), "checked"], None);
        spec.checked = Some(Arc::new(file));
        spec.script = script;
        assert_eq!(output_of(spec), expected, "{checked}");
    }
}

#[test]
fn a_missing_directory_runs_in_root_and_says_so() {
    if !as_root() {
        return;
    }
    let (mut server, mut client) = connected();
    let (stdio, out, err) = piped();
    let client = thread::spawn(move || {
        client.recv::<Response>().unwrap();
        client.recv::<Response>().unwrap()
    });
    let mut spec = spec(&["/bin/pwd"], None);
    spec.cwd = "/no/such/dir/epm".into();
    run(&mut server, spec, stdio, |_| {}).unwrap();
    client.join().unwrap();
    assert_eq!(read_all(out), "/\n");
    assert!(
        read_all(err).contains("cannot change to directory \"/no/such/dir/epm\""),
        "a warning"
    );
}

#[test]
fn a_missing_program_is_a_clear_error_before_started() {
    if !as_root() {
        return;
    }
    let (mut server, _client) = connected();
    let (stdio, _out, _err) = piped();
    let error = run(
        &mut server,
        spec(&["/no/such/program"], None),
        stdio,
        |_| {},
    )
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        "cannot run /no/such/program: no such program"
    );
    assert!(matches!(
        error.response(),
        Response::Error {
            code: ErrorCode::NotFound,
            ..
        }
    ));
}

#[test]
fn a_forwarded_int_reaches_the_command_even_when_epmd_ignores_it() {
    if !as_root() {
        return;
    }
    // As epmd has it when started from a non-interactive shell's background
    // job: an ignored disposition survives exec unless the child resets it.
    // Set for the whole test process, which no other test minds.
    // SAFETY: changes this process's disposition of one signal, no handler.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    let (mut server, mut client) = connected();
    let (stdio, out, _err) = piped();
    let client = thread::spawn(move || {
        assert!(matches!(
            client.recv::<Response>().unwrap(),
            Some(Response::Started { .. })
        ));
        // Wait until the shell is about to sleep.
        let mut byte = [0u8];
        (&out).read_exact(&mut byte).unwrap();
        client
            .send(&Request::Signal {
                signal: "KILL".into(),
            })
            .unwrap();
        let refused = client.recv::<Response>().unwrap();
        client
            .send(&Request::Signal {
                signal: "INT".into(),
            })
            .unwrap();
        (refused, client.recv::<Response>().unwrap())
    });
    let end = run(
        &mut server,
        spec(&["/bin/sh", "-c", "echo r; exec sleep 30"], None),
        stdio,
        |_| {},
    )
    .unwrap();
    let (refused, exited) = client.join().unwrap();
    assert!(
        matches!(
            refused,
            Some(Response::Error {
                code: ErrorCode::BadRequest,
                ..
            })
        ),
        "{refused:?}"
    );
    let status = ExitStatus {
        code: None,
        signal: Some(libc::SIGINT),
    };
    assert_eq!(exited, Some(Response::Exited(status)));
    assert_eq!(end.status.shell_code(), 130);
}

#[test]
fn the_command_dies_with_its_caller() {
    if !as_root() {
        return;
    }
    let (mut server, mut client) = connected();
    let (stdio, out, _err) = piped();
    let client = thread::spawn(move || {
        assert!(matches!(
            client.recv::<Response>().unwrap(),
            Some(Response::Started { .. })
        ));
        let mut byte = [0u8];
        (&out).read_exact(&mut byte).unwrap();
        drop(client);
    });
    // The shell ignores SIGHUP: SIGKILL follows after the grace.
    let end = run(
        &mut server,
        spec(
            &["/bin/sh", "-c", "trap '' HUP; echo r; sleep 30 & wait"],
            None,
        ),
        stdio,
        |_| {},
    )
    .unwrap();
    client.join().unwrap();
    assert!(end.caller_left);
    assert_eq!(end.status.signal, Some(libc::SIGKILL), "{:?}", end.status);
    assert!(end.duration < Duration::from_secs(10));
}

#[test]
fn on_a_terminal_the_command_gets_a_pty() {
    if !as_root() {
        return;
    }
    // The caller's terminal: a pty of its own.
    let caller = nix::pty::openpty(None, None).unwrap();
    let caller_slave = caller.slave;
    let mut caller_master = std::fs::File::from(caller.master);
    let (mut server, mut client) = connected();
    let stdio = vec![
        caller_slave.try_clone().unwrap(),
        caller_slave.try_clone().unwrap(),
        caller_slave.try_clone().unwrap(),
    ];
    drop(caller_slave);
    let client = thread::spawn(move || {
        assert!(matches!(
            client.recv::<Response>().unwrap(),
            Some(Response::Started { .. })
        ));
        client
            .send(&Request::Resize(TermSize { rows: 33, cols: 77 }))
            .unwrap();
        client.recv::<Response>().unwrap()
    });
    let typist = thread::spawn(move || {
        thread::sleep(Duration::from_millis(300));
        caller_master.write_all(b"hello\n").unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&seen).contains("got hello") {
            match caller_master.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        (caller_master, String::from_utf8_lossy(&seen).into_owned())
    });
    let end = run(
        &mut server,
        spec(
            &[
                "/bin/sh",
                "-c",
                "test -t 0 && test -t 1 && read line && sleep 0.2 && stty size && echo got $line; exit 4",
            ],
            Some(TermSize { rows: 24, cols: 80 }),
        ),
        stdio,
        |_| {},
    )
    .unwrap();
    let exited = client.join().unwrap();
    let (_master, seen) = typist.join().unwrap();
    assert!(end.on_pty);
    assert_eq!(
        exited,
        Some(Response::Exited(ExitStatus {
            code: Some(4),
            signal: None
        })),
        "{seen}"
    );
    assert!(seen.contains("33 77"), "the resize reached the pty: {seen}");
    assert!(seen.contains("got hello"), "{seen}");
}

#[test]
fn the_command_runs_as_the_run_as_user_with_its_groups() {
    if !as_root() {
        return;
    }
    let Ok(nobody) = RunAs::resolve("nobody") else {
        eprintln!("skipped: no user nobody");
        return;
    };
    let (mut server, mut client) = connected();
    let (stdio, out, _err) = piped();
    let client = thread::spawn(move || {
        client.recv::<Response>().unwrap();
        client.recv::<Response>().unwrap()
    });
    let mut spec = spec(
        &["/bin/sh", "-c", "id -u; id -g; id -G; echo $HOME $USER"],
        None,
    );
    spec.env = command_env(&BTreeMap::new(), &nobody);
    spec.run_as = nobody.clone();
    run(&mut server, spec, stdio, |_| {}).unwrap();
    client.join().unwrap();
    let groups: Vec<String> = nobody.groups.iter().map(u32::to_string).collect();
    assert_eq!(
        read_all(out),
        format!(
            "{}\n{}\n{}\n{} nobody\n",
            nobody.uid,
            nobody.gid,
            groups.join(" "),
            nobody.home
        )
    );
}
