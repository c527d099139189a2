//! Raw YAML schema -> resolved [`Config`], one function per section.
//!
//! Every check reports into one [`Problems`] collector with the YAML path it
//! concerns, so `--check` lists every problem at once. Defaults are the
//! named constants of `schema.rs`; nothing downstream re-validates.

use super::schema::*;
use super::*;

mod access;
mod audit;
mod authz;
mod cache;
mod images;
mod replicas;
use access::*;
use cache::*;
pub(in crate::config) use replicas::parse_endpoint;
use replicas::*;

/// Problems found so far, each `path: message`.
#[derive(Default)]
pub(super) struct Problems(Vec<String>, Vec<String>);

impl Problems {
    /// Records a warning about the value at YAML path `at`: accepted, but
    /// the user should know (a key of the other system with no effect
    /// here, a setting that does less than it says).
    pub(super) fn warn(&mut self, at: &str, message: impl std::fmt::Display) {
        self.1.push(format!("{at}: {message}"));
    }

    /// Records `message` about the value at YAML path `at`.
    pub(super) fn at(&mut self, at: &str, message: impl std::fmt::Display) {
        self.0.push(format!("{at}: {message}"));
    }

    /// Records that `value` at `at` must be at least 1.
    pub(super) fn positive(&mut self, at: &str, value: u64) {
        if value == 0 {
            self.at(at, "must be at least 1");
        }
    }

    /// Records that the string at `at` must not be blank.
    fn non_empty(&mut self, at: &str, value: &str) {
        if value.trim().is_empty() {
            self.at(at, "must not be empty");
        }
    }
}

/// Checks and resolves a whole configuration.
/// Why `scope: fleet` needs the Redis tier.
const FLEET_NEEDS_REDIS: &str =
    "fleet needs cache.redis (the fleet's limits are kept in that Redis)";

pub(super) fn validate(raw: RawConfig) -> Result<Config, Vec<String>> {
    let mut p = Problems::default();
    let server = server(&raw.server, &mut p);
    if let Some(h) = &raw.health_check {
        check_health(h, "health_check", &mut p);
    }
    if raw.buckets.is_empty() {
        p.at("buckets", "at least one bucket is required");
    }
    let cache = cache(raw.cache.as_ref(), &mut p);
    if cache.redis.is_none() {
        let limits = &server.rate_limit;
        for (r, at) in [
            (limits.global, "server.rate_limit.global.scope"),
            (limits.per_ip, "server.rate_limit.per_ip.scope"),
        ] {
            if r.is_some_and(|r| r.fleet) {
                p.at(at, FLEET_NEEDS_REDIS);
            }
        }
    }
    let jwt_enabled = raw.jwt.as_ref().is_some_and(|j| j.enabled == Some(true));
    let buckets = buckets(
        raw.buckets,
        raw.health_check.as_ref(),
        &cache,
        (jwt_enabled, raw.jwt.as_ref()),
        raw.image_optimization.as_ref(),
        &mut p,
    );
    let images_used = buckets.iter().any(|b| b.images.is_some());
    let image_pool = images::pool(raw.image_optimization.as_ref(), images_used, &mut p);
    let metrics = metrics(raw.metrics.as_ref(), server.address, &mut p);
    let logging = logging(raw.logging.as_ref(), &mut p);
    let jwt = raw.jwt.as_ref().and_then(|j| jwt(j, "jwt", &mut p));
    let audit = raw.audit_log.as_ref().and_then(|a| audit::audit(a, &mut p));
    let tracing = raw
        .observability
        .as_ref()
        .and_then(|o| o.tracing.as_ref())
        .and_then(|t| audit::tracing(t, &mut p));
    let admin_token = raw.admin.as_ref().and_then(|a| a.token.clone());
    if admin_token.as_deref().is_some_and(|t| t.len() < 16) {
        p.at("admin.token", "must be at least 16 characters");
    }
    let admin_main_port = raw
        .admin
        .as_ref()
        .and_then(|a| a.main_port)
        .unwrap_or(false);
    let admin_guarded =
        admin_token.is_some() || jwt.as_ref().is_some_and(|j| !j.admin_claims.is_empty());
    if admin_main_port && !admin_guarded {
        p.at(
            "admin.main_port",
            "needs admin.token or jwt.admin_claims (the admin API is off without one)",
        );
    }
    if p.0.is_empty() {
        Ok(Config {
            server,
            buckets,
            metrics,
            logging,
            cache,
            admin_token,
            admin_main_port,
            jwt,
            audit,
            tracing,
            image_pool,
            warnings: p.1,
        })
    } else {
        Err(p.0)
    }
}

