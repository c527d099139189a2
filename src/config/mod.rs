//! Configuration: load YAML, expand `${VAR}`, check everything, resolve defaults.
//!
//! [`load`] returns either a fully resolved [`Config`] or the complete list of
//! problems, each prefixed with the YAML path it concerns (for example
//! `buckets[1].s3.replicas[0].endpoint: ...`). Nothing downstream re-validates.

mod compat;
pub mod expand;
mod fd;
mod load;
pub mod schema;
mod validate;

pub use fd::{default_max_connections, default_max_upstream_connections, raise_fd_limit, FdLimit};
pub use load::{load, no_effect_warnings, parse};

use schema::*;
use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

/// Default config location, as in the tutorial's container.
pub const DEFAULT_PATH: &str = "/etc/yatagarasu/config.yaml";
/// At most this many replicas per bucket (keeps per-request plans allocation-free).
pub const MAX_REPLICAS: usize = 32;

#[derive(Debug, Clone)]
/// The whole resolved configuration.
pub struct Config {
    /// `server:`.
    pub server: Server,
    /// `buckets:`, in file order.
    pub buckets: Vec<Bucket>,
    /// `metrics:`.
    pub metrics: Metrics,
    /// `logging:`.
    pub logging: Logging,
    /// `cache:`.
    pub cache: CacheSettings,
    /// `admin.token`: bearer token of the admin endpoints (none: they are off).
    pub admin_token: Option<String>,
    /// `admin.main_port`: the admin API answers on the main listener too
    /// (it always does on the metrics listener).
    pub admin_main_port: bool,
    /// `jwt:` when enabled: keys, token sources and claim rules.
    pub jwt: Option<std::sync::Arc<crate::access::jwt::JwtSettings>>,
    /// `audit_log`, when enabled.
    pub audit: Option<AuditSettings>,
    /// `observability.tracing`, when enabled.
    pub tracing: Option<Tracing>,
    /// The image transform pool, when some bucket uses images.
    pub image_pool: Option<ImagePool>,
    /// Accepted, but worth saying: logged at WARN at start and on reload,
    /// and printed by `--check` (`YAML path: message`).
    pub warnings: Vec<String>,
}

/// `image_optimization.max_concurrent` / `max_queue`: the process's
/// transform pool (see `crate::images::Pool`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImagePool {
    /// Transforms at once (pool threads).
    pub threads: usize,
    /// Transforms waiting; beyond, 503.
    pub queue: usize,
}

/// `observability.tracing`, resolved (see `crate::trace`).
#[derive(Debug, Clone, PartialEq)]
pub struct Tracing {
    /// Where spans are POSTed (OTLP/HTTP, protobuf): `.../v1/traces`.
    pub endpoint: String,
    /// `service.name` of the resource.
    pub service_name: String,
    /// Share of new traces recorded (0 to 1); a client's `traceparent`
    /// decides for the traces it continues.
    pub ratio: f64,
    /// Send `traceparent` on the requests to the replicas.
    pub propagate: bool,
}

/// `audit_log`, resolved (see `crate::audit`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSettings {
    /// Which decisions are recorded.
    pub level: AuditLevel,
    /// `audit_log.file`, when `outputs` lists `file`.
    pub file: Option<AuditFile>,
    /// `audit_log.syslog`, when `outputs` lists `syslog`.
    pub syslog: Option<AuditSyslog>,
}

/// `audit_log.log_level`: which access decisions get a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum AuditLevel {
    /// `debug` / `info`: every decision.
    All,
    /// `warn`: refusals (401, 403, 429, policy denials) and errors.
    Refusals,
    /// `error`: answers of 5xx only.
    Errors,
}

/// How an audit file is rotated besides its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotation {
    /// By size only.
    Size,
    /// By size, and when the UTC day changes.
    Daily,
    /// By size, and when the UTC hour changes.
    Hourly,
}

/// `audit_log.file`, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditFile {
    /// The file written.
    pub path: String,
    /// Rotated when a record would take it past this (bytes).
    pub max_bytes: u64,
    /// Rotated files kept (`path.1` the newest).
    pub max_backups: u32,
    /// Rotation besides the size.
    pub rotation: Rotation,
    /// Bytes buffered before a write (0: each batch written at once).
    pub buffer_bytes: usize,
}

/// `audit_log.syslog`, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSyslog {
    /// `host:port` of the receiver.
    pub address: String,
    /// TCP (RFC 6587 octet counting) rather than UDP.
    pub tcp: bool,
    /// The facility's number (RFC 5424: local0 is 16).
    pub facility: u8,
}

