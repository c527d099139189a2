//! A worker's pipes within the kernel's per-user limit on pipe pages
//! (`fs.pipe-user-pages-soft`), through real sockets: the proxy is started
//! without CAP_SYS_RESOURCE and CAP_SYS_ADMIN, as an unprivileged user's
//! would run, so its pipe budget (half the limit, shared by its workers)
//! applies. Disk-tier hits that lose the last pipe to another read their
//! entries instead; bodies past the budget are copied, whole; splicing
//! comes back when relays end. Its own test binary: the kernel counts every pipe of
//! the user, so no other test's proxies should hold pipes meanwhile.
mod support;
use std::time::{Duration, Instant};
use support::http::Conn;
use support::rogue::{ok_with, Rogue};
use support::*;

/// A relayed body: spliced by `zero_copy: auto` (1 MiB and more), and
/// larger than loopback's socket buffers take while its client reads
/// nothing, so the relay holds its pipe until the client reads.
const RELAYED: usize = 8 * 1024 * 1024;

/// A cached body: large enough to be sent by reference, four of them
/// more than the memory tier (1 MiB) holds, so most live on disk only.
const CACHED: usize = 256 * 1024;

/// The cached objects, fetched in this order.
const STORED: [&str; 8] = ["s0", "s1", "s2", "s3", "s4", "s5", "s6", "s7"];

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
        "cache:\n  enabled: true\n  cache_layers: [\"memory\", \"disk\"]\n  memory:\n    max_cache_size_mb: 1\n    max_item_size_mb: 1\n  disk:\n    enabled: true\n    cache_dir: \"{}\"\nbuckets:\n{}{}",
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
    let cached = |key: &str| pattern(CACHED, key.len() as u64 * 31 + key.as_bytes()[1] as u64);
    let r = relayed.clone();
    let up = Rogue::start(move |seen| {
        let body = match seen.target.strip_prefix("/bkt/") {
            Some(key) if key.starts_with('s') => cached(key),
            _ => r.clone(),
        };
        vec![ok_with("ETag: \"v1\"\r\n", &body)]
    });
    let dir = tempfile::tempdir().expect("cache dir");
    let proxy = Proxy::start_unprivileged(&config(&up.endpoint(), dir.path()), 1);

    // Every cached object stored on disk; most of them no longer in memory
    // (a disk-tier hit then sends the entry from its file).
    for key in STORED {
        let r = proxy.get(&format!("/cached/{key}"));
        assert!(r.status == 200 && r.body == cached(key), "{key}");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.metric("yatagarasu_cache_items{layer=\"disk\"}") != Some(STORED.len() as f64) {
        assert!(Instant::now() < deadline, "not stored on disk");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Relays held open by clients that read nothing yet, each holding a
    // pipe while the budget lasts. Returns once the upstream has seen them
    // all and the proxy has had time to choose for each.
    let mut clients: Vec<Conn> = Vec::new();
    let hold = |clients: &mut Vec<Conn>, to: usize| {
        for i in clients.len()..to {
            let mut c = Conn::open_small_window(proxy.port, 16 * 1024).expect("connect");
            let req = format!("GET /data/obj-{i} HTTP/1.1\r\nHost: x\r\n\r\n");
            c.send(req.as_bytes()).expect("send");
            clients.push(c);
        }
        let seen = || {
            up.seen()
                .iter()
                .filter(|s| s.target.starts_with("/bkt/obj-"))
                .count()
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while seen() < to {
            assert!(Instant::now() < deadline, "{} of {to} relays", seen());
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let fallbacks = || counter(&proxy, "yatagarasu_splice_fallbacks_total");

    // One pipe left, and many disk-tier hits at once: the one that gets it
    // sends its entry's file, the others read their entries and copy them.
    // None may lose the race for the pipe after its head went out.
    hold(&mut clients, pipes - 1);
    assert_eq!(fallbacks(), 0.0, "{} relays within the budget", pipes - 1);
    let port = proxy.port;
    let start = std::sync::Arc::new(std::sync::Barrier::new(16));
    let hits: Vec<_> = (0..16)
        .map(|i| {
            let start = start.clone();
            std::thread::spawn(move || {
                let key = STORED[i % 4];
                let mut c = Conn::open(port).expect("connect");
                start.wait();
                (key, c.request("GET", &format!("/cached/{key}"), &[]))
            })
        })
        .collect();
    for h in hits {
        let (key, r) = h.join().expect("client");
        let r = r.unwrap_or_else(|e| panic!("{key}: no whole answer: {e}"));
        assert_eq!((r.status, r.header("X-Cache")), (200, Some("HIT")), "{key}");
        assert!(r.body == cached(key), "{key}: the cached body differs");
    }

    // More relays than the budget has pipes for: the one kept pipe goes to
    // the first, the rest copy.
    let n = pipes + 4;
    let before = fallbacks();
    hold(&mut clients, n);
    assert_eq!(fallbacks() - before, 4.0, "relays past the budget copy");

    // While the budget is spent, hits are sent whole.
    for key in STORED {
        let r = proxy.get(&format!("/cached/{key}"));
        assert_eq!((r.status, r.header("X-Cache")), (200, Some("HIT")), "{key}");
        assert!(r.body == cached(key), "{key}: the cached body differs");
    }

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
    assert_eq!(fallbacks() - before, 4.0);
    let gets = up
        .seen()
        .iter()
        .filter(|s| s.target.starts_with("/bkt/s"))
        .count();
    assert_eq!(gets, STORED.len(), "a cached object was fetched again");
}
