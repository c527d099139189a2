//! Hostile inputs, round two: where the features meet (issue #21). Slices,
//! cache fills, JWT on pipelined heads, trusted proxies, the disk tier
//! across restarts, the upstream rate limit, log lines. Each test failed
//! before the fix it covers; each drives the proxy through real sockets,
//! against the scripted upstream (`support::rogue`) or s3s-fs.

mod support;

use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use support::http::{self, Conn};
use support::rogue::{Rogue, Seen, Step};
use support::*;

const SECRET: &str = "seams-hmac-secret-0123456789";

fn now() -> u64 {
    unix_now()
}

fn hs256(claims: serde_json::Value) -> String {
    hs256_token(SECRET, &claims)
}

/// A 10-byte object, "0123456789", with an ETag; honours a `bytes=a-b`
/// range and `If-None-Match`.
fn small_object() -> Rogue {
    Rogue::start(|s: &Seen| {
        let body = b"0123456789";
        if s.header("if-none-match").as_deref() == Some("\"e\"") {
            return vec![support::rogue::send(
                "HTTP/1.1 304 Not Modified\r\nETag: \"e\"\r\n\r\n",
            )];
        }
        if let Some((a, b)) = s.header("range").and_then(|r| {
            let (a, b) = r.strip_prefix("bytes=")?.split_once('-')?;
            Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?.min(9)))
        }) {
            let mut out = format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {a}-{b}/10\r\nContent-Length: {}\r\nETag: \"e\"\r\n\r\n",
                b - a + 1
            )
            .into_bytes();
            out.extend_from_slice(&body[a..=b]);
            return vec![Step::Send(out)];
        }
        vec![support::rogue::ok_with("ETag: \"e\"\r\n", body)]
    })
}

/// A `server:` section on a free port, one worker, with `extra` lines.
fn server(extra: &str) -> String {
    format!(
        "server:\n  address: \"127.0.0.1:{}\"\n  workers: 1\n{extra}",
        free_port()
    )
}

fn bucket(name: &str, prefix: &str, endpoint: &str, extra: &str) -> String {
    format!(
        "  - name: \"{name}\"\n    path_prefix: \"{prefix}\"\n{extra}    s3:\n      bucket: \"bkt\"\n      endpoint: \"{endpoint}\"\n      access_key: \"{AK}\"\n      secret_key: \"{SK}\"\n      health_check:\n        enabled: false\n"
    )
}

/// Sends `first` (a head whose lines end in a bare LF) and `second` (a
/// normal head) in one write; returns both answers' statuses and bodies.
fn pipelined(port: u16, first: &str, second: &str) -> (http::Resp, http::Resp) {
    let mut c = Conn::open(port).expect("connect");
    let mut raw = first.as_bytes().to_vec();
    raw.extend_from_slice(second.as_bytes());
    c.send(&raw).expect("send");
    let a = c.read_response(false).expect("first answer");
    let b = c.read_response(false).expect("second answer");
    (a, b)
}