/// `server.address` as `host:port`, or a host (IPv6 bare or in brackets)
/// with `server.port`.
fn listen_address(raw: &RawServer) -> Option<SocketAddr> {
    match raw.port {
        None => raw.address.to_socket_addrs().ok()?.next(),
        Some(port) => {
            let host = raw.address.trim_start_matches('[').trim_end_matches(']');
            (host, port).to_socket_addrs().ok()?.next()
        }
    }
}

fn server(raw: &RawServer, p: &mut Problems) -> Server {
    let address = match listen_address(raw) {
        Some(a) => a,
        None if raw.port.is_some() => {
            p.at(
                "server.address",
                format_args!(
                    "{:?} is not a valid listen host for server.port {}",
                    raw.address,
                    raw.port.unwrap_or(0)
                ),
            );
            SocketAddr::from(([0, 0, 0, 0], 8080))
        }
        None => {
            p.at(
                "server.address",
                format_args!(
                    "{:?} is not a valid listen address (expected host:port, or a host with server.port)",
                    raw.address
                ),
            );
            SocketAddr::from(([0, 0, 0, 0], 8080))
        }
    };
    if let Some(c) = &raw.coalescing {
        if c.enabled == Some(false) {
            p.at(
                "server.coalescing.enabled",
                "concurrent misses for one object are always collapsed into one upstream request here; remove the key or set it to true",
            );
        }
        match c.strategy.as_deref() {
            None | Some("streaming") => {}
            Some("wait_for_complete") => p.warn(
                "server.coalescing.strategy",
                "waiters always stream the one fetch as it arrives here; wait_for_complete has no effect",
            ),
            Some(other) => p.at(
                "server.coalescing.strategy",
                format_args!("{other:?} is not one of streaming, wait_for_complete"),
            ),
        }
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = raw.workers.unwrap_or(cores);
    if workers == 0 || workers > MAX_WORKERS {
        p.at(
            "server.workers",
            format_args!("must be between 1 and {MAX_WORKERS}"),
        );
    }
    let workers = workers.max(1);
    let idle = raw
        .idle_timeout_seconds
        .unwrap_or(DEFAULT_IDLE_TIMEOUT_SECS);
    p.positive("server.idle_timeout_seconds", idle);
    let head = raw
        .request_head_timeout_seconds
        .unwrap_or(DEFAULT_REQUEST_HEAD_TIMEOUT_SECS);
    p.positive("server.request_head_timeout_seconds", head);
    let max_connections = raw.max_connections.unwrap_or_else(default_max_connections);
    if max_connections < workers {
        p.at(
            "server.max_connections",
            format_args!("must be at least the number of workers ({workers})"),
        );
    }
    let max_upstream = raw
        .max_upstream_connections
        .unwrap_or_else(|| default_max_upstream_connections(max_connections));
    if max_upstream < workers {
        p.at(
            "server.max_upstream_connections",
            format_args!("must be at least the number of workers ({workers})"),
        );
    }
    let tls = raw.tls.as_ref().map(|t| ListenerTls {
        cert_file: t.cert_file.clone(),
        key_file: t.key_file.clone(),
    });
    if let Some(t) = &tls {
        if let Err(e) = crate::tls::acceptor(&t.cert_file, &t.key_file) {
            p.at("server.tls", e);
        }
    }
    Server {
        tls,
        rate_limit: rate_limits(raw.rate_limit.as_ref(), p),
        trusted_proxies: cidrs(
            raw.trusted_proxies.as_deref().unwrap_or_default(),
            "server.trusted_proxies",
            p,
        ),
        zero_copy: raw.zero_copy.unwrap_or_default(),
        address,
        workers,
        idle_timeout: Duration::from_secs(idle.max(1)),
        request_head_timeout: Duration::from_secs(head.max(1)),
        max_connections: max_connections.max(workers),
        max_upstream_connections: max_upstream.max(workers),
        shutdown_timeout: Duration::from_secs(
            raw.shutdown_timeout_seconds
                .unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT_SECS),
        ),
    }
}