/// `cache:`, resolved (the memory tier; see `crate::cache`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSettings {
    /// `cache.enabled`: buckets cache unless they opt out.
    pub enabled: bool,
    /// `cache.memory.max_cache_size_mb`, in bytes.
    pub memory_bytes: u64,
    /// `cache.memory.max_item_size_mb`, in bytes: larger objects are not stored.
    pub max_item_bytes: u64,
    /// `cache.memory.default_ttl_seconds`: freshness when the origin says nothing.
    pub default_ttl: Duration,
    /// `cache.stale_if_error_seconds`: how long past its freshness a copy may
    /// answer when no replica can (0: never).
    pub stale_if_error: Duration,
    /// `cache.disk`: the disk tier, when enabled.
    pub disk: Option<DiskCache>,
    /// `cache.slice_size_mb`, in bytes: range requests are served from
    /// slices of this size (`None`: ranges go upstream as they are).
    pub slice_bytes: Option<u64>,
    /// `cache.redis`: the shared Redis tier, when enabled.
    pub redis: Option<RedisCache>,
    /// `cache.warming`: pre-warming tasks' pace.
    pub warming: Warming,
    /// The tiers below memory in the order a memory miss asks them
    /// (`cache.cache_layers`' order; disk then Redis when not listed).
    pub lower_layers: Vec<Layer>,
}

/// A cache tier below memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    /// `cache.disk`.
    Disk,
    /// `cache.redis`.
    Redis,
}

/// `cache.warming`: objects fetched at once and per second by a
/// pre-warming task (`crate::prewarm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Warming {
    /// Fetches under way at once.
    pub concurrency: usize,
    /// Fetches started per second.
    pub rate_limit: u32,
}

impl Default for Warming {
    /// The other system's defaults.
    fn default() -> Warming {
        Warming {
            concurrency: 10,
            rate_limit: 100,
        }
    }
}

/// `cache.redis`, when enabled (see `cache::redis`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisCache {
    /// `host:port` from `redis_url` (empty: none given, with `sentinel`).
    pub address: String,
    /// `redis_password`, or the URL's password (`AUTH`).
    pub password: Option<String>,
    /// The URL's user name, when it has one (`AUTH user password`).
    pub user: Option<String>,
    /// `redis_db`, or the URL's path (`SELECT`).
    pub db: u32,
    /// `redis_key_prefix`: every key this proxy writes begins with it.
    pub prefix: String,
    /// `redis_ttl_seconds`: how long an entry lives (capped below).
    pub ttl: Duration,
    /// `redis_max_ttl_seconds`: no entry lives longer.
    pub max_ttl: Duration,
    /// `connection_timeout_ms`.
    pub connect_timeout: Duration,
    /// `operation_timeout_ms`: a lookup slower than this is a miss.
    pub operation_timeout: Duration,
    /// `max_pool_size`: connections for the process (shared out per core).
    pub max_connections: usize,
    /// `chunk_size_kb`, in bytes: larger objects are stored as chunks of
    /// this size.
    pub chunk_bytes: usize,
    /// `rediss://`: TLS to Redis, verified against the system's roots and
    /// `ca_file`.
    pub tls: Option<RedisTls>,
    /// `sentinel`: the primary is the one these Sentinels name (then
    /// `address` is only asked while none of them answers).
    pub sentinel: Option<RedisSentinel>,
    /// `cluster.nodes`: a Cluster's nodes to read the slot map from when
    /// `address` does not answer (`address` is the first of them when
    /// `redis_url` is left out).
    pub seeds: Vec<String>,
}

impl RedisCache {
    /// The server to name in a log line: `redis_url`'s, or the Sentinels'.
    pub fn shown(&self) -> String {
        match (&self.sentinel, self.address.is_empty()) {
            (Some(s), true) => format!("the primary of {:?} named by Sentinel", s.master),
            _ => self.address.clone(),
        }
    }
}

/// `cache.redis.sentinel`: Redis Sentinel finds the primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisSentinel {
    /// `master_name`: the name the Sentinels monitor the primary under.
    pub master: String,
    /// `nodes`: the Sentinels' `host:port`, asked in order.
    pub nodes: Vec<String>,
}

/// TLS to Redis (`rediss://`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisTls {
    /// The name the server's certificate must carry (the URL's host).
    pub server_name: String,
    /// `cache.redis.ca_file`: extra trusted CA certificates (PEM).
    pub ca_file: Option<String>,
}

/// `cache.disk`, when enabled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskCache {
    /// `cache_dir`: where entry files live.
    pub dir: String,
    /// `max_disk_cache_size_mb`, in bytes.
    pub max_bytes: u64,
    /// `sendfile`: the smallest body a disk hit is sent from its file for
    /// (where `server.zero_copy` sends it by reference at all); `None`
    /// (`enabled: false`): never, every disk hit is read and copied.
    pub send_from_file: Option<u64>,
}

impl DiskCache {
    /// The other system's default `sendfile.threshold_bytes`.
    pub const SENDFILE_THRESHOLD_BYTES: u64 = 64 * 1024;

    /// Whether a disk hit whose body is `body_bytes` long may be sent from
    /// its file (`server.zero_copy` decides too).
    pub fn sends_from_file(&self, body_bytes: u64) -> bool {
        self.send_from_file.is_some_and(|min| body_bytes >= min)
    }
}

