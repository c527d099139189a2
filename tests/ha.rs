//! High availability: same-request failover, breakers, health checks, resume.
//! Real s3s-fs replicas, killed with -9 and restarted; faults injected by a
//! TCP fault proxy on loopback.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::fault::{Fault, Mode};
use support::http::{self, Conn};
use support::*;

struct Pair {
    primary: S3,
    backup: S3,
}

fn pair() -> Pair {
    let primary = S3::start();
    let backup = S3::start();
    for (s, text) in [(&primary, "Primary data!\n"), (&backup, "Backup data!\n")] {
        s.create_bucket("data-bucket");
        s.put("data-bucket", "test.txt", text.as_bytes());
    }
    Pair { primary, backup }
}

/// The tutorial's bucket with two replicas; `health` is the health_check block body.
fn ha_config(primary: &str, backup: &str, health: &str, breaker: &str) -> String {
    format!(
        r#"buckets:
  - name: "ha-data"
    path_prefix: "/data"
    s3:
      bucket: "data-bucket"
      region: "us-east-1"
      access_key: "{AK}"
      secret_key: "{SK}"
      replicas:
        - name: "primary"
          endpoint: "{primary}"
          priority: 1
          timeout_seconds: 2
        - name: "backup"
          endpoint: "{backup}"
          priority: 2
          timeout_seconds: 5
      circuit_breaker:
{breaker}
      health_check:
{health}
    auth:
      enabled: false
"#
    )
}

const BREAKER: &str = "        failure_threshold: 3\n        success_threshold: 2\n        timeout_seconds: 30\n        half_open_requests: 1";
const NO_HEALTH: &str = "        enabled: false";

fn health_every(secs: u64) -> String {
    format!("        enabled: true\n        interval_seconds: {secs}\n        timeout_seconds: 1\n        path: \"/\"")
}

fn metric(m: &str, prefix: &str) -> Option<f64> {
    m.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn the_tutorial_automated() {
    let mut p = pair();
    let proxy = Proxy::start(&ha_config(
        &p.primary.endpoint(),
        &p.backup.endpoint(),
        &health_every(2),
        BREAKER,
    ));
    // Step 4: normal operation.
    assert_eq!(proxy.get("/data/test.txt").text(), "Primary data!\n");
    // Step 5: primary dies; the very next request is served by the backup.
    p.primary.kill();
    let r = proxy.get("/data/test.txt");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "Backup data!\n");
    for _ in 0..5 {
        assert_eq!(proxy.get("/data/test.txt").text(), "Backup data!\n");
    }
    assert!(
        proxy.wait_log(
            "WARN Replica 'primary' failed, trying 'backup'",
            Duration::from_secs(2)
        ),
        "{}",
        proxy.log()
    );
    let line = proxy
        .log()
        .lines()
        .find(|l| l.contains("Replica 'primary' failed, trying 'backup'"))
        .unwrap_or_default()
        .to_string();
    assert!(
        line.contains("bucket=ha-data") && line.contains("request_id=") && line.contains("cause="),
        "{line}"
    );
    // The failed-over request's access line says so (as Envoy's flags).
    let request_id = line
        .split("request_id=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_default()
        .to_string();
    // Written when the request ends: wait for that very line.
    assert!(proxy.wait_log(
        &format!("request_id={request_id} sub="),
        Duration::from_secs(5)
    ));
    let access = proxy
        .log()
        .lines()
        .find(|l| l.contains(" request ") && l.contains(&format!("request_id={request_id}")))
        .unwrap_or_default()
        .to_string();
    assert!(
        access.contains("replica=backup")
            && access.contains("failovers=1")
            && access.contains("cause=connect"),
        "{access}"
    );
    // Step 6: primary back; served again within one health interval (+ margin).
    p.primary.restart();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = proxy.get("/data/test.txt");
        assert_eq!(r.status, 200);
        if r.text() == "Primary data!\n" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "primary not back within one interval:\n{}",
            proxy.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Step 7: metrics as the tutorial shows them.
    let m = proxy.metrics();
    assert_eq!(
        metric(
            &m,
            "yatagarasu_replica_health{bucket=\"ha-data\",replica=\"backup\"}"
        ),
        Some(1.0),
        "{m}"
    );
    assert!(
        metric(
            &m,
            "yatagarasu_replica_requests_total{bucket=\"ha-data\",replica=\"primary\"}"
        )
        .unwrap_or(0.0)
            >= 2.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "yatagarasu_replica_requests_total{bucket=\"ha-data\",replica=\"backup\"}"
        )
        .unwrap_or(0.0)
            >= 6.0,
        "{m}"
    );
    assert!(
        m.contains(
            "yatagarasu_replica_failures_total{bucket=\"ha-data\",replica=\"primary\",reason="
        ),
        "{m}"
    );
    assert!(
        m.contains(
            "yatagarasu_replica_failovers_total{bucket=\"ha-data\",from=\"primary\",to=\"backup\"}"
        ),
        "{m}"
    );
    assert!(
        m.contains("yatagarasu_circuit_breaker_state{bucket=\"ha-data\",replica=\"primary\"}"),
        "{m}"
    );
    assert!(m.contains("yatagarasu_replica_request_duration_seconds_bucket{bucket=\"ha-data\",replica=\"primary\",le="), "{m}");
}

