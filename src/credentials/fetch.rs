//! The credentials thread: fetches and refreshes every non-static source and
//! publishes the keys (see the module above). The AWS SDK's providers are
//! tokio-based, so they run here, on one current-thread tokio runtime, and
//! never on a core. Key files are re-read when a 1 s stat poll sees them
//! change.
//!
//! Each source gets one provider, built on first use and kept (the SDK's
//! providers hold their own state, such as the IMDSv2 session token). Fetches
//! of different sources run concurrently; a slow metadata service delays
//! only its own replicas.

use super::schedule;
use super::{Credentials, Hub, KeyCell};
use crate::config::{CredentialBase, CredentialSource, Level, ProviderKind};
use crate::log;
use aws_config::default_provider::credentials::DefaultCredentialsChain;
use aws_config::ecs::EcsCredentialsProvider;
use aws_config::environment::EnvironmentVariableCredentialsProvider;
use aws_config::imds::credentials::ImdsCredentialsProvider;
use aws_config::profile::ProfileFileCredentialsProvider;
use aws_config::provider_config::ProviderConfig;
use aws_config::sts::AssumeRoleProvider;
use aws_config::web_identity_token::WebIdentityTokenCredentialsProvider;
use aws_config::{BehaviorVersion, Region};
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_smithy_http_client::tls;
use aws_smithy_runtime_api::client::http::SharedHttpClient;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Longest a provider may take for one fetch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);
/// The thread's tick: how soon a request's call for a refresh is seen.
const TICK: Duration = Duration::from_millis(20);

/// Runs until `stop`: call on a thread of its own.
pub fn run(hub: Arc<Hub>, stop: &AtomicBool) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    match rt {
        Ok(rt) => rt.block_on(serve(hub, stop)),
        Err(e) => log!(
            Level::Error,
            "credentials thread could not start its runtime",
            error = e
        ),
    }
}

/// The fetcher's own state for one source.
struct Entry {
    /// Names the entry in fetch results (indices move as sources go).
    id: u64,
    cell: std::sync::Weak<KeyCell>,
    provider: Option<SharedCredentialsProvider>,
    /// When the next scheduled fetch is due.
    next: Instant,
    /// Start of the last fetch a request asked for.
    last_on_demand: Option<Instant>,
    failures: u32,
    in_flight: bool,
    /// Key files: what they looked like when last read.
    stamp: Option<Vec<FileStamp>>,
    last_poll: Option<Instant>,
}

type FetchResult = (u64, Result<Credentials, String>);

async fn serve(hub: Arc<Hub>, stop: &AtomicBool) {
    let http = http_client();
    let mut entries: Vec<Entry> = Vec::new();
    let mut next_id = 0u64;
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<FetchResult>();
    while !stop.load(Ordering::Relaxed) {
        let live = hub.live();
        entries.retain(|e| {
            live.iter()
                .any(|c| std::ptr::eq(e.cell.as_ptr(), Arc::as_ptr(c)))
        });
        for cell in &live {
            if cell.source.is_static() {
                continue;
            }
            if !entries
                .iter()
                .any(|e| std::ptr::eq(e.cell.as_ptr(), Arc::as_ptr(cell)))
            {
                next_id += 1;
                entries.push(Entry {
                    id: next_id,
                    cell: Arc::downgrade(cell),
                    provider: None,
                    next: Instant::now(),
                    last_on_demand: None,
                    failures: 0,
                    in_flight: false,
                    stamp: None,
                    last_poll: None,
                });
            }
        }
        drop(live);
        while let Ok((id, result)) = done_rx.try_recv() {
            if let Some(e) = entries.iter_mut().find(|e| e.id == id) {
                settle(e, result);
            }
        }
        for e in entries.iter_mut() {
            let Some(cell) = e.cell.upgrade() else {
                continue;
            };
            if e.in_flight {
                continue;
            }
            if let CredentialBase::Files { .. } = cell.source.base {
                files_changed(&cell.source, e);
            }
            let now = Instant::now();
            let wanted = cell.take_wanted();
            let on_demand = wanted && schedule::on_demand_fetch(e.last_on_demand.map(|t| now - t));
            if now < e.next && !on_demand {
                if wanted {
                    // Another request's fetch ran moments ago: its keys
                    // are the answer.
                    cell.fetch_finished();
                }
                continue;
            }
            if on_demand {
                e.last_on_demand = Some(now);
            }
            e.in_flight = true;
            let provider = match &e.provider {
                Some(p) => p.clone(),
                None => {
                    let p = build_provider(&cell.source, &cell.region, &http).await;
                    e.provider = Some(p.clone());
                    p
                }
            };
            let (tx, id) = (done_tx.clone(), e.id);
            tokio::spawn(async move {
                let result = fetch(&provider).await;
                let _ = tx.send((id, result));
            });
        }
        tokio::time::sleep(TICK).await;
    }
}

