//! Configuration: load YAML, expand `${VAR}`, check everything, resolve defaults.
//!
//! [`load`] returns either a fully resolved [`Config`] or the complete list of
//! problems, each prefixed with the YAML path it concerns (for example
//! `buckets[1].s3.replicas[0].endpoint: ...`). Nothing downstream re-validates.

pub mod expand;
pub mod schema;

use schema::*;
use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

/// Default config location, as in the tutorial's container.
pub const DEFAULT_PATH: &str = "/etc/yatagarasu/config.yaml";
/// At most this many replicas per bucket (keeps per-request plans allocation-free).
pub const MAX_REPLICAS: usize = 32;

#[derive(Debug, Clone)]
pub struct Config {
    pub server: Server,
    pub buckets: Vec<Bucket>,
    pub metrics: Metrics,
    pub logging: Logging,
}

#[derive(Debug, Clone)]
pub struct Server {
    pub address: SocketAddr,
    pub workers: usize,
    pub idle_timeout: Duration,
    /// A request head must be complete this long after its first byte.
    pub request_head_timeout: Duration,
    /// Open client connections allowed per process (split evenly across
    /// workers); more are refused at accept.
    pub max_connections: usize,
    pub shutdown_timeout: Duration,
    pub zero_copy: ZeroCopy,
    /// `server.tls`: serve HTTPS with this certificate chain and key (PEM).
    pub tls: Option<ListenerTls>,
}

/// `server.request_head_timeout_seconds` default.
pub const DEFAULT_REQUEST_HEAD_TIMEOUT_SECS: u64 = 10;

/// `server.max_connections` default: what the file-descriptor limit allows,
/// with room for two upstream sockets per client connection and a reserve
/// for listeners, pipes and files (a third of the limit per client, at least 64).
pub fn default_max_connections() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the valid rlimit struct passed by pointer.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
    let fds = if ok && lim.rlim_cur != libc::RLIM_INFINITY {
        lim.rlim_cur as usize
    } else {
        1024
    };
    (fds.saturating_sub(64) / 3).max(64)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerTls {
    pub cert_file: String,
    pub key_file: String,
}

/// `server.zero_copy`: how Content-Length bodies move from a plain-TCP
/// upstream to a plain-TCP client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroCopy {
    /// splice(2) for bodies of at least [`ZeroCopy::AUTO_MIN_BYTES`], copy below.
    Auto,
    /// splice(2) for every such body.
    On,
    /// Always copy through a user-space buffer.
    Off,
}

impl ZeroCopy {
    /// Smallest body `auto` splices (from loadtest/results: see README).
    pub const AUTO_MIN_BYTES: u64 = 1024 * 1024;

