//! Slices of a large object through real sockets: a scripted origin serves a
//! 300 MiB object it never holds (bytes computed from the offset and the
//! object's version), honours `Range` and `If-Match`, and records every
//! request; the proxy caches it in 1 MiB slices.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use support::http;
use support::rogue::{Rogue, Seen, Step};
use support::*;

const MIB: u64 = 1024 * 1024;
const TOTAL: u64 = 300 * MIB;

fn byte_at(offset: u64, version: u64) -> u8 {
    (offset
        .wrapping_mul(7)
        .wrapping_add(offset >> 13)
        .wrapping_add(version * 101)
        % 251) as u8
}

fn expected(first: u64, last: u64, version: u64) -> Vec<u8> {
    (first..=last).map(|o| byte_at(o, version)).collect()
}

/// The origin: `version` picks the object's content and ETag.
fn origin(version: Arc<AtomicU64>) -> Rogue {
    Rogue::start(move |s: &Seen| answer(s, version.load(Ordering::SeqCst)))
}

/// The origin's answer to `s` for the object's version `v`.
fn answer(s: &Seen, v: u64) -> Vec<Step> {
    {
        let etag = format!("\"v{v}\"");
        if let Some(m) = s.header("if-match") {
            if m != etag {
                return vec![Step::Send(
                    b"HTTP/1.1 412 Precondition Failed\r\nContent-Length: 0\r\n\r\n".to_vec(),
                )];
            }
        }
        let (first, last) = match s.range(TOTAL) {
            Some((a, _)) if a >= TOTAL => {
                return vec![Step::Send(
                    format!("HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{TOTAL}\r\nContent-Length: 0\r\n\r\n")
                        .into_bytes(),
                )]
            }
            Some(r) => r,
            None => return vec![Step::Send(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n".to_vec())],
        };
        let mut out = format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {first}-{last}/{TOTAL}\r\nContent-Length: {}\r\nETag: {etag}\r\nContent-Type: video/mp4\r\n\r\n",
            last - first + 1
        )
        .into_bytes();
        out.extend_from_slice(&expected(first, last, v));
        vec![Step::Send(out)]
    }
}

fn config(endpoint: &str) -> String {
    format!(
        "cache:\n  enabled: true\n  cache_layers: [\"memory\"]\n  slice_size_mb: 1\n  memory:\n    max_cache_size_mb: 64\nbuckets:\n  - name: \"b\"\n    path_prefix: \"/b\"\n    s3:\n      bucket: \"bkt\"\n      endpoint: \"{endpoint}\"\n      access_key: \"{AK}\"\n      secret_key: \"{SK}\"\n      health_check:\n        enabled: false\n"
    )
}

fn range(p: &Proxy, first: u64, last: u64) -> http::Resp {
    http::get(
        p.port,
        "/b/movie.mp4",
        &[("Range", &format!("bytes={first}-{last}"))],
    )
}

/// The upstream requests after the first `skip`: (Range, If-Match).
fn asked(up: &Rogue, skip: usize) -> Vec<(String, Option<String>)> {
    up.seen()
        .iter()
        .skip(skip)
        .map(|s| (s.header("range").unwrap_or_default(), s.header("if-match")))
        .collect()
}

fn slice_range(n: u64) -> String {
    format!("bytes={}-{}", n * MIB, (n + 1) * MIB - 1)
}

#[test]
fn a_range_of_a_large_object_fetches_one_slice_and_the_next_hits() {
    let version = Arc::new(AtomicU64::new(1));
    let up = origin(version.clone());
    let p = Proxy::start(&config(&up.endpoint()));
    let (a, b) = (150 * MIB + 4096, 150 * MIB + 4096 + 100 * 1024 - 1);
    let r = range(&p, a, b);
    assert_eq!(r.status, 206, "{}", p.log());
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes {a}-{b}/{TOTAL}").as_str())
    );
    assert_eq!(r.header("x-cache"), Some("MISS"));
    assert_eq!(r.header("etag"), Some("\"v1\""));
    assert_eq!(r.header("content-type"), Some("video/mp4"));
    assert!(r.body == expected(a, b, 1), "body of the first range");
    assert_eq!(
        asked(&up, 0),
        [(slice_range(150), None)],
        "one slice, not the object"
    );

    // Another range in the same slice: no upstream request.
    let r = range(&p, 150 * MIB, 150 * MIB + 9);
    assert_eq!((r.status, r.header("x-cache")), (206, Some("HIT")));
    assert!(r.body == expected(150 * MIB, 150 * MIB + 9, 1));
    assert_eq!(up.seen().len(), 1);

    // Across a slice boundary: only the missing slice, with If-Match.
    let (a, b) = (151 * MIB - 10, 151 * MIB + 9);
    let r = range(&p, a, b);
    assert_eq!(r.status, 206);
    assert!(r.body == expected(a, b, 1), "joined across slices");
    assert_eq!(asked(&up, 1), [(slice_range(151), Some("\"v1\"".into()))]);

    // A suffix range: the last, shorter slice.
    let r = http::get(p.port, "/b/movie.mp4", &[("Range", "bytes=-1000")]);
    assert_eq!(r.status, 206);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes {}-{}/{TOTAL}", TOTAL - 1000, TOTAL - 1).as_str())
    );
    assert!(r.body == expected(TOTAL - 1000, TOTAL - 1, 1));
    assert_eq!(asked(&up, 2), [(slice_range(299), Some("\"v1\"".into()))]);

    // Past the end: 416 from the stored length.
    let r = http::get(
        p.port,
        "/b/movie.mp4",
        &[("Range", &format!("bytes={}-", TOTAL + 5))],
    );
    assert_eq!(r.status, 416);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes */{TOTAL}").as_str())
    );
    assert_eq!(up.seen().len(), 3);
}

