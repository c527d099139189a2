//! Traces (`observability.tracing`): W3C trace context in and out, the
//! sampling decision, a request's spans, and their conversion to OTLP.
//!
//! A request continues the trace its client's `traceparent` names (and that
//! trace's sampling decision), or starts one, recorded for
//! `sampling_ratio` of them. A recorded request has a server span, with
//! child spans for its phases (access, the cache lookup, each upstream
//! attempt with its replica and cause, a resumed body, a cache fill). The
//! spans are plain records on the core, kept in the request's state; a
//! finished trace goes to the core's batch, handed to the export thread
//! (`export.rs`) once per tick, which encodes OTLP (the official protobuf
//! definitions, `opentelemetry-proto`) and POSTs it. Nothing on a core
//! waits for the collector; what it cannot take is dropped and counted.

pub mod export;

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1 as otlp;

/// An attribute's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    /// A string.
    Str(String),
    /// An integer.
    Int(i64),
}

/// One closed span.
#[derive(Debug, Clone)]
pub struct Span {
    /// Its id.
    pub id: [u8; 8],
    /// The span it belongs under.
    pub parent: [u8; 8],
    /// What it was (`access`, `cache lookup`, `upstream`, `resume`, `fill`,
    /// or the request's `GET /prefix`).
    pub name: String,
    /// Start and end, ns since the Unix epoch.
    pub start_ns: u64,
    /// End.
    pub end_ns: u64,
    /// Attributes.
    pub attrs: Vec<(&'static str, Attr)>,
    /// It failed.
    pub error: bool,
    /// The request's own span (kind server), else internal or client.
    pub kind: otlp::span::SpanKind,
}

/// A request's trace context and the spans it has closed.
#[derive(Debug, Default, Clone)]
pub struct Trace {
    /// The trace's id.
    pub trace_id: [u8; 16],
    /// The client's span, when it sent one.
    pub remote_parent: Option<[u8; 8]>,
    /// The request's own span.
    pub root: [u8; 8],
    /// Recorded and exported.
    pub sampled: bool,
    /// The client's `tracestate`, passed on.
    pub state: String,
    /// When the request began (ns since the Unix epoch).
    pub start_ns: u64,
    /// Spans closed so far (the root is added at the end).
    pub spans: Vec<Span>,
    /// The upstream attempt under way (its `traceparent`'s span id).
    pub upstream: [u8; 8],
    /// When the cache fill this request leads began (0: none).
    pub fill_start: u64,
}

/// Reads a W3C `traceparent` (`00-<trace id>-<parent id>-<flags>`): the
/// trace id, the parent span id, and whether the parent sampled. `None`
/// for anything else (then a new trace starts).
pub fn parse_traceparent(value: &str) -> Option<([u8; 16], [u8; 8], bool)> {
    let mut parts = value.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    let mut trace_id = [0u8; 16];
    let mut span_id = [0u8; 8];
    hex::decode_to_slice(trace, &mut trace_id).ok()?;
    hex::decode_to_slice(span, &mut span_id).ok()?;
    let mut flag = [0u8; 1];
    hex::decode_to_slice(flags, &mut flag).ok()?;
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some((trace_id, span_id, flag[0] & 1 == 1))
}

/// A `traceparent` header value.
pub fn traceparent(trace_id: &[u8; 16], span_id: &[u8; 8], sampled: bool) -> String {
    format!(
        "00-{}-{}-{}",
        hex::encode(trace_id),
        hex::encode(span_id),
        if sampled { "01" } else { "00" }
    )
}

/// Ids and sampling draws for one core: xorshift64*, seeded from the
/// kernel's randomness (ids must not collide across instances, not be
/// secret).
pub struct Ids(u64);

impl Default for Ids {
    fn default() -> Ids {
        Ids::new()
    }
}

impl Ids {
    /// A generator seeded from getrandom(2) (the clock when that fails).
    pub fn new() -> Ids {
        let mut seed = [0u8; 8];
        // SAFETY: getrandom writes at most `seed.len()` bytes into the
        // buffer, which lives for the call.
        let n = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
        let seed = if n == 8 {
            u64::from_ne_bytes(seed)
        } else {
            now_ns() ^ u64::from(std::process::id())
        };
        Ids(seed | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A new trace id (never all zeroes).
    pub fn trace_id(&mut self) -> [u8; 16] {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&self.next().to_be_bytes());
        id[8..].copy_from_slice(&(self.next() | 1).to_be_bytes());
        id
    }

    /// A new span id (never all zeroes).
    pub fn span_id(&mut self) -> [u8; 8] {
        (self.next() | 1).to_be_bytes()
    }

    /// Whether a new trace is recorded, for `ratio` of them.
    pub fn sample(&mut self, ratio: f64) -> bool {
        if ratio >= 1.0 {
            return true;
        }
        if ratio <= 0.0 {
            return false;
        }
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < ratio
    }
}

/// Now, in ns since the Unix epoch.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A finished trace's spans as OTLP spans.
pub fn to_otlp(t: &Trace) -> Vec<otlp::Span> {
    t.spans
        .iter()
        .map(|s| {
            let parent = if s.id == t.root {
                t.remote_parent.map(|p| p.to_vec()).unwrap_or_default()
            } else {
                s.parent.to_vec()
            };
            otlp::Span {
                trace_id: t.trace_id.to_vec(),
                span_id: s.id.to_vec(),
                trace_state: t.state.clone(),
                parent_span_id: parent,
                name: s.name.clone(),
                kind: s.kind as i32,
                start_time_unix_nano: s.start_ns,
                end_time_unix_nano: s.end_ns.max(s.start_ns),
                attributes: s
                    .attrs
                    .iter()
                    .map(|(k, v)| key_value(k, v.clone()))
                    .collect(),
                status: Some(otlp::Status {
                    code: if s.error {
                        otlp::status::StatusCode::Error as i32
                    } else {
                        otlp::status::StatusCode::Unset as i32
                    },
                    ..Default::default()
                }),
                ..Default::default()
            }
        })
        .collect()
}

/// One OTLP attribute.
pub fn key_value(key: &str, value: Attr) -> KeyValue {
    let value = match value {
        Attr::Str(s) => any_value::Value::StringValue(s),
        Attr::Int(i) => any_value::Value::IntValue(i),
    };
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_refuses_what_is_not_one() {
        let v = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let (t, s, sampled) = parse_traceparent(v).expect("valid");
        assert!(sampled);
        assert_eq!(traceparent(&t, &s, true), v);
        let (_, _, sampled) =
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
                .expect("valid");
        assert!(!sampled);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-zzf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
        // A later version's extra fields are ignored.
        assert!(
            parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-zz")
                .is_some()
        );
    }

    #[test]
    fn sampling_follows_the_ratio() {
        let mut ids = Ids::new();
        assert!(!ids.sample(0.0));
        assert!(ids.sample(1.0));
        let n = (0..100_000).filter(|_| ids.sample(0.01)).count();
        assert!((500..1500).contains(&n), "{n} of 100000 at 1%");
        assert_ne!(ids.trace_id(), ids.trace_id());
        assert_ne!(ids.span_id(), [0; 8]);
    }
}
