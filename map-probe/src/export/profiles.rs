//! The OTLP Profiles signal (`v1development`, opt-in with `--otlp-profiles`):
//! each interval's contention profile, the same samples as the pprof file,
//! sent beside the spans and metrics. `request` is the pure part (a report
//! and its resource to one request); `Sender` posts it over gRPC
//! (`ProfilesService/Export`) or HTTP (`/v1development/profiles`).
//!
//! In this version of the protocol a Profile has one sample type, so an
//! interval is two Profiles over one dictionary: `contentions/count` and
//! `delay/nanoseconds`, period type `contentions/count`, period 1, as in Go's
//! mutex profile. The executable's mapping carries its build ID as
//! `process.executable.build_id.gnu` or `.go`.

use std::time::Duration;

use opentelemetry_proto::tonic::{
    collector::profiles::v1development::{
        profiles_service_client::ProfilesServiceClient, ExportProfilesServiceRequest,
    },
    common::v1::{any_value, AnyValue, ArrayValue, InstrumentationScope, KeyValue},
    profiles::v1development as pb,
    resource::v1::Resource,
};
use prost::Message;

use super::{Config, Protocol};
use crate::report::{
    profile::{self, CONTENTIONS, DELAY},
    Report,
};

/// The sample attribute naming the lock kind (as on the metrics).
const KIND_KEY: &str = "map_probe.lock.kind";

/// The SDK's resource as the proto message the profiles request carries.
pub fn resource(r: &opentelemetry_sdk::Resource) -> Resource {
    Resource {
        attributes: r
            .iter()
            .map(|(k, v)| KeyValue {
                key: k.to_string(),
                value: Some(any(v)),
                key_strindex: 0,
            })
            .collect(),
        ..Default::default()
    }
}

fn any(v: &opentelemetry::Value) -> AnyValue {
    use opentelemetry::{Array, Value};
    let value = match v {
        Value::Bool(b) => any_value::Value::BoolValue(*b),
        Value::I64(i) => any_value::Value::IntValue(*i),
        Value::F64(f) => any_value::Value::DoubleValue(*f),
        Value::Array(Array::String(a)) => any_value::Value::ArrayValue(ArrayValue {
            values: a
                .iter()
                .map(|s| AnyValue {
                    value: Some(any_value::Value::StringValue(s.to_string())),
                })
                .collect(),
        }),
        other => any_value::Value::StringValue(other.to_string()),
    };
    AnyValue { value: Some(value) }
}

fn string(s: &str) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::StringValue(s.to_string())),
    }
}

