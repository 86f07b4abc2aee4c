//! The JSON report: the whole `Report`, for scripts and tests.

use anyhow::Result;

use super::Report;

pub fn render(report: &Report) -> Result<Vec<u8>> {
    let mut text = serde_json::to_vec_pretty(report)?;
    text.push(b'\n');
    Ok(text)
}