/// A rate: requests a second, and how many may come at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Sustained requests per second (process-wide).
    pub per_second: f64,
    /// Requests admitted at once (process-wide).
    pub burst: f64,
    /// `scope: fleet`: one allowance for every instance sharing the Redis
    /// tier (else each instance has its own).
    pub fleet: bool,
}

/// `server.rate_limit`, resolved (empty when not enabled).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RateLimits {
    /// `global`: every client request together.
    pub global: Option<Rate>,
    /// `per_ip`: each client address.
    pub per_ip: Option<Rate>,
}

/// `buckets[].cache`, resolved against `cache:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketCache {
    /// This bucket's objects are cached.
    pub enabled: bool,
    /// Freshness when the origin says nothing (`ttl_seconds`, else the default).
    pub ttl: Duration,
    /// Largest object stored (`max_item_size_mb`, else the default), in bytes.
    pub max_item_bytes: u64,
}

#[derive(Debug, Clone)]
/// `server:`, resolved.
pub struct Server {
    /// `server.address`: the listen address.
    pub address: SocketAddr,
    /// `server.workers`: one pinned runtime per worker.
    pub workers: usize,
    /// `server.idle_timeout_seconds`: idle keep-alive timeout; also bounds client writes.
    pub idle_timeout: Duration,
    /// A request head must be complete this long after its first byte.
    pub request_head_timeout: Duration,
    /// Open client connections allowed per process (split evenly across
    /// workers); more are refused at accept.
    pub max_connections: usize,
    /// Upstream connections allowed per process (all replicas, split evenly
    /// across workers); a request needing one beyond waits for one.
    pub max_upstream_connections: usize,
    /// `server.shutdown_timeout_seconds`: drain bound on SIGTERM.
    pub shutdown_timeout: Duration,
    /// `server.zero_copy`.
    pub zero_copy: ZeroCopy,
    /// `server.rate_limit` when enabled: client request limits.
    pub rate_limit: RateLimits,
    /// `server.trusted_proxies`: peers whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Vec<crate::access::ip::Cidr>,
    /// `server.tls`: serve HTTPS with this certificate chain and key (PEM).
    pub tls: Option<ListenerTls>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
/// `server.tls`: the listener's certificate chain and key (PEM files).
pub struct ListenerTls {
    /// Certificate chain (PEM).
    pub cert_file: String,
    /// Private key (PEM).
    pub key_file: String,
}

/// `server.zero_copy`: how Content-Length bodies move from a plain-TCP
/// upstream to a plain-TCP client, and whether large cached bodies are sent
/// to one by reference (vmsplice(2), see `http::zerocopy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ZeroCopy {
    /// splice(2) for bodies of at least [`ZeroCopy::AUTO_MIN_BYTES`], copy below.
    #[default]
    Auto,
    /// splice(2) for every such body.
    #[serde(alias = "true")]
    On,
    /// Always copy through a user-space buffer.
    #[serde(alias = "false")]
    Off,
}

impl ZeroCopy {
    /// Smallest relayed body `auto` splices (see loadtest/results/performance.md).
    pub const AUTO_MIN_BYTES: u64 = 1024 * 1024;

    /// Smallest cached body `auto` sends by reference (from
    /// loadtest/results/cache-hits.md: at 64 KiB it already saves CPU).
    pub const AUTO_MIN_STORED_BYTES: u64 = 64 * 1024;

    /// Whether a Content-Length body of `body_bytes` is spliced.
    pub fn splice(self, body_bytes: u64) -> bool {
        self.applies(body_bytes, Self::AUTO_MIN_BYTES)
    }

    /// Whether a cached body of `body_bytes` (one that may be: in a mapping
    /// of its own) is sent by reference.
    pub fn send_stored(self, body_bytes: u64) -> bool {
        self.applies(body_bytes, Self::AUTO_MIN_STORED_BYTES)
    }

    fn applies(self, body_bytes: u64, auto_min: u64) -> bool {
        match self {
            ZeroCopy::On => true,
            ZeroCopy::Off => false,
            ZeroCopy::Auto => body_bytes >= auto_min,
        }
    }
}

#[derive(Debug, Clone)]
/// `metrics:`, resolved.
pub struct Metrics {
    /// Serve the Prometheus endpoint.
    pub enabled: bool,
    /// Where it listens.
    pub address: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
/// Log level, most severe first.
pub enum Level {
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warn,
    /// Access log and state changes (the default).
    Info,
    /// Everything, including library events.
    Debug,
}

impl Level {
    /// Parses `error|warn|warning|info|debug|trace` (any case).
    pub fn parse(s: &str) -> Option<Level> {
        match s.to_ascii_lowercase().as_str() {
            "error" => Some(Level::Error),
            "warn" | "warning" => Some(Level::Warn),
            "info" => Some(Level::Info),
            "debug" | "trace" => Some(Level::Debug),
            _ => None,
        }
    }

