//! Credentials without static keys, through real sockets: a fake metadata
//! service (IMDSv2 and ECS, tests/support/metadata.rs), moto's STS for web
//! identity and assumed roles, key files rewritten under load, s3s-fs
//! restarted with the keys handed out (it verifies every signature).

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::metadata::{Keys, Metadata};
use support::rogue::{send, Rogue, Step};
use support::{http, Moto, Proxy, AK, S3, SK};

const HOUR: Duration = Duration::from_secs(3600);
const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/origin-reader";

fn metric(m: &str, prefix: &str) -> Option<f64> {
    m.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One bucket `b` at `/b` on `bkt`; `keys` is the YAML (at the `s3` level)
/// saying where its keys come from; `replicas` are `(name, endpoint, extra
/// replica YAML)`.
fn config(keys: &str, replicas: &[(&str, &str, &str)]) -> String {
    let mut out = format!(
        "buckets:\n  - name: \"b\"\n    path_prefix: \"/b\"\n    s3:\n      bucket: \"bkt\"\n      timeout_seconds: 5\n{keys}      health_check:\n        enabled: false\n      circuit_breaker:\n        failure_threshold: 3\n        success_threshold: 1\n        timeout_seconds: 1\n        half_open_requests: 1\n      replicas:\n"
    );
    for (i, (name, endpoint, extra)) in replicas.iter().enumerate() {
        out.push_str(&format!(
            "        - name: \"{name}\"\n          endpoint: \"{endpoint}\"\n          priority: {}\n{extra}",
            i + 1
        ));
    }
    out
}

/// An s3s-fs accepting only `keys`, holding `bkt/<key>`.
fn s3_holding(keys: (&str, &str), key: &str, body: &[u8]) -> S3 {
    let s3 = S3::start_with_keys(keys.0, keys.1);
    s3.create_bucket("bkt");
    s3.put("bkt", key, body);
    s3
}

fn provider(name: &str) -> String {
    format!("      credentials:\n        provider: \"{name}\"\n")
}

/// The `Credential=` access key of a signed request head.
fn signed_key(authorization: &str) -> &str {
    authorization
        .split("Credential=")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap_or("")
}

fn ready(p: &Proxy) -> serde_json::Value {
    let r = p.ready_details();
    serde_json::from_slice(&r.body).expect("ready JSON")
}

/// A client looping GETs until stopped; counts answers that are not 200.
struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    bad: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(port: u16, path: &'static str, expect: &'static [u8], clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let bad = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|_| {
                let (stop, done, bad) = (stop.clone(), done.clone(), bad.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match http::try_get(port, path, &[]) {
                            Ok(r) if r.status == 200 && r.body == expect => {}
                            Ok(r) => bad
                                .lock()
                                .unwrap()
                                .push(format!("{} {}", r.status, r.text())),
                            Err(e) => bad.lock().unwrap().push(e.to_string()),
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        Load {
            stop,
            done,
            bad,
            threads,
        }
    }

    /// Stops and returns (requests, failures).
    fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let bad = self.bad.lock().unwrap().clone();
        (self.done.load(Ordering::Relaxed), bad)
    }
}

#[test]
fn imds_instance_role_keys_sign_requests_and_stay_out_of_logs() {
    let md = Metadata::start(Keys::new(
        "ASIAIMDSKEY1",
        "imds-secret-1",
        "imds-token-1",
        HOUR,
    ));
    let s3 = s3_holding(
        ("ASIAIMDSKEY1", "imds-secret-1"),
        "a.txt",
        b"hello from an instance role",
    );
    let body = config(&provider("imds"), &[("a", &s3.endpoint(), "")]);
    let p = Proxy::start_with(
        &body,
        2,
        &[
            ("AWS_EC2_METADATA_SERVICE_ENDPOINT", &md.imds_endpoint()),
            ("RUST_LOG", "debug"),
        ],
    );
    let r = p.get("/b/a.txt");
    assert_eq!(r.status, 200, "{}\n{}", r.text(), p.log());
    assert_eq!(r.body, b"hello from an instance role");
    let seen = md.seen();
    assert!(
        seen.token_puts >= 1,
        "IMDSv2 session token requested: {seen:?}"
    );
    assert!(seen.credentials_served >= 1, "{seen:?}");
    assert_eq!(seen.unauthorized, 0, "{seen:?}");

    let m = p.metrics();
    assert_eq!(
        metric(
            &m,
            "yatagarasu_credentials_refresh_total{bucket=\"b\",replica=\"a\",result=\"ok\"}"
        ),
        Some(1.0),
        "{m}"
    );
    let left = metric(
        &m,
        "yatagarasu_credentials_expiry_seconds{bucket=\"b\",replica=\"a\"}",
    )
    .expect("expiry gauge");
    assert!(left > 3000.0 && left <= 3600.0, "{left}");
    let rd = ready(&p);
    let c = &rd["buckets"][0]["replicas"][0]["credentials"];
    assert_eq!(c["source"], "imds", "{rd}");
    assert_eq!(c["state"], "ok", "{rd}");

    // Keys, secret and session token appear nowhere: not in the log at
    // debug, not in /ready, not in the metrics.
    let log = p.log();
    assert!(log.contains("Credentials refreshed"), "{log}");
    for secret in ["imds-secret-1", "imds-token-1", "ASIAIMDSKEY1"] {
        assert!(
            !log.contains(secret),
            "{secret} leaked into the log:\n{log}"
        );
        assert!(!rd.to_string().contains(secret));
        assert!(!m.contains(secret));
    }
}

#[test]
fn ecs_container_credentials() {
    let md = Metadata::start(Keys::new(
        "ASIAECSKEY1",
        "ecs-secret-1",
        "ecs-token-1",
        HOUR,
    ));
    let s3 = s3_holding(("ASIAECSKEY1", "ecs-secret-1"), "k", b"task role");
    let body = config(&provider("ecs"), &[("a", &s3.endpoint(), "")]);
    let p = Proxy::start_with(
        &body,
        2,
        &[("AWS_CONTAINER_CREDENTIALS_FULL_URI", &md.ecs_uri())],
    );
    let r = p.get("/b/k");
    assert_eq!(r.status, 200, "{}\n{}", r.text(), p.log());
    assert_eq!(r.body, b"task role");
    assert_eq!(
        ready(&p)["buckets"][0]["replicas"][0]["credentials"]["source"],
        "ecs"
    );
}

#[test]
fn cold_start_with_a_slow_provider_waits_instead_of_failing() {
    let md = Metadata::start(Keys::new("ASIASLOW1", "slow-secret", "slow-token", HOUR));
    md.set_delay(Duration::from_millis(1500));
    let s3 = s3_holding(("ASIASLOW1", "slow-secret"), "k", b"worth the wait");
    let body = config(&provider("ecs"), &[("a", &s3.endpoint(), "")]);
    let t0 = Instant::now();
    let p = Proxy::start_with(
        &body,
        2,
        &[("AWS_CONTAINER_CREDENTIALS_FULL_URI", &md.ecs_uri())],
    );
    let port = p.port;
    let clients: Vec<_> = (0..4)
        .map(|_| std::thread::spawn(move || http::get(port, "/b/k", &[])))
        .collect();
    for c in clients {
        let r = c.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.body, b"worth the wait");
    }
    assert!(
        t0.elapsed() >= Duration::from_millis(1000),
        "the keys came after 1.5 s, so the requests waited for them"
    );
}

#[test]
fn imds_rotation_under_load_fails_no_request() {
    // Keys expiring in 5 min 6 s: the proxy refreshes them about 3-6 s
    // from now (5 minutes ahead, jittered), well before they expire.
    let k1 = Keys::new(
        "ASIAROT1",
        "rot-secret-1",
        "rot-token-1",
        Duration::from_secs(306),
    );
    let md = Metadata::start(k1);
    let mut a = s3_holding(("ASIAROT1", "rot-secret-1"), "obj", b"rotating");
    let mut b = a.sharing("ASIAROT1", "rot-secret-1");
    let body = config(
        &provider("imds"),
        &[("a", &a.endpoint(), ""), ("b", &b.endpoint(), "")],
    );
    let p = Proxy::start_with(
        &body,
        2,
        &[("AWS_EC2_METADATA_SERVICE_ENDPOINT", &md.imds_endpoint())],
    );
    let started = Instant::now();
    let pid = p.pid();
    assert_eq!(p.get("/b/obj").status, 200, "{}", p.log());
    let load = Load::start(p.port, "/b/obj", b"rotating", 4);

    // The platform rotates: the metadata service hands out new keys, and
    // the backup replica learns them first.
    md.set_keys(Keys::new("ASIAROT2", "rot-secret-2", "rot-token-2", HOUR));
    b.restart_with_keys("ASIAROT2", "rot-secret-2");
    let refreshes = |p: &Proxy| {
        metric(
            &p.metrics(),
            "yatagarasu_credentials_refresh_total{bucket=\"b\",replica=\"a\",result=\"ok\"}",
        )
        .unwrap_or(0.0)
    };
    wait_until("the scheduled refresh", Duration::from_secs(20), || {
        refreshes(&p) >= 2.0
    });
    let refreshed_after = started.elapsed();
    assert!(
        refreshed_after < Duration::from_secs(306 - 300 + 5),
        "refreshed {refreshed_after:?} after start: at least 5 minutes before the old keys expire"
    );
    // The primary still knows only the old keys: it refuses the new ones,
    // and requests move to the backup.
    std::thread::sleep(Duration::from_millis(800));
    a.restart_with_keys("ASIAROT2", "rot-secret-2");
    std::thread::sleep(Duration::from_millis(1500));
    let (n, bad) = load.finish();
    assert!(n > 20, "only {n} requests ran");
    assert!(
        bad.is_empty(),
        "{} of {n} requests failed: {:?}\n{}",
        bad.len(),
        &bad[..bad.len().min(5)],
        p.log()
    );
    assert_eq!(p.pid(), pid);
    // Both replicas now take the new keys: the primary alone serves.
    b.kill();
    std::thread::sleep(Duration::from_millis(1200));
    let r = p.get("/b/obj");
    assert_eq!(r.status, 200, "{}\n{}", r.text(), p.log());
}

/// Writes `value` to `path` the way a Kubernetes secret update does: a new
/// file renamed over the old one.
fn write_key(path: &std::path::Path, value: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{value}\n")).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn key_files_rotate_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let f = |n: &str| dir.path().join(n);
    for (name, value) in [
        ("a_ak", "FILEKEY1"),
        ("a_sk", "file-secret-1"),
        ("b_ak", "FILEKEY1"),
        ("b_sk", "file-secret-1"),
    ] {
        write_key(&f(name), value);
    }
    let mut a = s3_holding(("FILEKEY1", "file-secret-1"), "obj", b"from files");
    let mut b = a.sharing("FILEKEY1", "file-secret-1");
    let files = |r: &str| {
        format!(
            "          access_key_file: \"{}\"\n          secret_key_file: \"{}\"\n",
            f(&format!("{r}_ak")).display(),
            f(&format!("{r}_sk")).display()
        )
    };
    let body = config(
        "",
        &[
            ("a", &a.endpoint(), &files("a")),
            ("b", &b.endpoint(), &files("b")),
        ],
    );
    let p = Proxy::start(&body);
    let pid = p.pid();
    assert_eq!(p.get("/b/obj").status, 200, "{}", p.log());
    let load = Load::start(p.port, "/b/obj", b"from files", 4);
    // Rotate one replica at a time: its key files, then its server.
    for (name, server) in [("a", &mut a), ("b", &mut b)] {
        write_key(&f(&format!("{name}_ak")), "FILEKEY2");
        write_key(&f(&format!("{name}_sk")), "file-secret-2");
        server.restart_with_keys("FILEKEY2", "file-secret-2");
        std::thread::sleep(Duration::from_millis(2500));
    }
    let (n, bad) = load.finish();
    assert!(n > 20, "only {n} requests ran");
    assert!(
        bad.is_empty(),
        "{} of {n} requests failed: {:?}\n{}",
        bad.len(),
        &bad[..bad.len().min(5)],
        p.log()
    );
    assert_eq!(p.pid(), pid, "no restart");
    assert!(p.log().contains("Key files changed"), "{}", p.log());
    // Each replica alone serves with its new keys.
    for (down, up) in [(&mut a, "b"), (&mut b, "a")] {
        down.kill();
        std::thread::sleep(Duration::from_millis(1200));
        let r = p.get("/b/obj");
        assert_eq!(r.status, 200, "{up} alone: {}\n{}", r.text(), p.log());
        down.restart();
    }
}

#[test]
fn a_failing_provider_keeps_its_keys_until_expiry_then_fails_over() {
    let md = Metadata::start(Keys::new(
        "ASIAFAIL1",
        "fail-secret",
        "fail-token",
        Duration::from_secs(9),
    ));
    let a = s3_holding(("ASIAFAIL1", "fail-secret"), "obj", b"still here");
    let b = a.sharing(AK, SK);
    let ecs = "          credentials:\n            provider: \"ecs\"\n";
    let fixed = format!("          access_key: \"{AK}\"\n          secret_key: \"{SK}\"\n");
    let body = config(
        "",
        &[("a", &a.endpoint(), ecs), ("b", &b.endpoint(), &fixed)],
    );
    let p = Proxy::start_with(
        &body,
        1,
        &[("AWS_CONTAINER_CREDENTIALS_FULL_URI", &md.ecs_uri())],
    );
    let issued = Instant::now();
    assert_eq!(p.get("/b/obj").status, 200, "{}", p.log());
    md.set_failing(true);
    // Short-lived keys are fetched again every 5 s: that fetch fails.
    assert!(
        p.wait_log("Credentials refresh failed", Duration::from_secs(10)),
        "{}",
        p.log()
    );
    let served_by = |p: &Proxy, r: &str| {
        metric(
            &p.metrics(),
            &format!("yatagarasu_replica_requests_total{{bucket=\"b\",replica=\"{r}\"}}"),
        )
        .unwrap_or(0.0)
    };
    // Not expired yet (as /ready says after the request, so not when it
    // was served either): the old keys still serve, from the primary. On
    // a slow machine they may have expired by now; then that is said.
    let before = served_by(&p, "a");
    assert_eq!(p.get("/b/obj").status, 200);
    let rd = ready(&p);
    let state = &rd["buckets"][0]["replicas"][0]["credentials"]["state"];
    if *state == "refresh_failing" {
        assert_eq!(served_by(&p, "a"), before + 1.0, "{rd}");
    } else {
        assert_eq!(*state, "expired", "{rd}");
    }
    // Past expiry: the primary fails with cause `credentials`, the backup serves.
    wait_until("expiry", Duration::from_secs(15), || {
        issued.elapsed() > Duration::from_secs(10)
    });
    let r = p.get("/b/obj");
    assert_eq!(r.status, 200, "{}\n{}", r.text(), p.log());
    assert_eq!(r.body, b"still here");
    let m = p.metrics();
    assert!(
        metric(
            &m,
            "yatagarasu_replica_failures_total{bucket=\"b\",replica=\"a\",reason=\"credentials\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "yatagarasu_credentials_refresh_total{bucket=\"b\",replica=\"a\",result=\"failure\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{m}"
    );
    let rd = ready(&p);
    assert_eq!(
        rd["buckets"][0]["replicas"][0]["credentials"]["state"], "expired",
        "{rd}"
    );
    assert_eq!(
        rd["buckets"][0]["replicas"][1]["credentials"]["state"], "static",
        "{rd}"
    );
    assert!(
        p.log().contains("expired and no refresh has replaced them"),
        "{}",
        p.log()
    );
}

fn ok(body: &str) -> Vec<Step> {
    vec![send(&format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nETag: \"e\"\r\n\r\n{body}",
        body.len()
    ))]
}

#[test]
fn an_expired_token_answer_refreshes_and_retries_once() {
    let md = Metadata::start(Keys::new("ASIAOLD", "old-secret", "old-token", HOUR));
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let rogue = Rogue::start(move |_| {
        if c.fetch_add(1, Ordering::SeqCst) == 0 {
            let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>ExpiredToken</Code><Message>The provided token has expired.</Message></Error>";
            vec![send(&format!(
                "HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{xml}",
                xml.len()
            ))]
        } else {
            ok("fresh")
        }
    });
    let body = config(&provider("ecs"), &[("a", &rogue.endpoint(), "")]);
    let p = Proxy::start_with(
        &body,
        1,
        &[("AWS_CONTAINER_CREDENTIALS_FULL_URI", &md.ecs_uri())],
    );
    wait_until("first keys", Duration::from_secs(5), || {
        md.seen().credentials_served >= 1
    });
    md.set_keys(Keys::new("ASIANEW", "new-secret", "new-token", HOUR));
    let r = p.get("/b/k");
    assert_eq!(r.status, 200, "{}\n{}", r.text(), p.log());
    assert_eq!(r.body, b"fresh");
    let seen = rogue.seen();
    assert_eq!(seen.len(), 2, "one retry on the same replica");
    let keys: Vec<String> = seen
        .iter()
        .map(|s| signed_key(&s.header("authorization").unwrap_or_default()).to_string())
        .collect();
    assert_eq!(keys, ["ASIAOLD", "ASIANEW"]);
    assert_eq!(
        seen[0].header("x-amz-security-token").as_deref(),
        Some("old-token")
    );
    assert_eq!(
        seen[1].header("x-amz-security-token").as_deref(),
        Some("new-token")
    );
    let m = p.metrics();
    assert_eq!(
        metric(
            &m,
            "yatagarasu_replica_failures_total{bucket=\"b\",replica=\"a\",reason=\"credentials\"}"
        ),
        None,
        "the retry answered, so no failure counts: {m}"
    );
}

/// Checks an upstream request head carries an STS session: an `ASIA` key,
/// the token header, and the token among the signed headers.
fn assert_session_signed(seen: &support::rogue::Seen) {
    let auth = seen.header("authorization").expect("signed");
    assert!(signed_key(&auth).starts_with("ASIA"), "{auth}");
    let token = seen
        .header("x-amz-security-token")
        .expect("session token sent");
    assert!(token.len() > 20, "{token}");
    assert!(
        auth.contains("SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-security-token"),
        "{auth}"
    );
}

#[test]
fn web_identity_through_moto_sts() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "eyJhbGciOiJSUzI1NiJ9.e30.c2lnbmF0dXJl").unwrap();
    let rogue = Rogue::start(|_| ok("via irsa"));
    let body = config(&provider("web_identity"), &[("a", &rogue.endpoint(), "")]);
    let p = Proxy::start_with(
        &body,
        1,
        &[
            ("AWS_WEB_IDENTITY_TOKEN_FILE", token_file.to_str().unwrap()),
            ("AWS_ROLE_ARN", ROLE_ARN),
            ("AWS_ROLE_SESSION_NAME", "yatagarasu-test"),
            ("AWS_ENDPOINT_URL_STS", &moto.endpoint()),
        ],
    );
    let r = p.get("/b/k");
    assert_eq!(r.status, 200, "{}\n{}", r.text(), p.log());
    assert_eq!(r.body, b"via irsa");
    assert_session_signed(&rogue.seen()[0]);
    assert_eq!(
        ready(&p)["buckets"][0]["replicas"][0]["credentials"]["state"],
        "ok"
    );
}