#[test]
fn an_etag_change_drops_the_old_slices() {
    let version = Arc::new(AtomicU64::new(1));
    let up = origin(version.clone());
    let p = Proxy::start(&config(&up.endpoint()));
    assert!(range(&p, 10 * MIB, 10 * MIB + 99).body == expected(10 * MIB, 10 * MIB + 99, 1));
    assert_eq!(up.seen().len(), 1);

    // The object is replaced at the origin.
    version.store(2, Ordering::SeqCst);
    // A slice not cached yet: If-Match "v1" gets a 412; the old slices are
    // dropped and the range is served from the new version.
    let r = range(&p, 20 * MIB, 20 * MIB + 99);
    assert_eq!(r.status, 206, "{}", p.log());
    assert_eq!(r.header("etag"), Some("\"v2\""));
    assert!(
        r.body == expected(20 * MIB, 20 * MIB + 99, 2),
        "never bytes of v1"
    );
    assert_eq!(
        asked(&up, 1),
        [
            (slice_range(20), Some("\"v1\"".into())),
            (slice_range(20), None)
        ]
    );
    // The v1 slice cached before is gone: fetched again, as v2.
    let r = range(&p, 10 * MIB, 10 * MIB + 99);
    assert_eq!((r.status, r.header("x-cache")), (206, Some("MISS")));
    assert!(r.body == expected(10 * MIB, 10 * MIB + 99, 2));
    assert_eq!(asked(&up, 3), [(slice_range(10), Some("\"v2\"".into()))]);
}

#[test]
fn an_object_changing_mid_response_resets_the_client() {
    let version = Arc::new(AtomicU64::new(1));
    let up = origin(version.clone());
    let p = Proxy::start(&config(&up.endpoint()));
    // Slice 5 cached as v1.
    assert_eq!(range(&p, 5 * MIB, 5 * MIB + 9).status, 206);
    version.store(2, Ordering::SeqCst);
    // A range over slices 5 (cached, v1) and 6 (fetched: now v2): the head
    // and slice 5 go out, then slice 6 cannot be had as v1: the client must
    // not be given a body joined from two versions.
    let mut c = http::Conn::open(p.port).unwrap();
    let r = c.request(
        "GET",
        "/b/movie.mp4",
        &[(
            "Range",
            &format!("bytes={}-{}", 6 * MIB - 100, 6 * MIB + 99),
        )],
    );
    // Either the connection was cut (what must happen) or what came back
    // is visibly short; never a complete 206.
    if let Ok(r) = r {
        assert!(
            r.status == 206 && r.body.len() < 200,
            "a complete 206 must not come back: {} with {} bytes",
            r.status,
            r.body.len()
        );
    }
}