    /// The level as it appears in a log line.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Error => "ERROR",
            Level::Warn => "WARN",
            Level::Info => "INFO",
            Level::Debug => "DEBUG",
        }
    }
}

/// `logging.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One `key=value` line per event (`pretty`, the other system's
    /// human-readable format, is this one).
    #[serde(alias = "pretty")]
    Text,
    /// One JSON object per event.
    Json,
}

#[derive(Debug, Clone)]
/// `logging:`, resolved.
pub struct Logging {
    /// `logging.level` (`RUST_LOG` overrides it).
    pub level: Level,
    /// `logging.format`.
    pub format: LogFormat,
}

#[derive(Debug, Clone)]
/// One bucket: a path prefix served from replicas of one S3 bucket.
pub struct Bucket {
    /// `buckets[].name`: used in logs and metric labels.
    pub name: String,
    /// Normalised: starts with `/`, no trailing `/` (the root prefix is `""`).
    pub path_prefix: String,
    /// Its replicas, in config order (the plan orders them per request).
    pub replicas: Vec<Replica>,
    /// `s3.circuit_breaker`, shared by the bucket's replicas.
    pub breaker: BreakerSettings,
    /// `s3.health_check` (or the top-level default).
    pub health: HealthSettings,
    /// `cache` (or the top-level settings).
    pub cache: BucketCache,
    /// `s3.rate_limit`: requests sent upstream for this bucket (cache hits
    /// do not count).
    pub upstream_rate: Option<Rate>,
    /// `auth.enabled`: every request needs a valid JWT (see `jwt:`).
    pub auth: bool,
    /// `auth.jwt`: the bucket's own keys, token sources and claim rules
    /// (over the top-level `jwt`, which applies when this is `None`).
    pub jwt: Option<std::sync::Arc<crate::access::jwt::JwtSettings>>,
    /// `ip_filter.allowlist`: when not empty, only these ranges may read.
    pub allowlist: Vec<crate::access::ip::Cidr>,
    /// `ip_filter.blocklist`: these ranges may not read (wins over the allowlist).
    pub blocklist: Vec<crate::access::ip::Cidr>,
    /// Where the bucket's objects come from, as a fingerprint of its
    /// replicas' S3 locations ([`origin_fingerprint`]): part of every cache
    /// key, so an entry stored from another location is never served.
    pub origin: String,
    /// `authorization`: a policy decides who may read (see `authz`).
    pub authorization: Option<std::sync::Arc<Authorization>>,
    /// `image_optimization` (its own over the top level's), when
    /// transforms or a watermark apply to the bucket.
    pub images: Option<std::sync::Arc<crate::images::ImageSettings>>,
    /// `watermark`, when enabled.
    pub watermark: Option<std::sync::Arc<crate::images::watermark::Watermarks>>,
}

/// `buckets[].authorization`, resolved.
#[derive(Debug)]
pub struct Authorization {
    /// Who decides.
    pub engine: AuthzEngine,
    /// A decision service slower than this has failed (OPA, OpenFGA).
    pub timeout: Duration,
    /// How long a decision is remembered (per core; 0: not at all).
    pub cache_ttl: Duration,
    /// `fail_mode: open`: a failed decision allows (with a WARN); closed
    /// (the default) answers 503.
    pub fail_open: bool,
}

/// The policy engine of a bucket.
#[derive(Debug)]
pub enum AuthzEngine {
    /// Open Policy Agent's Data API: `POST {endpoint}{path}`.
    Opa {
        /// `opa_url`.
        endpoint: Endpoint,
        /// `/v1/data/` + `opa_policy_path`.
        path: String,
    },
    /// OpenFGA's Check API: `POST {endpoint}/stores/{store}/check`.
    OpenFga {
        /// `openfga_endpoint`.
        endpoint: Endpoint,
        /// `openfga_store_id`.
        store: String,
        /// `openfga_authorization_model_id`.
        model: Option<String>,
        /// `openfga_api_token` (sent as a bearer token).
        token: Option<String>,
        /// `openfga_user_claim`: a dotted path into the token's claims.
        user_claim: String,
        /// `openfga_relation` (`relation`): the relation checked.
        relation: String,
        /// `openfga_object_prefix` (`object_prefix`): objects are
        /// `<prefix><bucket>/<key>`; `None`: `bucket:`/`folder:`/`file:`.
        object_prefix: Option<String>,
    },
    /// Rego evaluated in this process (regorus), compiled at load.
    Rego {
        /// `policy_file`, for messages.
        file: String,
        /// The compiled policy and `data_file`'s data.
        engine: Box<regorus::Engine>,
        /// The rule evaluated: `data.` + `policy_path` with dots.
        rule: String,
    },
}

