//! Criterion micro-benchmarks of the per-request work, each guarding one cost:
//!
//! - `sigv4_sign`: signing is the most expensive CPU step per request (four
//!   HMACs for the key, two SHA-256s); a regression here shows up directly in
//!   CPU per 1 KiB request.
//! - `route/10` and `route/1000`: prefix lookup must stay O(path segments), not
//!   O(prefixes), so a config with many buckets costs the same per request.
//! - `parse_request_head`: every request pays it; it must not allocate.
//! - `select_and_admit`: replica plan + breaker admission, the HA logic's cost
//!   on the happy path.
//! - `metrics_record`: per-core recording (map update + two histogram records)
//!   must stay far below a microsecond.
//! - `pool_idle_check`: the `recv(MSG_PEEK)` every pooled connection gets
//!   when taken (so stray bytes are never read as the next response).
//! - `jwt_verify/hs256`, `jwt_verify/es256`: what verifying a token costs
//!   (an authenticated request pays it once per token per worker; later
//!   requests hit the worker's verified-token cache).
//! - `access_log/ours` vs `access_log/tracing_nonblocking`: one access-log
//!   line through our per-worker buffered logger, against `tracing` with the
//!   fmt subscriber and a non-blocking writer (both end in a sink; run with
//!   `2>/dev/null`, our lines go to stderr when the buffer fills).

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use std::time::{Duration, SystemTime};
use yatagarasu::config::BreakerSettings;
use yatagarasu::http::head::{parse_request, Method, Request};
use yatagarasu::metrics::CoreMetrics;
use yatagarasu::router::{decode_path, encode_key, Router};
use yatagarasu::s3::Signer;
use yatagarasu::upstream::breaker::Breaker;
use yatagarasu::upstream::select::{Plan, Selector};

fn sign(c: &mut Criterion) {
    let creds = yatagarasu::credentials::Credentials {
        access_key: "AKIAIOSFODNN7EXAMPLE".into(),
        secret_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
        session_token: None,
        expires: None,
    };
    let signer = Signer::new(&creds, "us-east-1");
    let mut out = Vec::with_capacity(512);
    c.bench_function("sigv4_sign", |b| {
        b.iter(|| {
            out.clear();
            signer
                .sign_into(
                    "GET",
                    "127.0.0.1:9000",
                    black_box("/data-bucket/dir/object-1k.bin"),
                    SystemTime::now(),
                    &mut out,
                )
                .expect("sign");
            black_box(&out);
        })
    });
}

fn route(c: &mut Criterion) {
    for n in [10usize, 1000] {
        let prefixes: Vec<String> = (0..n).map(|i| format!("/tenant{i}/assets")).collect();
        let router = Router::new(prefixes.iter().map(|s| s.as_str()));
        let target = format!("/tenant{}/assets/img/2024/photo%20one.jpg", n / 2);
        let mut path = String::new();
        let mut key = String::new();
        c.bench_function(&format!("route/{n}"), |b| {
            b.iter(|| {
                decode_path(black_box(target.as_bytes()), &mut path).expect("decode");
                let (idx, k) = router.route(&path).expect("route");
                key.clear();
                encode_key(k, &mut key);
                black_box((idx, &key));
            })
        });
    }
}

fn parse(c: &mut Criterion) {
    let raw = b"GET /data/dir/object-1k.bin HTTP/1.1\r\nHost: cdn.example.com\r\nUser-Agent: wrk\r\nAccept: */*\r\nRange: bytes=0-1023\r\nX-Request-ID: abc-123\r\n\r\n";
    let mut req = Request::default();
    c.bench_function("parse_request_head", |b| {
        b.iter(|| black_box(parse_request(black_box(raw), &mut req).expect("parse")))
    });
}

fn select(c: &mut Criterion) {
    let mut selector = Selector::new(&[(1, 3), (1, 1), (2, 1)]);
    let settings = BreakerSettings {
        failure_threshold: 5,
        success_threshold: 2,
        open_for: Duration::from_secs(30),
        half_open_requests: 1,
    };
    let mut breakers: Vec<Breaker> = (0..3).map(|_| Breaker::new(&settings)).collect();
    let mut plan = Plan::default();
    let mut now = 0u64;
    c.bench_function("select_and_admit", |b| {
        b.iter(|| {
            now += 1;
            selector.plan(|i| breakers[i].would_admit(now), &mut plan);
            let first = plan.as_slice()[0] as usize;
            let (admit, _) = breakers[first].admit(now);
            black_box(breakers[first].record(admit, true, now));
        })
    });
}

