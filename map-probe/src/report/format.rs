//! How numbers, durations and paths read in the human outputs.

pub fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn duration(ns: u64, timed: u64) -> String {
    match ns {
        _ if timed == 0 => "-".into(),
        n if n >= 1_000_000 => format!("{:.1} ms", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.0} µs", n as f64 / 1e3),
        n => format!("{n} ns"),
    }
}

/// Seconds for people: milliseconds below one second.
pub fn secs(s: f64) -> String {
    if s < 1.0 {
        format!("{:.0} ms", s * 1e3)
    } else {
        format!("{s:.1} s")
    }
}

/// The last two path components: enough to find the file, short enough to read.
pub fn short_path(p: &str) -> &str {
    let mut cut = p.len();
    for _ in 0..2 {
        match p[..cut].rfind('/') {
            Some(i) => cut = i,
            None => return p,
        }
    }
    &p[cut + 1..]
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats() {
        assert_eq!(super::group(1234567), "1,234,567");
        assert_eq!(super::group(12), "12");
        assert_eq!(super::short_path("/a/b/c/main.go"), "c/main.go");
        assert_eq!(super::short_path("main.go"), "main.go");
        assert_eq!(super::duration(1_500, 1), "2 µs");
    }
}
