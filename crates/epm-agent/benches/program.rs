//! What opening a program for elevation costs (`Program::for_elevation`):
//! the root-controlled walk, the open as the caller (a thread with their
//! ids when the caller is not root), and the SHA-256 read through the
//! descriptor; and the end-of-session setuid scan. Run as root:
//! `cargo bench -p epm-agent --bench program`.
#![allow(clippy::unwrap_used, missing_docs)]

use criterion::{Criterion, criterion_group, criterion_main};
use epm_agent::program::{Caller, Program};

fn open(c: &mut Criterion) {
    let root = Caller {
        uid: 0,
        gid: 0,
        groups: vec![0],
    };
    let nobody = Caller {
        uid: 65534,
        gid: 65534,
        groups: vec![65534],
    };
    let mut group = c.benchmark_group("program");
    group.bench_function("for_elevation /usr/bin/id as root", |b| {
        b.iter(|| Program::for_elevation("/usr/bin/id", &root).unwrap());
    });
    if nix::unistd::geteuid().is_root() {
        group.bench_function("for_elevation /bin/sh as nobody", |b| {
            b.iter(|| Program::for_elevation("/bin/sh", &nobody).unwrap());
        });
    }
    group.finish();
}

/// The end-of-session setuid scan over `/usr` (warm cache), as many
/// entries as it has, up to the default limit.
fn setuid_scan(c: &mut Criterion) {
    let roots = vec![std::path::PathBuf::from("/usr")];
    let visited = epm_agent::session_leftovers::new_setuid_files(&roots, 0, 200_000).visited;
    let mut group = c.benchmark_group("session_leftovers");
    group.sample_size(10);
    group.bench_function(format!("setuid scan of /usr ({visited} entries)"), |b| {
        b.iter(|| epm_agent::session_leftovers::new_setuid_files(&roots, 0, 200_000));
    });
    group.finish();
}

criterion_group!(benches, open, setuid_scan);
criterion_main!(benches);
