//! The YAML schema exactly as users write it (see `config/*.yaml`).
//!
//! Every struct rejects unknown keys so a typo is an error, not a silently
//! ignored setting. Numbers and booleans also accept strings so that values
//! produced by `${VAR}` expansion (always strings) deserialize.

// The `Raw*` structs below are the YAML as written: each field is the key of
// the same name, documented in docs/configuration.md.
#![allow(missing_docs)]

use super::{LogFormat, ZeroCopy};
use serde::de::{self, Deserializer};
use serde::Deserialize;
use std::str::FromStr;

// ---- defaults of keys the user may leave out ----

/// `server.idle_timeout_seconds`.
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 60;
/// `server.request_head_timeout_seconds`.
pub const DEFAULT_REQUEST_HEAD_TIMEOUT_SECS: u64 = 10;
/// `server.shutdown_timeout_seconds`.
pub const DEFAULT_SHUTDOWN_TIMEOUT_SECS: u64 = 30;
/// Most `server.workers`.
pub const MAX_WORKERS: usize = 1024;
/// `s3.region`.
pub const DEFAULT_REGION: &str = "us-east-1";
/// `s3.timeout_seconds` (each replica's unless it sets its own).
pub const DEFAULT_REPLICA_TIMEOUT_SECS: u64 = 30;
/// `replicas[].priority` (lower is tried first).
pub const DEFAULT_PRIORITY: u32 = 1;
/// `replicas[].weight`.
pub const DEFAULT_WEIGHT: u32 = 1;
/// Largest `replicas[].weight`.
pub const MAX_WEIGHT: u32 = 1_000_000;
/// `circuit_breaker.failure_threshold`.
pub const DEFAULT_FAILURE_THRESHOLD: u32 = 5;
/// `circuit_breaker.success_threshold`.
pub const DEFAULT_SUCCESS_THRESHOLD: u32 = 2;
/// `circuit_breaker.timeout_seconds`.
pub const DEFAULT_OPEN_SECS: u64 = 60;
/// `circuit_breaker.half_open_requests`.
pub const DEFAULT_HALF_OPEN_REQUESTS: u32 = 1;
/// `health_check.interval_seconds`.
pub const DEFAULT_HEALTH_INTERVAL_SECS: u64 = 10;
/// `health_check.timeout_seconds`.
pub const DEFAULT_HEALTH_TIMEOUT_SECS: u64 = 5;
/// `health_check.path`.
pub const DEFAULT_HEALTH_PATH: &str = "/";
/// `cache.memory.max_cache_size_mb`.
pub const DEFAULT_CACHE_MEMORY_MB: u64 = 1024;
/// `cache.memory.max_item_size_mb`.
pub const DEFAULT_CACHE_ITEM_MB: u64 = 10;
/// `cache.memory.default_ttl_seconds`.
pub const DEFAULT_CACHE_TTL_SECS: u64 = 3600;
/// `cache.disk.max_disk_cache_size_mb`.
pub const DEFAULT_CACHE_DISK_MB: u64 = 10240;
/// `metrics.port`.
pub const DEFAULT_METRICS_PORT: u16 = 9090;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub server: RawServer,
    pub buckets: Vec<RawBucket>,
    #[serde(default)]
    pub metrics: Option<RawMetrics>,
    #[serde(default)]
    pub logging: Option<RawLogging>,
    /// Default health check for every bucket that does not set its own.
    #[serde(default)]
    pub health_check: Option<RawHealthCheck>,
    /// The origin cache.
    #[serde(default)]
    pub cache: Option<RawCache>,
    /// The admin endpoints on the metrics listener.
    #[serde(default)]
    pub admin: Option<RawAdmin>,
    /// JWT authentication.
    #[serde(default)]
    pub jwt: Option<RawJwt>,
    /// The audit log (the other system's keys).
    #[serde(default)]
    pub audit_log: Option<RawAuditLog>,
    /// Traces (the other system's keys).
    #[serde(default)]
    pub observability: Option<RawObservability>,
    /// Image transforms (the other system's keys, and ours for the pool,
    /// the input limits and URL signing).
    #[serde(default)]
    pub image_optimization: Option<RawImages>,
}