#[test]
fn every_header_a_request_uses_comes_from_its_own_head_even_with_bare_lf_lines() {
    let up = small_object();
    let cfg = format!(
        "{}jwt:\n  enabled: true\n  secret: \"{SECRET}\"\n  token_sources:\n    - {{ type: bearer }}\n    - {{ type: cookie, name: \"tok\" }}\n    - {{ type: query, name: \"token\" }}\nbuckets:\n{}{}{}",
        server("  trusted_proxies: [\"127.0.0.1/32\"]\n"),
        bucket("p", "/p", &up.endpoint(), "    auth:\n      enabled: true\n"),
        bucket(
            "ip",
            "/ip",
            &up.endpoint(),
            "    ip_filter:\n      blocklist: [\"10.66.0.0/16\"]\n"
        ),
        bucket("pub", "/pub", &up.endpoint(), ""),
    );
    let p = Proxy::start(&cfg);
    let token = hs256(json!({"sub": "next-request", "exp": now() + 600}));

    // Authorization, Cookie and the query token: the first request has
    // none; the next one, pipelined after it, does.
    for (what, second_header, second_target) in [
        (
            "authorization",
            format!("Authorization: Bearer {token}\r\n"),
            "/p/k",
        ),
        ("cookie", format!("Cookie: tok={token}\r\n"), "/p/k"),
        ("query", String::new(), &*format!("/p/k?token={token}")),
    ] {
        let first = "GET /p/k HTTP/1.1\nHost: a\n\n";
        let second = format!("GET {second_target} HTTP/1.1\r\nHost: a\r\n{second_header}\r\n");
        let (a, b) = pipelined(p.port, first, &second);
        assert_eq!(a.status, 401, "{what}: the token-less request was let in");
        assert_eq!((b.status, b.text().as_str()), (200, "0123456789"), "{what}");
    }
    // X-Forwarded-For: the first (bare LF) names nothing, so it is the
    // trusted peer; the second names a blocked client.
    let (a, b) = pipelined(
        p.port,
        "GET /ip/k HTTP/1.1\nHost: a\n\n",
        "GET /ip/k HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 10.66.1.1\r\n\r\n",
    );
    assert_eq!((a.status, b.status), (200, 403), "X-Forwarded-For");
    // And the other way round: a blocked first, a clean second.
    let (a, b) = pipelined(
        p.port,
        "GET /ip/k HTTP/1.1\nHost: a\nX-Forwarded-For: 10.66.1.1\n\n",
        "GET /ip/k HTTP/1.1\r\nHost: a\r\n\r\n",
    );
    assert_eq!(
        (a.status, b.status),
        (403, 200),
        "X-Forwarded-For, reversed"
    );

    // Range and If-None-Match belong to the request that sent them.
    let (a, b) = pipelined(
        p.port,
        "GET /pub/k HTTP/1.1\nHost: a\n\n",
        "GET /pub/k HTTP/1.1\r\nHost: a\r\nRange: bytes=2-4\r\n\r\n",
    );
    assert_eq!((a.status, a.text().as_str()), (200, "0123456789"), "Range");
    assert_eq!((b.status, b.text().as_str()), (206, "234"), "Range");
    let (a, b) = pipelined(
        p.port,
        "GET /pub/k HTTP/1.1\nHost: a\n\n",
        "GET /pub/k HTTP/1.1\r\nHost: a\r\nIf-None-Match: \"e\"\r\n\r\n",
    );
    assert_eq!((a.status, b.status), (200, 304), "If-None-Match");

    // Host: an HTTP/1.1 head without one is refused, whatever follows.
    let mut c = Conn::open(p.port).expect("connect");
    c.send(b"GET /pub/k HTTP/1.1\nX: y\n\nGET /pub/k HTTP/1.1\r\nHost: a\r\n\r\n")
        .expect("send");
    assert_eq!(c.read_response(false).expect("answer").status, 400, "Host");
}

const MIB: u64 = 1024 * 1024;

fn byte_at(offset: u64) -> u8 {
    (offset.wrapping_mul(7).wrapping_add(offset >> 13) % 251) as u8
}

fn expected(first: u64, last: u64) -> Vec<u8> {
    (first..=last).map(byte_at).collect()
}

/// An origin of a `total`-byte object that answers every range honestly,
/// except a range that is exactly a 1 MiB slice: that one gets a 206 for
/// its first half only (a well-framed, short Content-Range).
fn short_slice_origin(total: u64) -> Rogue {
    Rogue::start(move |s: &Seen| {
        let Some((a, b)) = s.header("range").and_then(|r| {
            let (a, b) = r.strip_prefix("bytes=")?.split_once('-')?;
            Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?))
        }) else {
            let mut out =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {total}\r\nETag: \"v1\"\r\n\r\n")
                    .into_bytes();
            out.extend_from_slice(&expected(0, total - 1));
            return vec![Step::Send(out)];
        };
        let b = b.min(total - 1);
        let sliced = a % MIB == 0 && b - a + 1 == MIB;
        let last = if sliced { a + MIB / 2 - 1 } else { b };
        let mut out = format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {a}-{last}/{total}\r\nContent-Length: {}\r\nETag: \"v1\"\r\n\r\n",
            last - a + 1
        )
        .into_bytes();
        out.extend_from_slice(&expected(a, last));
        vec![Step::Send(out)]
    })
}

fn slices_config(endpoint: &str) -> String {
    format!(
        "cache:\n  enabled: true\n  slice_size_mb: 1\n  memory:\n    max_cache_size_mb: 64\nbuckets:\n{}",
        bucket("b", "/b", endpoint, "")
    )
}

