//! `cargo xtask bench`: placeholder, written elsewhere.

pub fn run(_args: &[String]) -> Result<(), String> {
    Err("not yet implemented".to_string())
}
