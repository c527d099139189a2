//! The slice, resume and cache-fill paths under a fuzzer, against scripted
//! upstream answers (issue #21): not the parsers alone, the whole request
//! path of the real process.
//!
//! Two scripted replicas serve one 3.5 MiB object whose every byte follows
//! from its offset. For each request they receive, a generator seeded by the
//! case picks an answer: honest, or one of the lies an upstream tells (a 206
//! at another offset, short, long, of another total or ETag; a body cut,
//! reset or padded; a 5xx, 412, 416; broken framing; a stall). The proxy
//! caches in 1 MiB slices. Clients ask for the whole object, ranges, suffix
//! ranges and HEADs, pipelined on kept-alive connections. Invariants, for
//! every case:
//!
//! - the process never dies and never panics (its log has no panic);
//! - an answer that arrives whole is byte-exact for what it claims: a 206's
//!   bytes are the object's bytes at its `Content-Range`, a 200's are the
//!   object's first `Content-Length` bytes (a lying upstream may shrink
//!   what is claimed, never mix or shift bytes);
//! - anything else is an error status or a connection cut short (an
//!   abort), never a short body presented as complete.
//!
//! The committed corpus (`fuzz/corpus/upstream/`, one case seed a line) is
//! replayed every run. `FUZZ_UPSTREAM_SECONDS=N` fuzzes new seeds for N
//! seconds more and prints any seed that breaks an invariant.

mod support;

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::http::Conn;
use support::rogue::{Rogue, Seen, Step};
use support::*;

const MIB: u64 = 1024 * 1024;
const TOTAL: u64 = 3 * MIB + MIB / 2;

fn byte_at(offset: u64) -> u8 {
    (offset.wrapping_mul(13).wrapping_add(offset >> 11) % 253) as u8
}

fn expected(first: u64, last: u64) -> Vec<u8> {
    (first..=last).map(byte_at).collect()
}

/// splitmix64.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = mix(self.0);
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn answer(status: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let len = body.len();
    let mut out =
        format!("HTTP/1.1 {status}\r\nContent-Length: {len}\r\n{headers}\r\n").into_bytes();
    out.extend_from_slice(body);
    out
}

/// A well-framed 206 of the object's bytes `a..=b`, claiming `total`.
fn partial(a: u64, b: u64, total: u64) -> Vec<Step> {
    let h = format!("ETag: \"v1\"\r\nContent-Range: bytes {a}-{b}/{total}\r\n");
    vec![Step::Send(answer(
        "206 Partial Content",
        &h,
        &expected(a, b),
    ))]
}

/// The scripted answer to request `n` of `case`.
fn script(case: u64, n: u64, s: &Seen) -> Vec<Step> {
    let mut rng = Rng(mix(case ^ n.wrapping_mul(0x1234_5678_9ABC)));
    let honest_etag = "\"v1\"";
    if s.header("if-match")
        .is_some_and(|m| m != honest_etag && rng.below(2) == 0)
    {
        return vec![Step::Send(answer("412 Precondition Failed", "", b""))];
    }
    let (first, last, status) = match s.range(TOTAL) {
        Some((a, _)) if a >= TOTAL => {
            let h = format!("Content-Range: bytes */{TOTAL}\r\n");
            return vec![Step::Send(answer("416 Range Not Satisfiable", &h, b""))];
        }
        Some((a, b)) => (a, b, "206 Partial Content"),
        None => (0, TOTAL - 1, "200 OK"),
    };
    let range = |a: u64, b: u64, total: u64| format!("Content-Range: bytes {a}-{b}/{total}\r\n");
    let honest = |a: u64, b: u64| {
        let mut h = format!("ETag: {honest_etag}\r\n");
        if status.starts_with("206") {
            h.push_str(&range(a, b, TOTAL));
        }
        answer(status, &h, &expected(a, b))
    };
    // Half the answers are honest, so the paths past the first step run.
    match rng.below(24) {
        0..=11 => vec![Step::Send(honest(first, last))],
        12 => {
            // Shifted: another offset than asked, bytes true to it.
            let a = (first + 1 + rng.below(4096)).min(TOTAL - 1);
            partial(a, (a + (last - first)).min(TOTAL - 1), TOTAL)
        }
        13 => {
            // Short: ends early, well framed.
            partial(first, first + rng.below(last - first + 1), TOTAL)
        }
        14 => {
            // Another total.
            let total = TOTAL + 1 + rng.below(MIB);
            let h = format!("ETag: {honest_etag}\r\n{}", range(first, last, total));
            vec![Step::Send(answer(status, &h, &expected(first, last)))]
        }
        15 => {
            // Another ETag, same bytes.
            let mut h = format!("ETag: \"v{}\"\r\n", 2 + rng.below(3));
            if status.starts_with("206") {
                h.push_str(&range(first, last, TOTAL));
            }
            vec![Step::Send(answer(status, &h, &expected(first, last)))]
        }
        16 => {
            // Cut: the head promises more than is sent, then FIN.
            let mut out = honest(first, last);
            let keep =
                out.len() - 1 - rng.below((last - first + 1).min(out.len() as u64 - 1)) as usize;
            out.truncate(keep);
            vec![Step::Send(out), Step::Close]
        }
        17 => {
            let mut out = honest(first, last);
            let keep = out.len() / 2;
            out.truncate(keep);
            vec![Step::Send(out), Step::Reset]
        }
        18 => {
            // Padded: bytes past the Content-Length.
            let mut out = honest(first, last);
            out.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbad");
            vec![Step::Send(out)]
        }
        19 => vec![Step::Send(answer(
            [
                "500 Internal Server Error",
                "503 Slow Down",
                "502 Bad Gateway",
            ][rng.below(3) as usize],
            "",
            b"<Error/>",
        ))],
        20 => vec![Step::Send(
            b"HTTP/1.1 200 OK\r\nContent-Length: 12x\r\n\r\n".to_vec(),
        )],
        21 => {
            // Chunked with a lying chunk size.
            let body = expected(first, (first + 100).min(last));
            let mut out = format!(
                "HTTP/1.1 {status}\r\nTransfer-Encoding: chunked\r\nETag: {honest_etag}\r\n\r\n{:x}\r\n",
                body.len() + rng.below(50) as usize
            )
            .into_bytes();
            out.extend_from_slice(&body);
            out.extend_from_slice(b"\r\n0\r\n\r\n");
            vec![Step::Send(out), Step::Close]
        }
        22 => {
            // A 206 for a request that asked no range.
            partial(first, (first + rng.below(MIB)).min(TOTAL - 1), TOTAL)
        }
        _ => vec![Step::Hang],
    }
}

