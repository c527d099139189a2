//! Fuzz target bodies, shared by the cargo-afl binaries (`src/bin/*.rs`) and
//! the corpus replay test (`tests/fuzz_corpus.rs`). Each takes arbitrary
//! bytes, must never panic, and checks the invariants the proxy relies on.

use yatagarasu::config::expand::expand_str;
use yatagarasu::http::chunked::ChunkedDecoder;
use yatagarasu::http::head::{self, Request, Response};
use yatagarasu::router::{self, Router};

/// Request heads: a parsed head lies within the input; refusals map to 4xx.
pub fn request_head(data: &[u8]) {
    let mut req = Request::default();
    match head::parse_request(data, &mut req) {
        Ok(n) => {
            assert!(n <= data.len());
            assert!(req.target.len() <= head::MAX_REQUEST_LINE);
            // Never two Range headers, never control characters forwarded.
            assert!(
                req.forwarded
                    .iter()
                    .filter(|(h, _)| *h == yatagarasu::http::head::Forwarded::Range)
                    .count()
                    <= 1
            );
            for (_, v) in &req.forwarded {
                assert!(!v.bytes().any(|b| b.is_ascii_control()));
            }
        }
        Err(e) => assert!((400..=431).contains(&e.status())),
    }
}

/// Response heads: a final status is 100-599; framing is unambiguous.
pub fn response_head(data: &[u8]) {
    let (flag, data) = data.split_first().unwrap_or((&0, data));
    let mut resp = Response::default();
    if let Ok(Some(n)) = head::parse_response(data, flag & 1 == 1, &mut resp) {
        assert!(n <= data.len());
        assert!((100..=599).contains(&resp.status));
        if let Some(cr) = resp.content_range {
            assert!(cr.first <= cr.last);
        }
        assert!(!resp.forward.contains("\r\n\r\n"));
    }
}

/// Chunked decoding: fed in two pieces split anywhere, the payload is the
/// same as fed whole, and never longer than the input.
pub fn chunked(data: &[u8]) {
    let (split, data) = match data.split_first() {
        Some((s, rest)) => (*s as usize, rest),
        None => return,
    };
    let whole = decode(data, &[data.len()]);
    let cut = split.min(data.len());
    let pieces = decode(data, &[cut, data.len()]);
    match (&whole, &pieces) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(_), Err(_)) => {}
        // An error in the second piece may come after payload from the first.
        _ => assert!(whole.is_err() || pieces.is_err()),
    }
    if let Ok((payload, _)) = whole {
        assert!(payload.len() <= data.len());
    }
}

fn decode(data: &[u8], cuts: &[usize]) -> Result<(Vec<u8>, bool), &'static str> {
    let mut d = ChunkedDecoder::default();
    let mut out = Vec::new();
    let mut from = 0;
    for &c in cuts {
        let mut piece = data[from..c].to_vec();
        from = c;
        let r = d.decode(&mut piece)?;
        out.extend_from_slice(&piece[..r.payload]);
        if r.done {
            return Ok((out, true));
        }
    }
    Ok((out, false))
}

/// Path decoding and routing: a decoded path never holds a dot segment or
/// NUL, a routed key is non-empty, a forwarded query holds only the two
/// forwarded parameters, and the log form never shows a query value.
pub fn route(data: &[u8]) {
    let mut path = String::new();
    if router::decode_path(data, &mut path).is_ok() {
        assert!(!path.split('/').any(|s| s == "." || s == ".."));
        assert!(!path.contains('\0'));
        let r = Router::new(["/data", "/data/archive", ""]);
        if let Ok((_, key)) = r.route(&path) {
            assert!(!key.is_empty());
            let mut enc = String::new();
            router::encode_key(key, &mut enc);
            assert!(enc.bytes().all(|b| b.is_ascii_graphic()));
        }
        let mut q = String::new();
        if router::upstream_query(data, &mut q).is_ok() {
            for pair in q.split('&').filter(|p| !p.is_empty()) {
                let name = pair.split('=').next().unwrap_or("");
                assert!(name == "partNumber" || name == "versionId", "{q}");
            }
        }
    }
    let mut logged = String::new();
    router::loggable_target(data, &mut logged);
    if let Some(q) = logged.split_once('?').map(|(_, q)| q) {
        for pair in q.split('&') {
            if let Some((_, v)) = pair.split_once('=') {
                assert_eq!(v, "REDACTED");
            }
        }
    }
}

/// `${VAR}` expansion: never panics; without `$` the input is unchanged.
pub fn expand(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let env = |name: &str| (name.len() < 4).then(|| format!("<{name}>"));
    let out = expand_str(s, &env);
    if !s.contains('$') {
        assert_eq!(out.as_deref(), Ok(s));
    }
}

