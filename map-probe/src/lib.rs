//! map-probe: attach to a running Go service by PID and rank its lock
//! contention by call site. Modules follow the path the data takes:
//! `target` and `gobin` find the process and read its binary, `catalog`
//! decides where to probe for its Go version, `probes` loads and attaches the
//! eBPF programs, `calibrate` measures what a hit costs here, `governor` keeps
//! their cost in budget (`tiers` choosing which lock points stay in), `aggregate` reads the
//! kernel's counts, `symbolize` names the stacks, `sites`, `risks`, `cas` and
//! `false_sharing` build the one report model, and `report` renders it. `session` drives one
//! target through all of it; `export` sends its reports to an OpenTelemetry
//! Collector (OTLP); `agent` drives many targets that `discover` finds.

pub mod agent;
pub mod aggregate;
pub mod calibrate;
pub mod cas;
pub mod catalog;
pub mod discover;
pub mod doctor;
pub mod export;
pub mod false_sharing;
pub mod gobin;
pub mod governor;
pub mod launch;
pub mod links;
pub mod probes;
pub mod report;
pub mod risks;
pub mod session;
pub mod sites;
pub mod symbolize;
pub mod target;
pub mod text;
pub mod tiers;
