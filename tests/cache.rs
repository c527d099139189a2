//! The origin cache's memory tier through real sockets: a scripted upstream
//! counts the GETs that reach it, the proxy runs as its own process.

mod support;

use std::time::Duration;
use support::http::{self, Conn};
use support::rogue::{ok_with, send, Gate, Rogue, Step};
use support::*;

/// One bucket `/b` with the cache on, on one upstream; `extra` goes into
/// the top-level `cache:` section, `bucket` into the bucket's `cache:`.
fn config(endpoint: &str, extra: &str, bucket: &str) -> String {
    format!(
        "cache:\n  enabled: true\n  cache_layers: [\"memory\"]\n{extra}buckets:\n  - name: \"b\"\n    path_prefix: \"/b\"\n{bucket}    s3:\n      bucket: \"bkt\"\n      endpoint: \"{endpoint}\"\n      access_key: \"{AK}\"\n      secret_key: \"{SK}\"\n      health_check:\n        enabled: false\n"
    )
}

/// An upstream serving `body` for every key, with extra response headers.
fn origin(body: &'static str, headers: &'static str) -> Rogue {
    Rogue::start(move |_| {
        vec![send(&format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nETag: \"v1\"\r\nLast-Modified: Wed, 21 Oct 2026 07:28:00 GMT\r\nContent-Type: text/plain\r\n{headers}\r\n{body}",
            body.len()
        ))]
    })
}

#[test]
fn a_miss_fills_and_the_next_requests_hit_without_upstream() {
    let up = origin("hello cache", "");
    let proxy = Proxy::start(&config(&up.endpoint(), "", ""));
    let first = proxy.get("/b/k.txt");
    assert_eq!((first.status, first.text().as_str()), (200, "hello cache"));
    assert_eq!(first.header("x-cache"), Some("MISS"));
    for _ in 0..5 {
        let r = proxy.get("/b/k.txt");
        assert_eq!((r.status, r.text().as_str()), (200, "hello cache"));
        assert_eq!(r.header("x-cache"), Some("HIT"));
        assert!(r.header("age").is_some());
        assert_eq!(r.header("etag"), Some("\"v1\""));
        assert_eq!(r.header("content-type"), Some("text/plain"));
    }
    assert_eq!(up.gets(), 1, "hits went upstream");
    // Another key, and the same key with another versionId, are other objects.
    assert_eq!(proxy.get("/b/other.txt").header("x-cache"), Some("MISS"));
    assert_eq!(
        proxy.get("/b/k.txt?versionId=2").header("x-cache"),
        Some("MISS")
    );
    assert_eq!(up.gets(), 3);
    let m = proxy.metrics();
    for needle in [
        "yatagarasu_cache_requests_total{bucket=\"b\",result=\"hit\"} 5",
        "yatagarasu_cache_requests_total{bucket=\"b\",result=\"miss\"} 3",
        "yatagarasu_cache_upstream_bytes_saved_total{bucket=\"b\"} 55",
        "yatagarasu_cache_items{layer=\"memory\"} 3",
    ] {
        assert!(m.contains(needle), "{needle}\n{m}");
    }
}

#[test]
fn ranges_conditionals_and_head_are_answered_from_the_copy() {
    let up = origin("0123456789", "");
    let proxy = Proxy::start(&config(&up.endpoint(), "", ""));
    assert_eq!(proxy.get("/b/k").status, 200);
    let r = http::get(proxy.port, "/b/k", &[("Range", "bytes=2-5")]);
    assert_eq!((r.status, r.text().as_str()), (206, "2345"));
    assert_eq!(r.header("content-range"), Some("bytes 2-5/10"));
    assert_eq!(r.header("x-cache"), Some("HIT"));
    let r = http::get(proxy.port, "/b/k", &[("Range", "bytes=-3")]);
    assert_eq!((r.status, r.text().as_str()), (206, "789"));
    let r = http::get(proxy.port, "/b/k", &[("Range", "bytes=10-")]);
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), Some("bytes */10"));
    let r = http::get(proxy.port, "/b/k", &[("If-None-Match", "\"v1\"")]);
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());
    assert_eq!(r.header("etag"), Some("\"v1\""));
    let r = http::get(
        proxy.port,
        "/b/k",
        &[("If-Modified-Since", "Thu, 22 Oct 2026 07:28:00 GMT")],
    );
    assert_eq!(r.status, 304);
    let r = http::get(proxy.port, "/b/k", &[("If-None-Match", "\"v0\"")]);
    assert_eq!((r.status, r.text().as_str()), (200, "0123456789"));
    let r = http::head(proxy.port, "/b/k");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("10"));
    assert_eq!(r.header("x-cache"), Some("HIT"));
    // Keep-alive holds across answers from the cache.
    let mut conn = Conn::open(proxy.port).unwrap();
    for _ in 0..3 {
        let r = conn.request("GET", "/b/k", &[]).unwrap();
        assert_eq!(r.text(), "0123456789");
    }
    assert_eq!(up.gets(), 1);
}

#[test]
fn what_must_not_be_stored_is_not() {
    let up = Rogue::start(|r| {
        let cc = match r.target.as_str() {
            "/bkt/nostore" => "Cache-Control: no-store\r\n",
            "/bkt/private" => "Cache-Control: private, max-age=600\r\n",
            _ => "",
        };
        let status = if r.target == "/bkt/missing" {
            "404 Not Found"
        } else {
            "200 OK"
        };
        vec![send(&format!(
            "HTTP/1.1 {status}\r\nContent-Length: 2\r\n{cc}\r\nok"
        ))]
    });
    let proxy = Proxy::start(&config(&up.endpoint(), "", ""));
    for key in ["nostore", "private", "missing"] {
        for _ in 0..2 {
            assert_eq!(
                proxy.get(&format!("/b/{key}")).header("x-cache"),
                Some("MISS")
            );
        }
    }
    assert_eq!(up.gets(), 6);
    // A Range on a miss goes upstream as asked and is not stored.
    let r = http::get(proxy.port, "/b/ranged", &[("Range", "bytes=0-0")]);
    assert_eq!(r.header("x-cache"), Some("BYPASS"));
    assert_eq!(proxy.get("/b/ranged").header("x-cache"), Some("MISS"));
}