/// The TLS stream's server side (our own over rustls, `src/tls/stream.rs`)
/// fed whatever a client might send, in pieces of a size the first byte
/// picks (records cut anywhere): the handshake fails or completes and the
/// reads that follow end, with an error or at the end: never a panic, never
/// a hang, never plaintext from bytes that were not a handshake.
pub fn tls_server(data: &[u8]) {
    use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
    let Some((piece, data)) = data.split_first() else {
        return;
    };
    let piece = (*piece as usize).max(1) * 7;
    let data = data.to_vec();
    let acceptor = tls_acceptor();
    let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let listener = monoio::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut peer = monoio::net::TcpStream::connect(addr)
            .await
            .expect("connect");
        let (ours, _) = listener.accept().await.expect("accept");
        let feeder = monoio::spawn(async move {
            for chunk in data.chunks(piece) {
                if peer.write_all(chunk.to_vec()).await.0.is_err() {
                    break;
                }
            }
            let _ = peer.shutdown().await;
            // Takes what the server answers until it closes.
            loop {
                match peer.read(Vec::with_capacity(65_536)).await.0 {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        });
        if let Ok(mut s) = acceptor.accept(ours).await {
            // Bytes that never completed a handshake of ours cannot, nor
            // can any plaintext follow from them.
            let (r, _) = s.read(Vec::with_capacity(4096)).await;
            assert!(!matches!(r, Ok(n) if n > 0), "plaintext from fuzz bytes");
        }
        feeder.await;
    });
}

/// The listener's acceptor over the fuzz crate's test certificate (a
/// self-signed P-256 key made for fuzzing, nothing else).
fn tls_acceptor() -> yatagarasu::tls::TlsAcceptor {
    static ACCEPTOR: std::sync::OnceLock<yatagarasu::tls::TlsAcceptor> = std::sync::OnceLock::new();
    ACCEPTOR
        .get_or_init(|| {
            let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/tls");
            let dir = if std::path::Path::new(dir).exists() {
                dir.to_string()
            } else {
                concat!(env!("CARGO_MANIFEST_DIR"), "/tls").to_string()
            };
            yatagarasu::tls::acceptor(&format!("{dir}/cert.pem"), &format!("{dir}/key.pem"))
                .expect("fuzz certificate")
        })
        .clone()
}

/// TLS record protection of our own (`src/tls/record.rs`). The first byte
/// picks the suite (its low bit), TLS 1.3 or 1.2 (its next bit) and a byte
/// to damage; the rest is cut into records (a length byte, a type byte,
/// the content), each sealed under a fixed key (in place, or straight from
/// the bytes, as the length byte's low bit says) and opened again (in
/// place, or into another buffer, as its next bit says): what opens is what
/// was sealed (TLS 1.3: the inner type and the content, zero padding
/// stripped when the type byte is a zero; TLS 1.2: the type outside and
/// all of the content), the same record with one byte damaged never opens,
/// and the plaintext parsed as an alert and as post-handshake messages
/// gives a value or an error, never a panic.
pub fn tls_record(data: &[u8]) {
    use rustls::crypto::cipher::{AeadKey, Iv};
    use rustls::ConnectionTrafficSecrets;
    use yatagarasu::tls::record::{self, Keys};
    let Some((&pick, mut data)) = data.split_first() else {
        return;
    };
    let tls12 = pick & 2 != 0;
    let secrets = || {
        let (key, iv) = (AeadKey::from([7u8; 32]), Iv::from([9u8; 12]));
        if pick & 1 == 0 {
            ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        } else {
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv }
        }
    };
    let keys = || Keys::new(0, secrets(), tls12).expect("keys");
    let (mut tx, mut rx, mut shadow) = (keys(), keys(), keys());
    while let [len, typ, rest @ ..] = data {
        let n = (*len as usize * 67).min(rest.len()).min(record::MAX_PLAIN);
        let (content, tail) = rest.split_at(n);
        data = tail;
        // TLS 1.2 records carry one of the three types a protected
        // record may have.
        let typ = if tls12 { record::ALERT + typ % 3 } else { *typ };
        // Sealed in place, or straight from the bytes (the same record).
        let mut sealed = vec![0u8; n + tx.overhead()];
        let total = if len & 1 == 0 {
            let at = tx.body_at();
            sealed[at..at + n].copy_from_slice(content);
            tx.seal(typ, &mut sealed, n).expect("seal")
        } else {
            tx.seal_from(typ, content, &mut sealed).expect("seal")
        };
        assert_eq!(rx.complete(&sealed).expect("header"), Some(total));
        assert_eq!(rx.complete(&sealed[..total - 1]).expect("header"), None);

        let mut damaged = sealed.clone();
        let at = record::HEADER + (pick as usize * 31 + n) % (total - record::HEADER);
        damaged[at] ^= 1 << (pick % 8);
        // Opened in place, or into another buffer.
        let into = len & 2 != 0;
        let mut out = vec![0u8; rx.plain_len(total)];
        let opened = if into {
            shadow.open_into(&damaged, &mut out).map(|_| ())
        } else {
            shadow.open(&mut damaged).map(|_| ())
        };
        assert!(opened.is_err(), "a damaged record opened");

        let opened = if into {
            rx.open_into(&sealed, &mut out)
                .map(|(t, got)| (t, out[..got].to_vec()))
        } else {
            rx.open(&mut sealed)
                .map(|(t, range)| (t, sealed[range].to_vec()))
        };
        let inner: Vec<u8> = content.iter().copied().chain([typ]).collect();
        let want = if tls12 {
            Some((typ, content))
        } else {
            inner
                .iter()
                .rposition(|&b| b != 0)
                .map(|at| (inner[at], &inner[..at]))
        };
        match (want, opened) {
            (Some((want_type, want_plain)), Ok((t, plain))) => {
                assert_eq!(t, want_type);
                assert_eq!(&plain[..], want_plain);
                let _ = record::alert(&plain);
                let _ = record::post_handshake(&plain);
                let _ = record::tls12_post_handshake(&plain);
            }
            (None, Err(_)) => {}
            (want, got) => panic!("opened {got:?}, expected {want:?}"),
        }
    }
}