/// `image_optimization` (top level, and per bucket over it).
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawImages {
    #[serde(default, deserialize_with = "flex_opt")]
    pub enabled: Option<bool>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub max_width: Option<u32>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub max_height: Option<u32>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub default_quality: Option<u8>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub max_input_pixels: Option<u64>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub max_input_mb: Option<u64>,
    /// Transforms at once, process-wide (top level only).
    #[serde(default, deserialize_with = "flex_opt")]
    pub max_concurrent: Option<usize>,
    /// Transforms waiting, process-wide (top level only).
    #[serde(default, deserialize_with = "flex_opt")]
    pub max_queue: Option<usize>,
    #[serde(default)]
    pub signing_key: Option<String>,
    #[serde(default)]
    pub signing_key_file: Option<String>,
    #[serde(default)]
    pub allowed_widths: Option<Vec<u32>>,
    #[serde(default)]
    pub allowed_heights: Option<Vec<u32>>,
}

/// `buckets[].watermark` (the other system's keys).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWatermark {
    #[serde(default, deserialize_with = "flex_opt")]
    pub enabled: Option<bool>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub cache_ttl_seconds: Option<u64>,
    #[serde(default)]
    pub rules: Vec<RawWatermarkRule>,
}

/// `watermark.rules[]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWatermarkRule {
    pub pattern: String,
    #[serde(default)]
    pub watermarks: Vec<RawMark>,
}

/// `watermark.rules[].watermarks[]`: `type: text` or `type: image`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMark {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub font_size: Option<u32>,
    #[serde(default)]
    pub color: Option<String>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub opacity: Option<f32>,
    #[serde(default)]
    pub position: Option<String>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub margin: Option<u32>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub rotation: Option<i32>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub tile_spacing: Option<u32>,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub width: Option<u32>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub height: Option<u32>,
}

/// `observability` (its no-effect parts are taken out by `compat`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawObservability {
    #[serde(default)]
    pub tracing: Option<RawTracing>,
}

/// `observability.tracing`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTracing {
    #[serde(default, deserialize_with = "flex_opt")]
    pub enabled: Option<bool>,
    #[serde(default)]
    pub exporter: Option<String>,
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    #[serde(default)]
    pub jaeger_endpoint: Option<String>,
    #[serde(default)]
    pub zipkin_endpoint: Option<String>,
    #[serde(default)]
    pub service_name: Option<String>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub sampling_ratio: Option<f64>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub propagate_context: Option<bool>,
}

/// `audit_log`: one record per access decision, to a file and/or syslog.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuditLog {
    #[serde(default, deserialize_with = "flex_opt")]
    pub enabled: Option<bool>,
    #[serde(default)]
    pub outputs: Option<Vec<String>>,
    #[serde(default)]
    pub log_level: Option<String>,
    #[serde(default)]
    pub file: Option<RawAuditFile>,
    #[serde(default)]
    pub syslog: Option<RawAuditSyslog>,
    /// The other system's S3 export: refused with a message.
    #[serde(default)]
    pub s3_export: Option<serde_yaml::Value>,
}

/// `audit_log.file`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuditFile {
    pub path: String,
    #[serde(default, deserialize_with = "flex_opt")]
    pub max_file_size_mb: Option<u64>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub max_backup_files: Option<u32>,
    #[serde(default)]
    pub rotation_policy: Option<String>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub buffer_size: Option<usize>,
}

/// `audit_log.syslog`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuditSyslog {
    pub address: String,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub facility: Option<String>,
}

