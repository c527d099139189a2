//! Core proxy behaviour against real s3s-fs (and moto) processes.

mod support;

use std::time::{Duration, Instant};
use support::fault::{Fault, Mode};
use support::http::{self, Conn};
use support::rogue::{ok_with, send, Rogue, Step};
use support::*;

fn setup() -> (S3, Proxy) {
    let s3 = S3::start();
    s3.create_bucket("data-bucket");
    s3.put("data-bucket", "test.txt", b"Primary data!\n");
    let proxy = Proxy::start(&single_bucket("/data", "data-bucket", &s3.endpoint()));
    (s3, proxy)
}

/// [`setup`] with `server:` settings (the listen address is added).
fn setup_server(settings: &str) -> (S3, Proxy) {
    let s3 = S3::start();
    s3.create_bucket("data-bucket");
    s3.put("data-bucket", "test.txt", b"Primary data!\n");
    let cfg = format!(
        "server:\n  address: \"127.0.0.1:{}\"\n{settings}{}",
        free_port(),
        single_bucket("/data", "data-bucket", &s3.endpoint())
    );
    (s3, Proxy::start(&cfg))
}

#[test]
fn signed_get_and_head_stream_the_object() {
    let (s3, proxy) = setup();
    let body = pattern(300_000, 7);
    s3.put("data-bucket", "big.bin", &body);
    let r = proxy.get("/data/big.bin");
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), body.len());
    assert_eq!(sha256(&r.body), sha256(&body));
    assert!(r.header("etag").is_some());
    assert!(r.header("last-modified").is_some());
    let h = http::head(proxy.port, "/data/big.bin");
    assert_eq!(h.status, 200);
    assert_eq!(h.header("content-length"), Some("300000"));
    assert!(h.body.is_empty());
    // A HEAD on a keep-alive connection must not leave stray body bytes behind.
    let mut c = Conn::open(proxy.port).unwrap();
    let h1 = c.request("HEAD", "/data/test.txt", &[]).unwrap();
    assert_eq!(h1.header("content-length"), Some("14"));
    let g = c.request("GET", "/data/test.txt", &[]).unwrap();
    assert_eq!(g.text(), "Primary data!\n");
}

/// A response head and the body bytes read with it leave in one vectored
/// write (the upstream here sends head and body in one write, as nginx or
/// S3 do). The client gets them whole and in order at every size around
/// the points where the path changes (16 KiB copied behind the head, 64 KiB
/// plus a head read in one receive), slowly through a small window, and
/// the connection stays usable.
#[test]
fn head_and_first_body_bytes_written_together_arrive_byte_exact() {
    let sizes = [
        16 * 1024,
        16 * 1024 + 1,
        60_000,
        64 * 1024,
        68 * 1024,
        200_000,
    ];
    let up = Rogue::start(move |seen| {
        let index: Option<usize> = seen
            .target
            .rsplit('/')
            .next()
            .and_then(|name| name.strip_suffix(".bin")?.strip_prefix('w')?.parse().ok());
        let Some(i) = index.filter(|&i| i < sizes.len()) else {
            return vec![send("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")];
        };
        vec![ok_with("", &pattern(sizes[i], i as u64 + 11))]
    });
    let proxy = Proxy::start(&single_bucket("/data", "data-bucket", &up.endpoint()));
    let mut c = Conn::open_small_window(proxy.port, 2048).unwrap();
    for (i, &size) in sizes.iter().enumerate() {
        let body = pattern(size, i as u64 + 11);
        c.send(format!("GET /data/w{i}.bin HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let r = c.read_response(false).unwrap();
        assert_eq!((r.status, r.body.len()), (200, size));
        assert_eq!(sha256(&r.body), sha256(&body), "size {size}");
    }
}

#[test]
fn wrong_secret_gives_403_from_s3() {
    let s3 = S3::start();
    s3.create_bucket("data-bucket");
    s3.put("data-bucket", "test.txt", b"x");
    let cfg = single_bucket("/data", "data-bucket", &s3.endpoint()).replace(SK, "not-the-secret");
    let proxy = Proxy::start(&cfg);
    let r = proxy.get("/data/test.txt");
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("SignatureDoesNotMatch"), "{}", r.text());
}

#[test]
fn range_requests_return_the_right_bytes() {
    let (s3, proxy) = setup();
    let body = pattern(100_000, 3);
    s3.put("data-bucket", "r.bin", &body);
    let r = http::get(proxy.port, "/data/r.bin", &[("Range", "bytes=1000-1999")]);
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &body[1000..2000]);
    assert_eq!(r.header("content-range"), Some("bytes 1000-1999/100000"));
    let tail = http::get(proxy.port, "/data/r.bin", &[("Range", "bytes=-10")]);
    assert_eq!(tail.status, 206);
    assert_eq!(tail.body, &body[body.len() - 10..]);
    let bad = http::get(
        proxy.port,
        "/data/r.bin",
        &[("Range", "bytes=200000-300000")],
    );
    assert_eq!(bad.status, 416);
}

