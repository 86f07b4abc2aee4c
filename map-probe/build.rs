//! Builds the eBPF programs for `bpfel-unknown-none` and hands the object to
//! the agent through OUT_DIR, so a plain `cargo build` of the agent is enough.
use std::{env, path::PathBuf, process::Command};

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let ebpf_dir = manifest.join("../map-probe-ebpf");
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    for p in ["src", "Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", ebpf_dir.join(p).display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        manifest.join("../map-probe-common/src").display()
    );

    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target_dir = out_dir.join("ebpf-target");
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&ebpf_dir)
        .args(["build", "--release", "--target", "bpfel-unknown-none"])
        .args(["-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        // build-std on a stable toolchain; the pinned toolchain carries rust-src.
        .env("RUSTC_BOOTSTRAP", "1")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            [
                "--cfg=bpf_target_arch=\"x86_64\"",
                "-Cdebuginfo=2",
                "-Clink-arg=--btf",
            ]
            .join("\x1f"),
        );
    // The outer build's wrappers (clippy) and flags are for the host, not for BPF.
    for var in [
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_PROFILE_RELEASE_DEBUG",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("could not run cargo to build the eBPF programs: {e}; run `cargo xtask setup`")
    });
    if !status.success() {
        panic!(
            "building map-probe-ebpf failed (needs Rust 1.98 with rust-src and bpf-linker 0.13: run `cargo xtask setup`)"
        );
    }
    let obj = target_dir.join("bpfel-unknown-none/release/map-probe");
    std::fs::copy(&obj, out_dir.join("map-probe.bpf.o"))
        .unwrap_or_else(|e| panic!("eBPF object missing at {}: {e}", obj.display()));
}
