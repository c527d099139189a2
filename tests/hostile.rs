//! Hostile upstreams and clients: no byte ever reaches the wrong client.
//!
//! A scripted misbehaving upstream (`support::rogue`) answers with odd but
//! real HTTP (interim 1xx heads, bodies after a 304, bytes past the
//! Content-Length, bad framing, resets mid-body), raw client sockets send what
//! attackers send, and s3s-fs plays an upstream that answers one key with a 500.
//! Each test failed before the fix it covers.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use support::http::{self, Conn};
use support::rogue::{send, Rogue, Step};
use support::*;

/// One bucket `/b` on the given replicas (name, endpoint), in priority order,
/// with health checks off so the upstreams see client traffic only.
fn config(replicas: &[(&str, &str)], breaker: &str) -> String {
    let mut out = format!(
        "buckets:\n  - name: \"b\"\n    path_prefix: \"/b\"\n    s3:\n      bucket: \"bkt\"\n      region: \"us-east-1\"\n      access_key: \"{AK}\"\n      secret_key: \"{SK}\"\n      timeout_seconds: 2\n      replicas:\n"
    );
    for (i, (name, endpoint)) in replicas.iter().enumerate() {
        out.push_str(&format!(
            "        - name: \"{name}\"\n          endpoint: \"{endpoint}\"\n          priority: {}\n",
            i + 1
        ));
    }
    out.push_str(&format!(
        "      circuit_breaker:\n{breaker}\n      health_check:\n        enabled: false\n"
    ));
    out
}

const BREAKER: &str = "        failure_threshold: 5\n        success_threshold: 1\n        timeout_seconds: 60\n        half_open_requests: 1";

/// A proxy with one worker, so every request shares one upstream pool.
fn one_worker(body: &str) -> Proxy {
    Proxy::start_with(body, 1, &[])
}

fn ok(body: &str) -> Vec<Step> {
    vec![send(&format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nETag: \"e\"\r\n\r\n{body}",
        body.len()
    ))]
}