#[test]
fn missing_key_is_404_and_unrouted_path_is_404() {
    let (_s3, proxy) = setup();
    let r = proxy.get("/data/does-not-exist.txt");
    assert_eq!(r.status, 404);
    assert!(r.text().contains("NoSuchKey"), "{}", r.text());
    assert_eq!(
        proxy.get("/database/test.txt").status,
        404,
        "/data must not match /database"
    );
    assert_eq!(proxy.get("/data/").status, 404);
}

#[test]
fn conditional_requests_via_moto_give_304_and_412() {
    let moto = Moto::start();
    http::signed(moto.port, "PUT", "/cond-bucket", b"", AK, SK);
    let put = http::signed(
        moto.port,
        "PUT",
        "/cond-bucket/obj.txt",
        b"hello moto",
        AK,
        SK,
    );
    assert_eq!(put.status, 200);
    let proxy = Proxy::start(&single_bucket("/m", "cond-bucket", &moto.endpoint()));
    let first = proxy.get("/m/obj.txt");
    assert_eq!(first.status, 200);
    assert_eq!(first.text(), "hello moto");
    let etag = first.header("etag").expect("etag").to_string();
    let r = http::get(proxy.port, "/m/obj.txt", &[("If-None-Match", &etag)]);
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());
    let r = http::get(
        proxy.port,
        "/m/obj.txt",
        &[("If-Match", "\"not-the-etag\"")],
    );
    assert_eq!(r.status, 412);
    let lm = first
        .header("last-modified")
        .expect("last-modified")
        .to_string();
    let r = http::get(proxy.port, "/m/obj.txt", &[("If-Modified-Since", &lm)]);
    assert_eq!(r.status, 304);
}

#[test]
fn tricky_keys_reach_s3_unchanged() {
    let (s3, proxy) = setup();
    // (key as uploaded, URI-encoded for S3; path as a client would send it)
    let cases = [
        ("a%20b.txt", "/data/a%20b.txt"),
        ("plus%2Bsign.txt", "/data/plus+sign.txt"),
        ("%E6%97%A5%E6%9C%AC.txt", "/data/%E6%97%A5%E6%9C%AC.txt"),
        ("dir/sub/file.txt", "/data/dir%2Fsub/file.txt"),
        ("dots..in..name", "/data/dots..in..name"),
        ("tilde~and-_.txt", "/data/tilde~and-_.txt"),
    ];
    for (i, (key, path)) in cases.iter().enumerate() {
        let body = format!("object {i}");
        s3.put("data-bucket", key, body.as_bytes());
        let r = proxy.get(path);
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(r.text(), body, "{path}");
    }
}

#[test]
fn path_traversal_is_refused() {
    let (s3, proxy) = setup();
    s3.create_bucket("secret-bucket");
    s3.put("secret-bucket", "secret.txt", b"top secret");
    for target in [
        "/data/../secret-bucket/secret.txt",
        "/data/%2e%2e/secret-bucket/secret.txt",
        "/data/%2E%2E%2Fsecret-bucket%2Fsecret.txt",
        "/data/./test.txt",
        "/data/a/../../secret-bucket/secret.txt",
    ] {
        let raw = format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let r = http::raw(proxy.port, raw.as_bytes()).unwrap();
        assert_eq!(r.status, 400, "{target}");
        assert!(!r.text().contains("top secret"));
    }
}

