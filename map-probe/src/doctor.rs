//! What this host supports, checked before anything is loaded so a missing
//! kernel feature or privilege is one clear line rather than an errno.

use std::{fs, path::PathBuf};

use anyhow::{bail, Result};

use crate::probes::{perf_event_cookies_supported, uprobe_multi_supported, UprobeMode};

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
        Ok(())
    }

    /// Without BTF the crash-signal capture (other threads' stacks as Go
    /// dies) cannot load; everything else works.
    pub fn crash_signals(&self) -> bool {
        self.btf
    }

    /// The crash-signal program reads the interrupted thread's registers
    /// with `bpf_task_pt_regs` (Linux 5.15); before that it cannot load.
    pub fn task_regs(&self) -> bool {
        self.privileged()
            && aya::sys::is_helper_supported(
                aya::programs::ProgramType::RawTracePoint,
                aya::sys::BpfHelper::BPF_FUNC_task_pt_regs,
            )
            .unwrap_or(false)
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
        "uprobe_multi    {}  (PID-scoped links, Linux 6.6+)",
        yes(h.privileged() && uprobe_multi_supported())
    );
    println!(
        "BPF cookies     {}  (on perf-event uprobes, Linux 5.15+; without them points are told apart by address)",
        yes(h.privileged() && perf_event_cookies_supported())
    );
    println!(
        "BTF             {}  (/sys/kernel/btf/vmlinux: other threads' stacks at a crash)",
        yes(h.btf)
    );
    println!(
        "task registers  {}  (bpf_task_pt_regs, Linux 5.15+: the same)",
        yes(h.task_regs())
    );
    if h.privileged() {
        println!("uprobe mode     {}", UprobeMode::for_host().as_str());
    }
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

pub fn kernel_version() -> (u32, u32) {
    let rel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut it = rel
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}
