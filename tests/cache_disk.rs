//! The origin cache's disk tier through real sockets and real files: a
//! scripted upstream counts the GETs that reach it; the proxy is killed
//! (-9) and started again on the same cache directory.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::http::Conn;
use support::rogue::Rogue;
use support::*;

/// One bucket `/b` with the memory and disk tiers on.
fn config(endpoint: &str, dir: &Path, disk_mb: u64, top: &str) -> String {
    format!(
        "{top}cache:\n  enabled: true\n  cache_layers: [\"memory\", \"disk\"]\n  disk:\n    enabled: true\n    cache_dir: \"{}\"\n    max_disk_cache_size_mb: {disk_mb}\nbuckets:\n  - name: \"b\"\n    path_prefix: \"/b\"\n    s3:\n      bucket: \"bkt\"\n      endpoint: \"{endpoint}\"\n      access_key: \"{AK}\"\n      secret_key: \"{SK}\"\n      health_check:\n        enabled: false\n",
        dir.display()
    )
}

/// An upstream answering every GET with `len` bytes derived from the key.
fn origin(len: usize) -> Rogue {
    Rogue::start(move |s| {
        let headers = "ETag: \"v1\"\r\nContent-Type: application/octet-stream\r\n";
        vec![support::rogue::ok_with(headers, &body_for(&s.target, len))]
    })
}

fn body_for(target: &str, len: usize) -> Vec<u8> {
    let seed = target
        .bytes()
        .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
    pattern(len, seed)
}

fn metric(m: &str, prefix: &str) -> Option<f64> {
    m.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn disk_items(p: &Proxy) -> f64 {
    metric(&p.metrics(), "yatagarasu_cache_items{layer=\"disk\"}").unwrap_or(-1.0)
}

fn wait_disk_items(p: &Proxy, n: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while disk_items(p) != n {
        assert!(
            Instant::now() < deadline,
            "disk items {} != {n}\n{}",
            disk_items(p),
            p.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn entry_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "entry"))
        .collect();
    v.sort();
    v
}

#[test]
fn a_restart_with_a_warm_disk_cache_serves_hits_without_upstream() {
    let up = origin(100 * 1024);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&up.endpoint(), dir.path(), 64, "");
    let p = Proxy::start(&cfg);
    for k in ["a", "b", "c"] {
        let r = p.get(&format!("/b/{k}"));
        assert_eq!((r.status, r.header("x-cache")), (200, Some("MISS")));
    }
    wait_disk_items(&p, 3.0);
    assert_eq!(entry_files(dir.path()).len(), 3);
    drop(p); // kill -9: the entries were already renamed into place

    let p = Proxy::start(&cfg);
    assert_eq!(disk_items(&p), 3.0, "index rebuilt at start");
    for k in ["a", "b", "c"] {
        let r = p.get(&format!("/b/{k}"));
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-cache"), Some("HIT"), "{k}");
        assert_eq!(r.body, body_for(&format!("/bkt/{k}"), 100 * 1024), "{k}");
    }
    assert_eq!(up.gets(), 3, "hits after the restart went upstream");
    // Ranges and HEAD from a promoted entry too.
    let r = support::http::get(p.port, "/b/a", &[("Range", "bytes=10-19")]);
    assert_eq!((r.status, r.body.len()), (206, 10));
    assert_eq!(up.gets(), 3);
}

