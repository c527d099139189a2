//! TLS to upstream replicas: a local TLS endpoint with a CA made by the test.

mod support;

use std::time::Duration;
use support::http;
use support::tls_front::{TestCa, TlsFront};
use support::*;

fn tls_bucket(endpoint: &str, extra: &str) -> String {
    format!(
        "buckets:\n  - name: \"secure\"\n    path_prefix: \"/s\"\n    s3:\n      bucket: \"data-bucket\"\n      region: \"us-east-1\"\n      endpoint: \"{endpoint}\"\n      access_key: \"{AK}\"\n      secret_key: \"{SK}\"\n{extra}"
    )
}

/// A TLS client connection to the proxy's listener, trusting `ca`.
fn tls_client(
    ca: &TestCa,
    port: u16,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(ca.client_config(), name).unwrap();
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// Whether the `openssl` tool is here (said when it is not).
fn has_openssl() -> bool {
    let here = std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_ok();
    if !here {
        eprintln!("openssl is not installed; skipped");
    }
    here
}

/// A proxy serving HTTPS with a leaf of a CA made here (`workers` cores),
/// in front of [`backend`]: the backend, the certificates' directory, the
/// port and the proxy.
fn https_listener(ca_name: &str, workers: usize) -> (S3, tempfile::TempDir, u16, Proxy) {
    let s3 = backend();
    let ca = TestCa::new(ca_name);
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = ca.leaf_pem_files(dir.path());
    let port = free_port();
    let cfg = format!(
        "server:\n  address: \"127.0.0.1:{port}\"\n  workers: {workers}\n  tls:\n    cert_file: \"{cert}\"\n    key_file: \"{key}\"\n{}",
        single_bucket("/s", "data-bucket", &s3.endpoint())
    );
    let proxy = Proxy::start(&cfg);
    (s3, dir, port, proxy)
}

fn backend() -> S3 {
    let s3 = S3::start();
    s3.create_bucket("data-bucket");
    s3.put("data-bucket", "hello.txt", b"over TLS\n");
    s3
}

#[test]
fn signed_get_over_tls_with_a_private_ca() {
    let s3 = backend();
    let ca = TestCa::new("yatagarasu test CA");
    let front = TlsFront::start(&ca, s3.port);
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, &ca.pem).unwrap();
    let proxy = Proxy::start(&tls_bucket(
        &front.endpoint(),
        &format!("      ca_file: \"{}\"\n", ca_path.display()),
    ));
    for _ in 0..3 {
        let r = proxy.get("/s/hello.txt");
        assert_eq!(r.status, 200, "{}\n{}", r.text(), proxy.log());
        assert_eq!(r.text(), "over TLS\n");
    }
    let big = pattern(2 * 1024 * 1024 + 3, 5);
    s3.put("data-bucket", "big.bin", &big);
    let r = proxy.get("/s/big.bin");
    assert!(r.body == big, "TLS body differs");
}

#[test]
fn wrong_ca_is_refused_and_counts_as_a_replica_failure() {
    let s3 = backend();
    let ca = TestCa::new("the real CA");
    let other = TestCa::new("some other CA");
    let front = TlsFront::start(&ca, s3.port);
    let dir = tempfile::tempdir().unwrap();
    let other_path = dir.path().join("other.pem");
    std::fs::write(&other_path, &other.pem).unwrap();
    // Primary over TLS with the wrong CA, backup plain: the client never notices.
    let cfg = format!(
        "buckets:\n  - name: \"secure\"\n    path_prefix: \"/s\"\n    s3:\n      bucket: \"data-bucket\"\n      access_key: \"{AK}\"\n      secret_key: \"{SK}\"\n      health_check:\n        enabled: false\n      replicas:\n        - name: \"tls-primary\"\n          endpoint: \"{}\"\n          ca_file: \"{}\"\n          priority: 1\n        - name: \"plain-backup\"\n          endpoint: \"{}\"\n          priority: 2\n",
        front.endpoint(),
        other_path.display(),
        s3.endpoint()
    );
    let proxy = Proxy::start(&cfg);
    let r = proxy.get("/s/hello.txt");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "over TLS\n");
    assert!(proxy.wait_log(
        "Replica 'tls-primary' failed, trying 'plain-backup'",
        Duration::from_secs(2)
    ));
    let log = proxy.log();
    let line = log
        .lines()
        .find(|l| l.contains("Replica 'tls-primary' failed"))
        .unwrap_or_default();
    assert!(
        line.contains("tls:") && line.contains("TLS handshake"),
        "{line}"
    );
    assert!(
        line.to_ascii_lowercase().contains("issuer") || line.contains("certificate"),
        "{line}"
    );
    let m = proxy.metrics();
    assert!(m.contains("yatagarasu_replica_failures_total{bucket=\"secure\",replica=\"tls-primary\",reason=\"tls\"} 1"), "{m}");
}

