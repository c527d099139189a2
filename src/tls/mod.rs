//! TLS settings built once (rustls with aws-lc-rs): the client side for
//! `https://` replicas and the listener's acceptor. The connections
//! themselves are our own stream over rustls ([`stream`]), whose buffers
//! come from each core's pool ([`buffers`]).
//!
//! Upstream certificates are checked against the system's roots plus an
//! optional `ca_file` (PEM) for private CAs, with SNI set from the endpoint
//! host. `insecure_skip_verify` turns verification off for that replica
//! (logged at WARN at start). A handshake or certificate failure is a replica
//! failure with reason `tls`. Nothing here knows the configuration types.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

pub mod buffers;
pub mod record;
pub mod stream;

pub use stream::{ClientTls, ServerTls, TlsAcceptor, TlsConnector};

/// The crypto provider (aws-lc-rs; ring with the `tls-ring` feature, for
/// the A/B of issue #28), its cipher suites ordered AES-128-GCM first
/// ([`prefer_aes128`]).
fn provider() -> Arc<CryptoProvider> {
    #[cfg(not(feature = "tls-ring"))]
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    #[cfg(feature = "tls-ring")]
    let mut p = rustls::crypto::ring::default_provider();
    prefer_aes128(&mut p.cipher_suites);
    Arc::new(p)
}

/// Puts the AES-128-GCM suites (SHA-256) ahead of AES-256-GCM (SHA-384),
/// version order kept; a server picks the first of its own list the client
/// offers. Measured (issue #28): with AES-256-GCM-SHA384 first, SHA-512's
/// software block function alone was 9% of a resumed handshake's CPU on
/// this AMD machine (ring has no SHA-512 instructions to use there), and
/// AES-256 takes 14 rounds a block against 10. AES-128-GCM is TLS 1.3's
/// mandatory suite.
fn prefer_aes128(suites: &mut [rustls::SupportedCipherSuite]) {
    let rank = |s: &rustls::SupportedCipherSuite| {
        let name = format!("{:?}", s.suite());
        let v13 = matches!(s, rustls::SupportedCipherSuite::Tls13(_));
        (
            !v13,
            !name.contains("AES_128_GCM"),
            !name.contains("AES_256_GCM"),
        )
    };
    suites.sort_by_key(rank);
}

/// The system's trusted roots, loaded once per process.
fn system_roots() -> &'static Vec<CertificateDer<'static>> {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| rustls_native_certs::load_native_certs().certs)
}

/// Reads every certificate of a PEM file (for `ca_file`).
pub fn load_pem_certs(path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {path:?}: {e}"))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{path:?} is not valid PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{path:?} holds no certificate"));
    }
    Ok(certs)
}

/// Builds a TLS client: the system's roots plus `ca_file`, or no
/// certificate verification at all when `insecure`.
pub fn connector(ca_file: Option<&str>, insecure: bool) -> Result<TlsConnector, String> {
    client_config(ca_file, insecure).map(TlsConnector::from)
}

/// A client that trusts exactly the leaf certificate of `cert_file` (the
/// proxy's own listener, for its pre-warming fetches): any name, no CA.
pub fn pinned_config(cert_file: &str) -> Result<Arc<ClientConfig>, String> {
    let leaf = load_pem_certs(cert_file)?
        .into_iter()
        .next()
        .ok_or_else(|| format!("{cert_file:?} holds no certificate"))?;
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoVerify(provider(), Some(leaf))))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The client settings behind [`connector`] (also for blocking clients).
pub fn client_config(ca_file: Option<&str>, insecure: bool) -> Result<Arc<ClientConfig>, String> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?;
    let config = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider(), None)))
            .with_no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        let (_added, _ignored) = roots.add_parsable_certificates(system_roots().iter().cloned());
        if let Some(path) = ca_file {
            for cert in load_pem_certs(path)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("ca_file {path:?}: unusable certificate: {e}"))?;
            }
        }
        if roots.is_empty() {
            return Err(
                "no trusted CA certificates: the system has none and no ca_file is set".into(),
            );
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    Ok(Arc::new(config))
}

/// The name the certificate must carry (SNI), from the endpoint host.
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(bare.to_string())
        .map_err(|e| format!("{host:?} is not a valid TLS server name: {e}"))
}

/// `insecure_skip_verify`: accepts any certificate (or, with a pinned
/// leaf, exactly that one); still checks handshake signatures.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>, Option<CertificateDer<'static>>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.1 {
            Some(pinned) if pinned.as_ref() != end_entity.as_ref() => {
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::ApplicationVerificationFailure,
                ))
            }
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// TLS 1.2 sessions kept for resumption (about 200 bytes each).
const TLS12_SESSIONS: usize = 16_384;

/// Builds the listener's TLS acceptor from PEM files (`server.tls`).
pub fn acceptor(cert_file: &str, key_file: &str) -> Result<TlsAcceptor, String> {
    let certs = load_pem_certs(cert_file)?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| format!("cannot read a private key from {key_file:?}: {e}"))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            format!("{cert_file:?} and {key_file:?} do not make a usable certificate: {e}")
        })?;
    // Our suite order, not the client's (OpenSSL clients put AES-256 and
    // SHA-384 first): see `prefer_aes128`.
    config.ignore_client_order = true;
    // Resumption. This one config is shared by every worker, so a ticket
    // or a cached session from one worker resumes on any other: TLS 1.3
    // tickets from rustls's ticketer (its keys rotate every 6 hours, the
    // previous key still accepted), TLS 1.2 sessions in a bounded cache.
    #[cfg(not(feature = "tls-ring"))]
    let tickets = rustls::crypto::aws_lc_rs::Ticketer::new();
    #[cfg(feature = "tls-ring")]
    let tickets = rustls::crypto::ring::Ticketer::new();
    let tickets = tickets.map_err(|e| format!("TLS tickets: {e}"))?;
    config.ticketer = Arc::new(CountResumptions(tickets));
    config.session_storage = Arc::new(CountResumptions(
        rustls::server::ServerSessionMemoryCache::new(TLS12_SESSIONS),
    ));
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Client handshakes that resumed a session (a TLS 1.3 ticket or a TLS 1.2
/// session this process issued), for `yatagarasu_tls_resumed_handshakes_total`.
/// Process-wide: the listener's one config serves every core, and counting
/// here costs one atomic add per resumed handshake, never per request.
pub fn resumed_handshakes() -> u64 {
    RESUMED.load(Ordering::Relaxed)
}

static RESUMED: AtomicU64 = AtomicU64::new(0);

/// Wraps the ticketer and the TLS 1.2 session cache: a ticket that
/// decrypts, or a session found, is a handshake that resumes.
#[derive(Debug)]
struct CountResumptions<T: ?Sized>(Arc<T>);

impl<T: rustls::server::ProducesTickets + ?Sized> rustls::server::ProducesTickets
    for CountResumptions<T>
{
    fn enabled(&self) -> bool {
        self.0.enabled()
    }

    fn lifetime(&self) -> u32 {
        self.0.lifetime()
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.0.encrypt(plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let plain = self.0.decrypt(cipher);
        if plain.is_some() {
            RESUMED.fetch_add(1, Ordering::Relaxed);
        }
        plain
    }
}

impl<T: rustls::server::StoresServerSessions + ?Sized> rustls::server::StoresServerSessions
    for CountResumptions<T>
{
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.0.put(key, value)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        let found = self.0.get(key);
        if found.is_some() {
            RESUMED.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        let found = self.0.take(key);
        if found.is_some() {
            RESUMED.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    fn can_cache(&self) -> bool {
        self.0.can_cache()
    }
}