#[test]
fn a_short_206_for_a_slice_is_a_replica_failure_not_a_crash_or_a_short_body() {
    let total = 4 * MIB;
    let up = short_slice_origin(total);
    let p = Proxy::start_with(&slices_config(&up.endpoint()), 1, &[]);
    // Past the short end of slice 2: this took `Bytes::slice` out of bounds.
    let (a, b) = (2 * MIB + 700_000, 2 * MIB + 700_099);
    let mut c = Conn::open(p.port).expect("connect");
    let r = c
        .request("GET", "/b/big", &[("Range", &format!("bytes={a}-{b}"))])
        .expect("an answer, not a dead process");
    assert_eq!(r.status, 206, "{}", p.log());
    assert!(r.body == expected(a, b), "bytes past the short slice");
    // Inside the short piece: promised its length, given all of it, and the
    // kept-alive connection carries the next request in step.
    let (a, b) = (MIB + 10, MIB + 10 + 999);
    let r = c
        .request("GET", "/b/big", &[("Range", &format!("bytes={a}-{b}"))])
        .expect("second answer");
    assert_eq!(r.status, 206, "{}", p.log());
    assert_eq!(r.body.len(), 1000);
    assert!(r.body == expected(a, b));
    let r = c
        .request("GET", "/b/big", &[("Range", "bytes=5-9")])
        .expect("third");
    assert!(
        r.status == 206 && r.body == expected(5, 9),
        "connection out of step"
    );
    // Each short slice counted against the replica as malformed.
    let failures = p
        .metric("yatagarasu_replica_failures_total{bucket=\"b\",replica=\"default\",reason=\"malformed\"}")
        .unwrap_or(0.0);
    assert!(failures >= 2.0, "{}", p.metrics());
}

#[test]
fn forwarded_for_entries_with_ports_zones_and_commas_name_the_client_or_fail_closed() {
    let up = small_object();
    let cfg = format!(
        "{}buckets:\n{}",
        server("  trusted_proxies: [\"127.0.0.1/32\"]\n  rate_limit:\n    enabled: true\n    per_ip:\n      requests_per_second: 0.001\n      burst: 1\n"),
        bucket(
            "ip",
            "/ip",
            &up.endpoint(),
            "    ip_filter:\n      blocklist: [\"10.66.0.0/16\", \"fe80::/10\"]\n"
        ),
    );
    let p = Proxy::start_with(&cfg, 1, &[]);
    let get = |xff: &str| http::get(p.port, "/ip/k", &[("X-Forwarded-For", xff)]).status;
    // A blocked client, however the front end wrote its address: 403 (each
    // a distinct client: the per-address limit runs first).
    for xff in [
        "10.66.1.1:52345",
        "[::ffff:10.66.1.2]:52345",
        "10.66.1.3,",
        "fe80::1%eth0",
        "[fe80::2%25eth0]:80",
        "1.1.1.1, 10.66.1.4:1",
    ] {
        assert_eq!(get(xff), 403, "{xff} fell back to the proxy's address");
    }
    // Unreadable: refused, never the proxy's own address.
    for xff in ["unknown", "10.66.1.1:port", "[::1", "host.example"] {
        assert_eq!(get(xff), 400, "{xff}");
    }
    // Distinct clients behind the proxy are distinct per-address buckets
    // (burst 1 each, nearly no refill): each one's first request passes.
    for n in 1..=4 {
        assert_eq!(get(&format!("192.0.2.{n}:40000")), 200, "client {n}");
    }
    assert_eq!(
        get("192.0.2.1:40001"),
        429,
        "the same client again, by another port"
    );
}

/// An honest answer to `s` for a `total`-byte object: the range asked
/// for (206), or the whole (200).
fn honest_answer(s: &Seen, total: u64) -> Vec<Step> {
    let (status, a, b) = match s.header("range").and_then(|r| {
        let (a, b) = r.strip_prefix("bytes=")?.split_once('-')?;
        let a = a.parse::<u64>().ok()?;
        let b = b.parse::<u64>().map_or(total - 1, |b| b.min(total - 1));
        Some((a, b))
    }) {
        Some((a, b)) => ("206 Partial Content", a, b),
        None => ("200 OK", 0, total - 1),
    };
    let range = match status {
        "200 OK" => String::new(),
        _ => format!("Content-Range: bytes {a}-{b}/{total}\r\n"),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\n{range}Content-Length: {}\r\nETag: \"v1\"\r\n\r\n",
        b - a + 1
    )
    .into_bytes();
    out.extend_from_slice(&expected(a, b));
    vec![Step::Send(out)]
}

/// An origin of a `total`-byte object that answers every range honestly.
fn honest_origin(total: u64) -> Rogue {
    Rogue::start(move |s: &Seen| honest_answer(s, total))
}