/// Every bucket, plus the checks across buckets (unique names and prefixes).
fn buckets(
    raw: Vec<RawBucket>,
    default_health: Option<&RawHealthCheck>,
    cache: &CacheSettings,
    (jwt_enabled, top_jwt): (bool, Option<&RawJwt>),
    top_images: Option<&super::schema::RawImages>,
    p: &mut Problems,
) -> Vec<Bucket> {
    let mut prefixes: HashMap<String, usize> = HashMap::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, b) in raw.into_iter().enumerate() {
        let at = format!("buckets[{i}]");
        if b.name.trim().is_empty() {
            p.at(&format!("{at}.name"), "must not be empty");
        } else if let Some(j) = names.insert(b.name.clone(), i) {
            p.at(
                &format!("{at}.name"),
                format_args!("{:?} is already used by buckets[{j}]", b.name),
            );
        }
        let prefix = path_prefix(&b.path_prefix, &format!("{at}.path_prefix"), p);
        if let Some(j) = prefixes.insert(prefix.clone(), i) {
            p.at(
                &format!("{at}.path_prefix"),
                format_args!(
                    "{:?} overlaps buckets[{j}].path_prefix (both route {:?})",
                    b.path_prefix,
                    if prefix.is_empty() { "/" } else { &prefix }
                ),
            );
        }
        let auth = b.auth.as_ref().is_some_and(|a| a.enabled);
        // The bucket's own `auth.jwt` (the other system's shape): its keys
        // over the top-level `jwt`'s, which stays the default.
        let own_jwt = match b.auth.as_ref().and_then(|a| a.jwt.as_ref()) {
            Some(own) if auth => {
                if own.jwks_url.is_some() {
                    p.at(
                        &format!("{at}.auth.jwt.jwks_url"),
                        "a JWK set is fetched for the top-level jwt only; set jwks_url there",
                    );
                }
                if own.admin_claims.is_some() {
                    p.at(
                        &format!("{at}.auth.jwt.admin_claims"),
                        "the admin API is guarded by the top-level jwt only; set admin_claims there",
                    );
                }
                if own.enabled == Some(false) {
                    p.at(
                        &format!("{at}.auth.jwt.enabled"),
                        "is false while the bucket's auth.enabled is true; auth.enabled decides",
                    );
                }
                let merged = own.over(top_jwt);
                jwt(&merged, &format!("{at}.auth.jwt"), p)
            }
            _ => None,
        };
        if auth && !jwt_enabled && own_jwt.is_none() {
            p.at(
                &format!("{at}.auth.enabled"),
                "needs jwt.enabled: true and a key, or a key in the bucket's auth.jwt",
            );
        }
        let bucket_cache = bucket_cache(b.cache.as_ref(), cache, &format!("{at}.cache"), p);
        let upstream_rate =
            b.s3.rate_limit
                .as_ref()
                .map(|r| rate(r, &format!("{at}.s3.rate_limit"), p));
        if upstream_rate.is_some_and(|r| r.fleet) && cache.redis.is_none() {
            p.at(&format!("{at}.s3.rate_limit.scope"), FLEET_NEEDS_REDIS);
        }
        let (allowlist, blocklist) = match &b.ip_filter {
            None => (Vec::new(), Vec::new()),
            Some(f) => (
                cidrs(&f.allowlist, &format!("{at}.ip_filter.allowlist"), p),
                cidrs(&f.blocklist, &format!("{at}.ip_filter.blocklist"), p),
            ),
        };
        let authorization = b
            .authorization
            .as_ref()
            .and_then(|a| authz::authorization(a, &format!("{at}.authorization"), auth, p));
        let watermark = b
            .watermark
            .as_ref()
            .and_then(|w| images::watermark(w, &format!("{at}.watermark"), auth, p));
        let image_settings = images::bucket_images(
            top_images,
            b.image_optimization.as_ref(),
            watermark.is_some(),
            &at,
            p,
        );
        let at3 = format!("{at}.s3");
        let s3 = &b.s3;
        let replicas = replicas(s3, &at3, p);
        let breaker = breaker(
            s3.circuit_breaker.as_ref(),
            &format!("{at3}.circuit_breaker"),
            p,
        );
        if let Some(h) = &s3.health_check {
            check_health(h, &format!("{at3}.health_check"), p);
        }
        let health = health(s3.health_check.as_ref().or(default_health));
        out.push(Bucket {
            name: b.name,
            path_prefix: prefix,
            origin: super::origin_fingerprint(&replicas),
            replicas,
            breaker,
            health,
            cache: bucket_cache,
            upstream_rate,
            auth,
            jwt: own_jwt,
            allowlist,
            blocklist,
            authorization: authorization.map(std::sync::Arc::new),
            images: image_settings.map(std::sync::Arc::new),
            watermark: watermark.map(std::sync::Arc::new),
        });
    }
    out
}