#[test]
fn truncated_or_corrupted_entries_are_dropped_and_refetched() {
    let up = origin(50 * 1024);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&up.endpoint(), dir.path(), 64, "");
    let p = Proxy::start(&cfg);
    assert_eq!(p.get("/b/one").status, 200);
    assert_eq!(p.get("/b/two").status, 200);
    wait_disk_items(&p, 2.0);
    drop(p);
    let files = entry_files(dir.path());
    assert_eq!(files.len(), 2);
    // One cut short (a crash mid-write of the disk itself), one with a
    // flipped bit in its body (same length).
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&files[0])
        .unwrap();
    f.set_len(f.metadata().unwrap().len() - 7).unwrap();
    let mut bytes = std::fs::read(&files[1]).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&files[1], bytes).unwrap();

    let p = Proxy::start(&cfg);
    assert_eq!(
        disk_items(&p),
        1.0,
        "the truncated entry is dropped at start"
    );
    for k in ["one", "two"] {
        let r = p.get(&format!("/b/{k}"));
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("x-cache"),
            Some("MISS"),
            "{k}: a bad entry is never served"
        );
        assert_eq!(r.body, body_for(&format!("/bkt/{k}"), 50 * 1024));
    }
    assert_eq!(up.gets(), 4, "both refetched");
    let m = p.metrics();
    assert_eq!(
        metric(&m, "yatagarasu_cache_disk_corrupt_total"),
        Some(2.0),
        "{m}"
    );
    assert!(p.log().contains("Disk cache entry dropped"), "{}", p.log());
    // Refetched copies are written again.
    wait_disk_items(&p, 2.0);
}

#[test]
fn the_disk_tier_is_bounded_and_evicts_least_recently_used() {
    let up = origin(300 * 1024);
    let dir = tempfile::tempdir().unwrap();
    let p = Proxy::start(&config(&up.endpoint(), dir.path(), 1, ""));
    for i in 0..6 {
        assert_eq!(p.get(&format!("/b/k{i}")).status, 200);
        // One at a time, so the order of writes is the order of use.
        std::thread::sleep(Duration::from_millis(100));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = p.metrics();
        let bytes = metric(&m, "yatagarasu_cache_bytes{layer=\"disk\"}").unwrap();
        let evicted = metric(&m, "yatagarasu_cache_evictions_total{layer=\"disk\"}").unwrap();
        if evicted >= 3.0 {
            assert!(bytes <= 1024.0 * 1024.0, "{bytes}");
            break;
        }
        assert!(Instant::now() < deadline, "{m}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let items = disk_items(&p);
    assert!((1.0..=3.0).contains(&items), "{items}");
    assert_eq!(
        entry_files(dir.path()).len() as f64,
        items,
        "evicted files are deleted"
    );
}

#[test]
fn an_unusable_cache_dir_degrades_to_memory_only() {
    let up = origin(1024);
    let dir = tempfile::tempdir().unwrap();
    // A path under a regular file can never be created.
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let p = Proxy::start(&config(&up.endpoint(), &file.join("cache"), 64, ""));
    assert!(
        p.log()
            .contains("Disk cache unusable; continuing memory-only"),
        "{}",
        p.log()
    );
    let r = p.get("/b/k");
    assert_eq!((r.status, r.header("x-cache")), (200, Some("MISS")));
    let r = p.get("/b/k");
    assert_eq!((r.status, r.header("x-cache")), (200, Some("HIT")));
    assert_eq!(disk_items(&p), 0.0);
}

#[test]
fn a_disk_that_fails_while_running_turns_writes_off_without_failing_requests() {
    let up = origin(8 * 1024);
    let dir = tempfile::tempdir().unwrap();
    let cache_dir = dir.path().join("cache");
    let p = Proxy::start(&config(&up.endpoint(), &cache_dir, 64, ""));
    assert_eq!(p.get("/b/before").status, 200);
    wait_disk_items(&p, 1.0);
    // The directory disappears under the proxy (unmounted, wiped).
    std::fs::remove_dir_all(&cache_dir).unwrap();
    for i in 0..5 {
        let r = p.get(&format!("/b/after{i}"));
        assert_eq!((r.status, r.header("x-cache")), (200, Some("MISS")));
    }
    assert!(
        p.wait_log(
            "Disk cache unusable; continuing memory-only",
            Duration::from_secs(5)
        ),
        "{}",
        p.log()
    );
    for i in 0..5 {
        let r = p.get(&format!("/b/after{i}"));
        assert_eq!(
            (r.status, r.header("x-cache")),
            (200, Some("HIT")),
            "memory still serves"
        );
    }
    // The entry indexed before is gone with the directory: a miss, refetched.
    let r = p.get("/b/before");
    assert_eq!(r.status, 200);
}

#[test]
fn a_purge_removes_disk_entries_too() {
    let up = origin(4096);
    let dir = tempfile::tempdir().unwrap();
    let token = "0123456789abcdef-admin";
    let cfg = config(
        &up.endpoint(),
        dir.path(),
        64,
        &format!("admin:\n  token: \"{token}\"\n"),
    );
    let p = Proxy::start(&cfg);
    assert_eq!(p.get("/b/x").status, 200);
    assert_eq!(p.get("/b/y").status, 200);
    wait_disk_items(&p, 2.0);
    let mut c = Conn::open(p.metrics_port).unwrap();
    let auth = format!("Bearer {token}");
    let r = c
        .request(
            "POST",
            "/admin/cache/purge/b/x",
            &[("Authorization", auth.as_str())],
        )
        .unwrap();
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "{\"purged\":1,\"purged_disk\":1}")
    );
    assert_eq!(entry_files(dir.path()).len(), 1);
    drop(p);
    // After a restart the purged object is fetched again, the other is not.
    let p = Proxy::start(&cfg);
    assert_eq!(p.get("/b/x").header("x-cache"), Some("MISS"));
    assert_eq!(p.get("/b/y").header("x-cache"), Some("HIT"));
    assert_eq!(up.gets(), 3);
}