#[test]
fn kill_and_restart_primary_under_load_loses_nothing() {
    let mut p = pair();
    let objects: Vec<Vec<u8>> = (0..6)
        .map(|i| pattern(50_000 + i * 150_000, 100 + i as u64))
        .collect();
    for (i, o) in objects.iter().enumerate() {
        p.primary.put("data-bucket", &format!("o{i}"), o);
        p.backup.put("data-bucket", &format!("o{i}"), o);
    }
    let proxy = Proxy::start(&ha_config(
        &p.primary.endpoint(),
        &p.backup.endpoint(),
        &health_every(1),
        BREAKER,
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let objects = Arc::new(objects);
    let clients: Vec<_> = (0..16)
        .map(|t| {
            let (stop, done, objects, port) =
                (stop.clone(), done.clone(), objects.clone(), proxy.port);
            std::thread::spawn(move || {
                let mut errors = Vec::new();
                let mut n = t;
                let mut conn = Conn::open(port).unwrap();
                while !stop.load(Ordering::SeqCst) {
                    let i = n % objects.len();
                    n += 1;
                    match conn.request("GET", &format!("/data/o{i}"), &[]) {
                        Ok(r) if r.status == 200 && r.body == objects[i] => {
                            done.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(r) => {
                            errors.push(format!("o{i}: status {} len {}", r.status, r.body.len()))
                        }
                        Err(e) => {
                            errors.push(format!("o{i}: {e}"));
                            conn = Conn::open(port).unwrap();
                        }
                    }
                }
                errors
            })
        })
        .collect();
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(700));
        p.primary.kill();
        std::thread::sleep(Duration::from_millis(700));
        p.primary.restart();
    }
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::SeqCst);
    let errors: Vec<String> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    assert!(
        errors.is_empty(),
        "{} failed requests: {:?}\n{}",
        errors.len(),
        &errors[..errors.len().min(5)],
        proxy.log()
    );
    assert!(
        done.load(Ordering::SeqCst) > 100,
        "too little load: {}",
        done.load(Ordering::SeqCst)
    );
    assert!(proxy
        .log()
        .contains("Replica 'primary' failed, trying 'backup'"));
}

#[test]
fn hung_primary_fails_over_after_timeout_seconds() {
    let p = pair();
    let fault = Fault::start(p.primary.port, Mode::Hang);
    let proxy = Proxy::start(&ha_config(
        &fault.endpoint(),
        &p.backup.endpoint(),
        NO_HEALTH,
        BREAKER,
    ));
    let t = Instant::now();
    let r = proxy.get("/data/test.txt");
    assert_eq!(r.text(), "Backup data!\n");
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert!(
        proxy.wait_log("cause=\"timeout", Duration::from_secs(2)),
        "{}",
        proxy.log()
    );
}

#[test]
fn slow_primary_fails_over() {
    let p = pair();
    // Head dribbles in slower than timeout_seconds allows.
    let fault = Fault::start(
        p.primary.port,
        Mode::Drip {
            bytes: 1,
            every_ms: 200,
        },
    );
    let proxy = Proxy::start(&ha_config(
        &fault.endpoint(),
        &p.backup.endpoint(),
        NO_HEALTH,
        BREAKER,
    ));
    let r = proxy.get("/data/test.txt");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "Backup data!\n");
}

#[test]
fn primary_answering_5xx_fails_over() {
    for code in [500u16, 503] {
        let p = pair();
        let fault = Fault::start(p.primary.port, Mode::Status(code));
        let proxy = Proxy::start(&ha_config(
            &fault.endpoint(),
            &p.backup.endpoint(),
            NO_HEALTH,
            BREAKER,
        ));
        let r = proxy.get("/data/test.txt");
        assert_eq!(r.status, 200, "{code}");
        assert_eq!(r.text(), "Backup data!\n");
        let m = proxy.metrics();
        let needle = format!("yatagarasu_replica_failures_total{{bucket=\"ha-data\",replica=\"primary\",reason=\"http_{code}\"}} 1");
        assert!(m.contains(&needle), "{m}");
    }
}

