//! `cargo xtask setup`: installs what building and testing map-probe needs, skipping
//! everything already there (a few seconds when nothing is missing).

use crate::util::{self, cargo_home, cmd, output, output_any, step, TOOLCHAIN};
use std::path::{Path, PathBuf};

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_MAJOR: &str = "22";
const APT_PACKAGES: &[&str] = &["golang-1.19-go", "bpftrace", "wrk", "caddy"];
pub const GO119: &str = "/usr/lib/go-1.19/bin/go";
const MIN_GO: (u32, u32) = (1, 21);

pub fn run() -> Result<(), String> {
    let t0 = std::time::Instant::now();
    let sysroot = rust_toolchain()?;
    let linker = bpf_linker(&sysroot)?;
    apt_packages()?;
    tracefs();
    let go = machine_go_version()?;
    let go127 = newest_go()?;
    let otelcol = crate::otelcol::ensure()?;
    let go119 = version_word(
        &output_any(cmd(GO119).arg("version")).unwrap_or_default(),
        "go",
    );
    let bpftrace = version_word(
        &output_any(cmd("bpftrace").arg("--version")).unwrap_or_default(),
        "v",
    );
    let wrk = output_any(cmd("wrk").arg("-v"))
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .map(|w| w.trim_start_matches("debian/").to_string())
        })
        .unwrap_or_else(|| "?".into());
    step(
        "setup",
        &format!(
            "ready in {:.1}s: rust {TOOLCHAIN}, bpf-linker {linker}, go {go}, go1.19 {go119}, {go127} (GOTOOLCHAIN), bpftrace {bpftrace}, wrk {wrk}, otelcol {otelcol}",
            t0.elapsed().as_secs_f64()
        ),
    );
    Ok(())
}

/// Ensures the pinned toolchain with rust-src, clippy and rustfmt; returns its sysroot.
fn rust_toolchain() -> Result<PathBuf, String> {
    if util::which("rustup").is_none() && !cargo_home()?.join("bin/rustup").is_file() {
        return Err("rustup not found: install rustup first".into());
    }
    if let Some(sysroot) = toolchain_complete() {
        step("setup", &format!("rust {TOOLCHAIN}: present"));
        return Ok(sysroot);
    }
    step("setup", &format!("rust {TOOLCHAIN}: installing"));
    util::run(cmd("rustup").args([
        "toolchain",
        "install",
        TOOLCHAIN,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
        "--component",
        "clippy",
        "--component",
        "rustfmt",
    ]))?;
    if toolchain_complete().is_none() {
        // An existing toolchain may not pick up components from `toolchain install`.
        util::run(cmd("rustup").args([
            "component",
            "add",
            "--toolchain",
            TOOLCHAIN,
            "rust-src",
            "clippy",
            "rustfmt",
        ]))?;
    }
    toolchain_complete().ok_or_else(|| format!("rust {TOOLCHAIN} still incomplete after install"))
}

/// The sysroot if the toolchain runs and has rust-src, clippy and rustfmt.
fn toolchain_complete() -> Option<PathBuf> {
    output(cmd("rustup").args(["run", TOOLCHAIN, "rustc", "--version"]))?;
    let sysroot = PathBuf::from(output(
        cmd("rustup").args(["run", TOOLCHAIN, "rustc", "--print", "sysroot"]),
    )?);
    let ok = sysroot.join("lib/rustlib/src/rust/library").is_dir()
        && sysroot.join("bin/cargo-clippy").is_file()
        && sysroot.join("bin/rustfmt").is_file();
    ok.then_some(sysroot)
}

/// Ensures `bpf-linker` 0.13.0 linked against rustc's own libLLVM; returns its version.
fn bpf_linker(sysroot: &Path) -> Result<String, String> {
    // Kept up to date even when the linker is present: its RUNPATH points here.
    let prefix = llvm_prefix(sysroot)?;
    if let Some(v) = bpf_linker_version() {
        if v == BPF_LINKER_VERSION {
            step("setup", &format!("bpf-linker {v}: present"));
            return Ok(v);
        }
        step(
            "setup",
            &format!("bpf-linker: found {v}, want {BPF_LINKER_VERSION}"),
        );
    }
    step(
        "setup",
        &format!("bpf-linker {BPF_LINKER_VERSION}: building against rustc's LLVM (a few minutes)"),
    );
    util::run(
        util::cargo()
            .current_dir(cargo_home()?)
            .env("LLVM_PREFIX", &prefix)
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--force",
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{LLVM_MAJOR}")),
    )?;
    match bpf_linker_version() {
        Some(v) if v == BPF_LINKER_VERSION => Ok(v),
        Some(v) => Err(format!(
            "bpf-linker on PATH is {v} after installing {BPF_LINKER_VERSION}: check PATH order"
        )),
        None => Err("bpf-linker was installed but does not run".into()),
    }
}

