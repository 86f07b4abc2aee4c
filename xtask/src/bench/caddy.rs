//! Debian's caddy as the bench's real server: a reverse proxy in front of its own file server
//! (Go 1.19.8, stripped, externally linked, 887 lock call sites), the setup on which per-site
//! probes once cost p99 +24-55%.

use super::collector::free_port;
use crate::util::cmd;
use std::net::TcpStream;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

pub const BIN: &str = "/usr/bin/caddy";

/// Writes the Caddyfile and the page it serves under `dir`, starts caddy and waits until its
/// front port accepts; returns the child and the front address.
pub fn start(dir: &Path) -> Result<(std::process::Child, String), String> {
    if !Path::new(BIN).is_file() {
        return Err(format!(
            "{BIN} is missing: `cargo xtask setup` installs Debian's caddy"
        ));
    }
    let (front, back) = (free_port()?, free_port()?);
    let www = dir.join("www");
    std::fs::create_dir_all(&www).map_err(|e| format!("{}: {e}", www.display()))?;
    // A 4 KB page: small enough that the proxy's locks, not the copy, set the pace.
    let page: String = (0..4096).map(|i| (b'a' + (i % 26) as u8) as char).collect();
    std::fs::write(www.join("index.html"), page).map_err(|e| e.to_string())?;
    let conf = dir.join("Caddyfile");
    std::fs::write(
        &conf,
        format!(
            "{{\n\tadmin off\n\tauto_https off\n}}\n:{front} {{\n\treverse_proxy 127.0.0.1:{back}\n}}\n\
             :{back} {{\n\troot * {}\n\tfile_server\n}}\n",
            www.display()
        ),
    )
    .map_err(|e| format!("{}: {e}", conf.display()))?;
    let log = std::fs::File::create(dir.join("caddy.log")).map_err(|e| e.to_string())?;
    let mut c = cmd(BIN);
    c.args(["run", "--adapter", "caddyfile", "--config"])
        .arg(&conf)
        // caddy keeps state under $HOME and the XDG folders: keep it in the run's folder.
        .env("HOME", dir)
        .env("XDG_DATA_HOME", dir)
        .env("XDG_CONFIG_HOME", dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log);
    let child = super::procs::die_with_parent(&mut c)
        .spawn()
        .map_err(|e| format!("cannot start {BIN}: {e}"))?;
    let addr = format!("127.0.0.1:{front}");
    let t0 = Instant::now();
    while TcpStream::connect(&addr).is_err() {
        if t0.elapsed() > Duration::from_secs(10) {
            return Err(format!(
                "caddy did not listen on {addr} within 10 s (log: {})",
                dir.join("caddy.log").display()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((child, addr))
}