#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct RawJwt {
    #[serde(default, deserialize_with = "flex_opt")]
    pub enabled: Option<bool>,
    #[serde(default)]
    pub algorithm: Option<String>,
    #[serde(default)]
    pub secret: Option<String>,
    #[serde(default)]
    pub rsa_public_key_path: Option<String>,
    #[serde(default)]
    pub ecdsa_public_key_path: Option<String>,
    #[serde(default)]
    pub keys: Option<Vec<RawJwtKey>>,
    #[serde(default)]
    pub jwks_url: Option<String>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub jwks_refresh_interval_secs: Option<u64>,
    #[serde(default)]
    pub token_sources: Option<Vec<RawTokenSource>>,
    /// `claims_verification` is the other system's name.
    #[serde(default, alias = "claims_verification")]
    pub claims: Option<Vec<RawClaim>>,
    /// Rules a token must also satisfy to call the admin API.
    #[serde(default)]
    pub admin_claims: Option<Vec<RawClaim>>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub leeway_seconds: Option<u64>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawJwtKey {
    pub id: String,
    pub algorithm: String,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub secret: Option<String>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawTokenSource {
    /// `source_type` is the other system's name.
    #[serde(rename = "type", alias = "source_type")]
    pub kind: String,
    /// `param_name` is how some of the other system's configs name a
    /// query parameter.
    #[serde(default, alias = "param_name")]
    pub name: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawClaim {
    /// `name` is how the other system's documentation writes it.
    #[serde(alias = "name")]
    pub claim: String,
    pub operator: String,
    #[serde(default)]
    pub value: serde_yaml::Value,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    #[serde(default)]
    pub token: Option<String>,
    /// Serve the admin API on the main port too (the other system's place).
    #[serde(default, deserialize_with = "flex_opt")]
    pub main_port: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    #[serde(default, deserialize_with = "flex_opt")]
    pub enabled: Option<bool>,
    #[serde(default)]
    pub cache_layers: Option<Vec<String>>,
    #[serde(default)]
    pub memory: Option<RawCacheMemory>,
    #[serde(default)]
    pub disk: Option<RawCacheDisk>,
    #[serde(default)]
    pub redis: Option<RawCacheRedis>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub stale_if_error_seconds: Option<u64>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub slice_size_mb: Option<u64>,
    /// Pre-warming through the admin API (the other system's `warming`).
    #[serde(default)]
    pub warming: Option<RawWarming>,
}

/// `cache.warming`: how hard a pre-warming task may pull from S3.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWarming {
    #[serde(default, deserialize_with = "flex_opt")]
    pub concurrency: Option<usize>,
    /// Objects per second.
    #[serde(default, deserialize_with = "flex_opt")]
    pub rate_limit: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCacheMemory {
    #[serde(default, deserialize_with = "flex_opt")]
    pub max_cache_size_mb: Option<u64>,
    /// The same bound in bytes (the other system's older spelling).
    #[serde(default, deserialize_with = "flex_opt")]
    pub max_size: Option<u64>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub max_item_size_mb: Option<u64>,
    #[serde(default, alias = "ttl", deserialize_with = "flex_opt")]
    pub default_ttl_seconds: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCacheDisk {
    #[serde(default, deserialize_with = "flex_opt")]
    pub enabled: Option<bool>,
    #[serde(default)]
    pub cache_dir: Option<String>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub max_disk_cache_size_mb: Option<u64>,
    /// Whether (and from what size) a disk hit is sent from its file.
    #[serde(default)]
    pub sendfile: Option<RawSendfile>,
}

/// `cache.disk.sendfile`: the other system's keys.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSendfile {
    #[serde(default, deserialize_with = "flex_opt")]
    pub enabled: Option<bool>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub threshold_bytes: Option<u64>,
}

/// `cache.redis`: the other system's keys.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCacheRedis {
    #[serde(default, deserialize_with = "flex_opt")]
    pub enabled: Option<bool>,
    #[serde(default, alias = "url")]
    pub redis_url: Option<String>,
    #[serde(default)]
    pub redis_password: Option<String>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub redis_db: Option<u32>,
    #[serde(default, alias = "key_prefix")]
    pub redis_key_prefix: Option<String>,
    #[serde(default, alias = "ttl", deserialize_with = "flex_opt")]
    pub redis_ttl_seconds: Option<u64>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub redis_max_ttl_seconds: Option<u64>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub connection_timeout_ms: Option<u64>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub operation_timeout_ms: Option<u64>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub min_pool_size: Option<usize>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub max_pool_size: Option<usize>,
    /// CA certificates (PEM) trusted for `rediss://` beside the system's.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// Objects larger than this are stored as chunks of this size (ours).
    #[serde(default, deserialize_with = "flex_opt")]
    pub chunk_size_kb: Option<u64>,
    /// The primary found through Redis Sentinel (the shape the other
    /// system's documentation shows).
    #[serde(default)]
    pub sentinel: Option<RawSentinel>,
    /// A Cluster's nodes to start from (the other system's documentation).
    #[serde(default)]
    pub cluster: Option<RawRedisCluster>,
}

/// `cache.redis.cluster`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedisCluster {
    #[serde(default)]
    pub nodes: Option<Vec<String>>,
}