#[test]
fn without_the_ca_the_system_roots_refuse_the_test_certificate() {
    let s3 = backend();
    let ca = TestCa::new("unknown to the system");
    let front = TlsFront::start(&ca, s3.port);
    let proxy = Proxy::start_with(
        &tls_bucket(
            &front.endpoint(),
            "      health_check:\n        enabled: false\n",
        ),
        2,
        &[("RUST_LOG", "debug")],
    );
    let r = proxy.get("/s/hello.txt");
    assert_eq!(r.status, 502);
    assert!(r.text().contains("secure"));
    // rustls' own events reach the proxy's log through the `log` bridge.
    assert!(
        proxy.wait_log("target=rustls", Duration::from_secs(2)),
        "{}",
        proxy.log()
    );
}

#[test]
fn insecure_skip_verify_works_and_warns() {
    let s3 = backend();
    let ca = TestCa::new("self-signed");
    let front = TlsFront::start(&ca, s3.port);
    let proxy = Proxy::start(&tls_bucket(
        &front.endpoint(),
        "      insecure_skip_verify: true\n",
    ));
    assert_eq!(proxy.get("/s/hello.txt").text(), "over TLS\n");
    assert!(
        proxy
            .log()
            .contains("WARN TLS certificate verification is OFF"),
        "{}",
        proxy.log()
    );
}

#[test]
fn tls_settings_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let check = |body: String| {
        let path = dir.path().join("c.yaml");
        std::fs::write(
            &path,
            format!("server:\n  address: \"127.0.0.1:1\"\n{body}"),
        )
        .unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_yatagarasu"))
            .args(["--check", "--config", path.to_str().unwrap()])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = check(tls_bucket(
        "https://127.0.0.1:9443",
        "      ca_file: \"/nonexistent/ca.pem\"\n",
    ));
    assert_eq!(code, Some(1));
    assert!(
        err.contains("buckets[0].s3.ca_file") && err.contains("cannot read"),
        "{err}"
    );
    let (code, err) = check(tls_bucket(
        "http://127.0.0.1:9000",
        "      insecure_skip_verify: true\n",
    ));
    assert_eq!(code, Some(1));
    assert!(err.contains("https:// endpoints only"), "{err}");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let (code, err) = check(tls_bucket(
        "https://127.0.0.1:9443",
        &format!("      ca_file: \"{}\"\n", garbage.display()),
    ));
    assert_eq!(code, Some(1));
    assert!(err.contains("no certificate"), "{err}");
}

#[test]
fn the_listener_serves_https_when_server_tls_is_set() {
    use std::io::Write;
    let s3 = backend();
    let ca = TestCa::new("listener CA");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = ca.leaf_pem_files(dir.path());
    let port = free_port();
    let cfg = format!(
        "server:\n  address: \"127.0.0.1:{port}\"\n  workers: 1\n  tls:\n    cert_file: \"{cert}\"\n    key_file: \"{key}\"\n{}",
        single_bucket("/s", "data-bucket", &s3.endpoint())
    );
    let proxy = Proxy::start(&cfg);
    let mut tls = tls_client(&ca, proxy.port);
    for _ in 0..2 {
        tls.write_all(b"GET /s/hello.txt HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).ends_with("over TLS\n") {
            let n = read_retry(&mut tls, &mut buf).unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        assert!(
            got.starts_with(b"HTTP/1.1 200 OK"),
            "{}",
            String::from_utf8_lossy(&got)
        );
    }
    // Plain HTTP on the TLS port gets nowhere, and the proxy stays up.
    assert!(http::try_get(proxy.port, "/s/hello.txt", &[]).is_err());
    let (code, _) = {
        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, cfg.replace(&key, "/nonexistent.key")).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_yatagarasu"))
            .args(["--check", "--config", bad.to_str().unwrap()])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(code, Some(1));
}

/// Reads one response (Content-Length framed) from `r`: status and body.
fn read_framed<R: std::io::Read>(r: &mut R) -> (u16, Vec<u8>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(n)) = resp.parse(&got) {
            let len: usize = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
                .expect("content-length");
            let status = resp.code.unwrap_or(0);
            while got.len() < n + len {
                let m = read_retry(r, &mut buf).unwrap();
                assert!(m > 0, "closed mid-body");
                got.extend_from_slice(&buf[..m]);
            }
            return (status, got[n..n + len].to_vec());
        }
        let m = read_retry(r, &mut buf).unwrap();
        assert!(m > 0, "closed mid-head");
        got.extend_from_slice(&buf[..m]);
    }
}