#[test]
fn malformed_requests_get_clear_errors_and_workers_survive() {
    let (_s3, proxy) = setup();
    let cases: Vec<(Vec<u8>, u16)> = vec![
        (b"GARBAGE\r\n\r\n".to_vec(), 400),
        (b"GET /data/test.txt HTTP/1.1\r\n\r\n".to_vec(), 400), // no Host
        (
            b"GET /data/test.txt HTTP/9.9\r\nHost: x\r\n\r\n".to_vec(),
            400,
        ),
        (b"GET /data/a%zz HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), 400),
        (
            b"GET /data/test.txt HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                .to_vec(),
            400,
        ),
        (
            format!("GET /data/{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(9000)).into_bytes(),
            414,
        ),
        (
            format!(
                "GET /data/t HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
                "b".repeat(20000)
            )
            .into_bytes(),
            431,
        ),
        (b"\x00\x01\x02\x03\r\n\r\n".to_vec(), 400),
    ];
    for (raw, status) in cases {
        let r = http::raw(proxy.port, &raw).unwrap_or_else(|e| {
            panic!(
                "{:?}: {e}",
                String::from_utf8_lossy(&raw[..20.min(raw.len())])
            )
        });
        assert_eq!(
            r.status,
            status,
            "{:?}",
            String::from_utf8_lossy(&raw[..40.min(raw.len())])
        );
    }
    let r = http::raw(
        proxy.port,
        b"POST /data/test.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    )
    .unwrap();
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    let r = http::raw(
        proxy.port,
        b"DELETE /data/test.txt HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .unwrap();
    assert_eq!(r.status, 405);
    // Half a request, then the client vanishes: nothing breaks.
    {
        let mut c = Conn::open(proxy.port).unwrap();
        c.send(b"GET /data/te").unwrap();
    }
    assert_eq!(proxy.get("/data/test.txt").text(), "Primary data!\n");
}

#[test]
fn idle_clients_are_closed_after_the_timeout() {
    let (_s3, proxy) = setup_server("  workers: 1\n  idle_timeout_seconds: 1\n");
    let mut c = Conn::open(proxy.port).unwrap();
    assert_eq!(c.request("GET", "/data/test.txt", &[]).unwrap().status, 200);
    let t = Instant::now();
    assert!(
        c.is_closed(Duration::from_secs(5)),
        "idle connection still open"
    );
    assert!(t.elapsed() >= Duration::from_millis(500));
}

#[test]
fn keep_alive_both_sides_and_connection_close_honoured() {
    let s3 = S3::start();
    s3.create_bucket("data-bucket");
    s3.put("data-bucket", "test.txt", b"Primary data!\n");
    let fault = Fault::start(s3.port, Mode::Pass);
    let proxy = Proxy::start_with(
        &single_bucket("/data", "data-bucket", &fault.endpoint()),
        1,
        &[],
    );
    let mut c = Conn::open(proxy.port).unwrap();
    let mut after_first = 0;
    for i in 0..5 {
        let r = c.request("GET", "/data/test.txt", &[]).unwrap();
        assert_eq!(r.text(), "Primary data!\n");
        assert_eq!(r.header("connection"), None);
        if i == 0 {
            after_first = fault.connections.load(std::sync::atomic::Ordering::SeqCst);
        }
    }
    assert_eq!(
        fault.connections.load(std::sync::atomic::Ordering::SeqCst),
        after_first,
        "the upstream connection is reused"
    );
    let r = c
        .request("GET", "/data/test.txt", &[("Connection", "close")])
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.is_closed(Duration::from_secs(2)));
    // HTTP/1.0 without keep-alive: closed after the response.
    let mut c = Conn::open(proxy.port).unwrap();
    c.send(b"GET /data/test.txt HTTP/1.0\r\n\r\n").unwrap();
    let r = c.read_response(false).unwrap();
    assert_eq!(r.text(), "Primary data!\n");
    assert!(c.is_closed(Duration::from_secs(2)));
}

#[test]
fn stale_pooled_connection_is_retried_once() {
    let s3 = S3::start();
    s3.create_bucket("data-bucket");
    s3.put("data-bucket", "test.txt", b"Primary data!\n");
    let fault = Fault::start(s3.port, Mode::CloseIdle(200));
    let proxy = Proxy::start_with(
        &single_bucket("/data", "data-bucket", &fault.endpoint()),
        1,
        &[],
    );
    for _ in 0..3 {
        let r = proxy.get("/data/test.txt");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), "Primary data!\n");
        std::thread::sleep(Duration::from_millis(600));
    }
    assert!(fault.connections.load(std::sync::atomic::Ordering::SeqCst) >= 3);
    assert!(
        !proxy
            .metrics()
            .contains("yatagarasu_replica_failures_total"),
        "a stale connection is not a replica failure"
    );
}

#[test]
fn request_id_is_kept_sent_upstream_and_authorization_dropped() {
    let s3 = S3::start();
    s3.create_bucket("data-bucket");
    s3.put("data-bucket", "test.txt", b"x");
    let fault = Fault::start(s3.port, Mode::Pass);
    let proxy = Proxy::start(&single_bucket("/data", "data-bucket", &fault.endpoint()));
    let r = http::get(
        proxy.port,
        "/data/test.txt",
        &[
            ("X-Request-ID", "req-12345"),
            ("Authorization", "Bearer client-token"),
        ],
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-request-id"), Some("req-12345"));
    let upstream = fault.recorded().join("");
    assert!(upstream.contains("X-Request-ID: req-12345"), "{upstream}");
    assert!(
        !upstream.contains("client-token"),
        "client Authorization leaked upstream"
    );
    assert!(
        upstream.contains("authorization: AWS4-HMAC-SHA256"),
        "{upstream}"
    );
    let generated = proxy.get("/data/test.txt");
    let id = generated.header("x-request-id").expect("generated id");
    assert_eq!(id.len(), 16);
    assert!(
        proxy.wait_log(&format!("request_id={id}"), Duration::from_secs(2)),
        "{}",
        proxy.log()
    );
}

#[test]
fn streams_256_mib_with_bounded_memory() {
    let (s3, proxy) = setup();
    let size = 256 * 1024 * 1024;
    let body = pattern(size, 42);
    let expected = sha256(&body);
    s3.put("data-bucket", "huge.bin", &body);
    drop(body);
    let mut c = Conn::open(proxy.port).unwrap();
    c.send(b"GET /data/huge.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    // Read the stream incrementally, hashing as we go.
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut head = Vec::new();
    let mut total = 0usize;
    loop {
        let n = read_retry(&mut c.stream, &mut buf).unwrap();
        if n == 0 {
            break;
        }
        let mut data = &buf[..n];
        if head.is_empty() || !head.windows(4).any(|w| w == b"\r\n\r\n") {
            head.extend_from_slice(data);
            match head.windows(4).position(|w| w == b"\r\n\r\n") {
                Some(p) => {
                    let body_start = head[p + 4..].to_vec();
                    head.truncate(p + 4);
                    hasher.update(&body_start);
                    total += body_start.len();
                }
                None => continue,
            }
            data = &[];
        }
        hasher.update(data);
        total += data.len();
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(total, size);
    let got: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(got, expected);
    let rss = proxy.peak_rss_kib();
    assert!(rss > 0 && rss < 64 * 1024, "peak RSS {rss} KiB");
}

#[test]
fn concurrent_clients_on_several_workers() {
    let (s3, proxy) = setup();
    let objects: Vec<Vec<u8>> = (0..8)
        .map(|i| pattern(10_000 + i * 3_000, i as u64))
        .collect();
    for (i, o) in objects.iter().enumerate() {
        s3.put("data-bucket", &format!("obj{i}"), o);
    }
    let objects = std::sync::Arc::new(objects);
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let objects = objects.clone();
            let port = proxy.port;
            std::thread::spawn(move || {
                let mut c = Conn::open(port).unwrap();
                for n in 0..20 {
                    let i = (t + n) % objects.len();
                    let r = c.request("GET", &format!("/data/obj{i}"), &[]).unwrap();
                    assert_eq!(r.status, 200);
                    assert_eq!(r.body, objects[i]);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    assert!(proxy.wait_log("worker=1 driver", Duration::from_secs(1)));
    let m = proxy.metrics();
    assert!(
        m.contains("yatagarasu_requests_total{bucket=\"b\",method=\"GET\",status=\"200\"} 320"),
        "{m}"
    );
    assert!(proxy.wait_log("worker=0", Duration::from_secs(2)) && proxy.log().contains("worker=1"));
    let log = proxy.log();
    let w0 = log
        .lines()
        .filter(|l| l.contains("INFO request ") && l.contains(" worker=0"))
        .count();
    let w1 = log
        .lines()
        .filter(|l| l.contains("INFO request ") && l.contains(" worker=1"))
        .count();
    assert!(
        w0 > 0 && w1 > 0,
        "both workers served requests: {w0} / {w1}"
    );
}

#[test]
fn metrics_endpoint_exports_the_core_metrics() {
    let (_s3, proxy) = setup();
    proxy.get("/data/test.txt");
    proxy.get("/data/missing");
    let m = proxy.metrics();
    for needle in [
        "yatagarasu_requests_total{bucket=\"b\",method=\"GET\",status=\"200\"} 1",
        "yatagarasu_requests_total{bucket=\"b\",method=\"GET\",status=\"404\"} 1",
        "yatagarasu_request_duration_seconds_count",
        "yatagarasu_upstream_duration_seconds_bucket{le=",
        "yatagarasu_response_bytes_total",
        "yatagarasu_open_connections",
    ] {
        assert!(m.contains(needle), "missing {needle}:\n{m}");
    }
    let ready = proxy.get("/ready");
    assert_eq!(ready.status, 200);
    assert!(ready.text().contains("\"status\":\"ready\""));
    assert_eq!(proxy.get("/health").status, 200);
}

#[test]
fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let s3 = S3::start();
    s3.create_bucket("data-bucket");
    let body = pattern(200_000, 9);
    s3.put("data-bucket", "slow.bin", &body);
    // A slow upstream keeps the request in flight while we signal.
    let fault = Fault::start(
        s3.port,
        Mode::Drip {
            bytes: 20_000,
            every_ms: 100,
        },
    );
    let mut proxy = Proxy::start(&single_bucket("/data", "data-bucket", &fault.endpoint()));
    let port = proxy.port;
    let client = std::thread::spawn(move || http::get(port, "/data/slow.bin", &[]));
    std::thread::sleep(Duration::from_millis(300));
    proxy.term();
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        Conn::open(port)
            .and_then(|mut c| c.request("GET", "/health", &[]))
            .is_err(),
        "still accepting after SIGTERM"
    );
    let r = client.join().expect("client");
    assert_eq!(r.status, 200);
    assert_eq!(
        sha256(&r.body),
        sha256(&body),
        "in-flight response completed"
    );
    let status = proxy.wait_exit(Duration::from_secs(10)).expect("exited");
    assert!(status.success(), "{status}");
    assert!(proxy.log().contains("Shutdown complete"));
}

#[test]
fn epoll_fallback_serves_and_the_driver_is_logged() {
    let s3 = S3::start();
    s3.create_bucket("data-bucket");
    s3.put("data-bucket", "test.txt", b"via epoll");
    let cfg = single_bucket("/data", "data-bucket", &s3.endpoint());
    // monoio's own switch, as a container without io_uring would behave.
    let proxy = Proxy::start_with(
        &cfg,
        2,
        &[
            ("MONOIO_FORCE_LEGACY_DRIVER", "1"),
            ("YATAGARASU_DRIVER", "auto"),
        ],
    );
    assert_eq!(proxy.get("/data/test.txt").text(), "via epoll");
    assert!(
        proxy.wait_log("worker=0 driver=epoll", Duration::from_secs(10)),
        "{}",
        proxy.log()
    );
    // Each worker logs its driver when it starts: wait for the line, not
    // for a moment (on a busy machine worker 1 may start later).
    assert!(
        proxy.wait_log("worker=1 driver=epoll", Duration::from_secs(10)),
        "{}",
        proxy.log()
    );
    let proxy = Proxy::start_with(&cfg, 1, &[("YATAGARASU_DRIVER", "epoll")]);
    assert_eq!(proxy.get("/data/test.txt").text(), "via epoll");
    assert!(proxy.wait_log("driver=epoll", Duration::from_secs(2)));
    if monoio::utils::detect_uring() {
        let proxy = Proxy::start_with(&cfg, 1, &[("YATAGARASU_DRIVER", "auto")]);
        assert_eq!(proxy.get("/data/test.txt").text(), "via epoll");
        assert!(
            proxy.wait_log("driver=io_uring", Duration::from_secs(2)),
            "{}",
            proxy.log()
        );
    }
}

#[test]
fn probe_flag_reports_liveness_for_container_healthchecks() {
    let (_s3, proxy) = setup();
    let run = |addr: String| {
        std::process::Command::new(env!("CARGO_BIN_EXE_yatagarasu"))
            .args(["--probe", &addr])
            .status()
            .unwrap()
            .code()
    };
    assert_eq!(run(format!("127.0.0.1:{}", proxy.port)), Some(0));
    assert_eq!(run(format!("127.0.0.1:{}", free_port())), Some(1));
}

/// `server.zero_copy` decides on the whole body: a 1 MiB body whose head
/// arrived with its first 64 KiB (as nginx or S3 send it) is still spliced
/// under `auto`, never under `off`, and small ones only under `on`.
#[test]
fn zero_copy_decides_on_the_whole_body_and_off_never_splices() {
    const MIB: usize = 1024 * 1024;
    let up = Rogue::start(|seen| {
        let size = if seen.target.ends_with("big.bin") {
            MIB
        } else {
            100 * 1024
        };
        let body = pattern(size, 5);
        let mut raw = format!("HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n").into_bytes();
        raw.extend_from_slice(&body);
        vec![Step::Send(raw)]
    });
    for (mode, big_spliced, small_spliced) in [
        ("auto", true, false),
        ("off", false, false),
        ("on", true, true),
    ] {
        let port = free_port();
        let cfg = format!(
            "server:\n  address: \"127.0.0.1:{port}\"\n  workers: 1\n  zero_copy: \"{mode}\"\n{}",
            single_bucket("/data", "data-bucket", &up.endpoint())
        );
        let proxy = Proxy::start(&cfg);
        let mut c = Conn::open(proxy.port).unwrap();
        let r = c.request("GET", "/data/big.bin", &[]).unwrap();
        assert!(r.body == pattern(MIB, 5), "{mode}: bytes differ");
        let spliced = || {
            proxy
                .metric("yatagarasu_spliced_bytes_total")
                .unwrap_or(-1.0)
        };
        let after_big = spliced();
        assert_eq!(
            after_big > 0.0,
            big_spliced,
            "{mode}: 1 MiB spliced {after_big}"
        );
        let r = c.request("GET", "/data/small.bin", &[]).unwrap();
        assert!(r.body == pattern(100 * 1024, 5), "{mode}: bytes differ");
        assert_eq!(spliced() > after_big, small_spliced, "{mode}: 100 KiB");
    }
}

/// A spliced relay waits for a pipeful of body before it splices (fewer
/// wake-ups), but never holds back what a slow upstream has sent; and the
/// upstream connection, back in the pool, reads small answers at once.
#[test]
fn a_spliced_body_from_a_slow_upstream_flows_and_its_connection_is_reused() {
    use std::io::Write;
    const SIZE: usize = 2 * 1024 * 1024;
    let body = pattern(SIZE, 9);
    let script_body = body.clone();
    let up = Rogue::start(move |seen| {
        let b = &script_body;
        let mut head = format!("HTTP/1.1 200 OK\r\nContent-Length: {SIZE}\r\n\r\n").into_bytes();
        if seen.target.ends_with("small") {
            vec![send("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nsmall")]
        } else if seen.target.ends_with("fast.bin") {
            head.extend_from_slice(b);
            vec![Step::Send(head)]
        } else {
            head.extend_from_slice(&b[..1000]);
            vec![
                Step::Send(head),
                Step::Sleep(Duration::from_millis(200)),
                // Far less than a pipeful, then nothing for a while.
                Step::Send(b[1000..3000].to_vec()),
                Step::Sleep(Duration::from_millis(2000)),
                Step::Send(b[3000..].to_vec()),
            ]
        }
    });
    let port = free_port();
    let cfg = format!(
        "server:\n  address: \"127.0.0.1:{port}\"\n  workers: 1\n{}      timeout_seconds: 5\n",
        single_bucket("/data", "data-bucket", &up.endpoint())
    );
    let proxy = Proxy::start(&cfg);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // Reads on until `got` holds `n` bytes.
    fn read_to(s: &mut std::net::TcpStream, got: &mut Vec<u8>, n: usize) {
        let mut tmp = vec![0u8; 65536];
        while got.len() < n {
            let k = read_retry(s, &mut tmp).unwrap();
            assert!(k > 0, "closed early: {}", String::from_utf8_lossy(got));
            got.extend_from_slice(&tmp[..k]);
        }
    }
    let head_len = |got: &[u8]| got.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
    let small = |s: &mut std::net::TcpStream| {
        let started = Instant::now();
        s.write_all(b"GET /data/small HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut got = Vec::new();
        while !got.ends_with(b"\r\n\r\nsmall") {
            let need = got.len() + 1;
            read_to(s, &mut got, need);
        }
        assert!(got.starts_with(b"HTTP/1.1 200"));
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "small answer took {took:?}");
    };
    let big = |s: &mut std::net::TcpStream, path: &str| {
        let started = Instant::now();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .unwrap();
        let mut got = Vec::new();
        let head_end = loop {
            let need = got.len() + 1;
            read_to(s, &mut got, need);
            if let Some(end) = head_len(&got) {
                break end;
            }
        };
        read_to(s, &mut got, head_end + 3000);
        let first = started.elapsed();
        read_to(s, &mut got, head_end + SIZE);
        assert!(got[head_end..] == body[..], "{path}: bytes differ");
        first
    };

    big(&mut s, "/data/fast.bin");
    let spliced = proxy
        .metric("yatagarasu_spliced_bytes_total")
        .unwrap_or(0.0);
    assert!(spliced > 0.0, "not spliced");
    small(&mut s);
    let first = big(&mut s, "/data/slow.bin");
    assert!(
        first < Duration::from_millis(1500),
        "the first 3000 bytes took {first:?}: held back for a pipeful"
    );
    small(&mut s);
    let seen: Vec<_> = up
        .seen()
        .into_iter()
        .filter(|r| r.target != "/data-bucket/") // health checks
        .collect();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert!(
        seen.iter().all(|r| r.connection == seen[0].connection),
        "not reused: {seen:?}"
    );
}

#[test]
fn zero_copy_on_off_and_auto_serve_identical_bytes_with_keep_alive() {
    let s3 = S3::start();
    s3.create_bucket("data-bucket");
    let body = pattern(3 * 1024 * 1024 + 17, 11);
    s3.put("data-bucket", "z.bin", &body);
    for mode in ["on", "off", "auto"] {
        let port = free_port();
        let cfg = format!(
            "server:\n  address: \"127.0.0.1:{port}\"\n  workers: 1\n  zero_copy: \"{mode}\"\n{}",
            single_bucket("/data", "data-bucket", &s3.endpoint())
        );
        let proxy = Proxy::start(&cfg);
        let mut c = Conn::open(proxy.port).unwrap();
        for _ in 0..3 {
            let r = c.request("GET", "/data/z.bin", &[]).unwrap();
            assert_eq!(r.status, 200, "{mode}");
            assert!(r.body == body, "{mode}: bytes differ");
        }
        let r = c
            .request("GET", "/data/z.bin", &[("Range", "bytes=100-2000099")])
            .unwrap();
        assert_eq!(r.status, 206);
        assert!(r.body == body[100..2_000_100], "{mode}: range bytes differ");
    }
    let bad = format!(
        "server:\n  address: \"127.0.0.1:1\"\n  zero_copy: \"sometimes\"\n{}",
        single_bucket("/data", "data-bucket", &s3.endpoint())
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, bad).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_yatagarasu"))
        .args(["--check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.zero_copy"));
}

#[test]
fn a_parked_keep_alive_connection_serves_again() {
    let (_s3, proxy) = setup();
    let mut c = Conn::open(proxy.port).unwrap();
    assert_eq!(
        c.request("GET", "/data/test.txt", &[]).unwrap().text(),
        "Primary data!\n"
    );
    // Past the 100 ms park delay: the connection has given its buffers back.
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        c.request("GET", "/data/test.txt", &[]).unwrap().text(),
        "Primary data!\n"
    );
    // A connection that never sent anything is served when it finally does.
    let mut quiet = Conn::open(proxy.port).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        quiet.request("HEAD", "/data/test.txt", &[]).unwrap().status,
        200
    );
}

/// Keep-alive connections idle past a park and a sweep move to the lot
/// (no task of their own); from there they are served again when they
/// send, pipelined requests included, and closed when their client hangs
/// up or their idle timeout passes.
#[test]
fn idle_connections_wait_in_the_lot_and_are_served_from_it() {
    let (_s3, proxy) = setup_server("  workers: 2\n  idle_timeout_seconds: 3\n");
    let mut conns: Vec<Conn> = (0..20).map(|_| Conn::open(proxy.port).unwrap()).collect();
    for c in &mut conns {
        let r = c.request("GET", "/data/test.txt", &[]).unwrap();
        assert_eq!(r.text(), "Primary data!\n");
    }
    let wait = Duration::from_secs(2);
    assert!(
        proxy.wait_metric("yatagarasu_idle_connections", 20.0, wait),
        "{}",
        proxy.metrics()
    );
    // Served from the lot: half send one request, half two pipelined.
    for (i, c) in conns.iter_mut().enumerate() {
        if i % 2 == 0 {
            let r = c.request("GET", "/data/test.txt", &[]).unwrap();
            assert_eq!((r.status, r.text().as_str()), (200, "Primary data!\n"));
        } else {
            let get = "GET /data/test.txt HTTP/1.1\r\nHost: x\r\n\r\n";
            c.send(format!("{get}HEAD /data/test.txt HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .unwrap();
            let r = c.read_response(false).unwrap();
            assert_eq!(r.text(), "Primary data!\n");
            let h = c.read_response(true).unwrap();
            assert_eq!(h.header("content-length"), Some("14"));
        }
    }
    // Back in the lot; clients that hang up are closed from it.
    assert!(proxy.wait_metric("yatagarasu_idle_connections", 20.0, wait));
    conns.truncate(5);
    assert!(
        proxy.wait_metric("yatagarasu_open_connections", 5.0, wait),
        "{}",
        proxy.metrics()
    );
    // The rest idle out from the lot (3 s after their last request).
    for c in &mut conns {
        assert!(
            c.is_closed(Duration::from_secs(6)),
            "idle connection still open"
        );
    }
    assert!(proxy.wait_metric("yatagarasu_open_connections", 0.0, wait));
    assert!(proxy.wait_metric("yatagarasu_idle_connections", 0.0, wait));
}

#[test]
fn logging_level_and_format_come_from_config_and_rust_log_overrides() {
    let s3 = S3::start();
    s3.create_bucket("data-bucket");
    s3.put("data-bucket", "test.txt", b"x");
    let body = format!(
        "{}logging:\n  level: \"info\"\n  format: \"json\"\n",
        single_bucket("/data", "data-bucket", &s3.endpoint())
    );
    let proxy = Proxy::start(&body);
    assert_eq!(proxy.get("/data/test.txt").status, 200);
    assert!(
        proxy.wait_log("\"msg\":\"request\"", Duration::from_secs(2)),
        "{}",
        proxy.log()
    );
    for line in proxy.log().lines() {
        assert!(
            line.starts_with("{\"ts\":\"") && line.ends_with('}'),
            "not a JSON line: {line}"
        );
    }
    // RUST_LOG=warn silences the INFO access log; the config's format stays.
    let quiet = Proxy::start_with(&body, 1, &[("RUST_LOG", "warn")]);
    assert_eq!(quiet.get("/data/test.txt").status, 200);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !quiet.log().contains("\"level\":\"INFO\""),
        "{}",
        quiet.log()
    );
}

#[test]
fn endpoints_given_by_name_are_resolved_off_the_cores() {
    let s3 = S3::start();
    s3.create_bucket("data-bucket");
    s3.put("data-bucket", "test.txt", b"by name");
    // "localhost" may resolve to ::1 first; s3s-fs listens on 127.0.0.1 only,
    // so this also shows each resolved address being tried in turn.
    let endpoint = format!("http://localhost:{}", s3.port);
    let proxy = Proxy::start(&single_bucket("/data", "data-bucket", &endpoint));
    for _ in 0..3 {
        let r = proxy.get("/data/test.txt");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), "by name");
    }
    let bad = Proxy::start(&single_bucket(
        "/data",
        "data-bucket",
        "http://no-such-host.invalid:9000",
    ));
    let r = bad.get("/data/test.txt");
    assert_eq!(r.status, 502);
    assert!(
        bad.wait_log("resolve no-such-host.invalid", Duration::from_secs(2)),
        "{}",
        bad.log()
    );
}