#[test]
fn max_age_expires_the_copy_and_large_objects_are_not_stored() {
    let up = origin("short-lived", "Cache-Control: max-age=60\r\n");
    let proxy = Proxy::start_with_test_clock(
        &config(
            &up.endpoint(),
            "",
            "    cache:\n      max_item_size_mb: 1\n",
        ),
        2,
    );
    assert_eq!(proxy.get("/b/k").header("x-cache"), Some("MISS"));
    assert_eq!(proxy.get("/b/k").header("x-cache"), Some("HIT"));
    proxy.advance_clock(60_001);
    assert_eq!(proxy.get("/b/k").header("x-cache"), Some("MISS"));
    assert_eq!(up.gets(), 2);

    let big = Rogue::start(|_| vec![ok_with("", &vec![b'x'; 1024 * 1024 + 1])]);
    let proxy = Proxy::start(&config(
        &big.endpoint(),
        "",
        "    cache:\n      max_item_size_mb: 1\n",
    ));
    for _ in 0..2 {
        let r = proxy.get("/b/big");
        assert_eq!(r.body.len(), 1024 * 1024 + 1);
    }
    assert_eq!(big.gets(), 2, "an object over max_item_size_mb was stored");
}

#[test]
fn a_bucket_that_opts_out_is_not_cached_and_says_nothing() {
    let up = origin("x", "");
    let proxy = Proxy::start(&config(
        &up.endpoint(),
        "",
        "    cache:\n      enabled: false\n",
    ));
    for _ in 0..2 {
        let r = proxy.get("/b/k");
        assert_eq!(r.text(), "x");
        assert_eq!(r.header("x-cache"), None);
    }
    assert_eq!(up.gets(), 2);
}

/// A proxy whose cache holds `cache_mb`, in front of an origin answering
/// every key with `size` bytes, after `objects` distinct keys went through it.
fn churn(size: usize, cache_mb: u64, objects: usize) -> (Rogue, Proxy) {
    let up = Rogue::start(move |_| {
        let mut out = format!("HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n").into_bytes();
        out.resize(out.len() + size, b'z');
        vec![Step::Send(out)]
    });
    let proxy = Proxy::start(&config(
        &up.endpoint(),
        &format!("  memory:\n    max_cache_size_mb: {cache_mb}\n    max_item_size_mb: 1\n"),
        "",
    ));
    let mut conn = Conn::open(proxy.port).unwrap();
    for i in 0..objects {
        let r = conn.request("GET", &format!("/b/churn-{i}"), &[]).unwrap();
        assert_eq!(r.body.len(), size);
    }
    (up, proxy)
}

#[test]
fn the_memory_tier_stays_within_its_bound_under_churn() {
    let (_up, proxy) = churn(64 * 1024, 2, 200);
    let m = proxy.metrics();
    let bytes: f64 = m
        .lines()
        .find(|l| l.starts_with("yatagarasu_cache_bytes{layer=\"memory\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .expect("cache bytes gauge");
    assert!(bytes <= 2.0 * 1024.0 * 1024.0, "{bytes}");
    assert!(
        !m.contains("yatagarasu_cache_evictions_total{layer=\"memory\"} 0"),
        "{m}"
    );
}

#[test]
fn stale_if_error_serves_an_expired_copy_through_an_outage_then_fresh_again() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let down = Arc::new(AtomicBool::new(false));
    let version = Arc::new(AtomicUsize::new(1));
    let (d, v) = (down.clone(), version.clone());
    let up = Rogue::start(move |_| {
        if d.load(Ordering::SeqCst) {
            return vec![send("HTTP/1.1 503 Slow Down\r\nContent-Length: 0\r\n\r\n")];
        }
        let body = format!("version {}", v.load(Ordering::SeqCst));
        vec![send(&format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nCache-Control: max-age=60\r\n\r\n{body}",
            body.len()
        ))]
    });
    let cfg = config(&up.endpoint(), "  stale_if_error_seconds: 60\n", "").replace(
        "      health_check:",
        "      circuit_breaker:\n        failure_threshold: 2\n        timeout_seconds: 1\n      health_check:",
    );
    let proxy = Proxy::start_with_test_clock(&cfg, 2);
    assert_eq!(proxy.get("/b/k").text(), "version 1");
    down.store(true, Ordering::SeqCst);
    proxy.advance_clock(60_001);
    // Expired, every replica failing (then every breaker open): the copy answers.
    for _ in 0..4 {
        let r = proxy.get("/b/k");
        assert_eq!((r.status, r.text().as_str()), (200, "version 1"));
        assert_eq!(r.header("x-cache"), Some("STALE"));
    }
    assert!(proxy.wait_log(
        "WARN No replica could answer; serving a stale copy",
        Duration::from_secs(2)
    ));
    let warnings = proxy.log().matches("serving a stale copy").count();
    assert_eq!(
        warnings, 1,
        "one WARN per key per minute (one worker served it)"
    );
    // A key never stored has nothing to fall back on.
    assert!(proxy.get("/b/never").status >= 500);
    // Recovery: the breaker half-opens after 1 s, the next request refills.
    down.store(false, Ordering::SeqCst);
    version.store(2, Ordering::SeqCst);
    proxy.advance_clock(1_001);
    let r = proxy.get("/b/k");
    assert_eq!(
        (r.text().as_str(), r.header("x-cache")),
        ("version 2", Some("MISS"))
    );
    assert_eq!(proxy.get("/b/k").header("x-cache"), Some("HIT"));
    let m = proxy.metrics();
    assert!(
        m.contains("yatagarasu_cache_requests_total{bucket=\"b\",result=\"stale\"} 4"),
        "{m}"
    );
}

/// Concurrent requests for an expired copy while the upstream fails slowly:
/// the first leads a fill, the others wait on it, and when it is abandoned
/// each tries the replicas itself and falls back to the stale copy. The
/// outage is still one WARN for the key, and every request is counted once,
/// as stale (not also as a coalesced hit).
#[test]
fn waiters_on_a_failed_fill_fall_back_to_the_stale_copy_with_one_warning() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let down = Arc::new(AtomicBool::new(false));
    let d = down.clone();
    let up = Rogue::start(move |_| {
        if d.load(Ordering::SeqCst) {
            return vec![
                Step::Sleep(Duration::from_millis(400)),
                send("HTTP/1.1 503 Slow Down\r\nContent-Length: 0\r\n\r\n"),
            ];
        }
        vec![send(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nCache-Control: max-age=60\r\n\r\nold",
        )]
    });
    let cfg = config(&up.endpoint(), "  stale_if_error_seconds: 60\n", "");
    let proxy = Proxy::start_with_test_clock(&cfg, 2);
    assert_eq!(proxy.get("/b/k").text(), "old");
    down.store(true, Ordering::SeqCst);
    proxy.advance_clock(60_001);
    let clients: Vec<_> = (0..6)
        .map(|i| {
            let port = proxy.port;
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20 * i));
                let mut conn = Conn::open(port).expect("connect");
                let r = conn.request("GET", "/b/k", &[]).expect("response");
                (r.status, r.text(), r.header("x-cache").map(str::to_string))
            })
        })
        .collect();
    for c in clients {
        let got = c.join().expect("client thread");
        assert_eq!(got, (200, "old".to_string(), Some("STALE".to_string())));
    }
    assert!(proxy.wait_log("serving a stale copy", Duration::from_secs(2)));
    assert_eq!(proxy.log().matches("serving a stale copy").count(), 1);
    let m = proxy.metrics();
    assert!(
        m.contains("yatagarasu_cache_requests_total{bucket=\"b\",result=\"stale\"} 6"),
        "{m}"
    );
    assert!(
        !m.contains("result=\"hit\""),
        "a waiter that fell back was counted as a hit: {m}"
    );
}

