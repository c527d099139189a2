//! The audit log (`audit_log`, the other system's keys) through real
//! sockets: one JSON record per access decision in a file (rotated by size
//! and by the clock, backups bounded, a full disk dropping records without
//! holding a request up) and over syslog (RFC 5424 on UDP, octet-counted
//! on TCP) to receivers in the test.

mod support;

use std::io::Read;
use std::time::Duration;
use support::rogue::{ok_with, Rogue};
use support::*;

const SECRET: &str = "audit-test-secret-0123456789abcdef";
const WAIT: Duration = Duration::from_secs(20);
const FILE_RECORDS: &str = "yatagarasu_audit_records_total{output=\"file\"}";

fn origin() -> Rogue {
    Rogue::start(|_| vec![ok_with("ETag: \"a\"\r\n", b"audited body")])
}

/// A private bucket `/p` (JWT) with an IP filter on `/f`, a public `/pub`;
/// `audit` is the `audit_log:` body.
fn config(endpoint: &str, audit: &str) -> String {
    let bucket = |name: &str, extra: &str| {
        format!(
            "  - name: \"{name}\"\n    path_prefix: \"/{name}\"\n{extra}    s3:\n      bucket: \"bkt\"\n      endpoint: \"{endpoint}\"\n      access_key: \"{AK}\"\n      secret_key: \"{SK}\"\n      health_check:\n        enabled: false\n"
        )
    };
    format!(
        "audit_log:\n  enabled: true\n{audit}jwt:\n  enabled: true\n  secret: \"{SECRET}\"\nbuckets:\n{}{}{}",
        bucket("p", "    auth:\n      enabled: true\n"),
        bucket("f", "    ip_filter:\n      allowlist: [\"10.0.0.0/8\"]\n"),
        bucket("pub", ""),
    )
}

fn file_output(path: &std::path::Path, extra: &str) -> String {
    format!(
        "  outputs: [\"file\"]\n  file:\n    path: \"{}\"\n{extra}",
        path.display()
    )
}