/// `cache.redis.sentinel`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSentinel {
    #[serde(default)]
    pub master_name: Option<String>,
    #[serde(default)]
    pub nodes: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBucketCache {
    #[serde(default, deserialize_with = "flex_opt")]
    pub enabled: Option<bool>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub ttl_seconds: Option<u64>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub max_item_size_mb: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// `host:port`, or a host with `port` (the other system's shape).
    #[serde(alias = "addr")]
    pub address: String,
    #[serde(default, deserialize_with = "flex_opt")]
    pub port: Option<u16>,
    /// `threads` is the other system's name.
    #[serde(default, alias = "threads", deserialize_with = "flex_opt")]
    pub workers: Option<usize>,
    /// The other system's request coalescing; collapsing is always on here,
    /// and it always streams (`enabled: false` is refused).
    #[serde(default)]
    pub coalescing: Option<RawCoalescing>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub idle_timeout_seconds: Option<u64>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub shutdown_timeout_seconds: Option<u64>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub request_head_timeout_seconds: Option<u64>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub max_connections: Option<usize>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub max_upstream_connections: Option<usize>,
    #[serde(default)]
    pub zero_copy: Option<ZeroCopy>,
    #[serde(default)]
    pub trusted_proxies: Option<Vec<String>>,
    #[serde(default)]
    pub rate_limit: Option<RawRateLimit>,
    #[serde(default)]
    pub tls: Option<RawListenerTls>,
}