#[test]
fn an_expired_copy_is_revalidated_with_its_etag_and_replaced_when_it_changed() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let version = Arc::new(AtomicUsize::new(1));
    let v = version.clone();
    let up = Rogue::start(move |r| {
        let current = format!("\"v{}\"", v.load(Ordering::SeqCst));
        if r.header("if-none-match").as_deref() == Some(current.as_str()) {
            return vec![send(&format!(
                "HTTP/1.1 304 Not Modified\r\nETag: {current}\r\nCache-Control: max-age=60\r\n\r\n"
            ))];
        }
        let body = format!("body of {current}");
        vec![send(&format!(
            "HTTP/1.1 200 OK\r\nETag: {current}\r\nCache-Control: max-age=60\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ))]
    });
    let proxy = Proxy::start_with_test_clock(&config(&up.endpoint(), "", ""), 1);
    assert_eq!(proxy.get("/b/k").header("x-cache"), Some("MISS"));
    proxy.advance_clock(60_001);
    let r = proxy.get("/b/k");
    assert_eq!((r.status, r.text().as_str()), (200, "body of \"v1\""));
    assert_eq!(r.header("x-cache"), Some("REVALIDATED"));
    assert_eq!(
        up.seen()[1].header("if-none-match").as_deref(),
        Some("\"v1\"")
    );
    assert_eq!(proxy.get("/b/k").header("x-cache"), Some("HIT"));
    assert_eq!(up.seen().len(), 2, "the refreshed copy answered");
    // The object changed: the revalidation gets a 200 that replaces the copy.
    version.store(2, Ordering::SeqCst);
    proxy.advance_clock(60_001);
    let r = proxy.get("/b/k");
    assert_eq!(
        (r.text().as_str(), r.header("x-cache")),
        ("body of \"v2\"", Some("MISS"))
    );
    let r = proxy.get("/b/k");
    assert_eq!(
        (r.text().as_str(), r.header("x-cache")),
        ("body of \"v2\"", Some("HIT"))
    );
    assert_eq!(r.header("etag"), Some("\"v2\""));
    let m = proxy.metrics();
    assert!(
        m.contains("yatagarasu_cache_requests_total{bucket=\"b\",result=\"revalidated\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("yatagarasu_cache_requests_total{bucket=\"b\",result=\"miss\"} 2"),
        "{m}"
    );
}

#[test]
fn a_reload_keeps_the_cache_and_a_bucket_that_moved_loses_its_entries() {
    let first = origin("from the first origin", "");
    let second = origin("from the second origin", "");
    let proxy = Proxy::start_with(&config(&first.endpoint(), "", ""), 1, &[]);
    assert_eq!(proxy.get("/b/k").header("x-cache"), Some("MISS"));
    // An unrelated change (a timeout): the copy survives the reload.
    let same_place = config(&first.endpoint(), "", "").replace(
        "      health_check:",
        "      timeout_seconds: 7\n      health_check:",
    );
    proxy.reload(&same_place);
    assert!(proxy.wait_log("Configuration reloaded", Duration::from_secs(5)));
    let r = proxy.get("/b/k");
    assert_eq!(
        (r.text().as_str(), r.header("x-cache")),
        ("from the first origin", Some("HIT"))
    );
    // The bucket now lives elsewhere: its copies are dropped.
    proxy.reload(&config(&second.endpoint(), "", ""));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while proxy.log().matches("Configuration reloaded").count() < 2 {
        assert!(std::time::Instant::now() < deadline, "{}", proxy.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = proxy.get("/b/k");
    assert_eq!(
        (r.text().as_str(), r.header("x-cache")),
        ("from the second origin", Some("MISS"))
    );
}

#[test]
fn purge_and_stats_on_the_admin_port_with_a_token() {
    let up = origin("purgeable", "");
    let token = "0123456789abcdef-admin";
    let cfg = format!(
        "admin:\n  token: \"{token}\"\n{}",
        config(&up.endpoint(), "", "")
    );
    let proxy = Proxy::start(&cfg);
    let admin = |method: &str, path: &str, auth: Option<&str>| {
        http::with_bearer(proxy.metrics_port, method, path, auth)
    };
    for key in ["a.txt", "dir/b%20c.txt"] {
        assert_eq!(
            proxy.get(&format!("/b/{key}")).header("x-cache"),
            Some("MISS")
        );
        assert_eq!(
            proxy.get(&format!("/b/{key}")).header("x-cache"),
            Some("HIT")
        );
    }
    let stats = admin("GET", "/admin/cache/stats", Some(token));
    assert_eq!(stats.status, 200);
    assert!(stats.text().contains("\"items\":2"), "{}", stats.text());
    assert_eq!(admin("GET", "/admin/cache/stats", None).status, 401);
    assert_eq!(
        admin("GET", "/admin/cache/stats", Some("0123456789abcdef-wrong")).status,
        401
    );
    // Never on the public port.
    assert_eq!(http::get(proxy.port, "/admin/cache/stats", &[]).status, 404);
    let r = admin("POST", "/admin/cache/purge/b/dir/b%20c.txt", Some(token));
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "{\"purged\":1,\"purged_disk\":0}")
    );
    assert_eq!(
        proxy.get("/b/dir/b%20c.txt").header("x-cache"),
        Some("MISS")
    );
    assert_eq!(proxy.get("/b/a.txt").header("x-cache"), Some("HIT"));
    let r = admin("POST", "/admin/cache/purge/b", Some(token));
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "{\"purged\":2,\"purged_disk\":0}")
    );
    assert_eq!(proxy.get("/b/a.txt").header("x-cache"), Some("MISS"));
    assert_eq!(
        admin("POST", "/admin/cache/purge/nope", Some(token)).status,
        404
    );
}

#[test]
fn admin_endpoints_are_off_without_a_token() {
    let up = origin("x", "");
    let proxy = Proxy::start(&config(&up.endpoint(), "", ""));
    let mut c = Conn::open(proxy.metrics_port).unwrap();
    let r = c
        .request(
            "GET",
            "/admin/cache/stats",
            &[("Authorization", "Bearer anything-at-all-here")],
        )
        .unwrap();
    assert_eq!(r.status, 404);
}

#[test]
fn a_purge_during_a_fill_wins() {
    // The body arrives in two parts 400 ms apart; the purge lands between.
    let up = Rogue::start(|_| {
        vec![
            send("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfirst"),
            Step::Sleep(Duration::from_millis(400)),
            send("-half"),
        ]
    });
    let token = "0123456789abcdef-admin";
    let cfg = format!(
        "admin:\n  token: \"{token}\"\n{}",
        config(&up.endpoint(), "", "")
    );
    let proxy = Proxy::start(&cfg);
    let port = proxy.port;
    let fetch = std::thread::spawn(move || http::get(port, "/b/k", &[]));
    std::thread::sleep(Duration::from_millis(150));
    let mut c = Conn::open(proxy.metrics_port).unwrap();
    let auth = format!("Bearer {token}");
    let r = c
        .request(
            "POST",
            "/admin/cache/purge/b/k",
            &[("Authorization", &auth)],
        )
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(fetch.join().unwrap().text(), "first-half");
    assert_eq!(
        proxy.get("/b/k").header("x-cache"),
        Some("MISS"),
        "the fill was stored after the purge"
    );
}

/// `objects` distinct objects of `size` bytes pass through a 16 MiB memory
/// tier: the peak RSS stays within the bound plus 64 MiB, and the tier
/// evicted.
fn churn_stays_within_the_bound(size: usize, objects: usize) {
    let (_up, proxy) = churn(size, 16, objects);
    let peak_mib = proxy.peak_rss_kib() / 1024;
    assert!(
        peak_mib <= 16 + 64,
        "peak RSS {peak_mib} MiB for a 16 MiB cache"
    );
    let m = proxy.metrics();
    assert!(
        !m.contains("yatagarasu_cache_evictions_total{layer=\"memory\"} 0"),
        "{m}"
    );
}

#[test]
fn resident_memory_stays_within_the_bound_while_10k_objects_churn() {
    churn_stays_within_the_bound(8 * 1024, 10_000);
}

/// An upstream that serves `body` in `pieces` writes `gap_ms` apart, with
/// an ETag, and honours a single `Range: bytes=N-M` (for resumes).
fn slow_origin(body: Arc<Vec<u8>>, pieces: usize, gap_ms: u64) -> Rogue {
    Rogue::start(move |r| {
        let (first, last, status) = match r.header("range") {
            Some(range) => {
                let spec = range.trim_start_matches("bytes=");
                let (a, b) = spec.split_once('-').unwrap();
                (
                    a.parse::<usize>().unwrap(),
                    b.parse::<usize>().unwrap(),
                    206,
                )
            }
            None => (0, body.len() - 1, 200),
        };
        let part = &body[first..=last];
        let mut head = format!(
            "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nETag: \"big\"\r\n",
            part.len()
        );
        if status == 206 {
            head.push_str(&format!(
                "Content-Range: bytes {first}-{last}/{}\r\n",
                body.len()
            ));
        }
        head.push_str("\r\n");
        let mut steps = vec![Step::Send(head.into_bytes())];
        for chunk in part.chunks(part.len().div_ceil(pieces).max(1)) {
            steps.push(Step::Send(chunk.to_vec()));
            steps.push(Step::Sleep(Duration::from_millis(gap_ms)));
        }
        steps
    })
}

use std::sync::Arc;

fn big_cache(endpoint: &str) -> String {
    config(
        endpoint,
        "  memory:\n    max_cache_size_mb: 64\n    max_item_size_mb: 16\n",
        "",
    )
}

/// GETs `path` with `Connection: close` and compares the body with `want`
/// as it arrives (no copy of the whole body is kept); `true` when every
/// byte matched and nothing was missing.
/// `n` clients at once, each streaming `path` and comparing it with `want`
/// (see [`exact_count`]).
fn readers(
    port: u16,
    path: &'static str,
    want: &Arc<Vec<u8>>,
    n: usize,
) -> Vec<std::thread::JoinHandle<bool>> {
    (0..n)
        .map(|_| {
            let want = want.clone();
            std::thread::spawn(move || streams_exactly(port, path, &want))
        })
        .collect()
}

/// How many of `readers` got their body whole and exact.
fn exact_count(readers: Vec<std::thread::JoinHandle<bool>>) -> usize {
    readers
        .into_iter()
        .filter_map(|c| c.join().ok())
        .filter(|ok| *ok)
        .count()
}

/// The rest of a response on `s` (its head read), to the connection's end.
fn rest_of(s: &mut std::net::TcpStream, len: usize) -> Vec<u8> {
    use std::io::Read;
    let mut got = Vec::with_capacity(len);
    s.set_read_timeout(Some(Duration::from_secs(60))).ok();
    s.read_to_end(&mut got).expect("the body");
    got
}

fn streams_exactly(port: u16, path: &str, want: &[u8]) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() || read_head(&mut s) != want.len() {
        return false;
    }
    let mut buf = vec![0u8; 256 * 1024];
    let mut at = 0;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return at == want.len(),
            Ok(n) if at + n <= want.len() && buf[..n] == want[at..at + n] => at += n,
            _ => return false,
        }
    }
}