#[test]
fn assume_role_on_static_keys_through_moto_sts() {
    let moto = Moto::start();
    let rogue = Rogue::start(|_| ok("cross-account"));
    let keys = format!(
        "      access_key: \"{AK}\"\n      secret_key: \"{SK}\"\n      credentials:\n        provider: \"static\"\n        assume_role:\n          role_arn: \"{ROLE_ARN}\"\n          session_name: \"edge\"\n          external_id: \"ext-123\"\n"
    );
    let body = config(&keys, &[("a", &rogue.endpoint(), "")]);
    let p = Proxy::start_with(&body, 1, &[("AWS_ENDPOINT_URL_STS", &moto.endpoint())]);
    let r = p.get("/b/k");
    assert_eq!(r.status, 200, "{}\n{}", r.text(), p.log());
    let seen = &rogue.seen()[0];
    assert_session_signed(seen);
    assert_ne!(
        signed_key(&seen.header("authorization").unwrap()),
        AK,
        "the role's keys sign, not the base keys"
    );
    let rd = ready(&p);
    assert!(
        rd["buckets"][0]["replicas"][0]["credentials"]["source"]
            .as_str()
            .is_some_and(|s| s.contains("assume_role")),
        "{rd}"
    );
}

#[test]
fn a_reload_switches_a_replica_to_another_source() {
    let mut s3 = s3_holding(("STATICKEY1", "static-secret-1"), "k", b"reloaded");
    let fixed = "      access_key: \"STATICKEY1\"\n      secret_key: \"static-secret-1\"\n";
    let p = Proxy::start(&config(fixed, &[("a", &s3.endpoint(), "")]));
    assert_eq!(p.get("/b/k").status, 200, "{}", p.log());
    // The keys move to files (a Kubernetes secret) with new values; the
    // server learns them, then the proxy's configuration is reloaded.
    let dir = tempfile::tempdir().unwrap();
    write_key(&dir.path().join("ak"), "FILEKEY9");
    write_key(&dir.path().join("sk"), "file-secret-9");
    s3.restart_with_keys("FILEKEY9", "file-secret-9");
    let files = format!(
        "      access_key_file: \"{}\"\n      secret_key_file: \"{}\"\n",
        dir.path().join("ak").display(),
        dir.path().join("sk").display()
    );
    p.reload(&config(&files, &[("a", &s3.endpoint(), "")]));
    wait_until(
        "the reloaded source's keys",
        Duration::from_secs(10),
        || {
            let rd = ready(&p);
            rd["buckets"][0]["replicas"][0]["credentials"]["source"] == "key files"
                && rd["buckets"][0]["replicas"][0]["credentials"]["state"] == "ok"
        },
    );
    let r = p.get("/b/k");
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, &b"reloaded"[..]),
        "{}",
        p.log()
    );
}