#[test]
fn answers_are_not_retried() {
    let p = pair();
    let fault = Fault::start(p.primary.port, Mode::Pass);
    let proxy = Proxy::start(&ha_config(
        &fault.endpoint(),
        &p.backup.endpoint(),
        NO_HEALTH,
        BREAKER,
    ));
    p.backup.put("data-bucket", "only-on-backup.txt", b"b");
    // 404 from the primary is an answer, even though the backup has the key.
    assert_eq!(proxy.get("/data/only-on-backup.txt").status, 404);
    assert!(!proxy.log().contains("trying 'backup'"));
}

#[test]
fn broken_credentials_on_primary_fail_over() {
    let p = pair();
    let cfg = ha_config(
        &p.primary.endpoint(),
        &p.backup.endpoint(),
        NO_HEALTH,
        BREAKER,
    )
    .replace(
        "          priority: 1\n",
        "          priority: 1\n          secret_key: \"wrong\"\n",
    );
    let proxy = Proxy::start(&cfg);
    let r = proxy.get("/data/test.txt");
    assert_eq!(r.text(), "Backup data!\n");
    assert!(proxy
        .metrics()
        .contains("replica=\"primary\",reason=\"credentials\"} 1"));
}

/// The same `size`-byte object as `big.bin` on both replicas, the primary
/// behind a fault proxy in `mode`, and a proxy (`server` may set its own
/// `server:` section). Returns the object's bytes.
fn resume_setup(size: usize, seed: u64, mode: Mode, server: &str) -> (Pair, Fault, Proxy, Vec<u8>) {
    let p = pair();
    let body = pattern(size, seed);
    p.primary.put("data-bucket", "big.bin", &body);
    p.backup.put("data-bucket", "big.bin", &body);
    let fault = Fault::start(p.primary.port, mode);
    let proxy = Proxy::start(&format!(
        "{server}{}",
        ha_config(&fault.endpoint(), &p.backup.endpoint(), NO_HEALTH, BREAKER)
    ));
    (p, fault, proxy, body)
}

const RESUMED: &str = "failed mid-body, resuming from 'backup'";

#[test]
fn reset_mid_body_resumes_from_backup_with_exact_bytes() {
    let size = 64 * 1024 * 1024;
    let (_p, _fault, proxy, body) = resume_setup(size, 64, Mode::ResetAfter(10 * 1024 * 1024), "");
    let r = proxy.get("/data/big.bin");
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), size);
    assert!(r.body == body, "bytes differ");
    // A client Range that breaks mid-way is resumed within the range.
    let r = http::get(
        proxy.port,
        "/data/big.bin",
        &[("Range", "bytes=1000000-40000000")],
    );
    assert_eq!(r.status, 206);
    assert!(
        r.body == body[1_000_000..=40_000_000],
        "range bytes differ ({} bytes)",
        r.body.len()
    );
    let m = proxy.metrics();
    let resumes = metric(
        &m,
        "yatagarasu_replica_resumes_total{bucket=\"ha-data\",replica=\"backup\"}",
    );
    assert_eq!(resumes, Some(2.0), "{m}");
    assert!(proxy.log().contains(RESUMED));
}

#[test]
fn reset_mid_body_resumes_with_zero_copy_on() {
    let size = 16 * 1024 * 1024;
    let server = format!(
        "server:\n  address: \"127.0.0.1:{}\"\n  workers: 1\n  zero_copy: \"on\"\n",
        free_port()
    );
    let (_p, _fault, proxy, body) =
        resume_setup(size, 65, Mode::ResetAfter(5 * 1024 * 1024), &server);
    let r = proxy.get("/data/big.bin");
    assert_eq!(r.status, 200);
    assert!(r.body == body, "bytes differ ({} of {size})", r.body.len());
    assert!(proxy.log().contains(RESUMED));
}