/// Sends `raw` on a new connection and reads until the proxy closes it.
/// Returns what arrived and whether the close was a reset.
fn exchange_to_close(port: u16, raw: &[u8]) -> (Vec<u8>, bool) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(raw).expect("send");
    let mut got = Vec::new();
    let mut tmp = [0u8; 65536];
    loop {
        match read_retry(&mut s, &mut tmp) {
            Ok(0) => return (got, false),
            Ok(n) => got.extend_from_slice(&tmp[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (got, true),
            Err(e) => panic!("read: {e}"),
        }
    }
}

// ---- 1. interim responses ----

#[test]
fn interim_1xx_heads_are_read_past_and_never_leak_to_the_next_client() {
    let rogue = Rogue::start(|r| {
        match r.target.as_str() {
        "/bkt/early" => vec![send(
            "HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst",
        )],
        "/bkt/switch" => vec![send(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: evil\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nleak",
        )],
        _ => ok("second"),
    }
    });
    let proxy = one_worker(&config(&[("r", &rogue.endpoint())], BREAKER));
    let r = proxy.get("/b/early");
    assert_eq!((r.status, r.text().as_str()), (200, "first"));
    // The connection went back to the pool with nothing unread: the next
    // client gets its own response.
    for _ in 0..3 {
        let r = proxy.get("/b/other");
        assert_eq!((r.status, r.text().as_str()), (200, "second"));
    }
    // A 101 from S3 is malformed: a replica failure, never relayed.
    let r = proxy.get("/b/switch");
    assert_eq!(r.status, 502);
    let r = proxy.get("/b/other");
    assert_eq!(r.text(), "second");
    let m = proxy.metrics();
    assert!(
        m.contains(
            "yatagarasu_replica_failures_total{bucket=\"b\",replica=\"r\",reason=\"malformed\"} 1"
        ),
        "{m}"
    );
}

// ---- 2. pooled connections with stray bytes ----

#[test]
fn a_connection_with_bytes_nobody_asked_for_is_closed_not_reused() {
    let rogue = Rogue::start(|r| {
        match r.target.as_str() {
        // A 304 followed by a whole response nobody asked for.
        "/bkt/304" => vec![send(
            "HTTP/1.1 304 Not Modified\r\nETag: \"e\"\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL",
        )],
        // The stray bytes arrive a moment after the response.
        "/bkt/late" => vec![
            send("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
            Step::Sleep(Duration::from_millis(100)),
            send("HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL"),
        ],
        // More bytes than the Content-Length said, in the same write.
        "/bkt/long" => vec![send(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL",
        )],
        // A HEAD answered with a body.
        "/bkt/headbody" => vec![send(
            "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL",
        )],
        _ => ok("good"),
    }
    });
    let proxy = one_worker(&config(&[("r", &rogue.endpoint())], BREAKER));
    let r = http::get(proxy.port, "/b/304", &[("If-None-Match", "\"e\"")]);
    assert_eq!(r.status, 304);
    assert_eq!(proxy.get("/b/next").text(), "good");

    assert_eq!(proxy.get("/b/late").text(), "ok");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(proxy.get("/b/next").text(), "good");

    assert_eq!(proxy.get("/b/long").text(), "abc");
    assert_eq!(proxy.get("/b/next").text(), "good");

    let r = http::head(proxy.port, "/b/headbody");
    assert_eq!(r.status, 200);
    assert_eq!(proxy.get("/b/next").text(), "good");

    // Each poisoned connection was closed: every "next" came on a new one.
    let seen = rogue.seen();
    for (i, s) in seen.iter().enumerate() {
        if s.target == "/bkt/next" {
            assert_ne!(
                s.connection,
                seen[i - 1].connection,
                "reused a poisoned connection: {seen:?}"
            );
        }
    }
}

#[test]
fn framing_doubts_are_replica_failures() {
    let rogue = Rogue::start(|r| {
        match r.target.as_str() {
        "/bkt/both" => vec![send(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        )],
        "/bkt/gzip" => vec![send(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        )],
        "/bkt/plus" => vec![send("HTTP/1.1 200 OK\r\nContent-Length: +3\r\n\r\nabc")],
        "/bkt/zero" => vec![send("HTTP/1.1 000 Zero\r\nContent-Length: 3\r\n\r\nabc")],
        _ => ok("good"),
    }
    });
    let backup = Rogue::start(|_| ok("from backup"));
    let proxy = one_worker(&config(
        &[("r", &rogue.endpoint()), ("backup", &backup.endpoint())],
        "        failure_threshold: 50\n        success_threshold: 1\n        timeout_seconds: 60\n        half_open_requests: 1",
    ));
    for key in ["both", "gzip", "plus", "zero"] {
        let r = proxy.get(&format!("/b/{key}"));
        assert_eq!((r.status, r.text().as_str()), (200, "from backup"), "{key}");
    }
    let m = proxy.metrics();
    assert!(
        m.contains(
            "yatagarasu_replica_failures_total{bucket=\"b\",replica=\"r\",reason=\"malformed\"} 4"
        ),
        "{m}"
    );
}

// ---- 3. resume into a multipart body ----

#[test]
fn a_broken_multipart_206_is_aborted_not_resumed_with_object_bytes() {
    let body = "--sep\r\nContent-Type: text/plain\r\nContent-Range: bytes 0-9/100\r\n\r\n0123456789\r\n--sep\r\nContent-Range: bytes 20-29/100\r\n\r\n";
    let primary = Rogue::start(move |_| {
        vec![
            send(&format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Type: multipart/byteranges; boundary=sep\r\nContent-Length: 200\r\nETag: \"e\"\r\n\r\n{body}"
            )),
            Step::Sleep(Duration::from_millis(50)),
            Step::Reset,
        ]
    });
    let backup = Rogue::start(|r| {
        // Would "resume" with plain object bytes at the offset asked for.
        let range = r.header("range").unwrap_or_default();
        let first: u64 = range
            .trim_start_matches("bytes=")
            .split('-')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let n = 199 - first + 1;
        vec![send(&format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {first}-199/1000\r\nContent-Length: {n}\r\nETag: \"e\"\r\n\r\n{}",
            "X".repeat(n as usize)
        ))]
    });
    let proxy = one_worker(&config(
        &[("p", &primary.endpoint()), ("backup", &backup.endpoint())],
        BREAKER,
    ));
    let (got, reset) = exchange_to_close(
        proxy.port,
        b"GET /b/obj HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9,20-29\r\n\r\n",
    );
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 206"), "{text}");
    assert!(
        !text.contains("XXXX"),
        "object bytes pasted into multipart: {text}"
    );
    assert!(reset, "the cut body must end in a reset");
    assert!(
        backup.seen().is_empty(),
        "backup was asked to resume: {:?}",
        backup.seen()
    );
}