impl AuthzEngine {
    /// Which engine (its metric label: `opa`, `openfga` or `rego`).
    pub fn kind(&self) -> crate::metrics::outcome::Engine {
        use crate::metrics::outcome::Engine;
        match self {
            AuthzEngine::Opa { .. } => Engine::Opa,
            AuthzEngine::OpenFga { .. } => Engine::OpenFga,
            AuthzEngine::Rego { .. } => Engine::Rego,
        }
    }
}

/// A fingerprint of a replica set's S3 locations (scheme, endpoint
/// authority, bucket; order-independent): 16 hex digits of SHA-256.
pub fn origin_fingerprint(replicas: &[Replica]) -> String {
    use sha2::{Digest, Sha256};
    let mut places: Vec<String> = replicas
        .iter()
        .map(|r| {
            let scheme = if r.endpoint.tls { "https" } else { "http" };
            format!("{scheme}://{}/{}", r.endpoint.authority, r.bucket)
        })
        .collect();
    places.sort();
    places.dedup();
    let digest = Sha256::digest(places.join("\n").as_bytes());
    hex::encode(&digest[..8])
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
/// `s3.circuit_breaker`, resolved.
pub struct BreakerSettings {
    /// Consecutive failures (across cores) that open the breaker.
    pub failure_threshold: u32,
    /// Successful trials that close a half-open breaker.
    pub success_threshold: u32,
    /// How long an open breaker stays open before a trial.
    pub open_for: Duration,
    /// Trials let through at once while half-open.
    pub half_open_requests: u32,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            failure_threshold: DEFAULT_FAILURE_THRESHOLD,
            success_threshold: DEFAULT_SUCCESS_THRESHOLD,
            open_for: Duration::from_secs(DEFAULT_OPEN_SECS),
            half_open_requests: DEFAULT_HALF_OPEN_REQUESTS,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
/// `health_check`, resolved.
pub struct HealthSettings {
    /// Probe this bucket's replicas.
    pub enabled: bool,
    /// Time between probes.
    pub interval: Duration,
    /// Time a probe may take.
    pub timeout: Duration,
    /// Path probed with a signed HEAD, relative to the bucket.
    pub path: String,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            enabled: true,
            interval: Duration::from_secs(DEFAULT_HEALTH_INTERVAL_SECS),
            timeout: Duration::from_secs(DEFAULT_HEALTH_TIMEOUT_SECS),
            path: DEFAULT_HEALTH_PATH.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
/// Where a replica listens.
pub struct Endpoint {
    /// `https://`.
    pub tls: bool,
    /// Host name or IP (IPv6 in brackets).
    pub host: String,
    /// Port (the scheme's default when not given).
    pub port: u16,
    /// `Host` header value (port omitted when it is the scheme's default).
    pub authority: String,
}

/// Where a replica's signing keys come from: a base source, optionally
/// exchanged for an assumed role's session.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CredentialSource {
    /// Static keys, key files or an AWS SDK provider.
    pub base: CredentialBase,
    /// `credentials.assume_role`: STS AssumeRole on top of `base`.
    pub assume_role: Option<AssumeRole>,
}

/// The first source of keys.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum CredentialBase {
    /// `access_key` / `secret_key` in the file.
    Static {
        /// Access key id.
        access_key: String,
        /// Secret key.
        secret_key: String,
    },
    /// `access_key_file` / `secret_key_file`, re-read when they change.
    Files {
        /// Path of the file holding the access key id.
        access_key_file: String,
        /// Path of the file holding the secret key.
        secret_key_file: String,
    },
    /// `credentials.provider`: one of the AWS SDK's providers.
    Provider(ProviderKind),
}

/// `credentials.provider` values served by the AWS SDK (`aws-config`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ProviderKind {
    /// The SDK's default chain (environment, profile, web identity, ECS, IMDS).
    DefaultChain,
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`.
    Environment,
    /// A named profile of the shared config files (`None`: `AWS_PROFILE` or `default`).
    Profile(Option<String>),
    /// `AWS_WEB_IDENTITY_TOKEN_FILE` + `AWS_ROLE_ARN` (EKS IRSA).
    WebIdentity,
    /// ECS / EKS Pod Identity container credentials.
    Ecs,
    /// EC2 instance role via IMDSv2.
    Imds,
}

/// `credentials.assume_role`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AssumeRole {
    /// The role to assume.
    pub role_arn: String,
    /// `RoleSessionName`.
    pub session_name: String,
    /// `ExternalId`, when the role's trust policy asks for one.
    pub external_id: Option<String>,
}

impl CredentialSource {
    /// Plain keys from the config file: never refreshed.
    pub fn is_static(&self) -> bool {
        matches!(self.base, CredentialBase::Static { .. }) && self.assume_role.is_none()
    }

    /// A label for logs and `/ready` (never a key).
    pub fn describe(&self) -> String {
        let base = match &self.base {
            CredentialBase::Static { .. } => "static".to_string(),
            CredentialBase::Files { .. } => "key files".to_string(),
            CredentialBase::Provider(ProviderKind::DefaultChain) => "default_chain".into(),
            CredentialBase::Provider(ProviderKind::Environment) => "environment".into(),
            CredentialBase::Provider(ProviderKind::Profile(p)) => {
                format!("profile {}", p.as_deref().unwrap_or("(default)"))
            }
            CredentialBase::Provider(ProviderKind::WebIdentity) => "web_identity".into(),
            CredentialBase::Provider(ProviderKind::Ecs) => "ecs".into(),
            CredentialBase::Provider(ProviderKind::Imds) => "imds".into(),
        };
        match &self.assume_role {
            Some(r) => format!("{base} + assume_role {}", r.role_arn),
            None => base,
        }
    }
}

/// Keys are never printed, not even in debug output.
impl std::fmt::Debug for CredentialSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
/// One replica of a bucket, with everything inherited resolved.
pub struct Replica {
    /// `replicas[].name`: used in logs and metric labels.
    pub name: String,
    /// Where it listens.
    pub endpoint: Endpoint,
    /// The S3 bucket name.
    pub bucket: String,
    /// The region signed for.
    pub region: String,
    /// Where its signing keys come from.
    pub credentials: CredentialSource,
    /// Lower is tried first.
    pub priority: u32,
    /// Share of requests within its priority.
    pub weight: u32,
    /// Connect + response head timeout, and body stall timeout.
    pub timeout: Duration,
    /// Virtual-hosted style (`bucket.host/key`) rather than path style (`host/bucket/key`).
    pub virtual_hosted: bool,
    /// Extra trusted CA certificates (PEM) for an `https://` endpoint.
    pub ca_file: Option<String>,
    /// Accept any certificate from an `https://` endpoint (logged at WARN).
    pub insecure_skip_verify: bool,
}

