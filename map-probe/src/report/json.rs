//! The JSON report: the whole `Report`, for scripts and tests.

use std::{fs, path::Path};

use anyhow::{Context, Result};

use super::Report;

pub fn write(report: &Report, path: &Path) -> Result<()> {
    let text = serde_json::to_string_pretty(report)?;
    fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}