#[test]
fn the_upstream_rate_limit_is_charged_per_request_sent_to_s3_not_per_client_request() {
    let total = 4 * MIB;
    let up = honest_origin(total);
    // One token, and nearly no refill: exactly one upstream request may go.
    let cfg = slices_config(&up.endpoint()).replace(
        "      access_key:",
        "      rate_limit:\n        requests_per_second: 0.001\n      access_key:",
    );
    let p = Proxy::start_with(&cfg, 1, &[]);
    // `bytes=0-` covers four slices: one GET is paid for, the second slice
    // finds no token, and the client is cut off rather than given a short
    // body presented as whole.
    let mut c = Conn::open(p.port).expect("connect");
    let r = c.request("GET", "/b/big", &[("Range", "bytes=0-")]);
    assert!(
        r.is_err(),
        "a complete answer although only one slice could be fetched: {:?}",
        r.map(|r| (r.status, r.body.len()))
    );
    assert_eq!(
        up.seen().len(),
        1,
        "requests sent past the limit: {:?}",
        up.seen()
    );
    // The next client request is refused before anything goes upstream.
    let r = http::get(p.port, "/b/big", &[("Range", "bytes=0-9")]);
    assert_eq!(r.status, 429);
    assert_eq!(up.seen().len(), 1);
}

#[test]
fn a_purge_wins_over_a_slice_still_arriving() {
    use support::rogue::Gate;
    let total = 4 * MIB;
    let gate = Gate::default();
    let held = gate.clone();
    // The slice's first half, then a wait the test ends after the purge.
    let up = Rogue::start(move |s: &Seen| {
        let (a, b) = s
            .header("range")
            .and_then(|r| {
                let (a, b) = r.strip_prefix("bytes=")?.split_once('-')?;
                Some((
                    a.parse::<u64>().ok()?,
                    b.parse::<u64>().ok()?.min(total - 1),
                ))
            })
            .unwrap_or((0, total - 1));
        let mut head = format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {a}-{b}/{total}\r\nContent-Length: {}\r\nETag: \"v1\"\r\n\r\n",
            b - a + 1
        )
        .into_bytes();
        let body = expected(a, b);
        let half = body.len() / 2;
        head.extend_from_slice(&body[..half]);
        vec![
            Step::Send(head),
            Step::Wait(held.clone()),
            Step::Send(body[half..].to_vec()),
        ]
    });
    let token = "0123456789abcdef-admin";
    let cfg = format!(
        "admin:\n  token: \"{token}\"\n{}",
        slices_config(&up.endpoint())
    );
    let p = Proxy::start_with(&cfg, 1, &[]);
    let port = p.port;
    let client =
        std::thread::spawn(move || http::get(port, "/b/big", &[("Range", "bytes=100-199")]));
    // The slice is on its way: the origin has the request.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while up.seen().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(up.seen().len(), 1);
    let mut c = Conn::open(p.metrics_port).expect("admin");
    let r = c
        .request(
            "POST",
            "/admin/cache/purge/b/big",
            &[("Authorization", &format!("Bearer {token}"))],
        )
        .expect("purge");
    assert_eq!(r.status, 200);
    gate.open();
    let r = client.join().expect("client");
    assert!(r.status == 206 && r.body == expected(100, 199));
    // Stored after the purge, this would be a HIT with no origin request.
    let r = http::get(p.port, "/b/big", &[("Range", "bytes=100-199")]);
    assert_eq!(
        r.header("x-cache"),
        Some("MISS"),
        "the purged slice was served"
    );
    assert_eq!(up.seen().len(), 2);
}