#[test]
fn a_slice_is_fetched_from_the_next_replica_when_the_first_fails() {
    let version = Arc::new(AtomicU64::new(1));
    let up = origin(version);
    let dead = format!("http://127.0.0.1:{}", free_port());
    let body = config(&up.endpoint()).replace(
        &format!("      endpoint: \"{}\"\n", up.endpoint()),
        &format!(
            "      replicas:\n        - name: \"dead\"\n          endpoint: \"{dead}\"\n          priority: 1\n        - name: \"live\"\n          endpoint: \"{}\"\n          priority: 2\n",
            up.endpoint()
        ),
    );
    let p = Proxy::start(&body);
    let r = range(&p, 42 * MIB + 7, 42 * MIB + 1006);
    assert_eq!(r.status, 206, "{}", p.log());
    assert!(r.body == expected(42 * MIB + 7, 42 * MIB + 1006, 1));
    assert_eq!(asked(&up, 0), [(slice_range(42), None)]);
}

/// An origin of one `total`-byte object (version 1) that answers a whole
/// GET with 200 and a `bytes=a-b` range with 206, honouring `If-Match`.
fn small_origin(total: u64) -> Rogue {
    Rogue::start(move |s: &Seen| {
        if s.header("if-match").is_some_and(|m| m != "\"v1\"") {
            return vec![Step::Send(
                b"HTTP/1.1 412 Precondition Failed\r\nContent-Length: 0\r\n\r\n".to_vec(),
            )];
        }
        let range = s.header("range").and_then(|r| {
            let (a, b) = r.strip_prefix("bytes=")?.split_once('-')?;
            Some((
                a.parse::<u64>().ok()?,
                b.parse::<u64>().ok()?.min(total - 1),
            ))
        });
        let (status, (first, last)) = match range {
            Some(r) => ("206 Partial Content", r),
            None => ("200 OK", (0, total - 1)),
        };
        let mut out = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nETag: \"v1\"\r\nContent-Type: video/mp4\r\n",
            last - first + 1
        );
        if range.is_some() {
            out.push_str(&format!("Content-Range: bytes {first}-{last}/{total}\r\n"));
        }
        out.push_str("\r\n");
        let mut out = out.into_bytes();
        out.extend_from_slice(&expected(first, last, 1));
        vec![Step::Send(out)]
    })
}

#[test]
fn whole_gets_of_an_object_above_the_item_limit_are_stored_as_slices_and_answered_from_them() {
    let total = 6 * MIB + 123;
    let up = small_origin(total);
    let cfg = config(&up.endpoint()).replace(
        "    max_cache_size_mb: 64\n",
        "    max_cache_size_mb: 64\n    max_item_size_mb: 1\n",
    );
    let p = Proxy::start(&cfg);
    let want = expected(0, total - 1, 1);
    // First: relayed whole (too large to store whole), its size and ETag
    // noted, and its body stored as 1 MiB slices as it went by.
    let r = http::get(p.port, "/b/movie.mp4", &[]);
    assert_eq!((r.status, r.header("x-cache")), (200, Some("MISS")));
    assert!(r.body == want, "relayed body differs");
    assert_eq!(up.seen().len(), 1);
    // Then: assembled from the stored slices, with no origin request.
    let r = http::get(p.port, "/b/movie.mp4", &[]);
    assert_eq!((r.status, r.header("x-cache")), (200, Some("HIT")));
    assert_eq!(r.header("content-length"), Some(total.to_string().as_str()));
    assert_eq!(r.header("content-range"), None);
    assert!(r.body == want, "body from stored slices differs");
    assert_eq!(up.seen().len(), 1, "a hit went upstream");
}

