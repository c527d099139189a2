//! Traces over OTLP/HTTP (`observability.tracing`) through real sockets: a
//! collector in the test support decodes what the proxy exports with the
//! official protobuf definitions; scripted replicas make a request fail
//! over and resume, and its span tree is checked.

mod support;

use opentelemetry_proto::tonic::trace::v1::Span;
use std::time::Duration;
use support::otlp::Collector;
use support::rogue::{Rogue, Seen, Step};
use support::*;

const WAIT: Duration = Duration::from_secs(20);
const SIZE: usize = 20_000;
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn config(replicas: &[(&str, String)], tracing: &str) -> String {
    let mut list = String::new();
    for (i, (name, endpoint)) in replicas.iter().enumerate() {
        list.push_str(&format!(
            "        - name: \"{name}\"\n          endpoint: \"{endpoint}\"\n          priority: {}\n",
            i + 1
        ));
    }
    format!(
        "observability:\n  tracing:\n{tracing}buckets:\n  - name: \"b\"\n    path_prefix: \"/b\"\n    s3:\n      bucket: \"bkt\"\n      access_key: \"{AK}\"\n      secret_key: \"{SK}\"\n      replicas:\n{list}      health_check:\n        enabled: false\n"
    )
}

fn attr(span: &Span, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.clone()),
            Value::IntValue(i) => Some(i.to_string()),
            _ => None,
        })
}