struct Harness {
    case: Arc<AtomicU64>,
    /// Requests the replicas received in this case (reset per case, so a
    /// seed replays alike).
    counter: Arc<AtomicU64>,
    _replicas: (Rogue, Rogue),
    proxy: Proxy,
}

fn harness() -> Harness {
    let case = Arc::new(AtomicU64::new(0));
    let counter = Arc::new(AtomicU64::new(0));
    let replica = |salt: u64| {
        let (case, counter) = (case.clone(), counter.clone());
        Rogue::start(move |s: &Seen| {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            script(case.load(Ordering::SeqCst) ^ salt, n, s)
        })
    };
    let (a, b) = (replica(0), replica(0xABCD));
    let cfg = format!(
        "server:\n  address: \"127.0.0.1:{}\"\n  workers: 2\n  idle_timeout_seconds: 5\ncache:\n  enabled: true\n  slice_size_mb: 1\n  memory:\n    max_cache_size_mb: 64\n    max_item_size_mb: 2\nbuckets:\n  - name: \"b\"\n    path_prefix: \"/b\"\n    s3:\n      bucket: \"bkt\"\n      access_key: \"{AK}\"\n      secret_key: \"{SK}\"\n      timeout_seconds: 1\n      replicas:\n        - name: \"a\"\n          endpoint: \"{}\"\n          priority: 1\n        - name: \"b\"\n          endpoint: \"{}\"\n          priority: 2\n      circuit_breaker:\n        failure_threshold: 1000\n      health_check:\n        enabled: false\n",
        free_port(),
        a.endpoint(),
        b.endpoint()
    );
    let proxy = Proxy::start(&cfg);
    Harness {
        case,
        counter,
        _replicas: (a, b),
        proxy,
    }
}

/// What a client asks for in one request of a case.
fn request(rng: &mut Rng) -> (String, &'static str) {
    let method = if rng.below(8) == 0 { "HEAD" } else { "GET" };
    let header = match rng.below(5) {
        0 => String::new(),
        1 => format!("Range: bytes=-{}\r\n", 1 + rng.below(2 * MIB)),
        2 => format!("Range: bytes={}-\r\n", rng.below(TOTAL + 10)),
        _ => {
            let a = rng.below(TOTAL);
            format!("Range: bytes={a}-{}\r\n", a + rng.below(2 * MIB))
        }
    };
    (header, method)
}