#[test]
fn a_resume_answered_at_the_wrong_offset_is_refused() {
    let data = "0123456789".repeat(10);
    let d = data.clone();
    let primary = Rogue::start(move |_| {
        vec![
            send(&format!(
                "HTTP/1.1 200 OK\r\nContent-Length: 100\r\nETag: \"e\"\r\n\r\n{}",
                &d[..40]
            )),
            Step::Sleep(Duration::from_millis(50)),
            Step::Reset,
        ]
    });
    // Answers every resume from offset 0, whatever was asked.
    let d = data.clone();
    let backup = Rogue::start(move |_| {
        vec![send(&format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-59/100\r\nContent-Length: 60\r\nETag: \"e\"\r\n\r\n{}",
            &d[..60]
        ))]
    });
    let proxy = one_worker(&config(
        &[("p", &primary.endpoint()), ("backup", &backup.endpoint())],
        BREAKER,
    ));
    let (got, reset) = exchange_to_close(proxy.port, b"GET /b/obj HTTP/1.1\r\nHost: x\r\n\r\n");
    let text = String::from_utf8_lossy(&got);
    let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
    assert_eq!(body, &data[..40], "only the primary's bytes");
    assert!(reset);
    assert_eq!(
        backup.seen()[0].header("range").as_deref(),
        Some("bytes=40-99")
    );
}

// ---- 4. truncation that looks complete ----

#[test]
fn a_body_cut_short_reaches_the_client_as_a_reset_for_every_framing() {
    let rogue = Rogue::start(|r| {
        let head = match r.target.as_str() {
            "/bkt/chunked" => "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
            "/bkt/close" => "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello",
            _ => "HTTP/1.1 200 OK\r\nContent-Length: 100\r\nETag: \"e\"\r\n\r\nhello",
        };
        let end = if r.target == "/bkt/close" {
            Step::Reset
        } else {
            Step::Close
        };
        vec![send(head), Step::Sleep(Duration::from_millis(50)), end]
    });
    let proxy = one_worker(&config(&[("r", &rogue.endpoint())], BREAKER));
    for (key, version) in [
        ("chunked", "1.0"),
        ("chunked", "1.1"),
        ("close", "1.0"),
        ("length", "1.0"),
    ] {
        let (got, reset) = exchange_to_close(
            proxy.port,
            format!("GET /b/{key} HTTP/{version}\r\nHost: x\r\n\r\n").as_bytes(),
        );
        let text = String::from_utf8_lossy(&got);
        assert!(text.contains("hello"), "{key} {version}: {text}");
        assert!(
            reset,
            "{key} over HTTP/{version} ended with a clean close: {text}"
        );
    }
}

#[test]
fn a_close_delimited_body_that_ends_cleanly_is_complete() {
    let rogue = Rogue::start(|_| {
        vec![
            send("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nwhole body"),
            Step::Close,
        ]
    });
    let proxy = one_worker(&config(&[("r", &rogue.endpoint())], BREAKER));
    let (got, reset) = exchange_to_close(proxy.port, b"GET /b/k HTTP/1.0\r\nHost: x\r\n\r\n");
    assert!(String::from_utf8_lossy(&got).ends_with("whole body"));
    assert!(!reset);
    let r = proxy.get("/b/k");
    assert_eq!(r.text(), "whole body");
}

// ---- 6. breaker poisoning ----

fn s3_pair() -> (S3, S3) {
    let a = S3::start();
    let b = S3::start();
    for s in [&a, &b] {
        s.create_bucket("bkt");
        s.put("bkt", "k.txt", b"fine");
    }
    (a, b)
}

