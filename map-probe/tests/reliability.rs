//! map-probe is safe to leave on a production host: churn of probe windows,
//! SIGKILLs at random moments, targets that churn threads or exec or exit,
//! older kernels (the fallbacks forced here), full tables, least privilege,
//! and a BPF object that never writes the target's memory.

mod common;

use std::{
    collections::HashSet,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{
    attach_json, go_fixture, map_probe_bin, read_json, require_root, start_fixture, tmp,
    workspace_root, Child, GoToolchain, Variant,
};
use serde_json::Value;

/// The executable mappings of `pid`'s own binary, read from /proc/PID/mem,
/// compared byte for byte with the file: the (file offset, in memory, in
/// the file) of every byte that differs.
fn text_differs_from_file(pid: u32) -> Option<Vec<(usize, u8, u8)>> {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let file = std::fs::read(&exe).ok()?;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).ok()?;
    let mut differ = Vec::new();
    let mut compared = 0;
    for l in maps.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 6 || !f[1].contains('x') || Path::new(f[5]) != exe {
            continue;
        }
        let (a, b) = f[0].split_once('-')?;
        let (start, end) = (
            u64::from_str_radix(a, 16).ok()?,
            u64::from_str_radix(b, 16).ok()?,
        );
        let off = u64::from_str_radix(f[2], 16).ok()? as usize;
        let len = ((end - start) as usize).min(file.len().saturating_sub(off));
        let mut buf = vec![0u8; len];
        mem.read_exact_at(&mut buf, start).ok()?;
        differ.extend(
            buf.iter()
                .zip(&file[off..off + len])
                .enumerate()
                .filter(|(_, (x, y))| x != y)
                .map(|(i, (x, y))| (off + i, *x, *y)),
        );
        compared += len;
    }
    assert!(
        compared > 100_000,
        "compared only {compared} bytes of {}",
        exe.display()
    );
    Some(differ)
}

