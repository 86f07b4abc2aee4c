//! The OpenTelemetry Collector the OTLP tests send to: built from the Go
//! module proxy with the official builder (ocb), pinned, with an OTLP
//! receiver, the file exporter (the tests read what it writes) and the debug
//! exporter. Kept in `$CARGO_HOME/map-probe-otelcol/<version>/`, out of git,
//! and rebuilt only when missing or of another version.

use crate::util::{self, cargo_home, cmd, output, step};
use std::path::PathBuf;

pub const VERSION: &str = "0.161.0";
/// The confmap providers follow the stable 1.x line of the same release.
const PROVIDERS: &str = "1.67.0";
pub const BINARY: &str = "otelcol-map-probe";

/// Where the binary lives: `$CARGO_HOME/map-probe-otelcol/<version>/otelcol-map-probe`.
/// `map-probe/tests/common` looks in the same place.
pub fn path() -> Result<PathBuf, String> {
    Ok(cargo_home()?
        .join("map-probe-otelcol")
        .join(VERSION)
        .join(BINARY))
}

fn manifest(out: &std::path::Path) -> String {
    format!(
        "dist:
  name: {BINARY}
  description: OpenTelemetry Collector for map-probe's tests
  version: {VERSION}
  output_path: {out}
receivers:
  - gomod: go.opentelemetry.io/collector/receiver/otlpreceiver v{VERSION}
exporters:
  - gomod: github.com/open-telemetry/opentelemetry-collector-contrib/exporter/fileexporter v{VERSION}
  - gomod: go.opentelemetry.io/collector/exporter/debugexporter v{VERSION}
providers:
  - gomod: go.opentelemetry.io/collector/confmap/provider/fileprovider v{PROVIDERS}
  - gomod: go.opentelemetry.io/collector/confmap/provider/envprovider v{PROVIDERS}
",
        out = out.display()
    )
}

/// Builds the collector unless the right version is there; returns its version.
pub fn ensure() -> Result<String, String> {
    let bin = path()?;
    let want = format!("version {VERSION}");
    if output(cmd(&bin).arg("--version")).is_some_and(|v| v.contains(&want)) {
        step("setup", &format!("otelcol {VERSION}: present"));
        return Ok(VERSION.into());
    }
    let dir = bin
        .parent()
        .ok_or("collector path has no folder")?
        .to_path_buf();
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    step(
        "setup",
        &format!("otelcol {VERSION}: building with the collector builder (a minute or two)"),
    );
    let go = util::machine_go();
    util::run(
        cmd(&go)
            .args(["install"])
            .arg(format!(
                "go.opentelemetry.io/collector/cmd/builder@v{VERSION}"
            ))
            .env("GOBIN", &dir)
            .env("GOTOOLCHAIN", "local")
            .env("CGO_ENABLED", "0"),
    )?;
    let build = dir.join("build");
    let manifest_path = dir.join("manifest.yaml");
    std::fs::write(&manifest_path, manifest(&build))
        .map_err(|e| format!("cannot write {}: {e}", manifest_path.display()))?;
    // The builder runs `go`: the machine's, on PATH first.
    let mut path = std::ffi::OsString::from(go.parent().unwrap_or(std::path::Path::new("/")));
    path.push(":");
    path.push(util::child_path());
    util::run(
        cmd(dir.join("builder"))
            .arg("--config")
            .arg(&manifest_path)
            .env("PATH", path)
            .env("GOTOOLCHAIN", "local")
            .env("CGO_ENABLED", "0"),
    )?;
    std::fs::rename(build.join(BINARY), &bin)
        .map_err(|e| format!("cannot move the collector into {}: {e}", bin.display()))?;
    let _ = std::fs::remove_dir_all(&build);
    match output(cmd(&bin).arg("--version")) {
        Some(v) if v.contains(&want) => Ok(VERSION.into()),
        Some(v) => Err(format!("built collector reports `{v}`, want {VERSION}")),
        None => Err(format!("built collector {} does not run", bin.display())),
    }
}