/// Runs one case; `Err` names the broken invariant.
fn run_case(h: &Harness, seed: u64) -> Result<(), String> {
    h.case.store(seed, Ordering::SeqCst);
    h.counter.store(0, Ordering::SeqCst);
    let mut rng = Rng(seed);
    let requests = 1 + rng.below(3);
    let mut conn = Conn::open(h.proxy.port).map_err(|e| format!("connect: {e}"))?;
    for i in 0..requests {
        let (header, method) = request(&mut rng);
        // Distinct keys per case keep cases apart; a few share one.
        let key = if rng.below(3) == 0 {
            "shared".to_string()
        } else {
            format!("k{seed:x}-{i}")
        };
        let raw = format!("{method} /b/{key} HTTP/1.1\r\nHost: a\r\n{header}\r\n");
        if conn.send(raw.as_bytes()).is_err() {
            conn = Conn::open(h.proxy.port).map_err(|e| format!("reconnect: {e}"))?;
            conn.send(raw.as_bytes())
                .map_err(|e| format!("send: {e}"))?;
        }
        let r = match conn.read_response(method == "HEAD") {
            Ok(r) => r,
            Err(_) => {
                // Cut short: an abort, which is allowed. Next request anew.
                conn = Conn::open(h.proxy.port).map_err(|e| format!("reconnect: {e}"))?;
                continue;
            }
        };
        check(&r, method, &format!("{method} {key} {header:?}"))?;
    }
    Ok(())
}

fn check(r: &support::http::Resp, method: &str, what: &str) -> Result<(), String> {
    let len: Option<u64> = r.header("content-length").and_then(|v| v.parse().ok());
    match r.status {
        200 => {
            let chunked = r
                .header("transfer-encoding")
                .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
            let len = match (len, chunked) {
                (Some(len), false) => len,
                (None, true) => r.body.len() as u64,
                // A HEAD answer of a chunked object says neither.
                (None, false) if method == "HEAD" => 0,
                _ => return Err(format!("{what}: 200 framed by {:?}", r.headers)),
            };
            if len > TOTAL {
                return Err(format!("{what}: 200 of {len} bytes, object has {TOTAL}"));
            }
            if method == "GET" && r.body != expected(0, len.saturating_sub(1)) && len > 0 {
                return Err(format!("{what}: 200 body differs from the object's bytes"));
            }
        }
        206 => {
            let cr = r.header("content-range").ok_or(format!(
                "{what}: 206 without Content-Range: {:?}",
                r.headers
            ))?;
            let (a, b) = cr
                .strip_prefix("bytes ")
                .and_then(|v| v.split_once('/'))
                .and_then(|(range, _)| range.split_once('-'))
                .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)))
                .ok_or(format!("{what}: unreadable Content-Range {cr:?}"))?;
            if b < a || len != Some(b - a + 1) {
                return Err(format!(
                    "{what}: Content-Range {cr} with Content-Length {len:?}"
                ));
            }
            if method == "GET" && r.body != expected(a, b) {
                return Err(format!(
                    "{what}: 206 {cr} body differs from the object's bytes there"
                ));
            }
        }
        s if s >= 300 => {}
        s => return Err(format!("{what}: unexpected status {s}")),
    }
    Ok(())
}

fn corpus_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/upstream/seeds")
}

#[test]
fn slice_resume_and_fill_paths_hold_their_invariants_against_lying_upstreams() {
    let h = harness();
    let corpus = std::fs::read_to_string(corpus_path()).expect("fuzz/corpus/upstream/seeds");
    let seeds: Vec<u64> = corpus
        .lines()
        .filter_map(|l| u64::from_str_radix(l.trim(), 16).ok())
        .collect();
    assert!(!seeds.is_empty(), "empty corpus");
    let mut broken = Vec::new();
    for &seed in &seeds {
        if let Err(e) = run_case(&h, seed) {
            broken.push(format!("{seed:016x}: {e}"));
        }
    }
    let secs: u64 = std::env::var("FUZZ_UPSTREAM_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let until = Instant::now() + Duration::from_secs(secs);
    let mut extra = 0u64;
    let mut rng = Rng(std::process::id() as u64 ^ 0x5EED);
    while Instant::now() < until {
        let seed = rng.next();
        extra += 1;
        if let Err(e) = run_case(&h, seed) {
            broken.push(format!("{seed:016x}: {e}"));
        }
        if secs > 0 && std::env::var("FUZZ_UPSTREAM_GROW").is_ok() && extra.is_multiple_of(50) {
            // Keep a sample of the seeds run, to grow the corpus.
            if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(corpus_path()) {
                let _ = writeln!(f, "{seed:016x}");
            }
        }
    }
    if secs > 0 {
        eprintln!("fuzzed {extra} new cases in {secs} s");
    }
    // Alive, and never panicked.
    assert_eq!(h.proxy.get("/health").status, 200, "{}", h.proxy.log());
    assert!(!h.proxy.log().contains("panicked"), "{}", h.proxy.log());
    assert!(
        broken.is_empty(),
        "{} broken cases:\n{}",
        broken.len(),
        broken.join("\n")
    );
}
