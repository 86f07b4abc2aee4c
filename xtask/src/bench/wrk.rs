//! Running wrk and reading its report (wrk 4.1 text output with `--latency`).

use crate::util::cmd;
use std::path::Path;

/// What one wrk run measured.
#[derive(Debug, Default, Clone)]
pub struct WrkResult {
    pub requests: u64,
    /// wrk's own measured run time (the "N requests in 8.01s" line).
    pub secs: f64,
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Non-2xx/3xx responses plus socket errors (connect, read, write, timeout).
    pub errors: u64,
}

/// The load generator's settings, shared by every phase of a run.
pub struct Load<'a> {
    pub threads: u32,
    pub connections: u32,
    pub url: String,
    /// A Lua script (and its arguments), or plain GETs of `url`.
    pub script: Option<&'a Path>,
    pub script_args: &'a [&'a str],
}

impl Load<'_> {
    /// Runs wrk for `secs` and parses its report; the raw text comes back on errors.
    pub fn run(&self, secs: u64) -> Result<(WrkResult, String), String> {
        let out = cmd("wrk")
            .arg(format!("-t{}", self.threads))
            .arg(format!("-c{}", self.connections))
            .arg(format!("-d{secs}s"))
            .arg("--latency")
            .args(
                self.script
                    .iter()
                    .flat_map(|s| [std::ffi::OsStr::new("-s"), s.as_os_str()]),
            )
            .arg(&self.url)
            .args(self.script.map(|_| "--"))
            .args(self.script_args)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| format!("cannot run wrk: {e}"))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            return Err(format!("wrk failed ({}):\n{text}", out.status));
        }
        match parse(&text) {
            Some(r) if r.requests > 0 => Ok((r, text)),
            _ => Err(format!("cannot read wrk's report:\n{text}")),
        }
    }
}

pub fn parse(text: &str) -> Option<WrkResult> {
    let mut r = WrkResult::default();
    let mut have_rps = false;
    let mut have_p99 = false;
    let mut in_dist = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("Latency Distribution") {
            in_dist = true;
            continue;
        }
        if in_dist {
            let mut w = t.split_whitespace();
            match (w.next(), w.next()) {
                (Some("50%"), Some(v)) => r.p50_us = duration_us(v)?,
                (Some("99%"), Some(v)) => {
                    r.p99_us = duration_us(v)?;
                    have_p99 = true;
                }
                (Some(p), Some(_)) if p.ends_with('%') => {}
                _ => in_dist = false,
            }
            if in_dist {
                continue;
            }
        }
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse().ok()?;
            have_rps = true;
        } else if let Some((n, rest)) = t.split_once(" requests in ") {
            r.requests = n.trim().parse().ok()?;
            let d = rest.split(',').next()?.trim();
            r.secs = duration_us(d)? / 1e6;
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            r.errors += v.trim().parse::<u64>().unwrap_or(0);
        } else if let Some(v) = t.strip_prefix("Socket errors:") {
            // "Socket errors: connect 0, read 0, write 0, timeout 12"
            for part in v.split(',') {
                if let Some(n) = part.split_whitespace().nth(1) {
                    r.errors += n.parse::<u64>().unwrap_or(0);
                }
            }
        }
    }
    (have_rps && have_p99).then_some(r)
}

/// "403.00us", "7.39ms", "1.20s", "1.00m", "2.00h" → microseconds.
fn duration_us(v: &str) -> Option<f64> {
    let split = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" | "" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => return None,
    };
    Some(n * mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "Running 4s test @ http://127.0.0.1:37017/item
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.01ms    1.54ms  17.99ms   87.76%
    Req/Sec    30.60k     5.87k   45.33k    65.00%
  Latency Distribution
     50%  403.00us
     75%    1.14ms
     90%    2.94ms
     99%    1.20s
  243892 requests in 4.01s, 125.84MB read
  Socket errors: connect 0, read 2, write 0, timeout 12
  Non-2xx or 3xx responses: 5
Requests/sec:  60802.13
Transfer/sec:     31.37MB
";

    #[test]
    fn parses_wrk_report() {
        let r = parse(SAMPLE).unwrap();
        assert_eq!(r.requests, 243892);
        assert!((r.secs - 4.01).abs() < 1e-9);
        assert!((r.rps - 60802.13).abs() < 1e-6);
        assert!((r.p50_us - 403.0).abs() < 1e-9);
        assert!((r.p99_us - 1.2e6).abs() < 1e-6);
        assert_eq!(r.errors, 19);
    }

    #[test]
    fn units() {
        assert_eq!(duration_us("7.39ms"), Some(7390.0));
        assert_eq!(duration_us("1.00m"), Some(60e6));
        assert_eq!(duration_us("12x"), None);
    }
}