/// Records a fetch's outcome: publish, or keep the current keys and back off.
fn settle(e: &mut Entry, result: Result<Credentials, String>) {
    e.in_flight = false;
    let Some(cell) = e.cell.upgrade() else {
        return;
    };
    let now = SystemTime::now();
    match result {
        Ok(creds) => {
            e.failures = 0;
            let wait = schedule::after_success(now, creds.expires, jitter());
            e.next = Instant::now() + wait;
            cell.ok.fetch_add(1, Ordering::Relaxed);
            log!(
                Level::Info,
                "Credentials refreshed",
                source = cell.source.describe(),
                expires_in = creds.expires.map_or("never".to_string(), |x| {
                    format!("{}s", x.duration_since(now).unwrap_or_default().as_secs())
                }),
                next_refresh_in = format_args!("{}s", wait.as_secs()),
            );
            cell.publish(creds);
        }
        Err(error) => {
            e.failures += 1;
            let wait = schedule::after_failure(e.failures);
            e.next = Instant::now() + wait;
            cell.failed.fetch_add(1, Ordering::Relaxed);
            cell.fetch_failed();
            let held = match cell.current() {
                Some(c) if c.expired(now) => "expired",
                Some(_) => "kept until they expire",
                None => "none yet",
            };
            log!(
                Level::Warn,
                "Credentials refresh failed",
                source = cell.source.describe(),
                error = error,
                current_keys = held,
                retry_in = format_args!("{}s", wait.as_secs()),
            );
        }
    }
    cell.fetch_finished();
}

/// Key files are stat-polled; a change makes a fetch (re-read) due now.
fn files_changed(source: &CredentialSource, e: &mut Entry) {
    let CredentialBase::Files {
        access_key_file,
        secret_key_file,
    } = &source.base
    else {
        return;
    };
    if e.last_poll
        .is_some_and(|t| t.elapsed() < schedule::FILE_POLL)
    {
        return;
    }
    e.last_poll = Some(Instant::now());
    let now = vec![
        FileStamp::of(access_key_file),
        FileStamp::of(secret_key_file),
    ];
    if e.stamp.as_ref() != Some(&now) {
        if e.stamp.is_some() {
            log!(
                Level::Info,
                "Key files changed; re-reading",
                access_key_file = access_key_file,
                secret_key_file = secret_key_file
            );
            // An assumed role's session is rebuilt on the new keys.
            e.provider = None;
        }
        e.stamp = Some(now);
        e.next = Instant::now();
    }
}

/// What a stat poll compares: a Kubernetes secret update swaps a symlink
/// (new inode), an editor may keep the inode and change size or time.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp(Option<(u64, u64, i64, i64)>);

impl FileStamp {
    fn of(path: &str) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp(
            std::fs::metadata(path)
                .ok()
                .map(|m| (m.ino(), m.len(), m.mtime(), m.mtime_nsec())),
        )
    }
}

async fn fetch(provider: &SharedCredentialsProvider) -> Result<Credentials, String> {
    let got = tokio::time::timeout(FETCH_TIMEOUT, provider.provide_credentials())
        .await
        .map_err(|_| format!("no answer within {}s", FETCH_TIMEOUT.as_secs()))?
        .map_err(|e| error_chain(&e))?;
    let printable = |v: &str| !v.is_empty() && v.bytes().all(|b| b.is_ascii_graphic());
    if !printable(got.access_key_id())
        || !printable(got.secret_access_key())
        || got.session_token().is_some_and(|t| !printable(t))
    {
        return Err("the provider returned keys with spaces or control characters".into());
    }
    // The SDK's IMDS provider answers a failed fetch with the last keys it
    // got ("static stability"): keys already expired are a failed fetch.
    if got.expiry().is_some_and(|e| e <= SystemTime::now()) {
        return Err("the provider returned credentials that have already expired".into());
    }
    Ok(Credentials {
        access_key: got.access_key_id().to_string(),
        secret_key: got.secret_access_key().to_string(),
        session_token: got.session_token().map(str::to_string),
        expires: got.expiry(),
    })
}

