//! The Endpoint Security message mapping (`gate::es_map`), from the plain
//! structs the macOS gate copies each message into: an `AUTH_EXEC` to the
//! facts the decider works on, `es_new_client` result codes to the
//! operator's message, and a sequence of exec, exit and notify events
//! through the process table and the asked-exec set.
#![no_main]

use epm_agent::gate::es_map::{
    AskedExecs, CS_ADHOC, CS_SIGNED, CS_VALID, EsExecInfo, EsFileInfo, EsProcessInfo,
    NewClientFailure, ProcessObserver, ProcessTable, exec_facts, new_client_error_message,
};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

fn file(u: &mut Unstructured<'_>) -> Result<EsFileInfo> {
    Ok(EsFileInfo {
        path: u.arbitrary()?,
        path_truncated: u.arbitrary()?,
        dev: u.arbitrary()?,
        ino: u.arbitrary()?,
        size: u.arbitrary()?,
        mtime_ns: u.arbitrary()?,
        ctime_ns: u.arbitrary()?,
    })
}

fn process(u: &mut Unstructured<'_>) -> Result<EsProcessInfo> {
    Ok(EsProcessInfo {
        executable: file(u)?,
        cdhash: u.arbitrary()?,
        codesigning_flags: u.arbitrary()?,
        team_id: u.arbitrary()?,
        signing_id: u.arbitrary()?,
        is_platform_binary: u.arbitrary()?,
        pid: u.arbitrary()?,
        pidversion: u.arbitrary()?,
        ruid: u.arbitrary()?,
        euid: u.arbitrary()?,
        rgid: u.arbitrary()?,
        egid: u.arbitrary()?,
        auid: u.arbitrary()?,
        ppid: u.arbitrary()?,
        parent_pidversion: u.arbitrary()?,
    })
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let exec = EsExecInfo {
        target: process(u)?,
        argv: u.arbitrary()?,
        parent_path: u.arbitrary()?,
    };
    let facts = exec_facts(&exec);
    let target = &exec.target;
    let flags = target.codesigning_flags;
    let valid = flags & CS_VALID != 0 && flags & CS_SIGNED != 0;
    assert_eq!(facts.pid, target.pid);
    assert_eq!(facts.uid, target.ruid);
    assert_eq!(facts.path, target.executable.path);
    assert!(
        valid || facts.cdhash.is_none(),
        "an invalid signature's cdhash"
    );
    if !valid || flags & CS_ADHOC != 0 {
        assert!(facts.team_id.is_none() && facts.signing_id.is_none());
    }
    if target.executable.path_truncated {
        assert!(facts.content_path.is_none(), "a cut path is hashed");
    }
    let failure = NewClientFailure::from_code(u.arbitrary()?);
    assert!(!new_client_error_message(failure).is_empty());

    let capacity = u.int_in_range(1..=8)?;
    let table = ProcessTable::new(capacity);
    let asked = AskedExecs::new(capacity);
    while !u.is_empty() {
        let pid = u.int_in_range(0..=3)?;
        let version = u.int_in_range(0..=3)?;
        match u.int_in_range(0..=4)? {
            0 => {
                let path: String = u.arbitrary()?;
                table.exec(pid, version, &path);
                assert_eq!(table.path(pid, version).as_deref(), Some(path.as_str()));
            }
            1 => table.exited(pid, version),
            2 => asked.asked(pid, version),
            3 => {
                if asked.executed(pid, version) {
                    // Told once: a second notification finds nothing.
                    assert!(!asked.executed(pid, version));
                }
            }
            _ => {
                let _ = table.path(pid, version);
            }
        }
        assert!(table.len() <= capacity);
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