/// `server.coalescing`: `{enabled, strategy}` (the other system's shape).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCoalescing {
    #[serde(default, deserialize_with = "flex_opt")]
    pub enabled: Option<bool>,
    /// `wait_for_complete` or `streaming`: waiters here always stream.
    #[serde(default)]
    pub strategy: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListenerTls {
    pub cert_file: String,
    pub key_file: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBucket {
    pub name: String,
    pub path_prefix: String,
    pub s3: RawS3,
    #[serde(default)]
    pub auth: Option<RawAuth>,
    #[serde(default)]
    pub cache: Option<RawBucketCache>,
    #[serde(default)]
    pub ip_filter: Option<RawIpFilter>,
    #[serde(default)]
    pub authorization: Option<RawAuthorization>,
    /// This bucket's image settings over the top level's.
    #[serde(default)]
    pub image_optimization: Option<RawImages>,
    #[serde(default)]
    pub watermark: Option<RawWatermark>,
}

/// `buckets[].authorization`: the other system's keys (`opa_*`,
/// `openfga_*`), the unprefixed spellings its load-test configs use
/// (`url`, `policy_path`, `timeout_ms`, `cache_ttl_seconds`, `fail_mode`),
/// and ours for `type: rego` (`policy_file`, `data_file`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuthorization {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, alias = "url")]
    pub opa_url: Option<String>,
    #[serde(default, alias = "policy_path")]
    pub opa_policy_path: Option<String>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub opa_timeout_ms: Option<u64>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub opa_cache_ttl_seconds: Option<u64>,
    #[serde(default)]
    pub opa_fail_mode: Option<String>,
    #[serde(default)]
    pub openfga_endpoint: Option<String>,
    #[serde(default)]
    pub openfga_store_id: Option<String>,
    #[serde(default, alias = "openfga_model_id")]
    pub openfga_authorization_model_id: Option<String>,
    #[serde(default)]
    pub openfga_api_token: Option<String>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub openfga_timeout_ms: Option<u64>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub openfga_cache_ttl_seconds: Option<u64>,
    #[serde(default)]
    pub openfga_fail_mode: Option<String>,
    #[serde(default)]
    pub openfga_user_claim: Option<String>,
    /// The relation checked (`viewer` by default).
    #[serde(default, alias = "relation")]
    pub openfga_relation: Option<String>,
    /// Objects named `<prefix><bucket>/<key>` (as `document:`) instead of
    /// `bucket:`/`folder:`/`file:`.
    #[serde(default, alias = "object_prefix")]
    pub openfga_object_prefix: Option<String>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub timeout_ms: Option<u64>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub cache_ttl_seconds: Option<u64>,
    #[serde(default)]
    pub fail_mode: Option<String>,
    #[serde(default)]
    pub policy_file: Option<String>,
    #[serde(default)]
    pub data_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    #[serde(default, deserialize_with = "flex_opt")]
    pub enabled: Option<bool>,
    #[serde(default)]
    pub global: Option<RawRate>,
    #[serde(default)]
    pub per_ip: Option<RawRate>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRate {
    #[serde(deserialize_with = "flex")]
    pub requests_per_second: f64,
    #[serde(default, deserialize_with = "flex_opt")]
    pub burst: Option<f64>,
    /// `instance` (default) or `fleet`.
    #[serde(default)]
    pub scope: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIpFilter {
    #[serde(default)]
    pub allowlist: Vec<String>,
    #[serde(default)]
    pub blocklist: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    #[serde(deserialize_with = "flex")]
    pub enabled: bool,
    /// The bucket's own JWT settings (the other system's shape), over the
    /// top-level `jwt`.
    #[serde(default)]
    pub jwt: Option<RawJwt>,
}

impl RawJwt {
    /// This bucket-level block with every key it leaves out taken from
    /// `top` (the top-level `jwt`); enabled, since the bucket's
    /// `auth.enabled` asked for it.
    pub fn over(&self, top: Option<&RawJwt>) -> RawJwt {
        let top = top.cloned().unwrap_or_default();
        // A bucket that names its own key material does not inherit the
        // top-level one (an HMAC secret must not sit beside its RSA key).
        let own_key = self.secret.is_some()
            || self.rsa_public_key_path.is_some()
            || self.ecdsa_public_key_path.is_some();
        RawJwt {
            enabled: Some(true),
            algorithm: self.algorithm.clone().or(top.algorithm),
            secret: self.secret.clone().or(top.secret.filter(|_| !own_key)),
            rsa_public_key_path: self
                .rsa_public_key_path
                .clone()
                .or(top.rsa_public_key_path.filter(|_| !own_key)),
            ecdsa_public_key_path: self
                .ecdsa_public_key_path
                .clone()
                .or(top.ecdsa_public_key_path.filter(|_| !own_key)),
            keys: self.keys.clone().or(top.keys),
            jwks_url: self.jwks_url.clone().or(top.jwks_url),
            jwks_refresh_interval_secs: self
                .jwks_refresh_interval_secs
                .or(top.jwks_refresh_interval_secs),
            token_sources: self.token_sources.clone().or(top.token_sources),
            claims: self.claims.clone().or(top.claims),
            // The admin API is guarded by the top-level settings only.
            admin_claims: None,
            leeway_seconds: self.leeway_seconds.or(top.leeway_seconds),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawS3 {
    pub bucket: String,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub access_key: Option<String>,
    #[serde(default)]
    pub secret_key: Option<String>,
    #[serde(default)]
    pub access_key_file: Option<String>,
    #[serde(default)]
    pub secret_key_file: Option<String>,
    #[serde(default)]
    pub credentials: Option<RawCredentials>,
    /// `timeout` is the other system's name.
    #[serde(default, alias = "timeout", deserialize_with = "flex_opt")]
    pub timeout_seconds: Option<u64>,
    #[serde(default)]
    pub ca_file: Option<String>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub insecure_skip_verify: Option<bool>,
    #[serde(default)]
    pub replicas: Option<Vec<RawReplica>>,
    #[serde(default)]
    pub circuit_breaker: Option<RawCircuitBreaker>,
    #[serde(default)]
    pub health_check: Option<RawHealthCheck>,
    #[serde(default)]
    pub rate_limit: Option<RawRate>,
}

/// Where a bucket's or replica's signing keys come from, as written.
#[derive(Debug, Default, Clone, Copy)]
pub struct RawKeys<'a> {
    pub access_key: Option<&'a str>,
    pub secret_key: Option<&'a str>,
    pub access_key_file: Option<&'a str>,
    pub secret_key_file: Option<&'a str>,
    pub credentials: Option<&'a RawCredentials>,
}

macro_rules! keys_of {
    ($t:ty) => {
        impl $t {
            /// The credential keys set at this level.
            pub fn keys(&self) -> RawKeys<'_> {
                RawKeys {
                    access_key: self.access_key.as_deref(),
                    secret_key: self.secret_key.as_deref(),
                    access_key_file: self.access_key_file.as_deref(),
                    secret_key_file: self.secret_key_file.as_deref(),
                    credentials: self.credentials.as_ref(),
                }
            }
        }
    };
}
keys_of!(RawS3);
keys_of!(RawReplica);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCredentials {
    pub provider: RawProvider,
    #[serde(default)]
    pub profile: Option<String>,
    #[serde(default)]
    pub assume_role: Option<RawAssumeRole>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawProvider {
    Static,
    DefaultChain,
    Environment,
    Profile,
    WebIdentity,
    Ecs,
    Imds,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAssumeRole {
    pub role_arn: String,
    #[serde(default)]
    pub session_name: Option<String>,
    #[serde(default)]
    pub external_id: Option<String>,
}

/// `credentials.assume_role.session_name`.
pub const DEFAULT_SESSION_NAME: &str = "yatagarasu";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReplica {
    pub name: String,
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub bucket: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub access_key: Option<String>,
    #[serde(default)]
    pub secret_key: Option<String>,
    #[serde(default)]
    pub access_key_file: Option<String>,
    #[serde(default)]
    pub secret_key_file: Option<String>,
    #[serde(default)]
    pub credentials: Option<RawCredentials>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub priority: Option<u32>,
    /// `timeout` is the other system's name.
    #[serde(default, alias = "timeout", deserialize_with = "flex_opt")]
    pub timeout_seconds: Option<u64>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub weight: Option<u32>,
    #[serde(default)]
    pub ca_file: Option<String>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub insecure_skip_verify: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCircuitBreaker {
    #[serde(default, deserialize_with = "flex_opt")]
    pub failure_threshold: Option<u32>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub success_threshold: Option<u32>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub timeout_seconds: Option<u64>,
    /// `half_open_max_requests` is the other system's name.
    #[serde(
        default,
        alias = "half_open_max_requests",
        deserialize_with = "flex_opt"
    )]
    pub half_open_requests: Option<u32>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    #[serde(default, deserialize_with = "flex_opt")]
    pub enabled: Option<bool>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub interval_seconds: Option<u64>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub timeout_seconds: Option<u64>,
    #[serde(default)]
    pub path: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    #[serde(default, deserialize_with = "flex_opt")]
    pub enabled: Option<bool>,
    #[serde(default, deserialize_with = "flex_opt")]
    pub port: Option<u16>,
    /// An IP, or `ip:port` (`addr`: the other system's older spelling).
    #[serde(default, alias = "addr")]
    pub address: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLogging {
    #[serde(default)]
    pub level: Option<String>,
    #[serde(default)]
    pub format: Option<LogFormat>,
}

/// A number or boolean written natively or as a string (`"8080"`, `"true"`).
#[derive(Deserialize)]
#[serde(untagged)]
enum Flex<T> {
    Native(T),
    Text(String),
}

fn flex<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + FromStr,
{
    match Flex::<T>::deserialize(d)
        .map_err(|_| de::Error::custom(format!("expected {}", type_word::<T>())))?
    {
        Flex::Native(v) => Ok(v),
        Flex::Text(s) => s
            .trim()
            .parse()
            .map_err(|_| de::Error::custom(format!("expected {}, found {s:?}", type_word::<T>()))),
    }
}

fn flex_opt<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + FromStr,
{
    flex(d).map(Some)
}

fn type_word<T>() -> &'static str {
    let name = std::any::type_name::<T>();
    if name == "bool" {
        "a boolean (true or false)"
    } else {
        "a non-negative integer"
    }
}