#[test]
fn a_body_that_stalls_longer_than_timeout_seconds_is_resumed() {
    let size = 8 * 1024 * 1024;
    // The primary sends 1 MiB, then nothing, with the connection left open.
    let (_p, _fault, proxy, body) = resume_setup(size, 66, Mode::StallAfter(1024 * 1024), "");
    let t = Instant::now();
    let r = proxy.get("/data/big.bin");
    assert_eq!(r.status, 200);
    assert!(r.body == body, "bytes differ ({} of {size})", r.body.len());
    // The stall is noticed after the primary's timeout_seconds (2 s).
    assert!(
        t.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        t.elapsed()
    );
    assert!(proxy.log().contains(RESUMED));
    // The access line says the body was resumed, and why.
    assert!(
        proxy.wait_log("resumed=true", Duration::from_secs(5)),
        "{}",
        proxy.log()
    );
    assert!(
        proxy.log().lines().any(|l| l.contains(" request ")
            && l.contains("resumed=true")
            && l.contains("cause=timeout")),
        "{}",
        proxy.log()
    );
    // Once: the stall is the primary's one failure (waited for: a scrape
    // shows what each worker published by then).
    let failures = "yatagarasu_replica_failures_total{bucket=\"ha-data\",replica=\"primary\",reason=\"timeout\"}";
    assert!(
        proxy.wait_metric(failures, 1.0, Duration::from_secs(10)),
        "{}",
        proxy.metrics()
    );
}

#[test]
fn etag_mismatch_on_resume_closes_the_connection() {
    let p = pair();
    let size = 8 * 1024 * 1024;
    p.primary.put("data-bucket", "diff.bin", &pattern(size, 1));
    p.backup.put("data-bucket", "diff.bin", &pattern(size, 2));
    let fault = Fault::start(p.primary.port, Mode::ResetAfter(1024 * 1024));
    let proxy = Proxy::start(&ha_config(
        &fault.endpoint(),
        &p.backup.endpoint(),
        NO_HEALTH,
        BREAKER,
    ));
    let mut c = Conn::open(proxy.port).unwrap();
    let r = c.request("GET", "/data/diff.bin", &[]);
    assert!(
        r.is_err(),
        "a body mixed from two versions must never complete"
    );
    assert!(
        proxy.wait_log(
            "cannot resume the body with the same ETag",
            Duration::from_secs(2)
        ),
        "{}",
        proxy.log()
    );
}

#[test]
fn all_replicas_down_gives_502_then_503_with_retry_after() {
    let mut p = pair();
    let breaker = "        failure_threshold: 1\n        success_threshold: 1\n        timeout_seconds: 30\n        half_open_requests: 1";
    let proxy = Proxy::start(&ha_config(
        &p.primary.endpoint(),
        &p.backup.endpoint(),
        NO_HEALTH,
        breaker,
    ));
    p.primary.kill();
    p.backup.kill();
    let r = proxy.get("/data/test.txt");
    assert_eq!(r.status, 502);
    assert!(r.text().contains("ha-data"), "{}", r.text());
    let r = proxy.get("/data/test.txt");
    assert_eq!(r.status, 503);
    let retry: u64 = r
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((25..=30).contains(&retry), "{retry}");
    let ready = proxy.ready_details();
    assert_eq!(ready.status, 503);
    assert!(
        ready.text().contains("\"state\":\"open\""),
        "{}",
        ready.text()
    );
    assert!(proxy.wait_log("ERROR All replicas failed", Duration::from_secs(2)));
    assert!(proxy.log().contains("ERROR No replica available"));
}