#[test]
fn a_failed_over_and_resumed_request_is_one_trace_with_a_span_per_step() {
    let body = pattern(SIZE, 7);
    // r1 answers 503; r2 sends half the body and resets; r3 answers the rest.
    let r1 = Rogue::start(|_| {
        vec![support::rogue::send(
            "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
        )]
    });
    let b2 = body.clone();
    let r2 = Rogue::start(move |_| {
        let mut out = format!("HTTP/1.1 200 OK\r\nContent-Length: {SIZE}\r\nETag: \"e\"\r\n\r\n")
            .into_bytes();
        out.extend_from_slice(&b2[..SIZE / 2]);
        vec![Step::Send(out), Step::Reset]
    });
    let b3 = body.clone();
    let r3 = Rogue::start(move |s: &Seen| {
        let Some((a, b)) = s.range(SIZE as u64) else {
            return vec![support::rogue::send(
                "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n",
            )];
        };
        let mut out = format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {a}-{b}/{SIZE}\r\nContent-Length: {}\r\nETag: \"e\"\r\n\r\n",
            b - a + 1
        )
        .into_bytes();
        out.extend_from_slice(&b3[a as usize..=b as usize]);
        vec![Step::Send(out)]
    });
    let collector = Collector::start();
    let tracing = format!(
        "    enabled: true\n    exporter: otlp\n    otlp_endpoint: \"{}\"\n    service_name: \"edge-origin\"\n    sampling_ratio: 0.0\n    propagate_context: true\n",
        collector.endpoint()
    );
    let proxy = Proxy::start(&config(
        &[
            ("r1", r1.endpoint()),
            ("r2", r2.endpoint()),
            ("r3", r3.endpoint()),
        ],
        &tracing,
    ));
    // The client's trace is continued (its sampled flag wins over the
    // ratio of 0).
    let parent = format!("00-{TRACE}-{CLIENT_SPAN}-01");
    let r = http::get(proxy.port, "/b/obj", &[("traceparent", &parent)]);
    assert_eq!(r.status, 200);
    assert!(r.body == body, "byte-exact after failover and resume");
    let deadline = std::time::Instant::now() + WAIT;
    let spans = loop {
        let spans = collector.trace(TRACE);
        if spans.iter().any(|s| s.name == "GET /b") {
            break spans;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no trace exported: {}",
            proxy.metrics()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let root = spans
        .iter()
        .find(|s| s.name == "GET /b")
        .expect("the request's span");
    assert_eq!(
        hex::encode(&root.parent_span_id),
        CLIENT_SPAN,
        "continues the client's span"
    );
    assert_eq!(root.kind, 2, "server");
    assert_eq!(
        attr(root, "http.response.status_code").as_deref(),
        Some("200")
    );
    let children: Vec<&Span> = spans.iter().filter(|s| s.span_id != root.span_id).collect();
    for c in &children {
        assert_eq!(
            c.parent_span_id, root.span_id,
            "{} under the request's span",
            c.name
        );
        assert!(
            c.start_time_unix_nano >= root.start_time_unix_nano
                && c.end_time_unix_nano <= root.end_time_unix_nano,
            "{} within the request",
            c.name
        );
    }
    let names: Vec<&str> = children.iter().map(|s| s.name.as_str()).collect();
    for want in ["access", "cache lookup", "resume"] {
        assert!(names.contains(&want), "{want}: {names:?}");
    }
    let upstream: Vec<(Option<String>, Option<String>, Option<String>)> = children
        .iter()
        .filter(|s| s.name == "upstream")
        .map(|s| {
            (
                attr(s, "yatagarasu.replica"),
                attr(s, "yatagarasu.cause"),
                attr(s, "http.response.status_code"),
            )
        })
        .collect();
    assert_eq!(
        upstream,
        vec![
            (Some("r1".into()), Some("http_503".into()), None),
            (Some("r2".into()), None, Some("200".into())),
            (Some("r3".into()), None, Some("206".into())),
        ],
        "one span per attempt, in order"
    );
    // The replicas were sent the trace, each attempt as its own parent.
    let sent = |up: &Rogue| {
        up.seen()
            .iter()
            .filter_map(|s| s.header("traceparent"))
            .collect::<Vec<_>>()
    };
    for (up, name) in [(&r2, "r2"), (&r3, "r3")] {
        let tp = sent(up);
        assert_eq!(tp.len(), 1, "{name}: {tp:?}");
        assert!(
            tp[0].starts_with(&format!("00-{TRACE}-")) && tp[0].ends_with("-01"),
            "{name}: {}",
            tp[0]
        );
        let span_id = &tp[0][36..52];
        let attempt = children
            .iter()
            .find(|s| hex::encode(&s.span_id) == span_id)
            .expect("the attempt's span is the parent the replica was given");
        assert_eq!(attr(attempt, "yatagarasu.replica").as_deref(), Some(name));
    }
    assert!(collector
        .service_names()
        .iter()
        .any(|n| n.contains("edge-origin")));
    // The access line names the trace.
    assert!(
        proxy.wait_log(&format!("trace_id={TRACE}"), WAIT),
        "{}",
        proxy.log()
    );
    // Sampling ratio 0: a request without traceparent is not recorded.
    let before = collector.span_count();
    assert_eq!(proxy.get("/b/obj").status, 200);
    assert!(proxy.wait_metric("yatagarasu_trace_spans_exported_total", before as f64, WAIT));
    assert_eq!(collector.span_count(), before);
}

#[test]
fn a_dead_collector_costs_no_request() {
    let up = Rogue::start(|_| {
        vec![support::rogue::send(
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        )]
    });
    let dead = free_port();
    let tracing = format!(
        "    enabled: true\n    otlp_endpoint: \"http://127.0.0.1:{dead}\"\n    sampling_ratio: 1.0\n"
    );
    let proxy = Proxy::start(&config(&[("only", up.endpoint())], &tracing));
    for _ in 0..20 {
        assert_eq!(proxy.get("/b/k").status, 200);
    }
    let dropped = "yatagarasu_trace_spans_dropped_total{reason=\"export\"}";
    let deadline = std::time::Instant::now() + WAIT;
    while proxy.metric(dropped).unwrap_or(0.0) < 20.0 {
        assert!(std::time::Instant::now() < deadline, "{}", proxy.metrics());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(proxy.wait_log("Trace export failed", WAIT));
}

#[test]
fn a_request_that_fills_the_cache_has_a_fill_span_and_a_hit_none() {
    let up = Rogue::start(|_| {
        vec![support::rogue::send(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nETag: \"f\"\r\n\r\nfresh",
        )]
    });
    let collector = Collector::start();
    let tracing = format!(
        "    enabled: true\n    otlp_endpoint: \"{}\"\n    sampling_ratio: 1.0\n",
        collector.endpoint()
    );
    let cfg = format!(
        "cache:\n  enabled: true\n{}",
        config(&[("only", up.endpoint())], &tracing)
    );
    let proxy = Proxy::start(&cfg);
    let ids = [
        "11111111111111111111111111111111",
        "22222222222222222222222222222222",
    ];
    for (id, cache) in ids.iter().zip(["MISS", "HIT"]) {
        let parent = format!("00-{id}-{CLIENT_SPAN}-01");
        let r = http::get(proxy.port, "/b/f", &[("traceparent", &parent)]);
        assert_eq!((r.status, r.header("x-cache")), (200, Some(cache)));
    }
    let spans_of = |id: &str| {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let spans = collector.trace(id);
            if spans.iter().any(|s| s.name == "GET /b") {
                return spans;
            }
            assert!(std::time::Instant::now() < deadline, "no trace {id}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let miss = spans_of(ids[0]);
    let fill = miss
        .iter()
        .find(|s| s.name == "fill")
        .expect("the miss filled the cache");
    assert_eq!(attr(fill, "yatagarasu.fill_bytes").as_deref(), Some("5"));
    let hit = spans_of(ids[1]);
    assert!(
        hit.iter().all(|s| s.name != "fill" && s.name != "upstream"),
        "a hit goes nowhere"
    );
    let root = hit.iter().find(|s| s.name == "GET /b").expect("root");
    assert_eq!(attr(root, "yatagarasu.cache").as_deref(), Some("HIT"));
}
