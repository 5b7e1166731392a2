//! fork + exec + wait of a program N times; prints the mean and the median
//! microseconds per exec. Used by scripts/bench-exec.sh:
//! `exec_loop [N] [PROGRAM]`.
//!
//! The median is printed beside the mean because the benchmark machines
//! are shared: a burst of other load moves the mean of a few thousand
//! execs by more than the effects measured, the median much less. The
//! mean keeps what a burst of execs costs in all (the audit's syncs land
//! on a few of them).

use std::process::Command;
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let runs: usize = args
        .next()
        .and_then(|n| n.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(3000);
    let program = args.next().unwrap_or_else(|| "/bin/true".to_owned());
    // Warm up caches (page cache, the daemon's hash and decision caches).
    for _ in 0..50 {
        let _ = Command::new(&program).status();
    }
    let mut each = Vec::with_capacity(runs);
    let started = Instant::now();
    for _ in 0..runs {
        let exec_started = Instant::now();
        match Command::new(&program).status() {
            Ok(status) if status.success() => {}
            other => {
                eprintln!("exec_loop: {program} failed: {other:?}");
                std::process::exit(1);
            }
        }
        each.push(exec_started.elapsed().as_secs_f64() * 1e6);
    }
    let mean = started.elapsed().as_secs_f64() * 1e6 / runs as f64;
    each.sort_by(f64::total_cmp);
    let median = each[each.len() / 2];
    println!("{mean:.1} {median:.1}");
}