fn lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[test]
fn a_record_per_access_decision_says_who_asked_what_was_decided_and_why() {
    let up = origin();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("audit.log");
    let proxy = Proxy::start(&config(&up.endpoint(), &file_output(&path, "")));
    let token = hs256_token(
        SECRET,
        &serde_json::json!({"sub": "alice", "exp": unix_now() + 600}),
    );
    let bearer = format!("Bearer {token}");
    assert_eq!(
        http::get(proxy.port, "/p/docs/a.txt", &[("Authorization", &bearer)]).status,
        200
    );
    assert_eq!(proxy.get("/p/docs/a.txt").status, 401);
    assert_eq!(
        http::get(
            proxy.port,
            "/p/docs/a.txt",
            &[("Authorization", "Bearer not.a.token")]
        )
        .status,
        401
    );
    assert_eq!(proxy.get("/f/x").status, 403);
    assert_eq!(
        proxy
            .get(&format!("/pub/q?token={token}&sig=SECRETSIG"))
            .status,
        200
    );
    // Not an access decision: no bucket.
    assert_eq!(proxy.get("/nowhere/x").status, 404);
    assert!(
        proxy.wait_metric(FILE_RECORDS, 5.0, WAIT),
        "{}",
        proxy.metrics()
    );
    // One record each; two cores hand theirs over apart, so the file is
    // not in request order.
    let records = lines(&path);
    assert_eq!(records.len(), 5, "{records:?}");
    let r = records
        .iter()
        .find(|r| r["status"] == 200 && r["bucket"] == "p")
        .expect("the allowed request's record");
    assert_eq!(r["sub"], "alice");
    assert_eq!(r["key"], "docs/a.txt");
    assert_eq!(r["method"], "GET");
    assert_eq!(r["decision"], "allow");
    assert_eq!(r["bytes"], 12);
    assert_eq!(r["client_ip"], "127.0.0.1");
    assert!(
        r["request_id"].as_str().is_some_and(|s| !s.is_empty()),
        "{r}"
    );
    assert!(
        r["timestamp"].as_str().is_some_and(|s| s.ends_with('Z')),
        "{r}"
    );
    let mut decisions: Vec<_> = records
        .iter()
        .map(|r| {
            (
                r["bucket"].as_str().unwrap_or("").to_string(),
                r["decision"].as_str().unwrap_or("").to_string(),
                r["reason"].as_str().unwrap_or("-").to_string(),
                r["status"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    decisions.sort();
    let want = [
        ("f", "deny", "ip_filter", 403),
        ("p", "allow", "-", 200),
        ("p", "deny", "invalid", 401),
        ("p", "deny", "missing", 401),
        ("pub", "allow", "-", 200),
    ];
    let want: Vec<_> = want
        .iter()
        .map(|(b, d, r, s)| (b.to_string(), d.to_string(), r.to_string(), *s))
        .collect();
    assert_eq!(decisions, want);
    // Secrets never appear: no token, no query value.
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        !text.contains(&token) && !text.contains("SECRETSIG"),
        "{text}"
    );
}

#[test]
fn the_file_rotates_by_size_and_keeps_at_most_its_backups() {
    let up = origin();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("audit.log");
    let proxy = Proxy::start(&config(
        &up.endpoint(),
        &file_output(
            &path,
            "    max_file_size_mb: 1\n    max_backup_files: 2\n    buffer_size: 0\n",
        ),
    ));
    // Records of about 4 KiB (long keys): 1,200 make about 4.7 MiB, so
    // the file rotates four times and the oldest backups go.
    let long = "k".repeat(4000);
    let mut c = http::Conn::open(proxy.port).expect("connect");
    for i in 0..1200 {
        let r = c
            .request("GET", &format!("/pub/{long}{i}"), &[])
            .expect("answer");
        assert_eq!(r.status, 200);
    }
    assert!(
        proxy.wait_metric(FILE_RECORDS, 1200.0, WAIT),
        "{}",
        proxy.metrics()
    );
    let backup = |i: u32| std::path::PathBuf::from(format!("{}.{i}", path.display()));
    assert!(backup(1).exists() && backup(2).exists(), "two backups kept");
    assert!(!backup(3).exists(), "no third backup");
    for p in [path.clone(), backup(1), backup(2)] {
        let size = std::fs::metadata(&p).map_or(0, |m| m.len());
        assert!(size <= 1024 * 1024, "{} is {size} bytes", p.display());
    }
    // The newest record is in the live file, the ones before it in order.
    let live = lines(&path);
    let last = live.last().expect("a record");
    assert_eq!(last["key"], format!("{long}1199"));
    let older = lines(&backup(1));
    let n = |r: &serde_json::Value| {
        r["key"]
            .as_str()
            .and_then(|k| k[4000..].parse::<u32>().ok())
            .unwrap_or(0)
    };
    assert_eq!(
        n(older.last().expect("a record")) + 1,
        n(&live[0]),
        "no record lost between files"
    );
}

#[test]
fn a_daily_file_rotates_when_the_day_changes() {
    let up = origin();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("audit.log");
    let proxy = Proxy::start_with_test_clock(
        &config(
            &up.endpoint(),
            &file_output(&path, "    rotation_policy: daily\n    buffer_size: 0\n"),
        ),
        1,
    );
    assert_eq!(proxy.get("/pub/yesterday").status, 200);
    assert!(
        proxy.wait_metric(FILE_RECORDS, 1.0, WAIT),
        "{}",
        proxy.metrics()
    );
    proxy.advance_clock(86_400_000);
    assert_eq!(proxy.get("/pub/today").status, 200);
    assert!(
        proxy.wait_metric(FILE_RECORDS, 2.0, WAIT),
        "{}",
        proxy.metrics()
    );
    let old = lines(&std::path::PathBuf::from(format!("{}.1", path.display())));
    let new = lines(&path);
    assert_eq!(old.len(), 1);
    assert_eq!(old[0]["key"], "yesterday");
    assert_eq!(new.len(), 1);
    assert_eq!(new[0]["key"], "today");
}

#[test]
fn a_full_disk_drops_records_and_holds_no_request_up() {
    let up = origin();
    let proxy = Proxy::start(&config(
        &up.endpoint(),
        &file_output(std::path::Path::new("/dev/full"), "    buffer_size: 0\n"),
    ));
    for i in 0..50 {
        assert_eq!(proxy.get(&format!("/pub/{i}")).status, 200);
    }
    let dropped = "yatagarasu_audit_records_dropped_total{reason=\"file\"}";
    assert!(
        proxy.wait_metric(dropped, 50.0, WAIT),
        "{}",
        proxy.metrics()
    );
    assert_eq!(proxy.metric(FILE_RECORDS), Some(0.0));
    assert!(proxy.wait_log("Audit records could not be written", WAIT));
}

#[test]
fn records_reach_syslog_over_udp_as_rfc_5424() {
    let up = origin();
    // UDP: a datagram a record.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    udp.set_read_timeout(Some(WAIT)).expect("timeout");
    let proxy = Proxy::start(&config(
        &up.endpoint(),
        &syslog(udp.local_addr().expect("addr").to_string(), "udp"),
    ));
    assert_eq!(proxy.get("/p/secret-doc").status, 401);
    let mut buf = [0u8; 8192];
    let n = udp.recv(&mut buf).expect("a datagram");
    let line = String::from_utf8_lossy(&buf[..n]).into_owned();
    // local3 (19) * 8 + warning (4) for a refusal.
    assert!(line.starts_with("<156>1 "), "{line}");
    let (header, json) = line.split_once(" audit - ").expect("an RFC 5424 header");
    assert!(header.contains(" yatagarasu "), "{header}");
    let record: serde_json::Value = serde_json::from_str(json).expect("JSON");
    assert_eq!(
        (record["decision"].as_str(), record["key"].as_str()),
        (Some("deny"), Some("secret-doc"))
    );
}

fn syslog(address: String, protocol: &str) -> String {
    format!(
        // Single quotes: the harness reads a double-quoted 127.0.0.1
        // address as the proxy's own.
        "  outputs: [\"syslog\"]\n  syslog:\n    address: '{address}'\n    protocol: \"{protocol}\"\n    facility: \"local3\"\n"
    )
}

#[test]
fn records_reach_syslog_over_tcp_with_octet_counting() {
    let up = origin();
    let mut buf = [0u8; 8192];
    // TCP: octet counting (RFC 6587).
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("tcp");
    let proxy = Proxy::start(&config(
        &up.endpoint(),
        &syslog(tcp.local_addr().expect("addr").to_string(), "tcp"),
    ));
    assert_eq!(proxy.get("/pub/one").status, 200);
    assert_eq!(proxy.get("/pub/two").status, 200);
    let (mut s, _) = tcp.accept().expect("the proxy connects");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut got = Vec::new();
    let mut frames = Vec::new();
    while frames.len() < 2 {
        let n = s.read(&mut buf).expect("bytes");
        assert!(n > 0, "closed early");
        got.extend_from_slice(&buf[..n]);
        while let Some(sp) = got.iter().position(|&b| b == b' ') {
            let len: usize = std::str::from_utf8(&got[..sp])
                .ok()
                .and_then(|l| l.parse().ok())
                .expect("a length");
            if got.len() < sp + 1 + len {
                break;
            }
            frames.push(String::from_utf8_lossy(&got[sp + 1..sp + 1 + len]).into_owned());
            got.drain(..sp + 1 + len);
        }
    }
    // local3 (19) * 8 + informational (6); two cores send apart, so in
    // either order.
    let mut keys = Vec::new();
    for frame in &frames {
        assert!(frame.starts_with("<158>1 "), "{frame}");
        let (_, json) = frame.split_once(" audit - ").expect("an RFC 5424 header");
        let record: serde_json::Value = serde_json::from_str(json).expect("JSON");
        keys.push(record["key"].as_str().unwrap_or("").to_string());
    }
    keys.sort();
    assert_eq!(keys, ["one", "two"]);
    assert!(proxy.wait_metric(
        "yatagarasu_audit_records_total{output=\"syslog\"}",
        2.0,
        WAIT
    ));
}

#[test]
fn audit_keys_are_checked() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = dir.path().join("c.yaml");
    let up = "http://127.0.0.1:9";
    let run = |audit: &str| {
        let body = format!("server:\n  address: \"127.0.0.1:0\"\n{}", config(up, audit));
        std::fs::write(&cfg, body).expect("write");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_yatagarasu"))
            .args(["--check", "--config"])
            .arg(&cfg)
            .output()
            .expect("run --check");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned()
                + &String::from_utf8_lossy(&out.stdout),
        )
    };
    let (code, out) = run(
        "  outputs: [\"file\", \"syslog\", \"s3\"]\n  log_level: loud\n  file:\n    path: \"/tmp/a.log\"\n    rotation_policy: weekly\n  syslog:\n    address: \"nohostport\"\n    protocol: sctp\n",
    );
    assert_eq!(code, Some(1), "{out}");
    for needle in [
        "audit_log.log_level: \"loud\" is not one of debug, info, warn, error",
        "audit_log.outputs[2]: \"s3\" is not supported here",
        "audit_log.file.rotation_policy: \"weekly\" is not one of size, daily, hourly",
        "audit_log.syslog.protocol: \"sctp\" is not one of udp, tcp",
    ] {
        assert!(out.contains(needle), "{needle}: {out}");
    }
    let (code, out) = run("  outputs: [\"file\"]\n  file:\n    path: \"/tmp/a.log\"\n    max_file_size_mb: 10\n    max_backup_files: 3\n");
    assert_eq!(code, Some(0), "{out}");
}
