//! What this host supports, checked before anything is loaded so a missing
//! kernel feature or privilege is one clear line rather than an errno.

use std::{fs, path::PathBuf};

use anyhow::{bail, Result};

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Where sysfs is; tests point this elsewhere to play a kernel without a feature.
fn sysfs() -> PathBuf {
    std::env::var_os("MAP_PROBE_SYSFS").map_or_else(|| PathBuf::from("/sys"), PathBuf::from)
}

pub struct Host {
    pub kernel: String,
    pub uprobe_pmu: bool,
    pub btf: bool,
    pub cap_bpf: bool,
    pub cap_perfmon: bool,
    pub cap_sys_admin: bool,
    pub tracefs: bool,
}

impl Host {
    pub fn probe() -> Host {
        let caps = effective_caps();
        let has = |c: u32| caps & (1u64 << c) != 0;
        let sys = sysfs();
        Host {
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into()),
            uprobe_pmu: sys.join("bus/event_source/devices/uprobe/type").exists(),
            btf: sys.join("kernel/btf/vmlinux").exists(),
            cap_bpf: has(CAP_BPF),
            cap_perfmon: has(CAP_PERFMON),
            cap_sys_admin: has(CAP_SYS_ADMIN),
            tracefs: sys.join("kernel/tracing/uprobe_events").exists(),
        }
    }

    pub fn privileged(&self) -> bool {
        (self.cap_bpf && self.cap_perfmon) || self.cap_sys_admin
    }

    /// The checks `attach` and `run` need to pass, in the order a user fixes them.
    pub fn require(&self) -> Result<()> {
        if !self.privileged() {
            bail!(
                "map-probe needs CAP_BPF and CAP_PERFMON (or root) to load eBPF programs: run it as root, e.g. `sudo map-probe ...`"
            );
        }
        if !self.uprobe_pmu {
            bail!(
                "this kernel ({}) has no uprobe support (no {}): map-probe needs CONFIG_UPROBE_EVENTS",
                self.kernel,
                sysfs().join("bus/event_source/devices/uprobe").display()
            );
        }
        if !self.btf {
            bail!(
                "this kernel ({}) exposes no BTF (no {}): map-probe needs CONFIG_DEBUG_INFO_BTF",
                self.kernel,
                sysfs().join("kernel/btf/vmlinux").display()
            );
        }
        if !uprobe_multi() {
            bail!(
                "this kernel ({}) lacks uprobe_multi links with process-wide PID filters: map-probe needs Linux 6.6 or newer",
                self.kernel
            );
        }
        Ok(())
    }
}

fn effective_caps() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

pub fn run() -> Result<bool> {
    let h = Host::probe();
    let yes = |b: bool| if b { "yes" } else { "NO" };
    println!("kernel          {}", h.kernel);
    println!("uprobes         {}  (uprobe perf PMU)", yes(h.uprobe_pmu));
    println!(
        "uprobe_multi    {}  (PID-scoped links)",
        yes(h.privileged() && uprobe_multi())
    );
    println!("BTF             {}  (/sys/kernel/btf/vmlinux)", yes(h.btf));
    println!("CAP_BPF         {}", yes(h.cap_bpf));
    println!("CAP_PERFMON     {}", yes(h.cap_perfmon));
    println!("CAP_SYS_ADMIN   {}", yes(h.cap_sys_admin));
    println!(
        "tracefs         {}  (only bpftrace cross-checks need it)",
        yes(h.tracefs)
    );
    match h.require() {
        Ok(()) => {
            println!("ready: map-probe can attach to Go processes on this host");
            Ok(true)
        }
        Err(e) => {
            println!("not ready: {e}");
            Ok(false)
        }
    }
}

fn uprobe_multi() -> bool {
    aya::sys::is_uprobe_multi_supported(aya::sys::UProbeMultiFeature::ProcessScopedPidFilter)
        .unwrap_or(false)
}