fn metrics(c: &mut Criterion) {
    let mut m = CoreMetrics::new(3);
    let mut i = 0u64;
    c.bench_function("metrics_record", |b| {
        b.iter(|| {
            i += 1;
            m.request(Some(0), Method::Get, 200, 150 + (i & 1023), 1024);
            m.upstream(1, 120 + (i & 511));
        })
    });
}

fn idle_check(c: &mut Criterion) {
    use std::os::fd::AsRawFd;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let client =
        std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (_server, _) = listener.accept().expect("accept");
    let fd = client.as_raw_fd();
    c.bench_function("pool_idle_check", |b| {
        b.iter(|| {
            assert!(!yatagarasu::upstream::pool::has_pending_input(black_box(
                fd
            )))
        })
    });
}

fn access_log(c: &mut Criterion) {
    use yatagarasu::config::{Level, LogFormat};
    yatagarasu::log::init(Level::Info, LogFormat::Text);
    yatagarasu::log::buffer_this_thread();
    let mut g = c.benchmark_group("access_log");
    g.bench_function("ours", |b| {
        b.iter(|| {
            yatagarasu::log!(
                Level::Info,
                "request",
                method = "GET",
                path = black_box("/data/dir/object-1k.bin"),
                status = 200,
                bytes = 1024,
                duration_ms = format_args!("{:.3}", 0.153),
                bucket = "data",
                replica = "primary",
                request_id = "53ba56a855c3bbba",
                worker = 0,
            );
        })
    });
    yatagarasu::log::flush();
    let (writer, _guard) = tracing_appender::non_blocking(std::io::sink());
    let subscriber = tracing_subscriber::fmt()
        .with_writer(writer)
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        g.bench_function("tracing_nonblocking", |b| {
            b.iter(|| {
                tracing::info!(
                    method = "GET",
                    path = black_box("/data/dir/object-1k.bin"),
                    status = 200,
                    bytes = 1024,
                    duration_ms = format_args!("{:.3}", 0.153),
                    bucket = "data",
                    replica = "primary",
                    request_id = "53ba56a855c3bbba",
                    worker = 0,
                    "request"
                );
            })
        });
    });
    g.finish();
}

fn jwt_verify(c: &mut Criterion) {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    use std::collections::HashMap;
    use yatagarasu::access::jwt::{authorize, JwtSettings, Key, Source};
    let exp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        + 3600;
    let claims = serde_json::json!({"sub": "bench", "role": "reader", "exp": exp});
    let secret = b"bench-secret-0123456789abcdef";
    let ec = rcgen::KeyPair::generate().expect("EC key");
    let mut keys = HashMap::new();
    keys.insert(
        "h".to_string(),
        Key {
            algorithm: Algorithm::HS256,
            key: jsonwebtoken::DecodingKey::from_secret(secret),
        },
    );
    keys.insert(
        "e".to_string(),
        Key {
            algorithm: Algorithm::ES256,
            key: jsonwebtoken::DecodingKey::from_ec_pem(ec.public_key_pem().as_bytes())
                .expect("EC public key"),
        },
    );
    let settings = JwtSettings {
        keys,
        sources: vec![Source::Bearer],
        leeway: 30,
        ..JwtSettings::default()
    };
    let token = |alg: Algorithm, kid: &str, key: &EncodingKey| {
        let mut h = Header::new(alg);
        h.kid = Some(kid.into());
        encode(&h, &claims, key).expect("token")
    };
    let hs = token(Algorithm::HS256, "h", &EncodingKey::from_secret(secret));
    let es = token(
        Algorithm::ES256,
        "e",
        &EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).expect("EC private key"),
    );
    let none = HashMap::new();
    let mut verified = quick_cache::unsync::Cache::new(4096);
    for (name, t) in [("hs256", &hs), ("es256", &es)] {
        c.bench_function(&format!("jwt_verify/{name}"), |b| {
            b.iter(|| black_box(authorize(&settings, &none, &|| {}, black_box(t)).expect("valid")))
        });
        verified.insert(
            t.clone(),
            authorize(&settings, &none, &|| {}, t).expect("valid"),
        );
    }
    // What a request pays once its token is in the worker's verified cache.
    c.bench_function("jwt_verify/cached", |b| {
        b.iter(|| black_box(verified.get(black_box(es.as_str())).is_some()))
    });
}

criterion_group!(benches, sign, route, parse, select, metrics, idle_check, jwt_verify, access_log);
criterion_main!(benches);