#[test]
fn entries_in_the_page_cache_are_sent_from_their_files_without_promotion() {
    const LEN: usize = 256 * 1024;
    let up = origin(LEN);
    let dir = tempfile::tempdir().unwrap();
    // A memory tier with room for about three of the eight objects.
    let top = "";
    let cfg = config(&up.endpoint(), dir.path(), 64, top).replace(
        "  disk:\n",
        "  memory:\n    max_cache_size_mb: 1\n    max_item_size_mb: 1\n  disk:\n",
    );
    let p = Proxy::start(&cfg);
    let keys = ["a", "b", "c", "d", "e", "f", "g", "h"];
    for k in keys {
        assert_eq!(p.get(&format!("/b/{k}")).status, 200);
    }
    wait_disk_items(&p, 8.0);
    let m = p.metrics();
    let evictions = |m: &str| metric(m, "yatagarasu_cache_evictions_total{layer=\"memory\"}");
    let by_reference = |m: &str| metric(m, "yatagarasu_cache_sent_by_reference_bytes_total");
    let (evicted, sent) = (evictions(&m), by_reference(&m).unwrap_or(0.0));
    for k in keys {
        let r = p.get(&format!("/b/{k}"));
        assert_eq!((r.status, r.header("x-cache")), (200, Some("HIT")), "{k}");
        assert_eq!(r.body, body_for(&format!("/bkt/{k}"), LEN), "{k}");
    }
    // A range, a conditional and a HEAD of an object only on disk.
    let want = body_for("/bkt/a", LEN);
    let r = support::http::get(p.port, "/b/a", &[("Range", "bytes=100000-100999")]);
    assert_eq!((r.status, r.header("x-cache")), (206, Some("HIT")));
    assert_eq!(r.body, &want[100_000..101_000]);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes 100000-100999/{LEN}").as_str())
    );
    let r = support::http::get(p.port, "/b/a", &[("If-None-Match", "\"v1\"")]);
    assert_eq!(r.status, 304);
    let r = Conn::open(p.port)
        .unwrap()
        .request("HEAD", "/b/a", &[])
        .unwrap();
    assert_eq!(
        (r.status, r.header("content-length")),
        (200, Some("262144"))
    );
    assert_eq!(up.gets(), 8, "disk hits went upstream");
    let m = p.metrics();
    assert_eq!(
        evictions(&m),
        evicted,
        "objects were read into memory (promoted) rather than sent from their files"
    );
    assert!(
        by_reference(&m).unwrap_or(0.0) >= sent + (8 * LEN + 1000) as f64,
        "{m}"
    );
}

