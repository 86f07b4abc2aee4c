//! The pinned OpenTelemetry Collector a bench exports to (file exporter only), so that an
//! attached phase pays for its exports as a deployed agent does.

use super::procs::Agent;
use crate::util::cmd;
use std::path::Path;
use std::time::{Duration, Instant};

fn config(dir: &Path, grpc: u16, http: u16) -> String {
    format!(
        "receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{grpc}
      http:
        endpoint: 127.0.0.1:{http}
exporters:
  file:
    path: {}
service:
  telemetry:
    metrics:
      level: none
  pipelines:
    traces:
      receivers: [otlp]
      exporters: [file]
    metrics:
      receivers: [otlp]
      exporters: [file]
",
        dir.join("received.jsonl").display()
    )
}

/// A free loopback port (the kernel's choice, released at once).
pub fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// Starts the collector with its config and output in `dir`; returns its guard and gRPC port
/// once it listens.
pub fn start(dir: &Path) -> Result<(Agent, u16), String> {
    let otelcol = crate::otelcol::path()?;
    if !otelcol.is_file() {
        return Err(format!(
            "no collector at {} (cargo xtask setup builds it)",
            otelcol.display()
        ));
    }
    let (grpc, http) = (free_port()?, free_port()?);
    let conf = dir.join("otelcol.yaml");
    std::fs::write(&conf, config(dir, grpc, http))
        .map_err(|e| format!("cannot write {}: {e}", conf.display()))?;
    let collector = Agent::start(
        cmd(&otelcol).arg(format!("--config={}", conf.display())),
        &dir.join("otelcol.log"),
    )?;
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", grpc)).is_err() {
        if t.elapsed() > Duration::from_secs(30) {
            return Err("the collector did not start listening".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((collector, grpc))
}