/// An error and its sources, one line (the SDK nests the useful part).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = s.source();
    }
    out
}

/// The SDK's HTTPS client on rustls with ring. Not its aws-lc mode, though
/// the proxy's own TLS is on aws-lc-rs: that mode turns on rustls's
/// `prefer-post-quantum` feature, and Cargo features are one per build, so
/// every handshake of the proxy would lead with ML-KEM (larger, dearer)
/// instead of X25519.
fn http_client() -> SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https()
}

/// The provider for `source`: the SDK's, wrapped in AssumeRole when asked.
async fn build_provider(
    source: &CredentialSource,
    region: &str,
    http: &SharedHttpClient,
) -> SharedCredentialsProvider {
    let region = Region::new(region.to_string());
    let conf = ProviderConfig::without_region()
        .with_http_client(http.clone())
        .with_region(Some(region.clone()));
    let base = match &source.base {
        CredentialBase::Static {
            access_key,
            secret_key,
        } => SharedCredentialsProvider::new(aws_credential_types::Credentials::new(
            access_key,
            secret_key,
            None,
            None,
            "config file",
        )),
        CredentialBase::Files {
            access_key_file,
            secret_key_file,
        } => SharedCredentialsProvider::new(KeyFiles {
            access_key_file: access_key_file.clone(),
            secret_key_file: secret_key_file.clone(),
        }),
        CredentialBase::Provider(kind) => match kind {
            ProviderKind::DefaultChain => SharedCredentialsProvider::new(
                DefaultCredentialsChain::builder()
                    .configure(conf.clone())
                    .build()
                    .await,
            ),
            ProviderKind::Environment => {
                SharedCredentialsProvider::new(EnvironmentVariableCredentialsProvider::new())
            }
            ProviderKind::Profile(name) => {
                let mut b = ProfileFileCredentialsProvider::builder().configure(&conf);
                if let Some(name) = name {
                    b = b.profile_name(name);
                }
                SharedCredentialsProvider::new(b.build())
            }
            ProviderKind::WebIdentity => SharedCredentialsProvider::new(
                WebIdentityTokenCredentialsProvider::builder()
                    .configure(&conf)
                    .build(),
            ),
            ProviderKind::Ecs => SharedCredentialsProvider::new(
                EcsCredentialsProvider::builder().configure(&conf).build(),
            ),
            ProviderKind::Imds => SharedCredentialsProvider::new(
                ImdsCredentialsProvider::builder().configure(&conf).build(),
            ),
        },
    };
    let Some(role) = &source.assume_role else {
        return base;
    };
    // The SDK's own config loading, so AWS_ENDPOINT_URL_STS and the profile's
    // STS settings apply as they would to any SDK client.
    let sdk = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http.clone())
        .region(region)
        .credentials_provider(base)
        .load()
        .await;
    let mut b = AssumeRoleProvider::builder(role.role_arn.clone())
        .session_name(role.session_name.clone())
        .configure(&sdk);
    if let Some(id) = &role.external_id {
        b = b.external_id(id.clone());
    }
    SharedCredentialsProvider::new(b.build().await)
}

/// Key files as a provider: read at each fetch (whitespace trimmed).
#[derive(Debug)]
struct KeyFiles {
    access_key_file: String,
    secret_key_file: String,
}

impl ProvideCredentials for KeyFiles {
    fn provide_credentials<'a>(
        &'a self,
    ) -> aws_credential_types::provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        let read = |path: &str| -> Result<String, String> {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
            let value = text.trim();
            if value.is_empty() {
                return Err(format!("{path} is empty"));
            }
            Ok(value.to_string())
        };
        let result = read(&self.access_key_file).and_then(|ak| {
            read(&self.secret_key_file)
                .map(|sk| aws_credential_types::Credentials::new(ak, sk, None, None, "key files"))
        });
        aws_credential_types::provider::future::ProvideCredentials::ready(
            result.map_err(|e| {
                aws_credential_types::provider::error::CredentialsError::not_loaded(e)
            }),
        )
    }
}

/// Uniform in `[0, 1)`, from the clock's nanoseconds (spreading refreshes
/// needs no better randomness).
fn jitter() -> f64 {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    f64::from(nanos % 1_000_000) / 1_000_000.0
}