#[test]
fn a_repointed_bucket_never_serves_the_old_bucket_s_objects_from_disk_after_a_restart() {
    let s3 = S3::start();
    s3.create_bucket("old");
    s3.create_bucket("new");
    s3.put("old", "secret.txt", b"from the old bucket");
    let dir = tempfile::tempdir().expect("dir");
    let cfg = |s3_bucket: &str| {
        format!(
            "cache:\n  enabled: true\n  cache_layers: [\"memory\", \"disk\"]\n  disk:\n    enabled: true\n    cache_dir: \"{}\"\nbuckets:\n  - name: \"docs\"\n    path_prefix: \"/docs\"\n    s3:\n      bucket: \"{s3_bucket}\"\n      endpoint: \"{}\"\n      access_key: \"{AK}\"\n      secret_key: \"{SK}\"\n      health_check:\n        enabled: false\n",
            dir.path().join("c").display(),
            s3.endpoint()
        )
    };
    let p = Proxy::start(&cfg("old"));
    let r = p.get("/docs/secret.txt");
    assert_eq!(
        (r.status, r.header("x-cache")),
        (200, Some("MISS")),
        "{}",
        p.log()
    );
    assert!(
        p.wait_metric(
            "yatagarasu_cache_items{layer=\"disk\"}",
            1.0,
            Duration::from_secs(10)
        ),
        "{}",
        p.log()
    );
    // Entries are this user's alone.
    {
        use std::os::unix::fs::PermissionsExt;
        let d = dir.path().join("c");
        let mode = std::fs::metadata(&d).expect("dir").permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "cache directory mode {mode:o}");
        for e in std::fs::read_dir(&d).expect("list").flatten() {
            let mode = e.metadata().expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{:?} mode {mode:o}", e.path());
        }
    }
    drop(p);
    // Restarted with `docs` pointed at another S3 bucket, which has no
    // such object: the old copy is dropped at start, never served.
    let p = Proxy::start(&cfg("new"));
    assert!(
        p.wait_log("dropped_other_origin=1", Duration::from_secs(10))
            || p.log().contains("\"dropped_other_origin\":1"),
        "{}",
        p.log()
    );
    let r = p.get("/docs/secret.txt");
    assert_eq!(r.status, 404, "served {:?} from the old bucket", r.text());
    assert_eq!(
        p.metric("yatagarasu_cache_items{layer=\"disk\"}"),
        Some(0.0),
        "{}",
        p.metrics()
    );
}

#[test]
fn the_public_ready_says_only_ready_or_not_and_details_stay_on_the_metrics_listener() {
    let up = small_object();
    let p = Proxy::start(&format!(
        "buckets:\n{}",
        bucket("secret-bucket-name", "/b", &up.endpoint(), "")
    ));
    let public = p.get("/ready");
    assert_eq!(public.status, 200);
    assert_eq!(public.text(), "{\"status\":\"ready\"}");
    let details = p.ready_details();
    assert_eq!(details.status, 200);
    let text = details.text();
    assert!(
        text.contains("secret-bucket-name") && text.contains("credentials"),
        "{text}"
    );
}

/// A JWS of `header` and `claims` signed with HS256 and [`SECRET`].
fn signed_with_header(header: serde_json::Value, claims: serde_json::Value) -> String {
    use base64::Engine;
    let b64 = |v: &serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string().as_bytes())
    };
    let input = format!("{}.{}", b64(&header), b64(&claims));
    let sig = jsonwebtoken::crypto::sign(
        input.as_bytes(),
        &EncodingKey::from_secret(SECRET.as_bytes()),
        Algorithm::HS256,
    )
    .expect("sign");
    format!("{input}.{sig}")
}

/// A proxy whose bucket `/p` needs a token for [`SECRET`] (text logs), in
/// front of [`small_object`].
fn jwt_proxy() -> (Rogue, Proxy) {
    let up = small_object();
    let cfg = format!(
        "jwt:\n  enabled: true\n  secret: \"{SECRET}\"\nlogging:\n  format: text\nbuckets:\n{}",
        bucket(
            "p",
            "/p",
            &up.endpoint(),
            "    auth:\n      enabled: true\n"
        ),
    );
    let p = Proxy::start(&cfg);
    (up, p)
}

#[test]
fn tokens_with_critical_extensions_are_refused() {
    let (_up, p) = jwt_proxy();
    let claims = json!({"sub": "alice", "exp": now() + 600});
    let plain = signed_with_header(json!({"alg": "HS256", "typ": "JWT"}), claims.clone());
    let auth = |t: &str| http::get(p.port, "/p/k", &[("Authorization", &format!("Bearer {t}"))]);
    assert_eq!(auth(&plain).status, 200, "the same token without crit");
    let crit = signed_with_header(
        json!({"alg": "HS256", "typ": "JWT", "crit": ["x-must-understand"], "x-must-understand": true}),
        claims,
    );
    let r = auth(&crit);
    assert_eq!(
        r.status, 401,
        "a crit extension nobody here understands was accepted"
    );
}