impl Replica {
    /// The URI path of `encoded_key` on this replica.
    pub fn object_path(&self, encoded_key: &str, out: &mut String) {
        out.clear();
        if !self.virtual_hosted {
            out.push('/');
            out.push_str(&self.bucket);
        }
        out.push('/');
        out.push_str(encoded_key);
    }
}

/// `/data/` -> `/data`; `/` -> `""`. Rejects anything that cannot match a request path.
pub fn normalize_prefix(p: &str) -> Result<String, String> {
    if !p.starts_with('/') {
        return Err(format!("{p:?} must start with '/'"));
    }
    if p.contains("//") || p.contains(['?', '#', '%', ' ']) || p.chars().any(|c| c.is_control()) {
        return Err(format!(
            "{p:?} must be a plain path (no '//', '?', '#', '%' or spaces)"
        ));
    }
    if p.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(format!("{p:?} must not contain '.' or '..' segments"));
    }
    Ok(p.trim_end_matches('/').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "KEY" => Some("minioadmin".into()),
            "PORT" => Some("9191".into()),
            _ => None,
        }
    }

    const BASE: &str = r#"
server:
  address: "127.0.0.1:8080"
buckets:
  - name: "ha-data"
    path_prefix: "/data/"
    s3:
      bucket: "data-bucket"
      region: "us-east-1"
      access_key: "${KEY}"
      secret_key: "${KEY}"
      replicas:
        - name: "primary"
          endpoint: "http://127.0.0.1:9001"
          priority: 1
          timeout_seconds: 5
        - name: "backup"
          endpoint: "http://[::1]:9002/"
          priority: 2
      circuit_breaker:
        failure_threshold: 3
metrics:
  port: "${PORT}"