/// Waits (up to 5 s: the kernel removes breakpoints as the links close)
/// until the target's code equals its file again.
fn assert_unprobed(pid: u32, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let d = text_differs_from_file(pid).expect("read the target's text");
        if d.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {} bytes of the target's code still differ from its file (offset, memory, file): {:x?}",
            d.len(),
            &d[..d.len().min(8)]
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The names our eBPF object gives its programs and maps (maps' cut to the
/// kernel's 15 characters; aya names the object's data sections' maps after
/// them, aya-log its ring buffer AYA_LOGS).
const OUR_PROGRAMS: [&str; 10] = [
    "lock_wait",
    "map_write",
    "go_fatal",
    "crash_signal",
    "lock_wait_pe",
    "map_write_pe",
    "go_fatal_pe",
    "lock_wait_ip",
    "map_write_ip",
    "go_fatal_ip",
];
const OUR_MAPS: [&str; 22] = [
    "SITES",
    "STACKS",
    "HISTS",
    "SITE_LOCKS",
    "POINT_HITS",
    "INFLIGHT",
    "ADDR_COOKIES",
    "STATS",
    "CONTROL",
    "WRITERS",
    "ACTIVE",
    "WRITING",
    "OVERLAPS",
    "FATAL_AT",
    "FATALS",
    "CRASH_STACKS",
    "FATAL_SCRATCH",
    "AYA_LOGS",
    ".rodata",
    ".rodata.cst8",
    ".data",
    ".bss",
];

/// What was in the kernel when a test began: programs are told new by
/// their load time, maps and links (which carry none) by their IDs, which
/// the kernel never reuses while it runs.
struct KernelBefore {
    since: Duration,
    maps: HashSet<u32>,
    links: HashSet<u32>,
}

impl KernelBefore {
    fn now() -> KernelBefore {
        KernelBefore {
            since: boottime(),
            maps: aya::maps::loaded_maps()
                .filter_map(Result::ok)
                .map(|m| m.id())
                .collect(),
            links: aya::programs::loaded_links()
                .filter_map(Result::ok)
                .map(|l| l.id())
                .collect(),
        }
    }

    /// Our programs, maps and links made since then that nothing keeps
    /// alive: no live process holds a descriptor to them and, for a map, no
    /// live program uses it. What a map-probe that is gone left in the
    /// kernel; another map-probe still running (a parallel test) holds its own.
    fn ours_left(&self) -> Vec<String> {
        let held = held_ids();
        let mut left = Vec::new();
        let programs: Vec<_> = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .collect();
        let ours = |n: Option<&str>, names: &[&str]| n.is_some_and(|n| names.contains(&n));
        let mut our_prog_ids = HashSet::new();
        for p in &programs {
            if !ours(p.name_as_str(), &OUR_PROGRAMS) {
                continue;
            }
            our_prog_ids.insert(p.id());
            let new = p.loaded_at().is_some_and(|t| {
                t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default()
                    >= unix_of_boottime(self.since)
            });
            if new && !held.programs.contains(&p.id()) {
                left.push(format!("program {} ({})", p.id(), p.name_as_str().unwrap()));
            }
        }
        let used_maps: HashSet<u32> = programs
            .iter()
            .filter_map(|p| p.map_ids().ok().flatten())
            .flatten()
            .collect();
        for m in aya::maps::loaded_maps().filter_map(Result::ok) {
            if ours(m.name_as_str(), &OUR_MAPS)
                && !self.maps.contains(&m.id())
                && !held.maps.contains(&m.id())
                && !used_maps.contains(&m.id())
            {
                left.push(format!("map {} ({})", m.id(), m.name_as_str().unwrap()));
            }
        }
        for l in aya::programs::loaded_links().filter_map(Result::ok) {
            if our_prog_ids.contains(&l.program_id())
                && !self.links.contains(&l.id())
                && !held.links.contains(&l.id())
            {
                left.push(format!("link {} (program {})", l.id(), l.program_id()));
            }
        }
        left
    }

    /// `ours_left`, once the kernel has finished releasing what exited
    /// processes dropped (a link waits out a grace period after its last
    /// descriptor closes, a map goes after the programs using it): empty
    /// within 5 s, or what is left then.
    fn left(&self) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = self.ours_left();
            if left.is_empty() || Instant::now() >= deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// BPF object IDs that live processes hold descriptors to (/proc/*/fdinfo).
#[derive(Default)]
struct Held {
    programs: HashSet<u32>,
    maps: HashSet<u32>,
    links: HashSet<u32>,
}

fn held_ids() -> Held {
    let mut held = Held::default();
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(fds) = std::fs::read_dir(p.path().join("fdinfo")) else {
            continue;
        };
        for fd in fds.flatten() {
            let info = std::fs::read_to_string(fd.path()).unwrap_or_default();
            for l in info.lines() {
                let Some((k, v)) = l.split_once(':') else {
                    continue;
                };
                let Ok(id) = v.trim().parse::<u32>() else {
                    continue;
                };
                match k {
                    // A link's fdinfo names its program too: a held link
                    // holds its program.
                    "prog_id" => held.programs.insert(id),
                    "map_id" => held.maps.insert(id),
                    "link_id" => held.links.insert(id),
                    _ => false,
                };
            }
        }
    }
    held
}

fn boottime() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the struct we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn unix_of_boottime(t: Duration) -> Duration {
    let now_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    now_unix.saturating_sub(boottime().saturating_sub(t))
}

fn windows(r: &Value) -> u64 {
    r["sampling"]["windows"].as_u64().unwrap()
        + r["sampling"]["map_writes"]["windows"].as_u64().unwrap_or(0)
}

/// The fixture's writes/s: the median of `n` one-second samples (it prints
/// `writes=N` on SIGUSR1).
fn rate(fixture: &mut Child, n: usize) -> f64 {
    let read = |f: &mut Child| {
        f.signal(libc::SIGUSR1);
        f.wait_for_line("writes=", Duration::from_secs(5))
            .trim_start_matches("writes=")
            .parse::<f64>()
            .unwrap()
    };
    let mut rates = Vec::new();
    let mut last = read(fixture);
    for _ in 0..n {
        let t = Instant::now();
        std::thread::sleep(Duration::from_secs(1));
        let now = read(fixture);
        rates.push((now - last) / t.elapsed().as_secs_f64());
        last = now;
    }
    rates.sort_by(f64::total_cmp);
    rates[n / 2]
}

/// The end of a stress test on the mapsafe fixture: nothing of ours left in
/// the kernel, and the fixture's own checksum of its work right.
fn assert_clean_end(fixture: &mut Child, before: &KernelBefore) {
    assert_eq!(
        before.left(),
        Vec::<String>::new(),
        "BPF programs, maps or links of ours left in the kernel"
    );
    fixture.signal(libc::SIGTERM);
    let line = fixture.wait_for_line("exit writes=", Duration::from_secs(10));
    assert!(line.ends_with("checksum=ok"), "{line}");
}

/// 1,000 probe windows opened and closed on a live, busy target: it never
/// crashes or stalls, its own checksum holds, its throughput comes back,
/// and afterwards its code equals its file and none of our BPF programs is
/// left in the kernel.
#[test]
fn a_thousand_windows_leave_no_trace() {
    require_root();
    let kernel = KernelBefore::now();
    let bin = go_fixture("mapsafe", GoToolchain::Go126, Variant::Pie);
    let mut fixture = start_fixture(&bin, &["-mode", "locked", "-duration", "0"]);
    let before = rate(&mut fixture, 5);
    // A hit "costs" 100 ms, so every window closes at its first tick, and
    // the gap is capped at 0.1 s: windows as fast as attach and detach go.
    let t = Instant::now();
    let (out, r) = attach_json(
        fixture.pid(),
        "churn-1000",
        // ~12 windows a second (lock and map windows side by side).
        &[
            "--duration",
            "100",
            "--hit-cost-us",
            "100000",
            "--max-gap",
            "0.1",
            "--budget",
            "100",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let n = windows(&r);
    assert!(n >= 1000, "only {n} windows: {}", r["sampling"]);
    assert!(fixture.running(), "the target must survive");
    let after = rate(&mut fixture, 5);
    eprintln!(
        "{n} windows in {:.0} s; target {before:.0} writes/s before, {after:.0} after",
        t.elapsed().as_secs_f64()
    );
    // Medians of five seconds each side; this VM's own noise is about a third.
    assert!(
        after > 0.6 * before,
        "throughput must recover: {before:.0} -> {after:.0} writes/s"
    );
    assert_unprobed(fixture.pid(), "after 1,000 windows");
    assert_clean_end(&mut fixture, &kernel);
}

/// map-probe SIGKILLed 50 times at random moments (loading, attaching,
/// inside windows, detaching, writing its outputs): the target survives,
/// is left unprobed, and an output is either absent or whole.
#[test]
fn sigkill_at_random_moments_harms_nothing() {
    require_root();
    let kernel = KernelBefore::now();
    let bin = go_fixture("mapsafe", GoToolchain::Go126, Variant::Plain);
    let mut fixture = start_fixture(&bin, &["-mode", "locked", "-duration", "0"]);
    let pid = fixture.pid().to_string();
    let json = tmp("killed.json");
    let svg = tmp("killed.svg");
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut whole = 0;
    for i in 0..50 {
        let _ = std::fs::remove_file(&json);
        let _ = std::fs::remove_file(&svg);
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let after = Duration::from_millis(seed % 1600);
        let mut probe = Command::new(map_probe_bin())
            .args([
                "attach",
                "--pid",
                &pid,
                "--duration",
                "1",
                "--max-gap",
                "0.1",
                "--budget",
                "5",
            ])
            .args([
                "--json",
                json.to_str().unwrap(),
                "--flamegraph",
                svg.to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(after);
        let _ = probe.kill();
        let _ = probe.wait();
        assert!(
            fixture.running(),
            "kill {i} after {after:?}: the target died"
        );
        assert_unprobed(fixture.pid(), &format!("kill {i} after {after:?}"));
        if json.exists() {
            let text = std::fs::read_to_string(&json).unwrap();
            serde_json::from_str::<Value>(&text).unwrap_or_else(|e| {
                panic!("kill {i}: a partial JSON report was left in place: {e}")
            });
            whole += 1;
        }
    }
    eprintln!("50 kills: target unharmed every time; {whole} runs had finished their JSON");
    assert_clean_end(&mut fixture, &kernel);
}

/// A target that starts and ends thousands of threads and goroutines and
/// forks children; one that exits mid-run; one that execs another program:
/// no hang, the right exit status, outputs for the time until then.
#[test]
fn targets_that_churn_exit_or_exec() {
    require_root();
    let bin = go_fixture("churn", GoToolchain::Go126, Variant::Plain);
    let mut busy = start_fixture(&bin, &["-duration", "60s"]);
    let (out, r) = attach_json(
        busy.pid(),
        "churn-busy",
        &["--duration", "4", "--budget", "5", "--max-gap", "0.2"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        r["sites"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["function"] == "main.work"),
        "{}",
        r["sites"]
    );
    assert!(busy.running());
    busy.signal(libc::SIGTERM);
    drop(busy);

    for (args, why) in [
        (vec!["-duration", "60s", "-exit-after", "2s"], "exited"),
        (
            vec!["-duration", "60s", "-exec-after", "2s"],
            "exec'd another program",
        ),
    ] {
        let fixture = start_fixture(&bin, &args);
        let t = Instant::now();
        let (out, r) = attach_json(
            fixture.pid(),
            "churn-ends",
            &["--duration", "30", "--budget", "5", "--max-gap", "0.2"],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{why}: {err}");
        assert!(err.contains(why), "{err}");
        assert!(t.elapsed() < Duration::from_secs(10), "{why}: noticed late");
        assert_eq!(r["end"], "target-exited");
        assert!(
            !r["sites"].as_array().unwrap().is_empty(),
            "{why}: what was seen is kept"
        );
    }
}

/// On a kernel without uprobe_multi map-probe plants classic perf-event
/// uprobes, one per point, with the point's cookie on the link (5.15+) or,
/// before BPF cookies, found by the address that trapped: both forced here,
/// the reports are the same.
#[test]
fn perf_event_uprobes_give_the_same_reports() {
    require_root();
    let bin = go_fixture("contended", GoToolchain::Go126, Variant::Pie);
    let fixture = start_fixture(&bin, &["-duration", "60s"]);
    let sites = |mode: &str| -> HashSet<(String, String, u64)> {
        let path = tmp(&format!("fallback-{mode}.json"));
        let out = Command::new(map_probe_bin())
            .env("MAP_PROBE_UPROBE_MODE", mode)
            .args([
                "attach",
                "--pid",
                &fixture.pid().to_string(),
                "--duration",
                "3",
                "--budget",
                "unlimited",
            ])
            .args(["--json", path.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r = read_json(&path);
        let timed: u64 = r["sites"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["wait"]["timed"].as_u64().unwrap_or(0))
            .sum();
        assert!(timed > 0, "{mode}: no wait was timed: {r}");
        assert_eq!(r["drops"]["unknown_address"], 0, "{mode}: {}", r["drops"]);
        r["sites"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["function"].as_str().unwrap().starts_with("main."))
            .map(|s| {
                (
                    s["function"].as_str().unwrap().into(),
                    s["kind"].as_str().unwrap().into(),
                    s["line"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let multi = sites("multi");
    assert!(multi.len() >= 5, "{multi:?}");
    for mode in ["perf-event", "perf-event-ip"] {
        assert_eq!(
            multi,
            sites(mode),
            "{mode}: the attach paths must find the same sites"
        );
    }
    for (mode, says) in [
        ("perf-event", "perf-event uprobes, one per point"),
        ("perf-event-ip", "told apart by address"),
    ] {
        let doctor = Command::new(map_probe_bin())
            .env("MAP_PROBE_UPROBE_MODE", mode)
            .arg("doctor")
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&doctor.stdout).contains(says));
    }

    // The crash capture too, and a concurrent write seen as one.
    for mode in ["perf-event", "perf-event-ip"] {
        let crash = go_fixture("mapcrash", GoToolchain::Go126, Variant::Plain);
        let fixture = start_fixture(&crash, &["-delay", "2s"]);
        let path = tmp(&format!("fallback-crash-{mode}.json"));
        let out = Command::new(map_probe_bin())
            .env("MAP_PROBE_UPROBE_MODE", mode)
            .args([
                "attach",
                "--pid",
                &fixture.pid().to_string(),
                "--duration",
                "30",
                "--json",
                path.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(3),
            "{mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r = read_json(&path);
        let fatal = r["risks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["kind"] == "fatal")
            .expect("a fatal risk");
        assert_eq!(fatal["message"], "concurrent map writes");
        assert!(
            fatal["writers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|w| w["state"] == "throwing" && w["function"] == "main.writer"),
            "{mode}: {fatal}"
        );
    }
}

/// Without BTF the crash-signal capture is dropped with one line; the rest
/// works (a sysfs tree without BTF plays the kernel).
#[test]
fn without_btf_only_the_crash_signals_go() {
    require_root();
    let fake = tmp("sysfs-without-btf");
    let _ = std::fs::remove_dir_all(&fake);
    let pmu = fake.join("bus/event_source/devices/uprobe");
    std::fs::create_dir_all(&pmu).unwrap();
    std::fs::write(pmu.join("type"), "7\n").unwrap();
    let bin = go_fixture("contended", GoToolchain::Go126, Variant::Plain);
    let fixture = start_fixture(&bin, &["-duration", "60s"]);
    let path = tmp("no-btf.json");
    let out = Command::new(map_probe_bin())
        .env("MAP_PROBE_SYSFS", &fake)
        .args([
            "attach",
            "--pid",
            &fixture.pid().to_string(),
            "--duration",
            "2",
            "--json",
            path.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("no BTF") && err.contains("throwing goroutine"),
        "{err}"
    );
    assert!(!read_json(&path)["sites"].as_array().unwrap().is_empty());
}

/// Tables that fill (shrunk here: 64 sites, 128 stacks, against a target
/// waiting from 262,144 distinct stacks) count what they lose in `drops`,
/// and map-probe's memory stays bounded.
#[test]
fn full_tables_are_counted_and_memory_stays_bounded() {
    require_root();
    let bin = go_fixture("manystacks", GoToolchain::Go126, Variant::Plain);
    let fixture = start_fixture(&bin, &["-duration", "60s", "-workers", "16"]);
    let path = tmp("full-tables.json");
    let mut probe = attach_for(
        fixture.pid(),
        5,
        &path,
        &["--budget", "unlimited", "--no-wait-time"],
    );
    probe
        .env("MAP_PROBE_MAX_SITES", "64")
        .env("MAP_PROBE_MAX_STACKS", "128");
    let peak_kb = run_measuring_rss(probe);
    let r = read_json(&path);
    let d = &r["drops"];
    eprintln!(
        "shrunk tables: drops {d}; {} sites; peak RSS {} MB",
        r["sites"].as_array().unwrap().len(),
        peak_kb / 1024
    );
    assert!(d["stack_lost"].as_u64().unwrap() > 0, "{d}");
    assert!(d["site_map_full"].as_u64().unwrap() > 0, "{d}");
    assert!(peak_kb < 100 * 1024, "map-probe used {} MB", peak_kb / 1024);

    // At full size the stack table fills too (16,384 of 262,144 stacks),
    // and every kept stack is symbolized and drawn: the bound the README
    // states.
    let path = tmp("full-size-tables.json");
    let svg = tmp("full-size-tables.svg");
    let probe = attach_for(
        fixture.pid(),
        15,
        &path,
        &[
            "--budget",
            "unlimited",
            "--no-wait-time",
            "--flamegraph",
            svg.to_str().unwrap(),
        ],
    );
    let peak_kb = run_measuring_rss(probe);
    let r = read_json(&path);
    let d = &r["drops"];
    let stacks: u64 = r["sites"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stacks"].as_u64().unwrap())
        .sum();
    eprintln!(
        "full-size tables: drops {d}; {stacks} stacks kept; flamegraph {} KB; peak RSS {} MB",
        std::fs::metadata(&svg).unwrap().len() / 1024,
        peak_kb / 1024
    );
    assert!(d["stack_lost"].as_u64().unwrap() > 0, "{d}");
    assert!(stacks > 10_000, "only {stacks} stacks kept");
    assert!(
        peak_kb < FULL_TABLES_RSS_MB * 1024,
        "map-probe used {} MB with full tables, over the stated {FULL_TABLES_RSS_MB} MB",
        peak_kb / 1024
    );
}

/// The README's bound on map-probe's memory with every table full.
const FULL_TABLES_RSS_MB: u64 = 200;

/// `map-probe attach` of `pid` for `secs` writing JSON to `json`, with `extra`.
fn attach_for(pid: u32, secs: u32, json: &std::path::Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(map_probe_bin());
    cmd.args(["attach", "--pid", &pid.to_string()])
        .args(["--duration", &secs.to_string()])
        .arg("--json")
        .arg(json)
        .args(extra);
    cmd
}

/// Runs map-probe to its end, sampling its RSS every 50 ms; its peak, in KB.
fn run_measuring_rss(mut cmd: Command) -> u64 {
    let mut probe = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut peak_kb = 0u64;
    while probe.try_wait().unwrap().is_none() {
        let st =
            std::fs::read_to_string(format!("/proc/{}/status", probe.id())).unwrap_or_default();
        if let Some(kb) = st
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
        {
            peak_kb = peak_kb.max(kb);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = probe.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    peak_kb
}

/// Ten thousand distinct lock call sites, more than any service has
/// (Debian's etcd has 831, caddy 885), in a stripped binary, at the default
/// budget: a probe point for every site, every site seen named at its own
/// line even when the kernel's stack table could not keep its stack, and
/// memory within the bound.
///
/// Not every site is seen in every run. With end probes planted before
/// entries, 2 runs in 5 lost a block of consecutive sites (6 to 1,216) for
/// the whole run; lock windows plant entries first since, and 1 run in 30
/// still left 2,112 unseen (no lock window opened after its first). The bar is
/// below the lowest run here (7,888); the README says so.
#[test]
fn ten_thousand_sites_are_named() {
    require_root();
    let bin = go_fixture("manysites", GoToolchain::Go126, Variant::Stripped);
    let src =
        std::fs::read_to_string(workspace_root().join("fixtures/manysites/sites_gen.go")).unwrap();
    // site N's Lock is the line after its `func siteN() {`.
    let lines: std::collections::HashMap<String, u64> = src
        .lines()
        .enumerate()
        .filter_map(|(i, l)| {
            let n = l.strip_prefix("func site")?.strip_suffix("() {")?;
            Some((format!("main.site{n}"), i as u64 + 2))
        })
        .collect();
    assert_eq!(lines.len(), 10_000);
    let fixture = start_fixture(&bin, &["-duration", "60s"]);
    let path = tmp("ten-thousand-sites.json");
    let probe = attach_for(fixture.pid(), 8, &path, &[]);
    let t = Instant::now();
    let peak_kb = run_measuring_rss(probe);
    let took = t.elapsed();
    let r = read_json(&path);
    let sites = r["sites"].as_array().unwrap();
    let mut named = 0;
    for s in sites {
        let f = s["function"].as_str().unwrap();
        let Some(&line) = lines.get(f) else {
            continue;
        };
        assert_eq!(s["line"], line, "{f}: {s}");
        assert_eq!(s["measured"], "call-site", "{f}");
        named += 1;
    }
    eprintln!(
        "{named} of 10,000 sites named; {} probe points; drops {}; {:.1} s for an 8 s run; peak RSS {} MB",
        r["probes"].as_array().map_or(0, Vec::len),
        r["drops"],
        took.as_secs_f64(),
        peak_kb / 1024
    );
    // One per site, and the runtime's own few.
    let points = r["probes"].as_array().map_or(0, Vec::len);
    assert!((10_000..10_100).contains(&points), "{points} probe points");
    assert_eq!(r["drops"]["site_map_full"], 0, "{}", r["drops"]);
    assert!(named >= 7_500, "only {named} of 10,000 sites named");
    assert!(
        peak_kb < FULL_TABLES_RSS_MB * 1024,
        "map-probe used {} MB",
        peak_kb / 1024
    );
}

/// The built BPF object never calls a helper that writes user memory or
/// signals a process: map-probe only reads.
#[test]
fn the_bpf_object_only_reads() {
    let obj = newest_bpf_object();
    let data = std::fs::read(&obj).unwrap();
    let file = object::File::parse(&*data).unwrap();
    use object::{Object, ObjectSection, SectionKind};
    let mut helpers = std::collections::BTreeSet::new();
    for s in file.sections().filter(|s| s.kind() == SectionKind::Text) {
        let code = s.data().unwrap();
        for ins in code.as_chunks::<8>().0 {
            // BPF_JMP | BPF_CALL with src_reg 0: a helper call, imm = its id.
            if ins[0] == 0x85 && ins[1] >> 4 == 0 {
                helpers.insert(i32::from_le_bytes([ins[4], ins[5], ins[6], ins[7]]));
            }
        }
    }
    eprintln!("{}: helpers {helpers:?}", obj.display());
    assert!(!helpers.is_empty());
    // bpf_probe_write_user, bpf_override_return, bpf_send_signal(_thread).
    for forbidden in [36, 58, 109, 117] {
        assert!(
            !helpers.contains(&forbidden),
            "helper {forbidden} in {}",
            obj.display()
        );
    }
}

fn newest_bpf_object() -> PathBuf {
    let build = workspace_root().join("target/release/build");
    std::fs::read_dir(&build)
        .unwrap()
        .filter_map(|e| Some(e.ok()?.path().join("out/map-probe.bpf.o")))
        .filter(|p| p.is_file())
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
        .expect("a built BPF object under target/release/build")
}

/// CAP_BPF and CAP_PERFMON are enough when map-probe runs as the target's
/// own user; as root without CAP_SYS_PTRACE, a target with more privileges
/// is refused with one line saying what is missing.
#[test]
fn least_privilege_is_enough() {
    require_root();
    let bin = go_fixture("contended", GoToolchain::Go126, Variant::Plain);
    // The fixture and map-probe both as nobody; map-probe with two capabilities.
    let mut fixture = Child::spawn_cmd(common::command(
        "setpriv",
        &[
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            bin.to_str().unwrap(),
            "-duration",
            "60s",
        ],
    ));
    fixture.wait_for_line("ready pid=", Duration::from_secs(10));
    let target = fixture
        .output_so_far()
        .iter()
        .find_map(|l| l.strip_prefix("ready pid=").map(str::to_string))
        .unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args([
            "--inh-caps=-all,+bpf,+perfmon",
            "--ambient-caps=-all,+bpf,+perfmon",
            "--bounding-set=-all,+bpf,+perfmon",
        ])
        .arg(map_probe_bin())
        .args(["attach", "--pid", &target, "--duration", "2", "--json", "-"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        r["sites"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["function"] == "main.hotPath"),
        "{}",
        r["sites"]
    );

    // Root with only the two, against a root target with every capability.
    let root_target = start_fixture(&bin, &["-duration", "60s"]);
    let out = Command::new("setpriv")
        .args(["--bounding-set=-all,+bpf,+perfmon"])
        .arg(map_probe_bin())
        .args([
            "attach",
            "--pid",
            &root_target.pid().to_string(),
            "--duration",
            "1",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("CAP_SYS_PTRACE"), "{err}");
    assert!(fixture.running());
}