/// The other system's `cache.disk.sendfile`: `enabled: false` reads every
/// disk hit (never sent from its file), and `threshold_bytes` is the
/// smallest body sent from its file. A disk hit read is promoted into
/// memory, which holds about three of the eight objects, so it evicts; one
/// sent from its file does not.
#[test]
fn cache_disk_sendfile_decides_which_disk_hits_are_sent_from_their_files() {
    const LEN: usize = 256 * 1024;
    let keys = ["a", "b", "c", "d", "e", "f", "g", "h"];
    // Memory evictions during a hit on every key, all of them on disk.
    let evictions_for = |sendfile: &str| {
        let up = origin(LEN);
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(&up.endpoint(), dir.path(), 64, "").replace(
            "  disk:\n    enabled: true\n",
            &format!("  memory:\n    max_cache_size_mb: 1\n    max_item_size_mb: 1\n  disk:\n    enabled: true\n{sendfile}"),
        );
        let p = Proxy::start(&cfg);
        for k in keys {
            assert_eq!(p.get(&format!("/b/{k}")).status, 200);
        }
        wait_disk_items(&p, keys.len() as f64);
        let evictions = |p: &Proxy| {
            metric(
                &p.metrics(),
                "yatagarasu_cache_evictions_total{layer=\"memory\"}",
            )
            .unwrap_or(0.0)
        };
        let before = evictions(&p);
        for k in keys {
            let r = p.get(&format!("/b/{k}"));
            assert_eq!((r.status, r.header("x-cache")), (200, Some("HIT")), "{k}");
            assert_eq!(r.body, body_for(&format!("/bkt/{k}"), LEN), "{k}");
        }
        assert_eq!(up.gets(), keys.len(), "disk hits went upstream");
        evictions(&p) - before
    };
    assert_eq!(
        evictions_for(""),
        0.0,
        "without sendfile, zero_copy decides"
    );
    let off = evictions_for("    sendfile:\n      enabled: false\n");
    assert!(
        off > 0.0,
        "enabled: false: no disk hit was read and promoted"
    );
    let under =
        evictions_for("    sendfile:\n      enabled: true\n      threshold_bytes: 300000\n");
    assert!(
        under > 0.0,
        "under threshold_bytes: no disk hit was read and promoted"
    );
    let over = evictions_for("    sendfile:\n      threshold_bytes: 200000\n");
    assert_eq!(over, 0.0, "over threshold_bytes: disk hits were promoted");
}

#[test]
fn a_disk_tier_file_kept_open_never_outlives_its_entry() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    const LEN: usize = 256 * 1024;
    // Version 1 of every object until the test switches the origin to 2.
    let version = Arc::new(AtomicUsize::new(1));
    let v = version.clone();
    let up = Rogue::start(move |s| {
        let n = v.load(Ordering::SeqCst);
        let body = body_for(&format!("{}#{n}", s.target), LEN);
        let mut out = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {LEN}\r\nETag: \"v{n}\"\r\nCache-Control: max-age=600\r\n\r\n"
        )
        .into_bytes();
        out.extend_from_slice(&body);
        vec![support::rogue::Step::Send(out)]
    });
    let token = "0123456789abcdef-admin";
    let dir = tempfile::tempdir().unwrap();
    // A memory tier with room for about three of these objects: the rest
    // are hits from their disk files, which the proxy keeps open.
    let cfg = config(
        &up.endpoint(),
        dir.path(),
        64,
        &format!("admin:\n  token: \"{token}\"\n"),
    )
    .replace(
        "  disk:\n",
        "  memory:\n    max_cache_size_mb: 1\n    max_item_size_mb: 1\n  disk:\n",
    );
    let p = Proxy::start(&cfg);
    let v1 = body_for("/bkt/a#1", LEN);
    let v2 = body_for("/bkt/a#2", LEN);
    let churn = |keys: &[&str]| {
        for k in keys {
            assert_eq!(p.get(&format!("/b/{k}")).status, 200, "{k}");
        }
    };
    churn(&["a", "b", "c", "d", "e", "f", "g", "h"]);
    wait_disk_items(&p, 8.0);
    for _ in 0..2 {
        let r = p.get("/b/a");
        assert_eq!((r.status, r.header("x-cache")), (200, Some("HIT")));
        assert!(r.body == v1, "version 1 from its disk file");
    }

    // A purge: the kept file no longer answers.
    version.store(2, Ordering::SeqCst);
    let auth = format!("Bearer {token}");
    let r = Conn::open(p.metrics_port)
        .unwrap()
        .request(
            "POST",
            "/admin/cache/purge/b/a",
            &[("Authorization", auth.as_str())],
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let r = p.get("/b/a");
    assert_eq!(
        r.header("x-cache"),
        Some("MISS"),
        "a purged entry was a hit"
    );
    assert!(r.body == v2);
    wait_disk_items(&p, 8.0);

    // The new copy is written to a new file: once memory has let it go, its
    // disk hit sends the new file, not the one kept open for version 1.
    churn(&["i", "j", "k", "l", "m", "n", "o", "p"]);
    wait_disk_items(&p, 16.0);
    for _ in 0..2 {
        let r = p.get("/b/a");
        assert_eq!((r.status, r.header("x-cache")), (200, Some("HIT")));
        assert!(r.body == v2, "a disk hit sent a replaced file");
    }
    let a_gets = up.seen().iter().filter(|s| s.target == "/bkt/a").count();
    assert_eq!(a_gets, 2);
}