#[test]
fn concurrent_misses_on_any_core_cause_one_upstream_get_and_stream_byte_exact() {
    // The case: 100 clients on 2 workers, one cold 64 MiB object.
    const LEN: usize = 64 * 1024 * 1024;
    let body = Arc::new(pattern(LEN, 7));
    let up = slow_origin(body.clone(), 32, 40);
    let proxy = Proxy::start(&config(
        &up.endpoint(),
        "  memory:\n    max_cache_size_mb: 256\n    max_item_size_mb: 128\n",
        "",
    ));
    let port = proxy.port;
    let clients = readers(port, "/b/big.bin", &body, 100);
    assert_eq!(exact_count(clients), 100, "bodies differ or were cut short");
    assert_eq!(
        up.gets(),
        1,
        "{:?}",
        up.seen().iter().map(|s| &s.target).collect::<Vec<_>>()
    );
    let m = proxy.metrics();
    assert!(
        m.contains("yatagarasu_cache_coalesced_total{bucket=\"b\"}"),
        "{m}"
    );
    assert_eq!(proxy.get("/b/big.bin").header("x-cache"), Some("HIT"));
}

#[test]
fn a_fill_broken_mid_body_is_resumed_for_every_waiter() {
    let body = Arc::new(pattern(2 * 1024 * 1024, 9));
    let b = body.clone();
    // The primary sends the head and about half, then resets.
    let primary = Rogue::start(move |_| {
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nETag: \"big\"\r\n\r\n",
            b.len()
        );
        vec![
            Step::Send(head.into_bytes()),
            Step::Send(b[..b.len() / 2].to_vec()),
            Step::Sleep(Duration::from_millis(300)),
            Step::Reset,
        ]
    });
    let backup = slow_origin(body.clone(), 4, 10);
    let cfg = format!(
        "cache:\n  enabled: true\n  memory:\n    max_cache_size_mb: 64\n    max_item_size_mb: 16\nbuckets:\n  - name: \"b\"\n    path_prefix: \"/b\"\n    s3:\n      bucket: \"bkt\"\n      access_key: \"{AK}\"\n      secret_key: \"{SK}\"\n      replicas:\n        - {{ name: \"p\", endpoint: \"{}\", priority: 1 }}\n        - {{ name: \"s\", endpoint: \"{}\", priority: 2 }}\n      health_check:\n        enabled: false\n",
        primary.endpoint(),
        backup.endpoint()
    );
    let proxy = Proxy::start(&cfg);
    let port = proxy.port;
    let clients: Vec<_> = (0..8)
        .map(|_| std::thread::spawn(move || http::get(port, "/b/big.bin", &[])))
        .collect();
    let want = sha256(&body);
    for c in clients {
        let r = c.join().unwrap();
        assert_eq!(sha256(&r.body), want);
    }
    assert_eq!(primary.gets(), 1);
    assert_eq!(backup.gets(), 1, "one resume, for every waiter");
    assert!(backup.seen()[0].header("range").is_some());
}