"#;

    #[test]
    fn the_other_system_s_names_configure_what_ours_do() {
        let theirs =
            BASE.replace(
                "  address: \"127.0.0.1:8080\"\n",
                "  address: \"127.0.0.1\"\n  port: 8080\n  threads: 3\n",
            )
            .replace("timeout_seconds: 5", "timeout: 5")
            .replace(
                "failure_threshold: 3",
                "failure_threshold: 3\n        half_open_max_requests: 4",
            ) + "logging:\n  format: pretty\n";
        let c = parse(&theirs, &env).unwrap();
        assert_eq!(c.server.address, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.server.workers, 3);
        assert_eq!(c.buckets[0].replicas[0].timeout, Duration::from_secs(5));
        assert_eq!(c.buckets[0].breaker.half_open_requests, 4);
        assert_eq!(c.logging.format, LogFormat::Text);
        let v6 = BASE.replace(
            "  address: \"127.0.0.1:8080\"\n",
            "  address: \"::1\"\n  port: 8081\n",
        );
        assert_eq!(
            parse(&v6, &env).unwrap().server.address,
            "[::1]:8081".parse().unwrap()
        );
    }

    #[test]
    fn parses_the_tutorial_shape() {
        let c = parse(BASE, &env).unwrap();
        let b = &c.buckets[0];
        assert_eq!(b.path_prefix, "/data");
        assert_eq!(b.replicas.len(), 2);
        assert!(
            b.replicas[0].credentials.base
                == CredentialBase::Static {
                    access_key: "minioadmin".into(),
                    secret_key: "minioadmin".into()
                }
        );
        assert_eq!(b.replicas[1].endpoint.host, "[::1]");
        assert_eq!(b.replicas[1].endpoint.authority, "[::1]:9002");
        assert_eq!(b.replicas[1].timeout, Duration::from_secs(30));
        assert_eq!(b.breaker.failure_threshold, 3);
        assert_eq!(b.breaker.success_threshold, 2);
        assert_eq!(c.metrics.address.port(), 9191);
        assert!(b.health.enabled);
    }

    #[test]
    fn unknown_key_names_its_path() {
        let text = BASE.replace("priority: 2", "priorty: 2");
        let errs = parse(&text, &env).unwrap_err();
        assert!(
            errs[0].contains("buckets[0].s3.replicas[1]") && errs[0].contains("priorty"),
            "{errs:?}"
        );
    }

    #[test]
    fn wrong_type_names_its_path() {
        let text = BASE.replace("timeout_seconds: 5", "timeout_seconds: soon");
        let errs = parse(&text, &env).unwrap_err();
        assert!(
            errs[0].contains("buckets[0].s3.replicas[0].timeout_seconds"),
            "{errs:?}"
        );
    }

    #[test]
    fn missing_env_and_empty_credentials() {
        let errs = parse(&BASE.replace("${PORT}", "${NOPE}"), &env).unwrap_err();
        assert!(
            errs[0].starts_with("metrics.port:") && errs[0].contains("NOPE"),
            "{errs:?}"
        );
        let errs = parse(
            &BASE.replace("secret_key: \"${KEY}\"", "secret_key: \"\""),
            &env,
        )
        .unwrap_err();
        assert!(
            errs.iter()
                .any(|e| e.starts_with("buckets[0].s3.secret_key")),
            "{errs:?}"
        );
    }

    /// `BASE` with the bucket's two key lines replaced by `keys`.
    fn with_keys(keys: &str) -> Result<Config, Vec<String>> {
        let text = BASE.replace(
            "      access_key: \"${KEY}\"\n      secret_key: \"${KEY}\"\n",
            keys,
        );
        parse(&text, &env)
    }

    fn errors_of(keys: &str) -> String {
        with_keys(keys).map(|_| ()).unwrap_err().join("\n")
    }

    #[test]
    fn no_credentials_is_an_error_naming_the_replica() {
        let e = errors_of("");
        assert!(
            e.contains("buckets[0].s3.replicas[0]: no credentials")
                && e.contains("buckets[0].s3.replicas[1]: no credentials"),
            "{e}"
        );
    }

    #[test]
    fn providers_resolve_and_replicas_inherit_them() {
        let c = with_keys("      credentials:\n        provider: \"web_identity\"\n").unwrap();
        for r in &c.buckets[0].replicas {
            assert!(r.credentials.base == CredentialBase::Provider(ProviderKind::WebIdentity));
            assert!(!r.credentials.is_static());
        }
        let c = with_keys(
            "      credentials:\n        provider: \"profile\"\n        profile: \"prod\"\n        assume_role:\n          role_arn: \"arn:aws:iam::1:role/r\"\n",
        )
        .unwrap();
        let src = &c.buckets[0].replicas[1].credentials;
        assert!(src.base == CredentialBase::Provider(ProviderKind::Profile(Some("prod".into()))));
        let role = src.assume_role.as_ref().unwrap();
        assert_eq!(
            (role.session_name.as_str(), role.external_id.as_deref()),
            ("yatagarasu", None)
        );
        assert_eq!(
            format!("{src:?}"),
            "profile prod + assume_role arn:aws:iam::1:role/r"
        );
    }

    #[test]
    fn a_replica_choosing_a_provider_does_not_inherit_static_keys() {
        let text = BASE.replace(
            "          timeout_seconds: 5\n",
            "          timeout_seconds: 5\n          credentials:\n            provider: \"imds\"\n",
        );
        let c = parse(&text, &env).unwrap();
        let r = &c.buckets[0].replicas;
        assert!(r[0].credentials.base == CredentialBase::Provider(ProviderKind::Imds));
        assert!(r[1].credentials.is_static());
    }

    #[test]
    fn conflicting_or_misplaced_credential_keys_are_refused() {
        let e = errors_of(
            "      access_key: \"a\"\n      secret_key: \"b\"\n      credentials:\n        provider: \"imds\"\n",
        );
        assert!(
            e.contains("access_key: cannot be combined with credentials.provider \"imds\""),
            "{e}"
        );
        let e = errors_of("      access_key: \"a\"\n");
        assert!(e.contains("secret_key: missing (access_key is set)"), "{e}");
        let e =
            errors_of("      credentials:\n        provider: \"ecs\"\n        profile: \"p\"\n");
        assert!(
            e.contains("credentials.profile: is only used with provider \"profile\""),
            "{e}"
        );
        let e = errors_of("      credentials:\n        provider: \"imds\"\n        assume_role:\n          role_arn: \"origin-reader\"\n");
        assert!(
            e.contains("assume_role.role_arn: \"origin-reader\" is not a role ARN"),
            "{e}"
        );
        let e = errors_of("      credentials:\n        provider: \"instance\"\n");
        assert!(e.contains("unknown variant `instance`"), "{e}");
        let e = errors_of("      access_key_file: \"/nonexistent/ak\"\n      secret_key_file: \"/nonexistent/sk\"\n");
        assert!(
            e.contains("access_key_file: cannot read /nonexistent/ak"),
            "{e}"
        );
        let e = errors_of("      access_key: \"a\"\n      secret_key: \"b\"\n      access_key_file: \"/x\"\n      secret_key_file: \"/y\"\n");
        assert!(
            e.contains("access_key_file: cannot be combined with access_key/secret_key"),
            "{e}"
        );
    }

    #[test]
    fn key_files_resolve_when_readable() {
        let dir = tempfile::tempdir().unwrap();
        let (ak, sk) = (dir.path().join("ak"), dir.path().join("sk"));
        std::fs::write(&ak, "AKID\n").unwrap();
        std::fs::write(&sk, "").unwrap();
        let keys = format!(
            "      access_key_file: \"{}\"\n      secret_key_file: \"{}\"\n",
            ak.display(),
            sk.display()
        );
        let e = errors_of(&keys);
        assert!(
            e.contains(&format!("secret_key_file: {} is empty", sk.display())),
            "{e}"
        );
        std::fs::write(&sk, "secret").unwrap();
        let c = with_keys(&keys).unwrap();
        assert!(matches!(
            c.buckets[0].replicas[0].credentials.base,
            CredentialBase::Files { .. }
        ));
    }

    fn example(name: &str) -> Config {
        let path = format!("{}/config/{name}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(path).unwrap();
        parse(&text, &|_| Some("x".to_string())).unwrap()
    }

    #[test]
    fn multi_region_resolves_to_aws_regional_endpoints() {
        let c = example("multi-region.yaml");
        let hosts: Vec<_> = c.buckets[0]
            .replicas
            .iter()
            .map(|r| {
                (
                    r.endpoint.host.as_str(),
                    r.endpoint.tls,
                    r.virtual_hosted,
                    r.region.as_str(),
                )
            })
            .collect();
        assert_eq!(
            hosts,
            [
                (
                    "global-assets.s3.us-west-2.amazonaws.com",
                    true,
                    true,
                    "us-west-2"
                ),
                (
                    "global-assets.s3.us-east-1.amazonaws.com",
                    true,
                    true,
                    "us-east-1"
                ),
                (
                    "global-assets.s3.eu-west-1.amazonaws.com",
                    true,
                    true,
                    "eu-west-1"
                ),
            ]
        );
        let mut p = String::new();
        c.buckets[0].replicas[0].object_path("a/b.txt", &mut p);
        assert_eq!(p, "/a/b.txt", "virtual-hosted: no bucket in the path");
    }

    #[test]
    fn mixed_providers_resolve_to_each_provider() {
        let c = example("mixed-providers.yaml");
        let r = &c.buckets[0].replicas;
        assert_eq!(r[0].endpoint.authority, "media.s3.us-east-1.amazonaws.com");
        assert_eq!(
            (
                r[1].endpoint.authority.as_str(),
                r[1].endpoint.port,
                r[1].virtual_hosted
            ),
            ("xxx.r2.cloudflarestorage.com", 443, false)
        );
        assert_eq!(r[1].region, "auto");
        assert_eq!(
            (r[2].endpoint.authority.as_str(), r[2].endpoint.tls),
            ("minio.internal:9000", true)
        );
        let mut p = String::new();
        r[1].object_path("k", &mut p);
        assert_eq!(p, "/media/k", "custom endpoints are path-style");
        // Dotted bucket names cannot be virtual-hosted under TLS.
        let dotted = parse(
            &BASE
                .replace("data-bucket", "my.bucket")
                .replace("          endpoint: \"http://127.0.0.1:9001\"\n", ""),
            &env,
        )
        .unwrap();
        assert_eq!(
            dotted.buckets[0].replicas[0].endpoint.host,
            "s3.us-east-1.amazonaws.com"
        );
        assert!(!dotted.buckets[0].replicas[0].virtual_hosted);
    }

    #[test]
    fn prefixes_normalise_and_collide() {
        assert_eq!(normalize_prefix("/a/b/").unwrap(), "/a/b");
        assert_eq!(normalize_prefix("/").unwrap(), "");
        assert!(normalize_prefix("a").is_err());
        assert!(normalize_prefix("/a/../b").is_err());
    }
}