/// Over a TLS listener, a response head and the body bytes that go with
/// it in one vectored write (relayed from an upstream that sends head and
/// body together, and cache hits) arrive whole and in order.
#[test]
fn head_and_body_written_together_arrive_whole_over_tls() {
    use std::io::Write;
    use support::rogue::{ok_with, Rogue};
    let sizes = [1024usize, 20 * 1024, 70 * 1024];
    let up = Rogue::start(move |seen| {
        let i: usize = seen
            .target
            .rsplit('/')
            .next()
            .and_then(|n| n.strip_prefix('o')?.parse().ok())
            .filter(|&i| i < sizes.len())
            .unwrap_or(0);
        let body = pattern(sizes[i], i as u64 + 3);
        vec![ok_with("Cache-Control: max-age=600\r\n", &body)]
    });
    let ca = TestCa::new("writev CA");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = ca.leaf_pem_files(dir.path());
    let cfg = format!(
        "server:\n  address: \"127.0.0.1:{}\"\n  workers: 1\n  tls:\n    cert_file: \"{cert}\"\n    key_file: \"{key}\"\ncache:\n  enabled: true\n{}",
        free_port(),
        single_bucket("/s", "data-bucket", &up.endpoint())
    );
    let proxy = Proxy::start(&cfg);
    let mut tls = tls_client(&ca, proxy.port);
    // Each object twice: relayed (a miss), then from the cache (a hit).
    for round in 0..2 {
        for (i, &size) in sizes.iter().enumerate() {
            tls.write_all(format!("GET /s/o{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .unwrap();
            let (status, body) = read_framed(&mut tls);
            assert_eq!((status, body.len()), (200, size));
            let want = pattern(size, i as u64 + 3);
            let first_diff = body.iter().zip(&want).position(|(a, b)| a != b);
            assert!(
                body == want,
                "round {round}, size {size}: bytes differ from {first_diff:?}"
            );
        }
    }
    let gets = up
        .seen()
        .iter()
        .filter(|s| s.head.starts_with("GET "))
        .count();
    assert_eq!(gets, 3, "the second round came from the cache");
}

/// Issue #28: clients resume their TLS sessions (TLS 1.3 tickets, from a
/// ticketer shared by every worker; a session cache for TLS 1.2), as
/// `openssl s_client -sess_out` / `-sess_in` sees it.
#[test]
fn clients_resume_tls_sessions_with_any_worker() {
    if !has_openssl() {
        return;
    }
    let (_s3, dir, port, _proxy) = https_listener("resumption CA", 2);
    let session = dir.path().join("session.pem");
    let connect = |version: &str, resume: bool| {
        use std::io::Write;
        let mut cmd = std::process::Command::new("openssl");
        cmd.args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            version,
            "-ign_eof",
        ]);
        cmd.arg(if resume { "-sess_in" } else { "-sess_out" })
            .arg(&session);
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("openssl s_client");
        // A request, so the client reads what the server sends after the
        // handshake (TLS 1.3 tickets); the server closes after answering.
        let _ = child
            .stdin
            .take()
            .expect("stdin")
            .write_all(b"GET /s/hello.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let out = child.wait_with_output().expect("s_client output");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for version in ["-tls1_3", "-tls1_2"] {
        let first = connect(version, false);
        assert!(first.contains("over TLS"), "{version}: {first}");
        assert!(first.contains("New,"), "{version}: {first}");
        // Two workers: resumed whichever one the kernel picks, each time.
        for _ in 0..4 {
            let again = connect(version, true);
            assert!(again.contains("Reused,"), "{version} not resumed: {again}");
            assert!(again.contains("over TLS"), "{version}: {again}");
        }
    }
    // Counted: ten handshakes, eight of them resumed.
    assert_eq!(_proxy.metric("yatagarasu_tls_handshakes_total"), Some(10.0));
    assert_eq!(
        _proxy.metric("yatagarasu_tls_resumed_handshakes_total"),
        Some(8.0)
    );
}

/// Issue #28: a client that reconnects after `Connection: close` resumes
/// its session. The proxy closed TLS connections without close_notify, and
/// OpenSSL takes such an end for a truncation and drops the session from
/// resumption: `openssl s_time -reuse` (HTTP/1.0, one request per
/// connection) resumed none.
#[test]
fn sessions_of_connections_the_proxy_closed_resume() {
    if !has_openssl() {
        return;
    }
    let (_s3, _dir, port, proxy) = https_listener("close_notify CA", 1);
    let out = std::process::Command::new("openssl")
        .args([
            "s_time",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-www",
            "/s/hello.txt",
            "-reuse",
            "-time",
            "1",
        ])
        .output()
        .expect("openssl s_time");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let handshakes = proxy
        .metric("yatagarasu_tls_handshakes_total")
        .unwrap_or(0.0);
    let resumed = proxy
        .metric("yatagarasu_tls_resumed_handshakes_total")
        .unwrap_or(0.0);
    assert!(handshakes >= 3.0, "{text}");
    // The first connection makes the session; every later one resumes it.
    assert_eq!(resumed, handshakes - 1.0, "{text}");
}

/// Issue #28: a reconnect to an `https://` replica resumes the session the
/// last connection made (rustls's client session store, kept per replica
/// in its connector), so only the first handshake is a full one.
#[test]
fn reconnects_to_an_https_replica_resume_their_tls_session() {
    let s3 = backend();
    let ca = TestCa::new("upstream resumption CA");
    // Every answer closes its connection: each request is a new handshake.
    let front = TlsFront::start_with(&ca, s3.port, true);
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, &ca.pem).unwrap();
    let proxy = Proxy::start_with(
        &tls_bucket(
            &front.endpoint(),
            &format!(
                "      ca_file: \"{}\"\n      health_check:\n        enabled: false\n",
                ca_path.display()
            ),
        ),
        1,
        &[],
    );
    for _ in 0..4 {
        let r = proxy.get("/s/hello.txt");
        assert_eq!(r.status, 200, "{}\n{}", r.text(), proxy.log());
        assert_eq!(r.text(), "over TLS\n");
    }
    let kinds = front.resumed.lock().unwrap().clone();
    assert_eq!(kinds.len(), 4, "one handshake per request: {kinds:?}");
    assert_eq!(
        kinds,
        vec![false, true, true, true],
        "full once, then resumed"
    );
}