#[test]
fn when_a_fill_cannot_be_completed_every_waiter_is_aborted() {
    let body = pattern(1024 * 1024, 3);
    let up = Rogue::start(move |_| {
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nETag: \"e\"\r\n\r\n",
            body.len()
        );
        vec![
            Step::Send(head.into_bytes()),
            Step::Send(body[..1000].to_vec()),
            Step::Sleep(Duration::from_millis(300)),
            Step::Reset,
        ]
    });
    let proxy = Proxy::start(&big_cache(&up.endpoint()));
    let port = proxy.port;
    let clients: Vec<_> = (0..6)
        .map(|_| std::thread::spawn(move || http::try_get(port, "/b/x", &[])))
        .collect();
    for c in clients {
        assert!(
            c.join().unwrap().is_err(),
            "a short body was presented as complete"
        );
    }
}

#[test]
fn the_leaders_client_leaving_does_not_cancel_the_fill() {
    use std::io::{Read, Write};
    let body = Arc::new(pattern(2 * 1024 * 1024, 5));
    let up = slow_origin(body.clone(), 8, 60);
    let proxy = Proxy::start(&big_cache(&up.endpoint()));
    // The leader reads a little and hangs up.
    let mut leader = std::net::TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    leader
        .write_all(b"GET /b/big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut first = [0u8; 1024];
    let _ = leader.read(&mut first).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let port = proxy.port;
    let waiters: Vec<_> = (0..4)
        .map(|_| std::thread::spawn(move || http::get(port, "/b/big.bin", &[])))
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    drop(leader);
    let want = sha256(&body);
    for w in waiters {
        assert_eq!(sha256(&w.join().unwrap().body), want);
    }
    assert_eq!(up.gets(), 1);
}

#[test]
fn waiters_on_an_uncacheable_answer_fetch_for_themselves() {
    let up = Rogue::start(|_| {
        vec![
            send("HTTP/1.1 200 OK\r\nContent-Length: 6\r\nCache-Control: no-store\r\n\r\n"),
            Step::Sleep(Duration::from_millis(300)),
            send("nocopy"),
        ]
    });
    let proxy = Proxy::start(&config(&up.endpoint(), "", ""));
    let port = proxy.port;
    let clients: Vec<_> = (0..4)
        .map(|i| {
            std::thread::sleep(Duration::from_millis(if i == 0 { 0 } else { 30 }));
            std::thread::spawn(move || http::get(port, "/b/k", &[]))
        })
        .collect();
    for c in clients {
        assert_eq!(c.join().unwrap().text(), "nocopy");
    }
    assert_eq!(up.gets(), 4, "nothing was shared or stored");
}

/// An upstream serving `len` bytes of `pattern(len, seed)` for `/bkt/k<seed>`.
fn patterned_origin(len: usize) -> Rogue {
    Rogue::start(move |r| {
        let seed: u64 = r
            .target
            .rsplit("/k")
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut out =
            format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nETag: \"{seed}\"\r\n\r\n")
                .into_bytes();
        out.extend_from_slice(&pattern(len, seed));
        vec![Step::Send(out)]
    })
}

/// Reads one response head from `s`; its Content-Length.
fn read_head(s: &mut std::net::TcpStream) -> usize {
    use std::io::Read;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).expect("head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    head.lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("content-length")
}

fn by_reference_bytes(proxy: &Proxy) -> u64 {
    let m = proxy.metrics();
    m.lines()
        .find_map(|l| l.strip_prefix("yatagarasu_cache_sent_by_reference_bytes_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no by-reference counter\n{m}"))
}