#[test]
fn a_subject_cannot_forge_a_log_line() {
    let (_up, p) = jwt_proxy();
    let auth = |t: &str| http::get(p.port, "/p/k", &[("Authorization", &format!("Bearer {t}"))]);
    // A subject made to look like a second, tab-separated ERROR line.
    let forged = "mallory\n2026-01-01T00:00:00.000Z\tERROR\tforged-line";
    let token = hs256(json!({"sub": forged, "exp": now() + 600}));
    assert_eq!(auth(&token).status, 200);
    assert!(
        p.wait_log("mallory", Duration::from_secs(10)),
        "the access line was not logged: {}",
        p.log()
    );
    let log = p.log();
    for line in log.lines() {
        assert!(
            !line.starts_with("2026-01-01T00:00:00.000Z") && !line.contains('\t'),
            "a forged line: {line:?}"
        );
    }
}

/// A bucket `/b` on one replica with `failure_threshold: 3`.
fn breaker_config(endpoint: &str) -> String {
    format!(
        "buckets:\n  - name: \"b\"\n    path_prefix: \"/b\"\n    s3:\n      bucket: \"bkt\"\n      endpoint: \"{endpoint}\"\n      access_key: \"{AK}\"\n      secret_key: \"{SK}\"\n      timeout_seconds: 30\n      circuit_breaker:\n        failure_threshold: 3\n        success_threshold: 1\n        timeout_seconds: 60\n      health_check:\n        enabled: false\n"
    )
}

#[test]
fn clients_that_stop_reading_never_open_a_healthy_replica_s_breaker() {
    use support::rogue::Gate;
    // More than every buffer between the upstream and the client: the
    // proxy's receive buffer alone may grow to tcp_rmem's maximum (32 MiB
    // on the test machines).
    const BIG: usize = 96 << 20;
    let body = Arc::new(pattern(BIG, 5));
    let drops: Arc<std::sync::Mutex<Vec<Gate>>> = Default::default();
    let (b, d) = (body.clone(), drops.clone());
    // `/b/big`: 96 MiB, more than every socket buffer between us; a send
    // that stalls 2 s is dropped, as S3 drops it. `/b/small`: a few bytes.
    let up = Rogue::start(move |s: &Seen| {
        if s.target.contains("small") {
            return vec![support::rogue::ok_with("ETag: \"s\"\r\n", b"small")];
        }
        let gate = Gate::default();
        d.lock().unwrap().push(gate.clone());
        let mut out = format!("HTTP/1.1 200 OK\r\nContent-Length: {BIG}\r\nETag: \"big\"\r\n\r\n")
            .into_bytes();
        out.extend_from_slice(&b);
        vec![Step::SendOrDrop {
            bytes: out,
            stall: Duration::from_secs(2),
            dropped: gate,
        }]
    });
    let p = Proxy::start_with(&breaker_config(&up.endpoint()), 1, &[]);
    // Three clients ask for the large object and stop reading.
    let mut clients: Vec<Conn> = (0..3)
        .map(|_| {
            let mut c = Conn::open_small_window(p.port, 4096).expect("connect");
            c.send(b"GET /b/big HTTP/1.1\r\nHost: a\r\n\r\n")
                .expect("send");
            c
        })
        .collect();
    // Until the upstream has dropped each stalled send.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while drops.lock().unwrap().len() < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let gates: Vec<Gate> = drops.lock().unwrap().clone();
    assert_eq!(gates.len(), 3, "{}", p.log());
    for g in &gates {
        assert!(
            g.wait_for(Duration::from_secs(60)),
            "the upstream's send never stalled: {}",
            p.log()
        );
    }
    // They read again: each gets an abort, never a whole body.
    for c in &mut clients {
        let r = c.read_response(false);
        assert!(r.is_err(), "a short body presented as whole");
    }
    assert!(
        p.wait_metric(
            "yatagarasu_request_caused_failures_total{bucket=\"b\",replica=\"default\",reason=\"client_stalled\"}",
            3.0,
            Duration::from_secs(30)
        ),
        "{}\n{}",
        p.metrics(),
        p.log()
    );
    // The replica's breaker is closed: the bucket still serves.
    let r = p.get("/b/small");
    assert_eq!((r.status, r.text().as_str()), (200, "small"), "{}", p.log());
    assert!(
        !p.metrics().contains("reason=\"truncated\""),
        "{}",
        p.metrics()
    );
}

#[test]
fn an_upstream_that_cuts_bodies_read_at_full_speed_still_opens_the_breaker() {
    let up = Rogue::start(|_| {
        vec![
            support::rogue::send(
                "HTTP/1.1 200 OK\r\nContent-Length: 100000\r\nETag: \"e\"\r\n\r\nonly-this",
            ),
            Step::Close,
        ]
    });
    let p = Proxy::start_with(&breaker_config(&up.endpoint()), 1, &[]);
    for _ in 0..3 {
        assert!(
            http::try_get(p.port, "/b/k", &[]).is_err(),
            "a cut body presented as whole"
        );
    }
    let r = p.get("/b/k");
    assert_eq!(r.status, 503, "the breaker did not open: {}", p.log());
}

