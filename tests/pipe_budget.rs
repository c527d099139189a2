//! A worker's pipes within the kernel's per-user limit on pipe pages
//! (`fs.pipe-user-pages-soft`), through real sockets: the proxy is started
//! without CAP_SYS_RESOURCE and CAP_SYS_ADMIN, as an unprivileged user's
//! would run, so its pipe budget (half the limit, shared by its workers)
//! applies. Bodies past the budget are copied, whole; splicing comes back
//! when pipes close. Its own test binary: the kernel counts every pipe of
//! the user, so no other test's proxies should hold pipes meanwhile.
mod support;
use std::time::{Duration, Instant};
use support::http::Conn;
use support::rogue::{Rogue, Step};
use support::*;

/// A relayed body: spliced by `zero_copy: auto` (1 MiB and more), and
/// larger than loopback's socket buffers take while its client reads
/// nothing, so the relay holds its pipe until the client reads.
const RELAYED: usize = 8 * 1024 * 1024;

/// A cached body: large enough to be sent by reference, and read from
/// disk into a mapping of its own.
const CACHED: usize = 2 * 1024 * 1024;

/// How many 1 MiB pipes one worker's budget holds here: none to test when
/// the machine sets no limit, or one too large to fill with a few dozen
/// clients.
fn budget_pipes() -> Option<usize> {
    let soft: usize = std::fs::read_to_string("/proc/sys/fs/pipe-user-pages-soft")
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let pipes = soft * 4096 / 2 / (1024 * 1024);
    (soft > 0 && pipes <= 64).then_some(pipes)
}

fn config(endpoint: &str, dir: &std::path::Path) -> String {
    let bucket = |name: &str, prefix: &str, cache: &str| {
        format!(
            "  - name: \"{name}\"\n    path_prefix: \"{prefix}\"\n    s3:\n      bucket: \"bkt\"\n      endpoint: \"{endpoint}\"\n      access_key: \"{AK}\"\n      secret_key: \"{SK}\"\n      health_check:\n        enabled: false\n    cache:\n      enabled: {cache}\n"
        )
    };
    format!(
        "cache:\n  enabled: true\n  cache_layers: [\"memory\", \"disk\"]\n  disk:\n    enabled: true\n    cache_dir: \"{}\"\nbuckets:\n{}{}",
        dir.display(),
        bucket("relayed", "/data", "false"),
        bucket("cached", "/cached", "true"),
    )
}

fn counter(p: &Proxy, name: &str) -> f64 {
    p.metric(name).unwrap_or(0.0)
}

#[test]
fn bodies_past_the_pipe_budget_are_copied_whole_and_splicing_comes_back_when_relays_end() {
    let Some(pipes) = budget_pipes() else {
        eprintln!("fs.pipe-user-pages-soft sets no budget a few dozen clients can spend here");
        return;
    };
    let relayed = pattern(RELAYED, 3);
    let cached = pattern(CACHED, 4);
    let (r, c) = (relayed.clone(), cached.clone());
    let up = Rogue::start(move |seen| {
        let body = if seen.target.starts_with("/bkt/stored") {
            &c
        } else {
            &r
        };
        let mut out = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nETag: \"v1\"\r\n\r\n",
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(body);
        vec![Step::Send(out)]
    });
    let dir = tempfile::tempdir().expect("cache dir");
    let cfg = config(&up.endpoint(), dir.path());

    // A first run stores the cached object on disk; the second starts with
    // nothing in memory, so its hit is a disk-tier one.
    {
        let first = Proxy::start_with(&cfg, 1, &[]);
        let r = first.get("/cached/stored.bin");
        assert_eq!((r.status, r.body == cached), (200, true));
        let deadline = Instant::now() + Duration::from_secs(10);
        while first.metric("yatagarasu_cache_items{layer=\"disk\"}") != Some(1.0) {
            assert!(Instant::now() < deadline, "not stored on disk");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let proxy = Proxy::start_unprivileged(&cfg, 1);

    // More relays than the budget has pipes for, each held open by a
    // client that reads nothing yet.
    let n = pipes + 4;
    let mut clients: Vec<Conn> = (0..n)
        .map(|i| {
            let mut c = Conn::open_small_window(proxy.port, 16 * 1024).expect("connect");
            let req = format!("GET /data/obj-{i} HTTP/1.1\r\nHost: x\r\n\r\n");
            c.send(req.as_bytes()).expect("send");
            c
        })
        .collect();
    let relays_seen = || {
        up.seen()
            .iter()
            .filter(|s| s.target.starts_with("/bkt/obj-"))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while relays_seen() < n {
        assert!(Instant::now() < deadline, "{} of {n} relays", relays_seen());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Every relay has its answer's head by now, and has chosen.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        counter(&proxy, "yatagarasu_splice_fallbacks_total"),
        (n - pipes) as f64,
        "{pipes} relays splice within the budget, the rest copy"
    );

    // While the budget is spent, a disk-tier hit is read and sent whole.
    let r = proxy.get("/cached/stored.bin");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("X-Cache"), Some("HIT"));
    assert!(r.body == cached, "the cached body differs");
    assert_eq!(
        counter(&proxy, "yatagarasu_splice_fallbacks_total"),
        (n - pipes + 1) as f64,
        "the hit is copied, not sent by reference"
    );

    for (i, c) in clients.iter_mut().enumerate() {
        let r = c.read_response(false).expect("relayed answer");
        assert_eq!(r.status, 200, "relay {i}");
        assert!(r.body == relayed, "relay {i}: the body differs");
    }
    let spliced = counter(&proxy, "yatagarasu_spliced_bytes_total");
    // A spliced body's first bytes came with its head, and were copied.
    let per_body = (RELAYED - 256 * 1024) as f64..=RELAYED as f64;
    assert!(
        spliced >= pipes as f64 * per_body.start() && spliced <= pipes as f64 * per_body.end(),
        "{spliced} bytes spliced by {pipes} relays"
    );

    // The pipes are back: the next relay splices.
    let r = proxy.get("/data/again");
    assert!(r.status == 200 && r.body == relayed);
    let more = counter(&proxy, "yatagarasu_spliced_bytes_total") - spliced;
    assert!(per_body.contains(&more), "{more} bytes spliced");
    assert_eq!(
        counter(&proxy, "yatagarasu_splice_fallbacks_total"),
        (n - pipes + 1) as f64
    );
    let gets = up
        .seen()
        .iter()
        .filter(|s| s.target.starts_with("/bkt/stored"))
        .count();
    assert_eq!(gets, 1, "the disk-tier copy was fetched again");
}