/// One interval's profiles: `None` when it saw no contention (nothing to send).
pub fn request(report: &Report, resource: Resource) -> Option<ExportProfilesServiceRequest> {
    let mut t = profile::build(report);
    if t.samples.is_empty() {
        return None;
    }
    let mut vt = |(ty, unit): (&str, &str)| pb::ValueType {
        type_strindex: t.strings.intern(ty) as i32,
        unit_strindex: t.strings.intern(unit) as i32,
    };
    let (contentions, delay) = (vt(CONTENTIONS), vt(DELAY));
    let mut attributes = vec![pb::KeyValueAndUnit::default()];
    let mut attribute = |t: &mut profile::Tables, key: &str, value: &str| {
        attributes.push(pb::KeyValueAndUnit {
            key_strindex: t.strings.intern(key) as i32,
            value: Some(string(value)),
            unit_strindex: 0,
        });
        attributes.len() as i32 - 1
    };
    let mapping_attrs = match report.target.build_id.as_deref() {
        // A Go build ID is action/content hashes joined by '/'; GNU's is hex.
        Some(id) if id.contains('/') => {
            vec![attribute(&mut t, "process.executable.build_id.go", id)]
        }
        Some(id) => vec![attribute(&mut t, "process.executable.build_id.gnu", id)],
        None => Vec::new(),
    };
    let mut kinds = std::collections::HashMap::new();
    let sample_kinds: Vec<i32> = t
        .samples
        .iter()
        .map(|s| s.kind)
        .collect::<Vec<_>>()
        .into_iter()
        .map(|k| {
            *kinds
                .entry(k)
                .or_insert_with(|| attribute(&mut t, KIND_KEY, k.as_str()))
        })
        .collect();
    let (start, limit, offset) = report.target.text_mapping;
    let mapping = pb::Mapping {
        memory_start: start,
        memory_limit: limit,
        file_offset: offset,
        filename_strindex: t.strings.intern(&report.target.exe) as i32,
        attribute_indices: mapping_attrs,
    };
    let locations = t
        .locations
        .iter()
        .enumerate()
        .map(|(i, l)| pb::Location {
            mapping_index: if i == 0 { 0 } else { 1 },
            address: 0,
            lines: l
                .lines
                .iter()
                .map(|ln| pb::Line {
                    function_index: ln.function as i32,
                    line: ln.line,
                    column: 0,
                })
                .collect(),
            attribute_indices: Vec::new(),
        })
        .collect();
    let functions = t
        .functions
        .iter()
        .map(|f| pb::Function {
            name_strindex: f.name as i32,
            system_name_strindex: f.name as i32,
            filename_strindex: f.file as i32,
            start_line: f.start_line,
        })
        .collect();
    // Stack i+1 is sample i's (stack 0 is the required empty one).
    let mut stacks = vec![pb::Stack::default()];
    stacks.extend(t.samples.iter().map(|s| pb::Stack {
        location_indices: s.locations.iter().map(|&l| l as i32).collect(),
    }));
    let samples = |value: fn(&profile::Sample) -> i64| -> Vec<pb::Sample> {
        t.samples
            .iter()
            .enumerate()
            .filter(|(_, s)| value(s) > 0)
            .map(|(i, s)| pb::Sample {
                stack_index: i as i32 + 1,
                attribute_indices: vec![sample_kinds[i]],
                link_index: 0,
                values: vec![value(s)],
                timestamps_unix_nano: Vec::new(),
            })
            .collect()
    };
    let time_unix_nano = report.sampling.start_unix_nanos;
    let duration_nano = (report.sampling.elapsed_secs.max(0.0) * 1e9).round() as u64;
    let profile = |sample_type: pb::ValueType, samples: Vec<pb::Sample>, n: u8| pb::Profile {
        sample_type: Some(sample_type),
        samples,
        time_unix_nano,
        duration_nano,
        period_type: Some(contentions),
        period: 1,
        profile_id: profile_id(report, n),
        ..Default::default()
    };
    let profiles = vec![
        profile(contentions, samples(|s| s.contentions), 0),
        profile(delay, samples(|s| s.delay_ns), 1),
    ];
    let dictionary = pb::ProfilesDictionary {
        mapping_table: vec![pb::Mapping::default(), mapping],
        location_table: locations,
        function_table: functions,
        link_table: vec![pb::Link::default()],
        string_table: t.strings.table,
        attribute_table: attributes,
        stack_table: stacks,
    };
    Some(ExportProfilesServiceRequest {
        resource_profiles: vec![pb::ResourceProfiles {
            resource: Some(resource),
            scope_profiles: vec![pb::ScopeProfiles {
                scope: Some(InstrumentationScope {
                    name: "map-probe".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                profiles,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
        dictionary: Some(dictionary),
    })
}

/// 16 bytes, unique per target, interval and sample type (not all zero).
fn profile_id(r: &Report, n: u8) -> Vec<u8> {
    let mut id = Vec::with_capacity(16);
    id.extend_from_slice(&r.sampling.start_unix_nanos.to_be_bytes());
    id.extend_from_slice(&r.target.pid.to_be_bytes());
    id.extend_from_slice(&[0, 0, 0, n + 1]);
    id
}

/// `OTEL_EXPORTER_OTLP_HEADERS` (`k=v,k2=v2`), which the SDK's exporters read
/// themselves and the profiles sender must apply on its own.
fn env_headers() -> Vec<(String, String)> {
    std::env::var("OTEL_EXPORTER_OTLP_HEADERS")
        .unwrap_or_default()
        .split(',')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            let k = k.trim();
            (!k.is_empty()).then(|| (k.to_string(), v.trim().to_string()))
        })
        .collect()
}

/// Sends profile requests to the collector, over the configured protocol.
pub struct Sender {
    endpoint: String,
    protocol: Protocol,
    timeout: Duration,
    headers: Vec<(String, String)>,
    /// gRPC: a lazily connecting channel, driven on the export runtime.
    grpc: Option<(
        tokio::runtime::Handle,
        ProfilesServiceClient<tonic::transport::Channel>,
    )>,
    /// HTTP: made on first use (a blocking client must not be built inside
    /// an async context).
    http: Option<reqwest::blocking::Client>,
}

impl Sender {
    /// Must run inside the export thread's tokio runtime (for gRPC).
    pub fn new(cfg: &Config) -> anyhow::Result<Sender> {
        let grpc = match cfg.protocol {
            Protocol::Grpc => {
                let channel = tonic::transport::Endpoint::from_shared(cfg.endpoint.clone())
                    .map_err(|e| anyhow::anyhow!("OTLP profiles endpoint: {e}"))?
                    .timeout(cfg.timeout)
                    .connect_timeout(cfg.timeout)
                    .connect_lazy();
                Some((
                    tokio::runtime::Handle::current(),
                    ProfilesServiceClient::new(channel),
                ))
            }
            Protocol::HttpProtobuf => None,
        };
        Ok(Sender {
            endpoint: cfg.endpoint.clone(),
            protocol: cfg.protocol,
            timeout: cfg.timeout,
            headers: env_headers(),
            grpc,
            http: None,
        })
    }

    /// Sends one request; the error is one line. Rejected profiles (a
    /// partial success) count as an error too.
    pub fn send(&mut self, req: ExportProfilesServiceRequest) -> Result<(), String> {
        let rejected = match self.protocol {
            Protocol::Grpc => self.send_grpc(req)?,
            Protocol::HttpProtobuf => self.send_http(req)?,
        };
        match rejected {
            Some(p) if p.rejected_profiles > 0 => Err(format!(
                "profiles: the collector rejected {} profile(s): {}",
                p.rejected_profiles, p.error_message
            )),
            _ => Ok(()),
        }
    }

    fn send_grpc(
        &mut self,
        req: ExportProfilesServiceRequest,
    ) -> Result<Option<PartialSuccess>, String> {
        let Some((rt, client)) = self.grpc.as_mut() else {
            return Err("profiles: no gRPC client".into());
        };
        let mut request = tonic::Request::new(req);
        for (k, v) in &self.headers {
            if let (Ok(k), Ok(v)) = (
                k.to_ascii_lowercase()
                    .parse::<tonic::metadata::MetadataKey<tonic::metadata::Ascii>>(),
                v.parse(),
            ) {
                request.metadata_mut().insert(k, v);
            }
        }
        let timeout = self.timeout;
        let res = rt.block_on(async {
            tokio::time::timeout(timeout, client.export(request))
                .await
                .map_err(|_| format!("profiles: no answer within {:.0} s", timeout.as_secs_f64()))?
                .map_err(|s| format!("profiles: gRPC {:?}: {}", s.code(), s.message()))
        })?;
        Ok(res.into_inner().partial_success.map(PartialSuccess::from))
    }

    fn send_http(
        &mut self,
        req: ExportProfilesServiceRequest,
    ) -> Result<Option<PartialSuccess>, String> {
        if self.http.is_none() {
            let client = reqwest::blocking::Client::builder()
                .timeout(self.timeout)
                .build()
                .map_err(|e| format!("profiles: HTTP client: {e}"))?;
            self.http = Some(client);
        }
        let client = self.http.as_ref().expect("made above");
        let url = format!("{}/v1development/profiles", self.endpoint);
        let mut post = client
            .post(&url)
            .header("content-type", "application/x-protobuf")
            .body(req.encode_to_vec());
        for (k, v) in &self.headers {
            post = post.header(k, v);
        }
        let resp = post
            .send()
            .map_err(|e| format!("profiles: POST {url}: {e}"))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(format!("profiles: POST {url}: HTTP {status}"));
        }
        let body = resp.bytes().map_err(|e| format!("profiles: {e}"))?;
        let answer = opentelemetry_proto::tonic::collector::profiles::v1development::ExportProfilesServiceResponse::decode(&body[..])
            .unwrap_or_default();
        Ok(answer.partial_success.map(PartialSuccess::from))
    }
}

struct PartialSuccess {
    rejected_profiles: i64,
    error_message: String,
}

impl From<opentelemetry_proto::tonic::collector::profiles::v1development::ExportProfilesPartialSuccess>
    for PartialSuccess
{
    fn from(
        p: opentelemetry_proto::tonic::collector::profiles::v1development::ExportProfilesPartialSuccess,
    ) -> Self {
        PartialSuccess {
            rejected_profiles: p.rejected_profiles,
            error_message: p.error_message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        catalog::Kind,
        report::{profile::tests::frame, tests::report_with, StackCount},
    };

    #[test]
    fn two_profiles_over_one_dictionary() {
        let r = report_with(vec![StackCount {
            kind: Kind::RwmutexRead,
            frames: vec![
                frame("sync.runtime_SemacquireRWMutexR", 1, false),
                frame("sync.(*RWMutex).RLock", 2, true),
                frame("main.read", 3, false),
            ],
            count: 3,
            delay_ns: 0,
        }]);
        let req = request(&r, Resource::default()).unwrap();
        let d = req.dictionary.as_ref().unwrap();
        let s = |i: i32| d.string_table[i as usize].as_str();
        let profiles = &req.resource_profiles[0].scope_profiles[0].profiles;
        let types: Vec<_> = profiles
            .iter()
            .map(|p| s(p.sample_type.unwrap().type_strindex))
            .collect();
        assert_eq!(types, ["contentions", "delay"]);
        assert_eq!(profiles[0].samples[0].values, [3]);
        assert!(profiles[1].samples.is_empty(), "no zero values are sent");
        let stack = &d.stack_table[profiles[0].samples[0].stack_index as usize];
        let outer = &d.location_table[stack.location_indices[1] as usize];
        let names: Vec<_> = outer
            .lines
            .iter()
            .map(|l| s(d.function_table[l.function_index as usize].name_strindex))
            .collect();
        assert_eq!(names, ["sync.(*RWMutex).RLock", "main.read"]);
        let kind = &d.attribute_table[profiles[0].samples[0].attribute_indices[0] as usize];
        assert_eq!(s(kind.key_strindex), KIND_KEY);
        let build = &d.attribute_table[d.mapping_table[1].attribute_indices[0] as usize];
        assert_eq!(s(build.key_strindex), "process.executable.build_id.gnu");
        assert_eq!(d.string_table[0], "");
        assert_eq!(d.location_table[0], pb::Location::default());
    }
}