#[test]
fn slices_stored_under_another_slice_size_are_never_served_as_this_one_s() {
    let version = Arc::new(AtomicU64::new(1));
    let up = origin(version.clone());
    let dir = tempfile::tempdir().unwrap();
    // The disk tier keeps slices across a restart; the slice size is
    // restart-only configuration.
    let with_disk = |slice_mb: u64| {
        config(&up.endpoint())
            .replace("slice_size_mb: 1", &format!("slice_size_mb: {slice_mb}"))
            .replace(
                "  cache_layers: [\"memory\"]\n",
                &format!(
                    "  cache_layers: [\"memory\", \"disk\"]\n  disk:\n    enabled: true\n    cache_dir: \"{}\"\n",
                    dir.path().display()
                ),
            )
    };
    let p = Proxy::start(&with_disk(1));
    // Slice 75 of 1 MiB: bytes 75..76 MiB.
    let r = range(&p, 75 * MIB + 10, 75 * MIB + 19);
    assert!(r.status == 206 && r.body == expected(75 * MIB + 10, 75 * MIB + 19, 1));
    // The slice and the object's slice metadata reach the disk.
    assert!(
        p.wait_metric(
            "yatagarasu_cache_items{layer=\"disk\"}",
            2.0,
            std::time::Duration::from_secs(10)
        ),
        "{}",
        p.log()
    );
    drop(p);
    // Slices of 2 MiB now: slice 75 is bytes 150..152 MiB.
    let p = Proxy::start(&with_disk(2));
    let (a, b) = (150 * MIB + 100, 150 * MIB + 4195);
    let r = range(&p, a, b);
    assert_eq!(r.status, 206, "{}", p.log());
    assert!(
        r.body == expected(a, b, 1),
        "bytes of the 1 MiB slice 75 were sent as the 2 MiB one"
    );
    assert_eq!(
        asked(&up, 1),
        [(
            format!("bytes={}-{}", 150 * MIB, 152 * MIB - 1),
            Some("\"v1\"".into())
        )]
    );
}

/// Issue #23: concurrent misses for one slice share one fetch, across
/// cores, as whole objects do (16 one-byte ranges on a cold object made
/// 16 slice GETs before).
#[test]
fn concurrent_misses_for_one_slice_share_one_fetch() {
    use support::rogue::Gate;
    let gate = Gate::default();
    let held = gate.clone();
    // The origin holds its answer until every client is waiting.
    let up = Rogue::start(move |s: &Seen| {
        held.wait();
        answer(s, 1)
    });
    let p = Proxy::start(&config(&up.endpoint()));
    let port = p.port;
    let clients: Vec<_> = (0..16u64)
        .map(|i| {
            std::thread::spawn(move || {
                let at = 7 * MIB + 1000 * i;
                let r = http::get(
                    port,
                    "/b/movie.mp4",
                    &[("Range", &format!("bytes={at}-{at}"))],
                );
                (at, r)
            })
        })
        .collect();
    // One fetch under way, fifteen requests waiting on it.
    assert!(
        p.wait_metric(
            "yatagarasu_cache_waiters",
            15.0,
            std::time::Duration::from_secs(30)
        ),
        "{}",
        p.metrics()
    );
    // The leader's slice request reaches the origin (it may be read there
    // after the waiters have joined).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while up.seen().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(up.seen().len(), 1);
    gate.open();
    for t in clients {
        let (at, r) = t.join().expect("client");
        assert_eq!(r.status, 206, "{}", p.log());
        assert!(r.body == expected(at, at, 1), "byte {at}");
    }
    assert_eq!(up.seen().len(), 1, "one slice GET for all");
    assert!(
        p.wait_metric(
            "yatagarasu_cache_coalesced_total{bucket=\"b\"}",
            15.0,
            std::time::Duration::from_secs(10)
        ),
        "{}",
        p.metrics()
    );
}
