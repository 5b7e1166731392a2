//! Compiles the BPF program (src/bpf/exec_hook.bpf.c) with clang for
//! Linux targets. Other targets get nothing to compile: the hook is
//! Linux's, and a macOS build must not need clang's BPF backend.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=src/bpf");
    println!("cargo:rerun-if-env-changed=CLANG");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let arch = match std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("x86_64") => "x86",
        Ok("aarch64") => "arm64",
        Ok(other) => panic!("the exec hook has no BPF build for {other}"),
        Err(_) => panic!("cargo sets CARGO_CFG_TARGET_ARCH"),
    };
    let multiarch = match arch {
        "x86" => "x86_64-linux-gnu",
        _ => "aarch64-linux-gnu",
    };
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
    let object = out.join("exec_hook.bpf.o");
    let status = Command::new(&clang)
        .args([
            "-g", "-O2", "-target", "bpf", "-mcpu=v3", "-Wall", "-Werror",
        ])
        .arg(format!("-D__TARGET_ARCH_{arch}"))
        // <linux/bpf.h> and <asm/types.h> (linux-libc-dev), <bpf/*.h> (libbpf-dev).
        .arg(format!("-I/usr/include/{multiarch}"))
        .arg("-Isrc/bpf")
        .args(["-c", "src/bpf/exec_hook.bpf.c", "-o"])
        .arg(&object)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {clang} to build the BPF exec hook: {e} \
                 (install clang, libbpf-dev and linux-libc-dev, or set CLANG)"
            )
        });
    assert!(
        status.success(),
        "{clang} failed to build src/bpf/exec_hook.bpf.c ({status})"
    );
}