#[test]
fn requests_every_replica_fails_do_not_open_healthy_breakers() {
    let (a, b) = s3_pair();
    let proxy = Proxy::start(&config(
        &[("a", &a.endpoint()), ("b", &b.endpoint())],
        BREAKER,
    ));
    assert_eq!(proxy.get("/b/k.txt").status, 200);
    // s3s-fs answers 500 to keys that begin with '/': 20 anonymous requests.
    for _ in 0..20 {
        assert_eq!(proxy.get("/b//poison").status, 502, "{}", proxy.log());
    }
    for _ in 0..5 {
        let r = proxy.get("/b/k.txt");
        assert_eq!((r.status, r.text().as_str()), (200, "fine"));
    }
    let ready = proxy.ready_details().text();
    assert!(!ready.contains("open"), "{ready}");
    let m = proxy.metrics();
    assert!(
        m.contains("yatagarasu_request_caused_failures_total{bucket=\"b\",replica=\"a\",reason=\"http_500\"} 20"),
        "{m}"
    );
    assert!(!m.contains("reason=\"http_500\"} 20\nyatagarasu_replica_failures"));
    assert!(
        !m.contains("yatagarasu_replica_failures_total{bucket=\"b\",replica=\"a\""),
        "{m}"
    );
}

#[test]
fn a_replica_that_fails_everything_still_opens_after_the_threshold() {
    let rogue = Rogue::start(|_| {
        vec![send(
            "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n",
        )]
    });
    let proxy = one_worker(&config(
        &[("r", &rogue.endpoint())],
        "        failure_threshold: 3\n        success_threshold: 1\n        timeout_seconds: 60\n        half_open_requests: 1",
    ));
    for _ in 0..3 {
        assert_eq!(proxy.get("/b/k").status, 502);
    }
    let r = proxy.get("/b/k");
    assert_eq!(r.status, 503, "the breaker opened");
    assert_eq!(rogue.seen().len(), 3);
}

// ---- 7. slow heads and connection caps ----

fn server_section(port: u16, extra: &str) -> String {
    format!("server:\n  address: \"127.0.0.1:{port}\"\n  workers: 1\n{extra}")
}

#[test]
fn a_head_trickled_byte_by_byte_is_cut_off_at_the_head_deadline() {
    let rogue = Rogue::start(|_| ok("served"));
    let port = free_port();
    let proxy = Proxy::start(&format!(
        "{}{}",
        server_section(port, "  request_head_timeout_seconds: 1\n"),
        config(&[("r", &rogue.endpoint())], BREAKER)
    ));
    let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let started = Instant::now();
    let head =
        b"GET /b/k HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut closed = false;
    for &b in head.iter() {
        if s.write_all(&[b]).is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        if started.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let text = String::from_utf8_lossy(&got);
    assert!(
        closed || text.starts_with("HTTP/1.1 408"),
        "slow head was not cut off: {text}"
    );
    assert!(!text.contains("served"));
    assert!(rogue.seen().is_empty());
    assert!(proxy
        .metrics()
        .contains("yatagarasu_request_head_timeouts_total 1"));
}

#[test]
fn connections_beyond_max_connections_are_refused_and_counted() {
    let rogue = Rogue::start(|_| ok("served"));
    let port = free_port();
    let proxy = Proxy::start(&format!(
        "{}{}",
        server_section(port, "  max_connections: 3\n"),
        config(&[("r", &rogue.endpoint())], BREAKER)
    ));
    // Readiness probing used a connection; wait until it is closed.
    std::thread::sleep(Duration::from_millis(200));
    let held: Vec<Conn> = (0..3).map(|_| Conn::open(proxy.port).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut extra = Conn::open(proxy.port).unwrap();
    assert!(
        extra.is_closed(Duration::from_secs(2)),
        "a 4th connection was accepted"
    );
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(proxy.get("/b/k").text(), "served");
    let m = proxy.metrics();
    assert!(m.contains("yatagarasu_connections_refused_total 1"), "{m}");
}

// ---- 8. metrics endpoint ----

#[test]
fn a_trickling_metrics_client_does_not_block_scrapes() {
    let rogue = Rogue::start(|_| ok("x"));
    let proxy = Proxy::start(&config(&[("r", &rogue.endpoint())], BREAKER));
    let mut slow = TcpStream::connect(("127.0.0.1", proxy.metrics_port)).unwrap();
    slow.write_all(b"GET /met").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let m = proxy.metrics();
    assert!(m.contains("yatagarasu_requests_total") || m.contains("yatagarasu_"));
    // Answered while the slow client is still connected, its request
    // unfinished: the scrape did not wait for it to be given up on.
    slow.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    match slow.read(&mut byte) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the slow client was answered or closed first: {other:?}"),
    }
    drop(slow);
}

// ---- 9. oversized heads ----

#[test]
fn oversized_heads_get_their_error_before_the_close() {
    let rogue = Rogue::start(|_| ok("x"));
    let proxy = Proxy::start(&config(&[("r", &rogue.endpoint())], BREAKER));
    // A big header, and the client keeps sending after it.
    let mut raw = b"GET /b/k HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    raw.extend(std::iter::repeat_n(b'a', 40_000));
    raw.extend_from_slice(b"\r\n\r\n");
    for _ in 0..5 {
        let (got, _) = exchange_to_close(proxy.port, &raw);
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 431"), "{text}");
        assert!(text.to_ascii_lowercase().contains("connection: close"));
    }
    let garbage = vec![b'x'; 20_000];
    let (got, _) = exchange_to_close(proxy.port, &garbage);
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 400") || text.starts_with("HTTP/1.1 431"),
        "{text}"
    );
    let mut long = b"GET /".to_vec();
    long.extend(std::iter::repeat_n(b'a', 9_000));
    long.extend_from_slice(b" HTTP/1.1\r\nHost: x\r\n\r\n");
    let (got, _) = exchange_to_close(proxy.port, &long);
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 414"));
}