fn path_prefix(raw: &str, at: &str, p: &mut Problems) -> String {
    let prefix = normalize_prefix(raw).unwrap_or_else(|e| {
        p.at(at, e);
        String::new()
    });
    if prefix == "/health" || prefix == "/ready" {
        p.at(
            at,
            format_args!("{prefix:?} is reserved for the proxy's own endpoint"),
        );
    }
    prefix
}

fn metrics(raw: Option<&RawMetrics>, server: SocketAddr, p: &mut Problems) -> Metrics {
    let Some(m) = raw else {
        return Metrics {
            enabled: true,
            address: SocketAddr::new(server.ip(), DEFAULT_METRICS_PORT),
        };
    };
    let mut port = m.port.unwrap_or(DEFAULT_METRICS_PORT);
    let ip = match &m.address {
        None => server.ip(),
        Some(a) => match (a.parse::<std::net::IpAddr>(), a.parse::<SocketAddr>()) {
            (Ok(ip), _) => ip,
            (_, Ok(both)) if m.port.is_none_or(|p| p == both.port()) => {
                port = both.port();
                both.ip()
            }
            (_, Ok(_)) => {
                p.at("metrics.port", "differs from the port in metrics.address");
                server.ip()
            }
            _ => {
                p.at(
                    "metrics.address",
                    format_args!("{a:?} is not an IP address or ip:port"),
                );
                server.ip()
            }
        },
    };
    let enabled = m.enabled.unwrap_or(true);
    if enabled && port == server.port() && port != 0 {
        p.at(
            "metrics.port",
            format_args!("{port} is the same port as server.address"),
        );
    }
    Metrics {
        enabled,
        address: SocketAddr::new(ip, port),
    }
}

fn logging(raw: Option<&RawLogging>, p: &mut Problems) -> Logging {
    let mut logging = Logging {
        level: Level::Info,
        format: LogFormat::Text,
    };
    let Some(l) = raw else { return logging };
    if let Some(level) = &l.level {
        match Level::parse(level) {
            Some(v) => logging.level = v,
            None => p.at(
                "logging.level",
                format_args!("{level:?} is not one of error, warn, info, debug"),
            ),
        }
    }
    if let Some(format) = l.format {
        logging.format = format;
    }
    logging
}