/// A cacheable `size`-byte object per key (content from the key); the
/// second half of each body waits for `gate` when one is given.
fn objects_origin(size: usize, gate: Option<support::rogue::Gate>) -> Rogue {
    Rogue::start(move |s: &Seen| {
        let seed = s
            .target
            .bytes()
            .fold(3u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
        let body = pattern(size, seed);
        let mut head =
            format!("HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nETag: \"{seed}\"\r\n\r\n")
                .into_bytes();
        match &gate {
            None => {
                head.extend_from_slice(&body);
                vec![Step::Send(head)]
            }
            Some(g) => {
                head.extend_from_slice(&body[..size / 2]);
                vec![
                    Step::Send(head),
                    Step::Wait(g.clone()),
                    Step::Send(body[size / 2..].to_vec()),
                ]
            }
        }
    })
}

/// The body `objects_origin` sends for the proxy path `target` (`/b/..`,
/// which reaches it as `/bkt/..`).
fn body_of(target: &str, size: usize) -> Vec<u8> {
    let target = target.replacen("/b/", "/bkt/", 1);
    let seed = target
        .bytes()
        .fold(3u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
    pattern(size, seed)
}

fn cache_config(endpoint: &str, memory_mb: u64, item_mb: u64) -> String {
    format!(
        "cache:\n  enabled: true\n  memory:\n    max_cache_size_mb: {memory_mb}\n    max_item_size_mb: {item_mb}\nbuckets:\n{}",
        bucket("b", "/b", endpoint, "")
    )
}

#[test]
fn fills_complete_at_the_upstream_s_pace_while_their_clients_stall() {
    const SIZE: usize = 4 << 20;
    let up = objects_origin(SIZE, None);
    // Budget: max(256 MiB / 4, 4 x 16 MiB): all eight fills (8 MiB each) fit.
    // The store is sharded (32 MiB shards here) and a shard evicts when full:
    // with 64 MiB (two shards) the eight 4 MiB objects all hashed to one
    // shard one run in 128 and one was evicted. Eight shards leave room.
    let p = Proxy::start_with(&cache_config(&up.endpoint(), 256, 16), 1, &[]);
    // Eight clients ask for eight objects, read nothing, and hold on.
    let stalled: Vec<Conn> = (0..8)
        .map(|i| {
            let mut c = Conn::open_small_window(p.port, 4096).expect("connect");
            c.send(format!("GET /b/o{i} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
                .expect("send");
            c
        })
        .collect();
    // Every fill completes and is stored although no client has read its
    // body; the budget they held is given back.
    assert!(
        p.wait_metric(
            "yatagarasu_cache_items{layer=\"memory\"}",
            8.0,
            Duration::from_secs(30)
        ),
        "fills held at their clients' pace: {}",
        p.metrics()
    );
    assert!(
        p.wait_metric("yatagarasu_cache_fill_bytes", 0.0, Duration::from_secs(30)),
        "{}",
        p.metrics()
    );
    // Others get the objects as hits meanwhile, whole.
    for i in 0..8 {
        let target = format!("/b/o{i}");
        let r = p.get(&target);
        assert_eq!(r.header("x-cache"), Some("HIT"));
        assert!(r.body == body_of(&target, SIZE), "o{i}");
    }
    // And the stalled clients, reading at last, get every byte.
    for (i, mut c) in stalled.into_iter().enumerate() {
        let r = c.read_response(false).expect("the stalled client's answer");
        assert_eq!(r.header("x-cache"), Some("MISS"));
        assert!(
            r.body == body_of(&format!("/b/o{i}"), SIZE),
            "o{i} for its stalled client"
        );
    }
    assert_eq!(up.seen().len(), 8, "one origin GET per object");
}

#[test]
fn fills_past_the_budget_are_relayed_uncached() {
    use support::rogue::Gate;
    const SIZE: usize = 4 << 20;
    let gate = Gate::default();
    let up = objects_origin(SIZE, Some(gate.clone()));
    // Budget: max(64 MiB / 4, 4 x 4 MiB) = 16 MiB; a 4 MiB fill holds 8.
    let p = Proxy::start_with(&cache_config(&up.endpoint(), 64, 4), 1, &[]);
    let port = p.port;
    let clients: Vec<_> = (0..3)
        .map(|i| std::thread::spawn(move || http::get(port, &format!("/b/f{i}"), &[])))
        .collect();
    assert!(
        p.wait_metric(
            "yatagarasu_cache_fills_refused_total",
            1.0,
            Duration::from_secs(30)
        ),
        "{}",
        p.metrics()
    );
    assert_eq!(
        p.metric("yatagarasu_cache_fill_bytes"),
        Some(16.0 * 1048576.0)
    );
    gate.open();
    for (i, t) in clients.into_iter().enumerate() {
        let r = t.join().expect("client");
        assert!(
            r.status == 200 && r.body == body_of(&format!("/b/f{i}"), SIZE),
            "f{i}"
        );
    }
    assert!(p.wait_metric("yatagarasu_cache_fill_bytes", 0.0, Duration::from_secs(30)));
    assert_eq!(up.seen().len(), 3, "one origin GET each");
}

/// Whether the metrics listener's `/ready` says the first replica is usable.
fn usable_now(p: &Proxy) -> bool {
    let d: serde_json::Value = serde_json::from_slice(&p.ready_details().body).expect("json");
    d["buckets"][0]["replicas"][0]["usable"] == true
}

#[test]
fn a_5xx_on_a_slice_fetch_does_not_leak_the_half_open_trial() {
    use std::sync::atomic::AtomicBool;
    let total = 4 * MIB;
    let failing = Arc::new(AtomicBool::new(true));
    let f = failing.clone();
    // Answers 500 while `failing`, honestly after.
    let up = Rogue::start(move |s: &Seen| {
        if f.load(std::sync::atomic::Ordering::SeqCst) {
            return vec![Step::Send(
                b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n".to_vec(),
            )];
        }
        honest_answer(s, total)
    });
    let cfg = format!(
        "cache:\n  enabled: true\n  slice_size_mb: 1\n  memory:\n    max_cache_size_mb: 64\nbuckets:\n  - name: \"b\"\n    path_prefix: \"/b\"\n    s3:\n      bucket: \"bkt\"\n      endpoint: \"{}\"\n      access_key: \"{AK}\"\n      secret_key: \"{SK}\"\n      circuit_breaker:\n        failure_threshold: 1\n        success_threshold: 1\n        timeout_seconds: 1\n        half_open_requests: 1\n      health_check:\n        enabled: false\n",
        up.endpoint()
    );
    let p = Proxy::start_with(&cfg, 1, &[]);
    let range = |p: &Proxy| http::get(p.port, "/b/big", &[("Range", "bytes=10-19")]);
    // A 500 on the slice fetch opens the breaker (threshold 1, the replica
    // never answered): 503 once the request falls back to the plain path.
    assert!(range(&p).status >= 500);
    assert!(!usable_now(&p), "{}", p.log());
    let usable = usable_now;
    let wait_usable = |p: &Proxy| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !usable(p) {
            assert!(std::time::Instant::now() < deadline, "{}", p.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // Half-open: the one trial goes to a slice fetch, and gets a 500.
    wait_usable(&p);
    let r = range(&p);
    assert!(r.status >= 500, "{}", r.status);
    // The replica recovers. A trial slot that leaked would keep every
    // request from it for good: the breaker must admit a trial again.
    failing.store(false, std::sync::atomic::Ordering::SeqCst);
    wait_usable(&p);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = range(&p);
        if r.status == 206 {
            assert!(r.body == expected(10, 19));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the replica is never tried again ({}): {}",
            r.status,
            p.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_206_without_content_range_is_a_malformed_answer_never_relayed() {
    // Found by tests/fuzz_upstream.rs: relayed, the client could not know
    // where the bytes belong.
    let up = Rogue::start(|_| {
        vec![support::rogue::send(
            "HTTP/1.1 206 Partial Content\r\nContent-Length: 3\r\nETag: \"e\"\r\n\r\nabc",
        )]
    });
    let p = Proxy::start(&format!(
        "buckets:\n{}",
        bucket("b", "/b", &up.endpoint(), "")
    ));
    let r = http::get(p.port, "/b/k", &[("Range", "bytes=5-7")]);
    assert_eq!(r.status, 502, "{:?}", r.headers);
    assert!(
        p.wait_metric(
            "yatagarasu_replica_failures_total{bucket=\"b\",replica=\"default\",reason=\"malformed\"}",
            1.0,
            Duration::from_secs(10)
        ),
        "{}",
        p.metrics()
    );
}