#[test]
fn large_hits_sent_by_reference_keep_their_bytes_after_the_copy_is_purged_and_replaced() {
    use std::io::{Read, Write};
    const MB: usize = 1024 * 1024;
    let up = patterned_origin(4 * MB);
    let token = "0123456789abcdef-admin";
    let cfg = format!(
        "admin:\n  token: \"{token}\"\n{}",
        config(
            &up.endpoint(),
            "  memory:\n    max_cache_size_mb: 64\n    max_item_size_mb: 8\n",
            ""
        )
    );
    let proxy = Proxy::start_with(&cfg, 1, &[]);
    let bearer = format!("Bearer {token}");
    let purge = |path: &str| {
        let r = Conn::open(proxy.metrics_port)
            .unwrap()
            .request("POST", path, &[("Authorization", bearer.as_str())])
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    };
    let mut other = Conn::open(proxy.port).unwrap();
    let mut churn = |keys: std::ops::RangeInclusive<u64>| {
        for i in keys {
            let r = other.request("GET", &format!("/b/k{i}"), &[]).unwrap();
            assert_eq!(sha256(&r.body), sha256(&pattern(4 * MB, i)));
        }
    };
    // Bodies stored and dropped before: memory that an allocator would
    // hand out again (which a mapped body never is).
    churn(7..=9);
    purge("/admin/cache/purge/b");
    assert_eq!(proxy.get("/b/k0").header("x-cache"), Some("MISS"));

    // A client that reads slowly: the hit's pages are in the kernel's
    // socket queues while the copy is purged and new bodies are mapped.
    let mut slow = std::net::TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    slow.write_all(b"GET /b/k0 HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let len = read_head(&mut slow);
    assert_eq!(len, 4 * MB);
    let mut got = vec![0u8; len];
    slow.read_exact(&mut got[..MB]).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    purge("/admin/cache/purge/b/k0");
    // Most of the rest: the proxy finishes its send and drops the body,
    // whose last pages are still queued for this client.
    slow.read_exact(&mut got[MB..3 * MB]).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..3 {
        churn(1..=3);
        purge("/admin/cache/purge/b");
    }
    churn(1..=1);
    slow.read_exact(&mut got[3 * MB..]).unwrap();
    assert_eq!(
        sha256(&got),
        sha256(&pattern(4 * MB, 0)),
        "bytes changed in flight"
    );
    assert!(by_reference_bytes(&proxy) >= 4 * MB as u64);

    // The same connection keeps working (the socket's mode changed for the
    // splice): another large hit, then a request the runtime reads.
    slow.write_all(b"GET /b/k1 HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let len = read_head(&mut slow);
    let mut body = vec![0u8; len];
    slow.read_exact(&mut body).unwrap();
    assert_eq!(sha256(&body), sha256(&pattern(4 * MB, 1)));
    slow.write_all(b"GET /b/k0 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let len = read_head(&mut slow);
    let mut body = Vec::new();
    slow.read_to_end(&mut body).unwrap();
    assert_eq!(
        (body.len(), sha256(&body)),
        (len, sha256(&pattern(4 * MB, 0)))
    );
}

#[test]
fn with_zero_copy_off_hits_are_copied() {
    let up = patterned_origin(256 * 1024);
    let cfg = format!(
        "server:\n  address: \"127.0.0.1:{}\"\n  workers: 1\n  zero_copy: off\n{}",
        free_port(),
        config(&up.endpoint(), "", "")
    );
    let proxy = Proxy::start(&cfg);
    for _ in 0..3 {
        let r = proxy.get("/b/k5");
        assert_eq!(sha256(&r.body), sha256(&pattern(256 * 1024, 5)));
    }
    assert_eq!(by_reference_bytes(&proxy), 0);
}

#[test]
fn resident_memory_stays_within_the_bound_while_mapped_bodies_churn() {
    // 256 KiB bodies live in mappings of their own: evicted ones must be
    // unmapped (250 MiB pass through a 16 MiB cache).
    churn_stays_within_the_bound(256 * 1024, 1_000);
}

/// Pipelined requests of every kind on one connection, written in random
/// fragments, through the cache: hits sent by reference and copied, misses,
/// HEAD, ranges, conditionals, empty bodies, 404s. Every answer arrives in
/// order, complete and byte-exact; none carries another request's bytes.
#[test]
fn pipelined_requests_of_every_kind_are_answered_in_order_and_byte_exact() {
    use std::io::Write;
    fn len_of(kind: &str) -> Option<usize> {
        match kind {
            "small" => Some(1000),
            "mid" => Some(70_000),
            "big" => Some(3 * 1024 * 1024),
            "zero" => Some(0),
            _ => None,
        }
    }
    fn body_of(key: &str) -> Option<Vec<u8>> {
        let kind = key.split('-').next().unwrap_or("");
        let seed = key.bytes().fold(5u64, |h, b| h * 31 + b as u64);
        len_of(kind).map(|n| pattern(n, seed))
    }
    let up = Rogue::start(|seen| {
        let key = seen.target.trim_start_matches("/bkt/").to_string();
        match body_of(&key) {
            None => vec![send("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")],
            Some(body) => vec![ok_with(
                "ETag: \"v1\"\r\nCache-Control: max-age=600\r\n",
                &body,
            )],
        }
    });
    let proxy = Proxy::start(&config(&up.endpoint(), "", ""));
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    for round in 0..30 {
        let mut asked = Vec::new();
        let mut raw = Vec::new();
        for _ in 0..2 + next(10) {
            let kind = ["small", "mid", "big", "zero", "none"][next(5) as usize];
            let key = format!("{kind}-{}", next(3));
            let head = next(4) == 0;
            let extra = match next(10) {
                0 => "Range: bytes=10-99\r\n",
                1 => "If-None-Match: \"other\"\r\n",
                2 => "Range: bytes=99999999-\r\n",
                _ => "",
            };
            let method = if head { "HEAD" } else { "GET" };
            raw.extend_from_slice(
                format!("{method} /b/{key} HTTP/1.1\r\nHost: x\r\n{extra}\r\n").as_bytes(),
            );
            asked.push((head, key, extra));
        }
        let mut c = Conn::open(proxy.port).expect("connect");
        let mut at = 0;
        while at < raw.len() {
            let to = (at + 1 + next(200) as usize).min(raw.len());
            c.stream.write_all(&raw[at..to]).expect("write");
            at = to;
        }
        for (i, (head, key, extra)) in asked.iter().enumerate() {
            let what = format!("round {round}, request {i}: {key} {extra:?} head={head}");
            let r = c
                .read_response(*head)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let Some(want) = body_of(key) else {
                assert_eq!(r.status, 404, "{what}");
                continue;
            };
            let length = r
                .header("content-length")
                .and_then(|v| v.parse::<usize>().ok());
            match r.status {
                // Whole (the scripted upstream ignores Range, relayed as is).
                200 if *head => assert_eq!(length, Some(want.len()), "{what}"),
                200 => assert!(r.body == want, "{what}: the body differs"),
                206 if extra.contains("10-99") => {
                    assert!(
                        *head || r.body == want[10..100],
                        "{what}: the range differs"
                    )
                }
                416 if extra.contains("10-99") => assert!(want.len() <= 10, "{what}"),
                416 if extra.contains("99999999") => {}
                s => panic!("{what}: status {s}"),
            }
        }
    }
}

/// Issue #24: a purge of everything is every bucket's purge; per-bucket
/// stats and the cache's settings, the other system's endpoint names.
#[test]
fn purge_everything_per_bucket_stats_and_info_on_the_admin_port() {
    let up = origin("purgeable", "");
    let token = "0123456789abcdef-admin";
    let second = config(&up.endpoint(), "", "")
        .split("buckets:\n")
        .nth(1)
        .unwrap_or_default()
        .replace("name: \"b\"", "name: \"c\"")
        .replace("path_prefix: \"/b\"", "path_prefix: \"/c\"");
    let cfg = format!(
        "admin:\n  token: \"{token}\"\n{}{second}",
        config(&up.endpoint(), "", "")
    );
    let proxy = Proxy::start(&cfg);
    let admin =
        |method: &str, path: &str| http::with_bearer(proxy.metrics_port, method, path, Some(token));
    for path in ["/b/x", "/b/y", "/c/x"] {
        assert_eq!(proxy.get(path).header("x-cache"), Some("MISS"));
        assert_eq!(proxy.get(path).header("x-cache"), Some("HIT"));
    }
    let stats: serde_json::Value =
        serde_json::from_slice(&admin("GET", "/admin/cache/stats/b").body).unwrap();
    assert_eq!(stats["layers"][0]["items"], 2, "{stats}");
    assert_eq!(admin("GET", "/admin/cache/stats/nope").status, 404);
    let info: serde_json::Value =
        serde_json::from_slice(&admin("GET", "/admin/cache/info").body).unwrap();
    assert_eq!(info["enabled"], true, "{info}");
    assert_eq!(info["buckets"].as_array().map(Vec::len), Some(2), "{info}");
    let r = admin("POST", "/admin/cache/purge");
    assert_eq!(r.status, 200);
    let purged: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(purged["purged"], 3, "{purged}");
    for path in ["/b/x", "/b/y", "/c/x"] {
        assert_eq!(proxy.get(path).header("x-cache"), Some("MISS"), "{path}");
    }
}

/// An origin for one object of `body`: a plain GET gets the head and the
/// first MiB, waits for `gate`, then the rest in 256 KiB pieces; a Range
/// GET is answered at once (206).
fn gated_origin(body: Arc<Vec<u8>>, gate: Gate) -> Rogue {
    Rogue::start(move |r| {
        if let Some(range) = r.header("range") {
            let spec = range.trim_start_matches("bytes=");
            let (a, b) = spec.split_once('-').unwrap_or(("0", ""));
            let first: usize = a.parse().unwrap_or(0);
            let last: usize = b.parse().unwrap_or(body.len() - 1).min(body.len() - 1);
            let mut out = format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nETag: \"big\"\r\nContent-Range: bytes {first}-{last}/{}\r\n\r\n",
                last + 1 - first,
                body.len()
            )
            .into_bytes();
            out.extend_from_slice(&body[first..=last]);
            return vec![Step::Send(out)];
        }
        let mut steps = vec![Step::Send(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nETag: \"big\"\r\n\r\n",
                body.len()
            )
            .into_bytes(),
        )];
        const MIB: usize = 1024 * 1024;
        steps.push(Step::Send(body[..MIB].to_vec()));
        steps.push(Step::Wait(gate.clone()));
        for chunk in body[MIB..].chunks(256 * 1024) {
            steps.push(Step::Send(chunk.to_vec()));
            steps.push(Step::Sleep(Duration::from_millis(2)));
        }
        steps
    })
}

fn waiters(proxy: &Proxy) -> f64 {
    proxy.metric("yatagarasu_cache_waiters").unwrap_or(-1.0)
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_object_over_the_item_limit_is_fetched_once_for_a_burst_and_a_reader_left_behind_resumes() {
    // 32 MiB with the 8 MiB item limit: too large to store, fetched once
    // for everyone (it was fetched once per client).
    const LEN: usize = 32 * 1024 * 1024;
    const CLIENTS: usize = 24;
    let body = Arc::new(pattern(LEN, 11));
    let gate = Gate::default();
    let up = gated_origin(body.clone(), gate.clone());
    let proxy = Proxy::start(&config(
        &up.endpoint(),
        "  memory:\n    max_cache_size_mb: 64\n    max_item_size_mb: 8\n",
        "",
    ));
    let port = proxy.port;
    let clients = readers(port, "/b/huge.bin", &body, CLIENTS);
    // Every client but the leader waits on the leader's fetch.
    wait_until("the burst waits on one fetch", || {
        waiters(&proxy) == (CLIENTS - 1) as f64
    });
    // One more reader that reads the head, then nothing until the others
    // are done: the fetch's window moves past it.
    use std::io::Write;
    let mut slow = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    slow.write_all(b"GET /b/huge.bin HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .expect("request");
    wait_until("the slow reader joins", || {
        waiters(&proxy) == CLIENTS as f64
    });
    gate.open();
    assert_eq!(
        exact_count(clients),
        CLIENTS,
        "bodies differ or were cut short"
    );
    assert_eq!(read_head(&mut slow), LEN);
    let got = rest_of(&mut slow, LEN);
    assert!(
        got == *body,
        "the slow reader's body differs ({} bytes)",
        got.len()
    );
    let seen = up.seen();
    let whole = seen.iter().filter(|s| s.header("range").is_none()).count();
    let ranged = seen.len() - whole;
    assert_eq!(whole, 1, "one fetch of the whole object for the burst");
    assert!(ranged >= 1, "the slow reader resumed with a range");
    let m = proxy.metrics();
    assert!(
        m.contains(&format!(
            "yatagarasu_cache_waiters_detached_total{{bucket=\"b\"}} {ranged}\n"
        )),
        "{m}"
    );
    assert!(
        m.contains(&format!(
            "yatagarasu_cache_coalesced_total{{bucket=\"b\"}} {CLIENTS}\n"
        )),
        "{m}"
    );
    // Not stored: the next request fetches it again.
    assert_eq!(proxy.get("/b/huge.bin").header("x-cache"), Some("MISS"));
}

/// Issue #23: with the budget room for the whole object, a burst's slowest
/// reader stays attached to the one fetch: no second origin request (it
/// was resumed with a range, the 8 MiB window having moved past it).
#[test]
fn a_burst_s_slow_reader_stays_on_the_one_fetch_while_the_budget_holds_the_object() {
    const LEN: usize = 32 * 1024 * 1024;
    let body = Arc::new(pattern(LEN, 12));
    let gate = Gate::default();
    let up = gated_origin(body.clone(), gate.clone());
    // Fill budget: max(256 MiB / 4, 4 x 8 MiB) = 64 MiB; half holds 32 MiB.
    let proxy = Proxy::start(&config(
        &up.endpoint(),
        "  memory:\n    max_cache_size_mb: 256\n    max_item_size_mb: 8\n",
        "",
    ));
    let port = proxy.port;
    let leader = readers(port, "/b/huge.bin", &body, 1);
    wait_until("the leader's fetch started", || up.seen().len() == 1);
    use std::io::Write;
    let mut slow = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    slow.write_all(b"GET /b/huge.bin HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .expect("request");
    wait_until("the slow reader waits on the fetch", || {
        waiters(&proxy) == 1.0
    });
    gate.open();
    assert_eq!(exact_count(leader), 1, "the leader's body");
    assert_eq!(read_head(&mut slow), LEN);
    let got = rest_of(&mut slow, LEN);
    assert!(got == *body, "the slow reader's body ({} bytes)", got.len());
    assert_eq!(up.seen().len(), 1, "one origin request: {:?}", up.seen());
    let detached = proxy.metric("yatagarasu_cache_waiters_detached_total{bucket=\"b\"}");
    assert_eq!(detached.unwrap_or(0.0), 0.0);
}

/// Issue #23: with slices on, requests that arrive once a large object's
/// size is known take the slice path; they wait on the slices the leader's
/// whole fetch stores as it goes, instead of fetching every slice again
/// (one whole GET plus a range GET per slice before).
#[test]
fn with_slices_on_a_burst_on_a_large_object_makes_one_origin_request() {
    const LEN: usize = 32 * 1024 * 1024;
    const CLIENTS: usize = 12;
    let body = Arc::new(pattern(LEN, 13));
    let gate = Gate::default();
    let up = gated_origin(body.clone(), gate.clone());
    let proxy = Proxy::start(&config(
        &up.endpoint(),
        "  slice_size_mb: 4\n  memory:\n    max_cache_size_mb: 256\n    max_item_size_mb: 8\n",
        "",
    ));
    let port = proxy.port;
    // The leader has the head: the object's size is known (its slice
    // metadata stored); its body waits at the origin's gate. The leader's
    // client reads on (a pass-through fill goes at its leader's pace).
    let (has_head, head) = std::sync::mpsc::channel();
    let leader = {
        let body = body.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
            s.write_all(b"GET /b/huge.bin HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                .expect("request");
            let len = read_head(&mut s);
            let _ = has_head.send(len);
            rest_of(&mut s, LEN) == *body
        })
    };
    assert_eq!(head.recv().expect("the leader's head"), LEN);
    let clients = readers(port, "/b/huge.bin", &body, CLIENTS);
    wait_until("the burst waits on the first slice", || {
        waiters(&proxy) == CLIENTS as f64
    });
    gate.open();
    assert_eq!(
        exact_count(clients),
        CLIENTS,
        "bodies differ or were cut short\n{}",
        proxy.log()
    );
    assert!(
        leader.join().expect("leader"),
        "the leader's body\n{}",
        proxy.log()
    );
    let seen = up.seen();
    assert_eq!(seen.len(), 1, "one origin request: {:?}", seen);
    assert!(seen[0].header("range").is_none());
    // Stored as slices: a range is a hit now, with no origin request.
    let r = http::get(port, "/b/huge.bin", &[("Range", "bytes=20000000-20000099")]);
    assert_eq!(r.status, 206);
    assert!(r.body[..] == body[20000000..20000100]);
    assert_eq!(up.seen().len(), 1);
}

/// Issue #23: a warm object went upstream during a hit benchmark. A copy is
/// aged by the wall clock; when that clock was stepped back (NTP does, on
/// VMs often), every copy stored in the stepped-over span read as stored in
/// the future, which counted as expired: each went upstream once more.
#[test]
fn a_wall_clock_stepped_back_does_not_expire_warm_copies() {
    let up = origin("warm", "Cache-Control: max-age=600\r\n");
    let proxy = Proxy::start_with_test_clock(&config(&up.endpoint(), "", ""), 1);
    assert_eq!(proxy.get("/b/k").header("x-cache"), Some("MISS"));
    assert_eq!(proxy.get("/b/k").header("x-cache"), Some("HIT"));
    proxy.step_clock_back(5_000);
    for _ in 0..3 {
        let r = proxy.get("/b/k");
        assert_eq!(r.header("x-cache"), Some("HIT"), "{}", r.text());
        assert_eq!(r.header("age"), Some("0"));
    }
    assert_eq!(up.seen().len(), 1, "a warm copy went upstream");
}

#[test]
fn the_clock_moves_only_in_a_process_started_for_tests() {
    let up = origin("timed", "Cache-Control: max-age=60\r\n");
    let token = "0123456789abcdef-admin";
    let cfg = format!(
        "admin:\n  token: \"{token}\"\n{}",
        config(&up.endpoint(), "", "")
    );
    let proxy = Proxy::start(&cfg);
    assert_eq!(proxy.get("/b/k").header("x-cache"), Some("MISS"));
    let mut c = Conn::open(proxy.metrics_port).unwrap();
    let bearer = format!("Bearer {token}");
    let r = c
        .request(
            "POST",
            "/admin/debug/advance-clock?ms=3600000",
            &[("Authorization", &bearer)],
        )
        .unwrap();
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(proxy.get("/b/k").header("x-cache"), Some("HIT"));
}

#[test]
fn the_admin_api_answers_on_the_main_port_too() {
    let up = origin("admin on the main port", "");
    let token = "0123456789abcdef-admin";
    let cfg = format!(
        "admin:\n  token: \"{token}\"\n  main_port: true\n{}",
        config(&up.endpoint(), "", "")
    );
    let proxy = Proxy::start(&cfg);
    let admin = |method: &str, path: &str, auth: Option<&str>| {
        http::with_bearer(proxy.port, method, path, auth)
    };
    assert_eq!(proxy.get("/b/k").header("x-cache"), Some("MISS"));
    assert_eq!(proxy.get("/b/k").header("x-cache"), Some("HIT"));
    let stats = admin("GET", "/admin/cache/stats", Some(token));
    assert_eq!(stats.status, 200, "{}", stats.text());
    assert!(stats.text().contains("\"items\":1"), "{}", stats.text());
    assert_eq!(admin("GET", "/admin/cache/stats", None).status, 401);
    assert_eq!(
        admin("POST", "/admin/cache/purge/b", Some("wrong-token-0000")).status,
        401
    );
    let purged = admin("POST", "/admin/cache/purge/b", Some(token));
    assert_eq!(purged.status, 200, "{}", purged.text());
    assert_eq!(proxy.get("/b/k").header("x-cache"), Some("MISS"));
    // Without admin.main_port, /admin/ is an ordinary path there.
    let plain = Proxy::start(&format!(
        "admin:\n  token: \"{token}\"\n{}",
        config(&up.endpoint(), "", "")
    ));
    let mut c = Conn::open(plain.port).unwrap();
    let r = c.request("POST", "/admin/cache/purge", &[]).unwrap();
    assert_eq!(r.status, 405, "{}", r.text());
    assert_eq!(plain.get("/admin/cache/stats").status, 404);
}