/// A disk-tier copy read back for a request answers that request, even
/// when the memory tier lets it go at once: here the tier (1 MiB) is full
/// of objects of a quarter of it, each read back and used again, so the
/// next one read back is the one it drops. Never a second upstream GET.
#[test]
fn a_copy_read_from_disk_answers_its_request_even_when_memory_drops_it_at_once() {
    const LEN: usize = 256 * 1024;
    let up = origin(LEN);
    let dir = tempfile::tempdir().unwrap();
    // Copied hits: no entry is sent from its file, every disk hit is read.
    let top = format!(
        "server:\n  address: \"127.0.0.1:{}\"\n  workers: 1\n  zero_copy: off\n",
        free_port()
    );
    let cfg = config(&up.endpoint(), dir.path(), 64, &top).replace(
        "  disk:\n",
        "  memory:\n    max_cache_size_mb: 1\n    max_item_size_mb: 1\n  disk:\n",
    );
    let p = Proxy::start(&cfg);
    for k in ["a", "b", "c", "d", "e", "f", "g", "h"] {
        assert_eq!(p.get(&format!("/b/{k}")).status, 200);
    }
    wait_disk_items(&p, 8.0);
    for k in ["a", "b", "c", "a", "b", "c", "d"] {
        let r = p.get(&format!("/b/{k}"));
        assert_eq!((r.status, r.header("x-cache")), (200, Some("HIT")), "{k}");
        assert_eq!(r.body, body_for(&format!("/bkt/{k}"), LEN), "{k}");
    }
    assert_eq!(up.gets(), 8, "a copy on disk was fetched again");
}

#[test]
fn memory_hits_keep_their_disk_entries_from_being_evicted_first() {
    let up = origin(300 * 1024);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&up.endpoint(), dir.path(), 1, "");
    let p = Proxy::start(&cfg);
    // Three entries fill the 1 MiB disk tier, k0 written first.
    for i in 0..3 {
        assert_eq!(p.get(&format!("/b/k{i}")).status, 200);
        wait_disk_items(&p, (i + 1) as f64);
    }
    // k0 is served from memory: its disk entry becomes the most recent.
    assert_eq!(p.get("/b/k0").header("x-cache"), Some("HIT"));
    assert!(
        p.wait_metric(
            "yatagarasu_cache_disk_recency_refreshes_total",
            1.0,
            Duration::from_secs(10)
        ),
        "{}",
        p.metrics()
    );
    // A fourth entry evicts the least recently used: k1, not k0.
    assert_eq!(p.get("/b/k3").status, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(
        &p.metrics(),
        "yatagarasu_cache_evictions_total{layer=\"disk\"}",
    ) < Some(1.0)
    {
        assert!(Instant::now() < deadline, "{}", p.metrics());
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(p); // kill -9: the entries were already renamed into place
    let p = Proxy::start(&cfg);
    let before = up.gets();
    assert_eq!(p.get("/b/k0").header("x-cache"), Some("HIT"));
    assert_eq!(up.gets(), before, "k0 was evicted from disk");
    assert_eq!(p.get("/b/k1").header("x-cache"), Some("MISS"));
}