/// Issue #28: the proxy picks the cipher suite by its own order, AES-128-GCM
/// first, whatever the client prefers (OpenSSL puts AES-256-GCM-SHA384
/// first; its SHA-384 key schedule ran in software here, 9% of a resumed
/// handshake). Both TLS versions.
#[test]
fn the_server_s_suite_order_wins() {
    if !has_openssl() {
        return;
    }
    let (_s3, _dir, port, _proxy) = https_listener("suite order CA", 1);
    let negotiate = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl s_client");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let v13 = negotiate(&[
        "-tls1_3",
        "-ciphersuites",
        "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256",
    ]);
    assert!(v13.contains("TLS_AES_128_GCM_SHA256"), "{v13}");
    let v12 = negotiate(&[
        "-tls1_2",
        "-cipher",
        "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-AES128-GCM-SHA256",
    ]);
    assert!(v12.contains("AES128-GCM-SHA256"), "{v12}");
    // A client offering only AES-256 still gets it.
    let only = negotiate(&["-tls1_3", "-ciphersuites", "TLS_AES_256_GCM_SHA384"]);
    assert!(only.contains("TLS_AES_256_GCM_SHA384"), "{only}");
}

/// What a client puts in its handshake is not a WARN line per connection:
/// rustls's notes on what a peer sent (here an IP address as the SNI name,
/// as wrk and browsers' tools send) are DEBUG. At WARN, every handshake
/// wrote one, and a client could fill the log as fast as it connects.
#[test]
fn what_a_client_sends_in_its_handshake_writes_no_warning() {
    if !has_openssl() {
        return;
    }
    let (_s3, _dir, port, proxy) = https_listener("SNI CA", 1);
    for _ in 0..3 {
        let out = std::process::Command::new("openssl")
            .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
            .args(["-servername", "127.0.0.1", "-tls1_3"])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl s_client");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(text.contains("TLSv1.3"), "{text}");
    }
    // Counted once each handshake is done (workers publish their counts).
    assert!(
        proxy.wait_metric(
            "yatagarasu_tls_handshakes_total",
            3.0,
            Duration::from_secs(30)
        ),
        "{}",
        proxy.metrics()
    );
    let log = proxy.log();
    assert!(!log.contains("SNI"), "{log}");
    assert!(!log.contains("rustls"), "{log}");
}
