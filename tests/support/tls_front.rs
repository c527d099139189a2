//! A TLS-terminating front for a plain HTTP backend (s3s-fs), with a test CA.
//! One thread per connection, requests handled in order (keep-alive).

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;

/// A certificate authority made for one test.
pub struct TestCa {
    params: CertificateParams,
    key: KeyPair,
    pub pem: String,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::CrlSign,
        ];
        let key = KeyPair::generate().expect("ca key");
        let cert = params.self_signed(&key).expect("ca cert");
        TestCa {
            pem: cert.pem(),
            params,
            key,
        }
    }

    /// A server certificate as PEM files in `dir`: (cert path, key path).
    pub fn leaf_pem_files(&self, dir: &std::path::Path) -> (String, String) {
        let params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .expect("leaf params");
        let key = KeyPair::generate().expect("leaf key");
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).expect("leaf cert");
        let cert_path = dir.join("server.pem");
        let key_path = dir.join("server.key");
        std::fs::write(&cert_path, cert.pem()).expect("write cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        (
            cert_path.display().to_string(),
            key_path.display().to_string(),
        )
    }

    /// A rustls client trusting only this CA.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        let der =
            rustls::pki_types::pem::PemObject::from_pem_slice(self.pem.as_bytes()).expect("ca pem");
        roots.add(der).expect("add ca");
        Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
        )
    }

    /// A server certificate for 127.0.0.1 and localhost: (cert DER, key DER).
    pub fn leaf(&self) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .expect("leaf params");
        let key = KeyPair::generate().expect("leaf key");
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).expect("leaf cert");
        (
            cert.der().clone(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }
}

/// Listens with TLS on a free port and forwards to `127.0.0.1:backend`.
pub struct TlsFront {
    pub port: u16,
    /// Each handshake's kind, in order: `true` when it resumed a session.
    pub resumed: Arc<std::sync::Mutex<Vec<bool>>>,
}

impl TlsFront {
    pub fn start(ca: &TestCa, backend: u16) -> TlsFront {
        TlsFront::start_with(ca, backend, false)
    }

    /// With `one_request_each`, every answer says `Connection: close` and
    /// the connection closes after it: each request is a new handshake.
    pub fn start_with(ca: &TestCa, backend: u16, one_request_each: bool) -> TlsFront {
        let (cert, key) = ca.leaf();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .expect("server cert");
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let resumed = Arc::new(std::sync::Mutex::new(Vec::new()));
        let kinds = resumed.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(tcp) = conn else { continue };
                let config = config.clone();
                let kinds = kinds.clone();
                std::thread::spawn(move || {
                    let Ok(session) = rustls::ServerConnection::new(config) else {
                        return;
                    };
                    let mut tls = rustls::StreamOwned::new(session, tcp);
                    while tls.conn.is_handshaking() {
                        if tls.conn.complete_io(&mut tls.sock).is_err() {
                            return;
                        }
                    }
                    let kind = tls.conn.handshake_kind();
                    if let Ok(mut k) = kinds.lock() {
                        k.push(kind == Some(rustls::HandshakeKind::Resumed));
                    }
                    let Ok(mut up) = TcpStream::connect(("127.0.0.1", backend)) else {
                        return;
                    };
                    let _ = serve(&mut tls, &mut up, one_request_each);
                    if one_request_each {
                        tls.conn.send_close_notify();
                        let _ = tls.conn.complete_io(&mut tls.sock);
                    }
                });
            }
        });
        TlsFront { port, resumed }
    }

    pub fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }
}

fn read_head<R: Read>(r: &mut R, buf: &mut Vec<u8>) -> std::io::Result<Option<Vec<u8>>> {
    let mut tmp = [0u8; 16384];
    loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = buf[..p + 4].to_vec();
            buf.drain(..p + 4);
            return Ok(Some(head));
        }
        let n = super::read_retry(r, &mut tmp)?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

fn content_length(head: &[u8]) -> usize {
    let text = String::from_utf8_lossy(head).to_ascii_lowercase();
    text.lines()
        .find_map(|l| {
            l.strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap_or(0))
        })
        .unwrap_or(0)
}

fn serve<S: Read + Write>(
    client: &mut S,
    up: &mut TcpStream,
    one_request: bool,
) -> std::io::Result<()> {
    let mut cbuf = Vec::new();
    let mut ubuf = Vec::new();
    while let Some(req) = read_head(client, &mut cbuf)? {
        up.write_all(&req)?;
        // The request's body (a POST to a decision service), if any.
        let mut body_left = content_length(&req);
        let take = body_left.min(cbuf.len());
        up.write_all(&cbuf[..take])?;
        cbuf.drain(..take);
        body_left -= take;
        let mut chunk = [0u8; 16384];
        while body_left > 0 {
            let n = super::read_retry(client, &mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            let k = n.min(body_left);
            up.write_all(&chunk[..k])?;
            cbuf.extend_from_slice(&chunk[k..n]);
            body_left -= k;
        }
        let Some(head) = read_head(up, &mut ubuf)? else {
            return Ok(());
        };
        let is_head = req.starts_with(b"HEAD ");
        let mut left = if is_head { 0 } else { content_length(&head) };
        if one_request {
            client.write_all(&head[..head.len() - 2])?;
            client.write_all(b"Connection: close\r\n\r\n")?;
        } else {
            client.write_all(&head)?;
        }
        let mut tmp = vec![0u8; 65536];
        let take = left.min(ubuf.len());
        client.write_all(&ubuf[..take])?;
        ubuf.drain(..take);
        left -= take;
        while left > 0 {
            let n = super::read_retry(up, &mut tmp)?;
            if n == 0 {
                return Ok(());
            }
            let k = n.min(left);
            client.write_all(&tmp[..k])?;
            left -= k;
        }
        client.flush()?;
        if one_request {
            break;
        }
    }
    Ok(())
}