/// The version `bpf-linker --version` prints, if it runs.
fn bpf_linker_version() -> Option<String> {
    let out = output(cmd("bpf-linker").arg("--version"))?;
    out.split_whitespace().nth(1).map(str::to_string)
}

/// `$CARGO_HOME/map-probe-llvm/lib/{libLLVM.so,<real name>}` -> rustc's libLLVM.
fn llvm_prefix(sysroot: &Path) -> Result<PathBuf, String> {
    let lib_dir = sysroot.join("lib");
    let want = format!("libLLVM.so.{LLVM_MAJOR}");
    let mut real: Vec<PathBuf> = std::fs::read_dir(&lib_dir)
        .map_err(|e| format!("cannot read {}: {e}", lib_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            // The real shared object, not a small linker script or a symlink.
            name.starts_with(&want)
                && std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file() && m.len() > 1 << 20)
        })
        .collect();
    real.sort();
    let real = real.pop().ok_or_else(|| {
        format!(
            "no {want}* in {} (rust {TOOLCHAIN} ships its LLVM there)",
            lib_dir.display()
        )
    })?;
    let prefix = cargo_home()?.join("map-probe-llvm");
    let plib = prefix.join("lib");
    std::fs::create_dir_all(&plib).map_err(|e| format!("cannot create {}: {e}", plib.display()))?;
    let real_name = real.file_name().unwrap_or_default().to_os_string();
    for name in [std::ffi::OsString::from("libLLVM.so"), real_name] {
        let link = plib.join(&name);
        if std::fs::read_link(&link).is_ok_and(|t| t == real) {
            continue;
        }
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&real, &link)
            .map_err(|e| format!("cannot link {}: {e}", link.display()))?;
    }
    Ok(prefix)
}

fn apt_packages() -> Result<(), String> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            output(cmd("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_none_or(|s| s != "install ok installed")
        })
        .collect();
    if missing.is_empty() {
        step(
            "setup",
            &format!("apt packages: present ({})", APT_PACKAGES.join(", ")),
        );
        return Ok(());
    }
    if !util::is_root() {
        return Err(format!("need root to install {}", missing.join(" ")));
    }
    step(
        "setup",
        &format!("apt packages: installing {}", missing.join(" ")),
    );
    util::run(
        cmd("apt-get")
            .args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    util::run(
        cmd("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// bpftrace needs tracefs; a failure here is only a warning.
fn tracefs() {
    if Path::new("/sys/kernel/tracing/uprobe_events").exists() {
        return;
    }
    step("setup", "tracefs: mounting at /sys/kernel/tracing");
    let ok = cmd("mount")
        .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        step(
            "setup",
            "warning: could not mount tracefs (bpftrace will not work)",
        );
    }
}

/// The machine's `go` version, which must be >= 1.21.
fn machine_go_version() -> Result<String, String> {
    let go = util::machine_go();
    let out = output(cmd(&go).args(["env", "GOVERSION"]))
        .ok_or_else(|| format!("`{} env GOVERSION` failed: is Go installed?", go.display()))?;
    let v = out.trim_start_matches("go").to_string();
    let mut parts = v
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) < MIN_GO {
        return Err(format!(
            "{} is go {v}; need >= {}.{}",
            go.display(),
            MIN_GO.0,
            MIN_GO.1
        ));
    }
    Ok(v)
}

/// The Go releases the tests build with through `GOTOOLCHAIN` (each minor's latest patch,
/// 1.20 to the newest, 1.27): the machine's `go` fetches each from the Go module proxy into
/// the module cache the first time (~10 s and 76 MB each). 1.19 is Debian's package.
pub const FETCHED_GO: &[&str] = &[
    "go1.20.14",
    "go1.21.13",
    "go1.22.12",
    "go1.23.12",
    "go1.24.13",
    "go1.25.14",
    "go1.27.4",
];

fn newest_go() -> Result<String, String> {
    for v in FETCHED_GO {
        let out = output(cmd(util::machine_go()).arg("version").env("GOTOOLCHAIN", v)).ok_or_else(
            || format!("`GOTOOLCHAIN={v} go version` failed: is the Go module proxy reachable?"),
        )?;
        if !out.contains(v) {
            return Err(format!("asked for {v}, got `{out}`"));
        }
    }
    Ok(format!(
        "{} releases {}..{}",
        FETCHED_GO.len(),
        FETCHED_GO[0],
        FETCHED_GO[FETCHED_GO.len() - 1]
    ))
}

/// The first word of `text` that starts with `prefix` followed by a digit, sans prefix.
fn version_word(text: &str, prefix: &str) -> String {
    text.split_whitespace()
        .filter_map(|w| w.strip_prefix(prefix))
        .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))
        .unwrap_or("?")
        .to_string()
}