    pub fn splice(self, body_bytes: u64) -> bool {
        match self {
            ZeroCopy::On => true,
            ZeroCopy::Off => false,
            ZeroCopy::Auto => body_bytes >= Self::AUTO_MIN_BYTES,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Metrics {
    pub enabled: bool,
    pub address: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
}

impl Level {
    pub fn parse(s: &str) -> Option<Level> {
        match s.to_ascii_lowercase().as_str() {
            "error" => Some(Level::Error),
            "warn" | "warning" => Some(Level::Warn),
            "info" => Some(Level::Info),
            "debug" | "trace" => Some(Level::Debug),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Error => "ERROR",
            Level::Warn => "WARN",
            Level::Info => "INFO",
            Level::Debug => "DEBUG",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct Logging {
    pub level: Level,
    pub format: LogFormat,
}

#[derive(Debug, Clone)]
pub struct Bucket {
    pub name: String,
    /// Normalised: starts with `/`, no trailing `/` (the root prefix is `""`).
    pub path_prefix: String,
    pub replicas: Vec<Replica>,
    pub breaker: BreakerSettings,
    pub health: HealthSettings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    pub failure_threshold: u32,
    pub success_threshold: u32,
    pub open_for: Duration,
    pub half_open_requests: u32,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            failure_threshold: 5,
            success_threshold: 2,
            open_for: Duration::from_secs(60),
            half_open_requests: 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSettings {
    pub enabled: bool,
    pub interval: Duration,
    pub timeout: Duration,
    pub path: String,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            enabled: true,
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(5),
            path: "/".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// `Host` header value (port omitted when it is the scheme's default).
    pub authority: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    pub name: String,
    pub endpoint: Endpoint,
    pub bucket: String,
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
    pub priority: u32,
    pub weight: u32,
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

/// Reads, expands and validates the file at `path`.
pub fn load(path: &str) -> Result<Config, Vec<String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| vec![format!("{path}: cannot read config: {e}")])?;
    parse(&text, &|name| std::env::var(name).ok())
}

/// Parses config text with `env` supplying `${VAR}` values.
pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, Vec<String>> {
    let mut tree: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|e| vec![format!("invalid YAML: {e}")])?;
    let mut errors = Vec::new();
    expand::expand_tree(&mut tree, &mut String::new(), env, &mut errors);
    if !errors.is_empty() {
        return Err(errors);
    }
    let raw: RawConfig = serde_path_to_error::deserialize(tree).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path == "." {
            vec![inner]
        } else {
            vec![format!("{path}: {inner}")]
        }
    })?;
    validate(raw)
}

fn validate(raw: RawConfig) -> Result<Config, Vec<String>> {
    let mut errs = Vec::new();
    let address = match raw.server.address.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(a)) => a,
        _ => {
            errs.push(format!(
                "server.address: {:?} is not a valid listen address (expected host:port)",
                raw.server.address
            ));
            SocketAddr::from(([0, 0, 0, 0], 8080))
        }
    };
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let workers = raw.server.workers.unwrap_or(cores);
    if workers == 0 || workers > 1024 {
        errs.push("server.workers: must be between 1 and 1024".into());
    }
    let idle = raw.server.idle_timeout_seconds.unwrap_or(60);
    if idle == 0 {
        errs.push("server.idle_timeout_seconds: must be at least 1".into());
    }
    let head_timeout = raw
        .server
        .request_head_timeout_seconds
        .unwrap_or(DEFAULT_REQUEST_HEAD_TIMEOUT_SECS);
    if head_timeout == 0 {
        errs.push("server.request_head_timeout_seconds: must be at least 1".into());
    }
    let max_connections = raw
        .server
        .max_connections
        .unwrap_or_else(default_max_connections);
    if max_connections < workers.max(1) {
        errs.push(format!(
            "server.max_connections: must be at least the number of workers ({})",
            workers.max(1)
        ));
    }
    let zero_copy = match raw
        .server
        .zero_copy
        .as_deref()
        .map(|z| z.to_ascii_lowercase())
    {
        None => ZeroCopy::Auto,
        Some(z) if z == "auto" => ZeroCopy::Auto,
        Some(z) if z == "on" || z == "true" => ZeroCopy::On,
        Some(z) if z == "off" || z == "false" => ZeroCopy::Off,
        Some(z) => {
            errs.push(format!(
                "server.zero_copy: {z:?} is not one of auto, on, off"
            ));
            ZeroCopy::Auto
        }
    };
    let tls = raw.server.tls.as_ref().map(|t| ListenerTls {
        cert_file: t.cert_file.clone(),
        key_file: t.key_file.clone(),
    });
    if let Some(t) = &tls {
        if let Err(e) = crate::upstream::tls::acceptor(&t.cert_file, &t.key_file) {
            errs.push(format!("server.tls: {e}"));
        }
    }
    let server = Server {
        tls,
        zero_copy,
        address,
        workers: workers.max(1),
        idle_timeout: Duration::from_secs(idle.max(1)),
        request_head_timeout: Duration::from_secs(head_timeout.max(1)),
        max_connections: max_connections.max(workers.max(1)),
        shutdown_timeout: Duration::from_secs(raw.server.shutdown_timeout_seconds.unwrap_or(30)),
    };

    let default_health = raw.health_check.clone();
    if let Some(h) = &default_health {
        check_health(h, "health_check", &mut errs);
    }
    if raw.buckets.is_empty() {
        errs.push("buckets: at least one bucket is required".into());
    }
    let mut buckets = Vec::new();
    let mut prefixes: HashMap<String, usize> = HashMap::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    for (i, b) in raw.buckets.into_iter().enumerate() {
        let at = format!("buckets[{i}]");
        if b.name.trim().is_empty() {
            errs.push(format!("{at}.name: must not be empty"));
        } else if let Some(j) = names.insert(b.name.clone(), i) {
            errs.push(format!(
                "{at}.name: {:?} is already used by buckets[{j}]",
                b.name
            ));
        }
        let prefix = match normalize_prefix(&b.path_prefix) {
            Ok(p) => p,
            Err(e) => {
                errs.push(format!("{at}.path_prefix: {e}"));
                String::new()
            }
        };
        if prefix == "/health" || prefix == "/ready" {
            errs.push(format!(
                "{at}.path_prefix: {prefix:?} is reserved for the proxy's own endpoint"
            ));
        }
        if let Some(j) = prefixes.insert(prefix.clone(), i) {
            errs.push(format!(
                "{at}.path_prefix: {:?} overlaps buckets[{j}].path_prefix (both route {:?})",
                b.path_prefix,
                if prefix.is_empty() { "/" } else { &prefix }
            ));
        }
        if let Some(auth) = &b.auth {
            if auth.enabled {
                errs.push(format!(
                    "{at}.auth.enabled: client authentication is not supported by this proxy; set it to false"
                ));
            }
        }
        let s3 = b.s3;
        let at3 = format!("{at}.s3");
        if s3.bucket.trim().is_empty() {
            errs.push(format!("{at3}.bucket: must not be empty"));
        }
        let region = s3.region.clone().unwrap_or_else(|| "us-east-1".into());
        if region.trim().is_empty() {
            errs.push(format!("{at3}.region: must not be empty"));
        }
        if s3.access_key.is_empty() {
            errs.push(format!("{at3}.access_key: must not be empty"));
        }
        if s3.secret_key.is_empty() {
            errs.push(format!("{at3}.secret_key: must not be empty"));
        }
        let default_timeout = s3.timeout_seconds.unwrap_or(30);
        if default_timeout == 0 {
            errs.push(format!("{at3}.timeout_seconds: must be at least 1"));
        }
        let mut replicas = Vec::new();
        match &s3.replicas {
            None => {
                let endpoint = resolve_endpoint(
                    s3.endpoint.as_deref(),
                    &s3.bucket,
                    &region,
                    &format!("{at3}.endpoint"),
                    &mut errs,
                );
                replicas.push(Replica {
                    name: "default".into(),
                    virtual_hosted: s3.endpoint.is_none() && !s3.bucket.contains('.'),
                    endpoint,
                    bucket: s3.bucket.clone(),
                    region: region.clone(),
                    access_key: s3.access_key.clone(),
                    secret_key: s3.secret_key.clone(),
                    priority: 1,
                    weight: 1,
                    timeout: Duration::from_secs(default_timeout.max(1)),
                    ca_file: s3.ca_file.clone(),
                    insecure_skip_verify: s3.insecure_skip_verify.unwrap_or(false),
                });
                check_tls(replicas.last(), &at3, &mut errs);
            }
            Some(list) => {
                if list.is_empty() {
                    errs.push(format!(
                        "{at3}.replicas: must list at least one replica (or be removed)"
                    ));
                }
                if list.len() > MAX_REPLICAS {
                    errs.push(format!(
                        "{at3}.replicas: at most {MAX_REPLICAS} replicas per bucket"
                    ));
                }
                let mut rnames: HashMap<&str, usize> = HashMap::new();
                for (r, rep) in list.iter().enumerate() {
                    let atr = format!("{at3}.replicas[{r}]");
                    if rep.name.trim().is_empty() {
                        errs.push(format!("{atr}.name: must not be empty"));
                    } else if let Some(j) = rnames.insert(&rep.name, r) {
                        errs.push(format!(
                            "{atr}.name: {:?} is already used by replicas[{j}]",
                            rep.name
                        ));
                    }
                    let bucket = rep.bucket.clone().unwrap_or_else(|| s3.bucket.clone());
                    let rregion = rep.region.clone().unwrap_or_else(|| region.clone());
                    let endpoint_src = rep.endpoint.as_deref().or(s3.endpoint.as_deref());
                    let endpoint = resolve_endpoint(
                        endpoint_src,
                        &bucket,
                        &rregion,
                        &format!("{atr}.endpoint"),
                        &mut errs,
                    );
                    let access_key = rep
                        .access_key
                        .clone()
                        .unwrap_or_else(|| s3.access_key.clone());
                    let secret_key = rep
                        .secret_key
                        .clone()
                        .unwrap_or_else(|| s3.secret_key.clone());
                    if rep.access_key.as_deref() == Some("") {
                        errs.push(format!("{atr}.access_key: must not be empty"));
                    }
                    if rep.secret_key.as_deref() == Some("") {
                        errs.push(format!("{atr}.secret_key: must not be empty"));
                    }
                    if bucket.trim().is_empty() {
                        errs.push(format!("{atr}.bucket: must not be empty"));
                    }
                    let timeout = rep.timeout_seconds.unwrap_or(default_timeout);
                    if timeout == 0 {
                        errs.push(format!("{atr}.timeout_seconds: must be at least 1"));
                    }
                    let weight = rep.weight.unwrap_or(1);
                    if weight == 0 || weight > 1_000_000 {
                        errs.push(format!("{atr}.weight: must be between 1 and 1000000"));
                    }
                    replicas.push(Replica {
                        name: rep.name.clone(),
                        virtual_hosted: endpoint_src.is_none() && !bucket.contains('.'),
                        endpoint,
                        bucket,
                        region: rregion,
                        access_key,
                        secret_key,
                        priority: rep.priority.unwrap_or(1),
                        weight: weight.max(1),
                        timeout: Duration::from_secs(timeout.max(1)),
                        ca_file: rep.ca_file.clone().or_else(|| s3.ca_file.clone()),
                        insecure_skip_verify: rep
                            .insecure_skip_verify
                            .or(s3.insecure_skip_verify)
                            .unwrap_or(false),
                    });
                    check_tls(replicas.last(), &atr, &mut errs);
                }
            }
        }
        let mut breaker = BreakerSettings::default();
        if let Some(cb) = &s3.circuit_breaker {
            let atc = format!("{at3}.circuit_breaker");
            breaker.failure_threshold = cb.failure_threshold.unwrap_or(breaker.failure_threshold);
            breaker.success_threshold = cb.success_threshold.unwrap_or(breaker.success_threshold);
            breaker.open_for = cb
                .timeout_seconds
                .map(Duration::from_secs)
                .unwrap_or(breaker.open_for);
            breaker.half_open_requests =
                cb.half_open_requests.unwrap_or(breaker.half_open_requests);
            for (v, key) in [
                (breaker.failure_threshold, "failure_threshold"),
                (breaker.success_threshold, "success_threshold"),
                (breaker.half_open_requests, "half_open_requests"),
            ] {
                if v == 0 {
                    errs.push(format!("{atc}.{key}: must be at least 1"));
                }
            }
            if breaker.open_for.is_zero() {
                errs.push(format!("{atc}.timeout_seconds: must be at least 1"));
            }
        }
        let health_raw = s3.health_check.clone().or_else(|| default_health.clone());
        if let Some(h) = &s3.health_check {
            check_health(h, &format!("{at3}.health_check"), &mut errs);
        }
        let mut health = HealthSettings::default();
        if let Some(h) = health_raw {
            health.enabled = h.enabled.unwrap_or(true);
            health.interval = h
                .interval_seconds
                .map(Duration::from_secs)
                .unwrap_or(health.interval);
            health.timeout = h
                .timeout_seconds
                .map(Duration::from_secs)
                .unwrap_or(health.timeout);
            health.path = h.path.unwrap_or(health.path);
        }
        buckets.push(Bucket {
            name: b.name,
            path_prefix: prefix,
            replicas,
            breaker,
            health,
        });
    }

    let metrics = match raw.metrics {
        None => Metrics {
            enabled: true,
            address: SocketAddr::new(address.ip(), 9090),
        },
        Some(m) => {
            let port = m.port.unwrap_or(9090);
            let ip = match &m.address {
                None => address.ip(),
                Some(a) => match a.parse() {
                    Ok(ip) => ip,
                    Err(_) => {
                        errs.push(format!("metrics.address: {a:?} is not an IP address"));
                        address.ip()
                    }
                },
            };
            let metrics = Metrics {
                enabled: m.enabled.unwrap_or(true),
                address: SocketAddr::new(ip, port),
            };
            if metrics.enabled && port == address.port() && port != 0 {
                errs.push(format!(
                    "metrics.port: {port} is the same port as server.address"
                ));
            }
            metrics
        }
    };

    let mut logging = Logging {
        level: Level::Info,
        format: LogFormat::Text,
    };
    if let Some(l) = raw.logging {
        if let Some(level) = l.level {
            match Level::parse(&level) {
                Some(v) => logging.level = v,
                None => errs.push(format!(
                    "logging.level: {level:?} is not one of error, warn, info, debug"
                )),
            }
        }
        if let Some(format) = l.format {
            match format.to_ascii_lowercase().as_str() {
                "text" => logging.format = LogFormat::Text,
                "json" => logging.format = LogFormat::Json,
                _ => errs.push(format!(
                    "logging.format: {format:?} is not one of text, json"
                )),
            }
        }
    }

    if errs.is_empty() {
        Ok(Config {
            server,
            buckets,
            metrics,
            logging,
        })
    } else {
        Err(errs)
    }
}

/// `ca_file` must be readable PEM, and TLS settings need an https endpoint.
fn check_tls(replica: Option<&Replica>, at: &str, errs: &mut Vec<String>) {
    let Some(r) = replica else { return };
    if !r.endpoint.tls && (r.ca_file.is_some() || r.insecure_skip_verify) {
        errs.push(format!(
            "{at}: ca_file and insecure_skip_verify apply to https:// endpoints only (this one is http://)"
        ));
    }
    if let Some(path) = &r.ca_file {
        if let Err(e) = crate::upstream::tls::load_pem_certs(path) {
            errs.push(format!("{at}.ca_file: {e}"));
        }
    }
}

fn check_health(h: &RawHealthCheck, at: &str, errs: &mut Vec<String>) {
    if h.interval_seconds == Some(0) {
        errs.push(format!("{at}.interval_seconds: must be at least 1"));
    }
    if h.timeout_seconds == Some(0) {
        errs.push(format!("{at}.timeout_seconds: must be at least 1"));
    }
    if let Some(p) = &h.path {
        if !p.starts_with('/') || p.chars().any(|c| c.is_control() || c == ' ') {
            errs.push(format!(
                "{at}.path: {p:?} must start with '/' and contain no spaces"
            ));
        }
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

/// Parses `http://host[:port][/]`, or builds the AWS regional endpoint when absent.
fn resolve_endpoint(
    src: Option<&str>,
    bucket: &str,
    region: &str,
    at: &str,
    errs: &mut Vec<String>,
) -> Endpoint {
    let fallback = Endpoint {
        tls: false,
        host: "invalid".into(),
        port: 80,
        authority: "invalid".into(),
    };
    let Some(src) = src else {
        let host = if bucket.contains('.') {
            format!("s3.{region}.amazonaws.com")
        } else {
            format!("{bucket}.s3.{region}.amazonaws.com")
        };
        return Endpoint {
            tls: true,
            authority: host.clone(),
            host,
            port: 443,
        };
    };
    let (tls, rest) = if let Some(r) = src.strip_prefix("http://") {
        (false, r)
    } else if let Some(r) = src.strip_prefix("https://") {
        (true, r)
    } else {
        errs.push(format!("{at}: {src:?} must start with http:// or https://"));
        return fallback;
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
        errs.push(format!(
            "{at}: {src:?} must be scheme://host[:port] with no path"
        ));
        return fallback;
    }
    let default_port = if tls { 443 } else { 80 };
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        match v6.split_once(']') {
            Some((h, tail)) => (format!("[{h}]"), tail.strip_prefix(':')),
            None => {
                errs.push(format!("{at}: {src:?} has an unclosed IPv6 bracket"));
                return fallback;
            }
        }
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (rest.to_string(), None),
        }
    };
    let port = match port {
        None => default_port,
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => {
                errs.push(format!("{at}: {src:?} has an invalid port"));
                return fallback;
            }
        },
    };
    let authority = if port == default_port {
        host.clone()
    } else {
        format!("{host}:{port}")
    };
    Endpoint {
        tls,
        host,
        port,
        authority,
    }
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
    fn parses_the_tutorial_shape() {
        let c = parse(BASE, &env).unwrap();
        let b = &c.buckets[0];
        assert_eq!(b.path_prefix, "/data");
        assert_eq!(b.replicas.len(), 2);
        assert_eq!(b.replicas[0].access_key, "minioadmin");
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