// ---- 10. methods with bodies ----

#[test]
fn uploads_get_405_with_allow_and_the_connection_closes() {
    let rogue = Rogue::start(|_| ok("x"));
    let proxy = Proxy::start(&config(&[("r", &rogue.endpoint())], BREAKER));
    let mut raw = b"PUT /b/k HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n".to_vec();
    raw.extend(std::iter::repeat_n(b'z', 100_000));
    let (got, _) = exchange_to_close(proxy.port, &raw);
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 405"), "{text}");
    assert!(text.contains("Allow: GET, HEAD"), "{text}");
    assert!(text.to_ascii_lowercase().contains("connection: close"));
    assert!(rogue.seen().is_empty());
}

// ---- protocol conformance ----

#[test]
fn absolute_form_targets_use_the_uri_path_only() {
    let rogue = Rogue::start(|_| ok("x"));
    let proxy = Proxy::start(&config(&[("r", &rogue.endpoint())], BREAKER));
    let r = http::raw(
        proxy.port,
        b"GET http://evil.example?/b/k HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    assert_eq!(r.status, 400);
    let r = http::raw(
        proxy.port,
        b"GET http://h.example/b/k HTTP/1.1\r\nHost: h.example\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    assert_eq!(r.status, 200);
    assert!(rogue.seen().iter().all(|s| s.target == "/bkt/k"));
}

#[test]
fn request_header_rules() {
    let rogue = Rogue::start(|_| ok("x"));
    let proxy = Proxy::start(&config(&[("r", &rogue.endpoint())], BREAKER));
    // Headers named in Connection are not forwarded.
    let r = http::get(
        proxy.port,
        "/b/k",
        &[("Range", "bytes=0-0"), ("Connection", "Range, close")],
    );
    assert_eq!(r.status, 200);
    assert_eq!(rogue.seen()[0].header("range"), None);
    // Two Range headers; an invalid Host.
    let r = http::raw(
        proxy.port,
        b"GET /b/k HTTP/1.1\r\nHost: x\r\nRange: bytes=0-1\r\nRange: bytes=5-6\r\n\r\n",
    )
    .unwrap();
    assert_eq!(r.status, 400);
    let r = http::raw(proxy.port, b"GET /b/k HTTP/1.1\r\nHost: a b/c@d\r\n\r\n").unwrap();
    assert_eq!(r.status, 400);
    // HTTP/1.2 is served as HTTP/1.1.
    let r = http::raw(
        proxy.port,
        b"GET /b/k HTTP/1.2\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "x"));
    assert_eq!(rogue.seen().len(), 2);
}

#[test]
fn upstream_status_lines_location_and_date() {
    let rogue = Rogue::start(|r| {
        match r.target.as_str() {
        "/bkt/odd" => vec![send("HTTP/1.1 299 Whatever\r\nContent-Length: 2\r\n\r\nok")],
        "/bkt/moved" => vec![send(
            "HTTP/1.1 301 Moved Permanently\r\nLocation: https://elsewhere.example/k\r\nContent-Length: 0\r\n\r\n",
        )],
        _ => ok("x"),
    }
    });
    let proxy = one_worker(&config(&[("r", &rogue.endpoint())], BREAKER));
    let (got, _) = exchange_to_close(
        proxy.port,
        b"GET /b/odd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 299 \r\n"), "{text}");
    assert!(text.contains("\r\nDate: "), "relayed without Date: {text}");
    let r = proxy.get("/b/moved");
    assert_eq!(r.status, 301);
    assert_eq!(r.header("location"), Some("https://elsewhere.example/k"));
    for path in ["/health", "/nowhere/x", "/b/"] {
        let r = proxy.get(path);
        let date = r
            .header("date")
            .unwrap_or_else(|| panic!("{path}: no Date"));
        assert!(httpdate::parse_http_date(date).is_ok(), "{date}");
    }
}

#[test]
fn version_and_part_are_forwarded_and_signed_subresources_refused_rest_dropped() {
    let rogue = Rogue::start(|_| ok("x"));
    let proxy = Proxy::start(&config(&[("r", &rogue.endpoint())], BREAKER));
    let r = proxy.get("/b/k?versionId=v%2F1&partNumber=2&v=123");
    assert_eq!(r.status, 200);
    let seen = rogue.seen();
    assert_eq!(seen[0].target, "/bkt/k?partNumber=2&versionId=v%2F1");
    let r = proxy.get("/b/k?acl");
    assert_eq!(r.status, 400);
    assert!(r.text().contains("'acl'"), "{}", r.text());
    let r = proxy.get("/b/k?tagging=&x=1");
    assert!(r.text().contains("'tagging'"), "{}", r.text());
    let r = proxy.get("/b/k?v=123");
    assert_eq!(r.status, 200);
    assert_eq!(rogue.seen().len(), 2);
    assert_eq!(rogue.seen()[1].target, "/bkt/k");
}

#[test]
fn a_signed_query_is_accepted_by_a_sigv4_checking_s3() {
    let (a, _b) = s3_pair();
    let proxy = Proxy::start(&config(&[("a", &a.endpoint())], BREAKER));
    // s3s-fs verifies the signature, query included.
    let r = proxy.get("/b/k.txt?partNumber=1");
    assert_ne!(r.status, 403, "{}", r.text());
    assert!(r.status < 500, "{} {}", r.status, r.text());
}

#[test]
fn the_access_log_redacts_query_values() {
    let rogue = Rogue::start(|_| ok("x"));
    let proxy = Proxy::start(&config(&[("r", &rogue.endpoint())], BREAKER));
    proxy.get("/b/k?token=supersecret&sig=abc");
    assert!(proxy.wait_log("token=REDACTED&sig=REDACTED", Duration::from_secs(2)));
    assert!(!proxy.log().contains("supersecret"));
}

/// A flood of clients that exhausts the proxy's file descriptors must not
/// open the replica's breaker (taking the bucket down for everyone once the
/// flood is gone): the request that cannot reach a replica gets a 503 with
/// `Retry-After: 1`, the breaker stays closed, and service is back as soon
/// as descriptors are free.
#[test]
fn running_out_of_file_descriptors_is_not_a_replica_failure() {
    let up = Rogue::start(|_| ok("fine"));
    let body = config(&[("only", &up.endpoint())], BREAKER)
        .replace("failure_threshold: 5", "failure_threshold: 1");
    let body = format!(
        "server:\n  address: \"127.0.0.1:{}\"\n  workers: 1\n  max_connections: 1000\n{body}",
        free_port()
    );
    let proxy = Proxy::start_with_nofile(&body, 1, 48);
    // A client whose request comes once the descriptors are gone.
    let mut first = TcpStream::connect(proxy.addr()).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let mut flood = Vec::new();
    for _ in 0..60 {
        if let Ok(s) = TcpStream::connect(proxy.addr()) {
            flood.push(s);
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    first
        .write_all(b"GET /b/k HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut got = String::new();
    let _ = first.read_to_string(&mut got);
    assert!(got.starts_with("HTTP/1.1 503"), "{got}\n{}", proxy.log());
    assert!(got.contains("Retry-After: 1"), "{got}");
    drop(flood);
    std::thread::sleep(Duration::from_millis(300));
    let m2 = proxy.metrics();
    assert!(
        m2.contains("yatagarasu_circuit_breaker_state{bucket=\"b\",replica=\"only\"} 0"),
        "the breaker must stay closed (threshold 1):\n{m2}"
    );
    assert!(
        m2.contains("reason=\"local_resources\"} 1"),
        "counted as the proxy's own exhaustion:\n{m2}"
    );
    let r = proxy.get("/b/k");
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "fine"),
        "{}",
        proxy.log()
    );
    assert!(proxy
        .log()
        .contains("Out of local resources reaching the replicas"));
}

/// `server.max_upstream_connections` caps the sockets a worker opens to the
/// replicas: more concurrent requests than that wait for a connection to be
/// returned instead of each opening its own, and all are served.
#[test]
fn upstream_connections_are_capped_and_requests_queue_for_them() {
    let up = Rogue::start(|_| {
        let mut steps = vec![Step::Sleep(Duration::from_millis(150))];
        steps.extend(ok("queued"));
        steps
    });
    let body = format!(
        "server:\n  address: \"127.0.0.1:{}\"\n  workers: 1\n  max_upstream_connections: 2\n{}",
        free_port(),
        config(&[("only", &up.endpoint())], BREAKER)
    );
    let proxy = Proxy::start(&body);
    let port = proxy.port;
    let clients: Vec<_> = (0..8)
        .map(|_| std::thread::spawn(move || http::get(port, "/b/k", &[])))
        .collect();
    for c in clients {
        let r = c.join().unwrap();
        assert_eq!((r.status, r.text().as_str()), (200, "queued"));
    }
    let seen = up.seen();
    assert_eq!(seen.len(), 8);
    let connections = seen.iter().map(|s| s.connection).max().unwrap_or(0) + 1;
    assert!(
        connections <= 2,
        "{connections} upstream connections for a cap of 2"
    );
}

/// Issue #27: started from a shell with the usual soft open-file limit of
/// 1024 under a higher hard limit, the proxy raises its soft limit and
/// serves 2,000 connections at once (it refused all but 320 before).
#[test]
fn a_low_soft_open_file_limit_is_raised_and_2000_connections_are_held() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the rlimit passed by pointer.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if lim.rlim_max < 4200 {
        eprintln!(
            "hard open-file limit {} too low for this test; skipped",
            lim.rlim_max
        );
        return;
    }
    // This test's own side needs 2,000 descriptors too.
    let mine = libc::rlimit {
        rlim_cur: lim.rlim_max,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: setrlimit reads the rlimit passed by pointer.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &mine) };
    let up = Rogue::start(|_| ok("x"));
    let proxy = Proxy::start_with_soft_nofile(&config(&[("a", &up.endpoint())], BREAKER), 1, 1024);
    assert!(
        proxy.log().contains("Open-file limit soft="),
        "{}",
        proxy.log()
    );
    assert!(proxy.log().contains("raised_from=1024"), "{}", proxy.log());
    let mut conns: Vec<Conn> = (0..2000)
        .map(|i| Conn::open(proxy.port).unwrap_or_else(|e| panic!("connection {i}: {e}")))
        .collect();
    for (i, c) in conns.iter_mut().enumerate() {
        let r = c
            .request("GET", "/health", &[])
            .unwrap_or_else(|e| panic!("connection {i} was not served: {e}"));
        assert_eq!(r.status, 200, "connection {i}");
    }
    assert!(
        proxy
            .metrics()
            .contains("yatagarasu_connections_refused_total 0"),
        "{}",
        proxy.metrics()
    );
}
