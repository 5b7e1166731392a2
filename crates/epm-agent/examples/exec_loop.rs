//! fork + exec + wait of a program N times; prints microseconds per exec.
//! Used by scripts/bench-exec.sh: `exec_loop [N] [PROGRAM]`.

use std::process::Command;
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let runs: u32 = args.next().and_then(|n| n.parse().ok()).unwrap_or(3000);
    let program = args.next().unwrap_or_else(|| "/bin/true".to_owned());
    // Warm up caches (page cache, the daemon's hash and decision caches).
    for _ in 0..50 {
        let _ = Command::new(&program).status();
    }
    let started = Instant::now();
    for _ in 0..runs {
        match Command::new(&program).status() {
            Ok(status) if status.success() => {}
            other => {
                eprintln!("exec_loop: {program} failed: {other:?}");
                std::process::exit(1);
            }
        }
    }
    let per_exec = started.elapsed().as_secs_f64() * 1e6 / f64::from(runs);
    println!("{per_exec:.1}");
}