#[test]
fn weights_spread_requests_within_five_percent() {
    let a = S3::start();
    let b = S3::start();
    for s in [&a, &b] {
        s.create_bucket("data-bucket");
        s.put("data-bucket", "w.txt", b"w");
    }
    let cfg = ha_config(&a.endpoint(), &b.endpoint(), NO_HEALTH, BREAKER)
        .replace(
            "          priority: 2\n",
            "          priority: 1\n          weight: 1\n",
        )
        .replace(
            "          priority: 1\n          timeout_seconds: 2\n",
            "          priority: 1\n          weight: 3\n          timeout_seconds: 2\n",
        );
    let proxy = Proxy::start(&cfg);
    let threads: Vec<_> = (0..40)
        .map(|_| {
            let port = proxy.port;
            std::thread::spawn(move || {
                let mut c = Conn::open(port).unwrap();
                for _ in 0..250 {
                    assert_eq!(c.request("HEAD", "/data/w.txt", &[]).unwrap().status, 200);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let m = proxy.metrics();
    let pa = metric(
        &m,
        "yatagarasu_replica_requests_total{bucket=\"ha-data\",replica=\"primary\"}",
    )
    .unwrap();
    let pb = metric(
        &m,
        "yatagarasu_replica_requests_total{bucket=\"ha-data\",replica=\"backup\"}",
    )
    .unwrap();
    assert_eq!(pa + pb, 10_000.0);
    let share = pa / (pa + pb);
    assert!((share - 0.75).abs() <= 0.05 * 0.75, "primary share {share}");
}

#[test]
fn flapping_primary_never_fails_a_client() {
    let mut p = pair();
    p.backup.put("data-bucket", "f.txt", b"same");
    p.primary.put("data-bucket", "f.txt", b"same");
    let proxy = Proxy::start(&ha_config(
        &p.primary.endpoint(),
        &p.backup.endpoint(),
        &health_every(1),
        BREAKER,
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, port) = (stop.clone(), proxy.port);
            std::thread::spawn(move || {
                let mut bad = 0;
                let mut ok = 0;
                while !stop.load(Ordering::SeqCst) {
                    match http::try_get(port, "/data/f.txt", &[]) {
                        Ok(r) if r.status == 200 && r.body == b"same" => ok += 1,
                        _ => bad += 1,
                    }
                }
                (ok, bad)
            })
        })
        .collect();
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(300));
        p.primary.kill();
        std::thread::sleep(Duration::from_millis(300));
        p.primary.restart();
    }
    stop.store(true, Ordering::SeqCst);
    let (ok, bad) = clients
        .into_iter()
        .map(|c| c.join().unwrap())
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    assert_eq!(bad, 0, "{}", proxy.log());
    assert!(ok > 20);
}

#[test]
fn a_breaker_opened_on_one_core_is_skipped_on_all() {
    let p = pair();
    let fault = Fault::start(p.primary.port, Mode::Status(500));
    let proxy = Proxy::start(&ha_config(
        &fault.endpoint(),
        &p.backup.endpoint(),
        NO_HEALTH,
        BREAKER,
    ));
    // Three failures open the primary's breaker on whichever core saw them.
    for _ in 0..3 {
        assert_eq!(proxy.get("/data/test.txt").text(), "Backup data!\n");
    }
    let primary_hits = || {
        fault
            .recorded()
            .iter()
            .filter(|r| r.starts_with("GET /data-bucket/test.txt"))
            .count()
    };
    assert_eq!(primary_hits(), 3);
    // Many connections land on both workers; none may try the primary again.
    for _ in 0..30 {
        assert_eq!(proxy.get("/data/test.txt").text(), "Backup data!\n");
    }
    assert_eq!(primary_hits(), 3, "another core paid failures of its own");
    // Request lines are buffered per worker and written at its next tick:
    // wait for both workers' (" worker=1" alone matches a start-up line).
    let served = |w: &str| {
        proxy
            .log()
            .lines()
            .filter(|l| l.contains("INFO request ") && l.ends_with(w))
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while (served(" worker=0") == 0 || served(" worker=1") == 0)
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        served(" worker=0") > 0 && served(" worker=1") > 0,
        "both workers served: {}",
        proxy.log()
    );
    let m = proxy.metrics();
    assert_eq!(
        metric(
            &m,
            "yatagarasu_circuit_breaker_state{bucket=\"ha-data\",replica=\"primary\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            "yatagarasu_replica_health{bucket=\"ha-data\",replica=\"primary\"}"
        ),
        Some(0.0)
    );
}

#[test]
fn probes_run_once_per_process_and_open_the_breaker_without_traffic() {
    let mut p = pair();
    let fault = Fault::start(p.primary.port, Mode::Pass);
    let started = Instant::now();
    let proxy = Proxy::start(&ha_config(
        &fault.endpoint(),
        &p.backup.endpoint(),
        &health_every(1),
        BREAKER,
    ));
    // One prober a process, one probe a second: however busy the machine,
    // never more probes than whole seconds elapsed (plus the one at start).
    // One prober per core would send two a second.
    let probes = || {
        fault
            .recorded()
            .iter()
            .filter(|r| r.starts_with("HEAD /data-bucket/"))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while probes() < 5 {
        assert!(Instant::now() < deadline, "{} probes in 60 s", probes());
        std::thread::sleep(Duration::from_millis(50));
    }
    let seen = probes();
    let bound = started.elapsed().as_secs() as usize + 1;
    assert!(seen <= bound, "{seen} probes within {bound} ticks");
    // No client traffic at all: a dead primary is ejected by probes alone.
    p.primary.kill();
    fault.drop_connections();
    let deadline = Instant::now() + Duration::from_secs(4);
    while !proxy
        .metrics()
        .contains("yatagarasu_circuit_breaker_state{bucket=\"ha-data\",replica=\"primary\"} 1")
    {
        assert!(Instant::now() < deadline, "probe did not open the breaker");
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = fault.connections.load(Ordering::SeqCst);
    assert_eq!(proxy.get("/data/test.txt").text(), "Backup data!\n");
    // The open breaker means the client request did not even try the primary.
    assert!(fault.connections.load(Ordering::SeqCst) - before <= 1);
    assert!(!proxy
        .log()
        .contains("Replica 'primary' failed, trying 'backup'"));
}
