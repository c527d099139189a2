//! Raw YAML schema -> resolved [`Config`], one function per section.
//!
//! Every check reports into one [`Problems`] collector with the YAML path it
//! concerns, so `--check` lists every problem at once. Defaults are the
//! named constants of `schema.rs`; nothing downstream re-validates.

use super::schema::*;
use super::*;

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
    let jwt_enabled = raw.jwt.as_ref().is_some_and(|j| j.enabled == Some(true));
    let buckets = buckets(
        raw.buckets,
        raw.health_check.as_ref(),
        &cache,
        (jwt_enabled, raw.jwt.as_ref()),
        &mut p,
    );
    let metrics = metrics(raw.metrics.as_ref(), server.address, &mut p);
    let logging = logging(raw.logging.as_ref(), &mut p);
    let jwt = raw.jwt.as_ref().and_then(|j| jwt(j, "jwt", &mut p));
    let admin_token = raw.admin.as_ref().and_then(|a| a.token.clone());
    if admin_token.as_deref().is_some_and(|t| t.len() < 16) {
        p.at("admin.token", "must be at least 16 characters");
    }
    if p.0.is_empty() {
        Ok(Config {
            server,
            buckets,
            metrics,
            logging,
            cache,
            admin_token,
            jwt,
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
            .and_then(|a| super::authz::authorization(a, &format!("{at}.authorization"), auth, p));
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
        });
    }
    out
}

const MIB: u64 = 1024 * 1024;
/// Largest `cache.slice_size_mb`.
const MAX_SLICE_MB: u64 = 1024;

/// `cache:`: the memory and disk tiers and slices.
fn cache(raw: Option<&RawCache>, p: &mut Problems) -> CacheSettings {
    let mut out = CacheSettings {
        enabled: false,
        memory_bytes: DEFAULT_CACHE_MEMORY_MB * MIB,
        max_item_bytes: DEFAULT_CACHE_ITEM_MB * MIB,
        default_ttl: Duration::from_secs(DEFAULT_CACHE_TTL_SECS),
        stale_if_error: Duration::ZERO,
        disk: None,
        slice_bytes: None,
        redis: None,
    };
    let Some(c) = raw else { return out };
    out.enabled = c.enabled.unwrap_or(false);
    let disk_on = c.disk.as_ref().is_some_and(|d| d.enabled == Some(true));
    let mut listed_disk = false;
    let mut listed_memory = false;
    let mut listed_redis = false;
    for (i, layer) in c.cache_layers.iter().flatten().enumerate() {
        let at = format!("cache.cache_layers[{i}]");
        match layer.as_str() {
            "memory" => listed_memory = true,
            "disk" if !disk_on => p.at(&at, "\"disk\" needs cache.disk.enabled: true"),
            "disk" => {
                if i == 0 && c.cache_layers.as_ref().is_some_and(|l| l.len() > 1) {
                    p.warn(
                        "cache.cache_layers",
                        "lookups always go memory, then disk (a memory hit never needs the disk); the order written has no effect",
                    );
                }
                listed_disk = true;
            }
            "redis" if c.redis.is_none() => p.at(&at, "\"redis\" needs cache.redis (redis_url)"),
            "redis" => listed_redis = true,
            other => p.at(
                &at,
                format_args!("{other:?} is not one of memory, disk, redis"),
            ),
        }
    }
    if listed_disk && !listed_memory && out.enabled {
        p.warn(
            "cache.cache_layers",
            "the memory tier is always in front of the disk tier here (sized by cache.memory.max_cache_size_mb)",
        );
    }
    if disk_on && c.cache_layers.is_some() && !listed_disk {
        p.at(
            "cache.disk.enabled",
            "the disk tier is enabled but cache.cache_layers does not list \"disk\"",
        );
    }
    if let Some(m) = &c.memory {
        let mb = m.max_cache_size_mb.unwrap_or(DEFAULT_CACHE_MEMORY_MB);
        let item = m.max_item_size_mb.unwrap_or(DEFAULT_CACHE_ITEM_MB);
        let ttl = m.default_ttl_seconds.unwrap_or(DEFAULT_CACHE_TTL_SECS);
        p.positive("cache.memory.max_cache_size_mb", mb);
        p.positive("cache.memory.max_item_size_mb", item);
        p.positive("cache.memory.default_ttl_seconds", ttl);
        if item > mb {
            p.at(
                "cache.memory.max_item_size_mb",
                "must not exceed max_cache_size_mb",
            );
        }
        out.memory_bytes = mb.max(1) * MIB;
        out.max_item_bytes = item.max(1) * MIB;
        out.default_ttl = Duration::from_secs(ttl.max(1));
    }
    if let Some(d) = &c.disk {
        let dir = d.cache_dir.as_deref().unwrap_or("").trim();
        if disk_on && dir.is_empty() {
            p.at(
                "cache.disk.cache_dir",
                "is required when the disk tier is enabled",
            );
        }
        let mb = d.max_disk_cache_size_mb.unwrap_or(DEFAULT_CACHE_DISK_MB);
        p.positive("cache.disk.max_disk_cache_size_mb", mb);
        if disk_on {
            out.disk = Some(DiskCache {
                dir: dir.to_string(),
                max_bytes: mb.max(1) * MIB,
            });
        }
    }
    if let Some(r) = &c.redis {
        let on = r.enabled.unwrap_or(listed_redis) || listed_redis;
        if r.enabled == Some(true) && c.cache_layers.is_some() && !listed_redis {
            p.at(
                "cache.redis.enabled",
                "the Redis tier is enabled but cache.cache_layers does not list \"redis\"",
            );
        }
        if on {
            out.redis = redis(r, p);
        }
    }
    out.stale_if_error = Duration::from_secs(c.stale_if_error_seconds.unwrap_or(0));
    if let Some(mb) = c.slice_size_mb {
        if !(1..=MAX_SLICE_MB).contains(&mb) {
            p.at(
                "cache.slice_size_mb",
                format_args!("must be between 1 and {MAX_SLICE_MB}"),
            );
        } else if mb * MIB > out.max_item_bytes {
            p.at(
                "cache.slice_size_mb",
                "must not exceed cache.memory.max_item_size_mb (a slice is stored like an object)",
            );
        }
        out.slice_bytes = Some(mb.clamp(1, MAX_SLICE_MB) * MIB);
    }
    out
}

/// Default `cache.redis.redis_ttl_seconds` (the other system's).
const DEFAULT_REDIS_TTL_SECS: u64 = 3600;
/// Default `cache.redis.redis_max_ttl_seconds` (the other system's).
const DEFAULT_REDIS_MAX_TTL_SECS: u64 = 86_400;

/// `cache.redis`, when the tier is on.
fn redis(r: &super::schema::RawCacheRedis, p: &mut Problems) -> Option<super::RedisCache> {
    let Some(url) = r
        .redis_url
        .as_deref()
        .map(str::trim)
        .filter(|u| !u.is_empty())
    else {
        p.at(
            "cache.redis.redis_url",
            "is required when the Redis tier is on",
        );
        return None;
    };
    let parsed = match crate::cache::redis::parse_url(url) {
        Ok(u) => u,
        Err(why) => {
            p.at("cache.redis.redis_url", why);
            return None;
        }
    };
    let ttl = r.redis_ttl_seconds.unwrap_or(DEFAULT_REDIS_TTL_SECS);
    let max_ttl = r
        .redis_max_ttl_seconds
        .unwrap_or(DEFAULT_REDIS_MAX_TTL_SECS);
    p.positive("cache.redis.redis_ttl_seconds", ttl);
    p.positive("cache.redis.redis_max_ttl_seconds", max_ttl);
    let connect = r.connection_timeout_ms.unwrap_or(5000);
    let operation = r.operation_timeout_ms.unwrap_or(2000);
    p.positive("cache.redis.connection_timeout_ms", connect);
    p.positive("cache.redis.operation_timeout_ms", operation);
    let max_pool = r.max_pool_size.unwrap_or(10);
    p.positive("cache.redis.max_pool_size", max_pool as u64);
    if r.min_pool_size.is_some() {
        p.warn(
            "cache.redis.min_pool_size",
            "has no effect: each core opens its Redis connections when it first needs them",
        );
    }
    let prefix = r
        .redis_key_prefix
        .clone()
        .unwrap_or_else(|| "yatagarasu".into());
    if prefix
        .bytes()
        .any(|b| b.is_ascii_control() || b == b'{' || b == b'}')
    {
        p.at(
            "cache.redis.redis_key_prefix",
            "must not hold control characters or braces (braces are the key's hash tag)",
        );
    }
    Some(super::RedisCache {
        address: parsed.address,
        password: r
            .redis_password
            .clone()
            .filter(|s| !s.is_empty())
            .or(parsed.password),
        user: parsed.user,
        db: r.redis_db.or(parsed.db).unwrap_or(0),
        prefix,
        ttl: Duration::from_secs(ttl.max(1)),
        max_ttl: Duration::from_secs(max_ttl.max(1)),
        connect_timeout: Duration::from_millis(connect.max(1)),
        operation_timeout: Duration::from_millis(operation.max(1)),
        max_connections: max_pool.max(1),
    })
}

/// `buckets[].cache`, resolved against the top-level settings.
fn bucket_cache(
    raw: Option<&RawBucketCache>,
    top: &CacheSettings,
    at: &str,
    p: &mut Problems,
) -> BucketCache {
    let mut out = BucketCache {
        enabled: top.enabled,
        ttl: top.default_ttl,
        max_item_bytes: top.max_item_bytes,
    };
    let Some(c) = raw else { return out };
    if c.enabled == Some(true) && !top.enabled {
        p.warn(
            &format!("{at}.enabled"),
            "has no effect while cache.enabled is false (the cache is off for every bucket)",
        );
    }
    out.enabled = top.enabled && c.enabled.unwrap_or(true);
    if let Some(v) = c.ttl_seconds {
        p.positive(&format!("{at}.ttl_seconds"), v);
        out.ttl = Duration::from_secs(v.max(1));
    }
    if let Some(v) = c.max_item_size_mb {
        p.positive(&format!("{at}.max_item_size_mb"), v);
        out.max_item_bytes = v.max(1) * MIB;
    }
    out
}

/// `server.rate_limit`: nothing unless `enabled`.
fn rate_limits(raw: Option<&RawRateLimit>, p: &mut Problems) -> RateLimits {
    let Some(r) = raw else {
        return RateLimits::default();
    };
    let global = r
        .global
        .as_ref()
        .map(|g| rate(g, "server.rate_limit.global", p));
    let per_ip = r
        .per_ip
        .as_ref()
        .map(|g| rate(g, "server.rate_limit.per_ip", p));
    if r.enabled != Some(true) {
        return RateLimits::default();
    }
    RateLimits { global, per_ip }
}

/// A rate: positive requests per second; burst (default: one second's worth) >= 1.
fn rate(r: &RawRate, at: &str, p: &mut Problems) -> Rate {
    if !(r.requests_per_second > 0.0 && r.requests_per_second.is_finite()) {
        p.at(
            &format!("{at}.requests_per_second"),
            "must be a positive number",
        );
    }
    let burst = r.burst.unwrap_or(r.requests_per_second.max(1.0));
    if !(burst >= 1.0 && burst.is_finite()) {
        p.at(&format!("{at}.burst"), "must be at least 1");
    }
    Rate {
        per_second: r.requests_per_second.max(0.001),
        burst: burst.max(1.0),
    }
}

/// `jwt:`: the keys (each built now, so a bad file names its key), token
/// sources and claim rules. `None` unless `enabled`.
fn jwt(
    raw: &RawJwt,
    at0: &str,
    p: &mut Problems,
) -> Option<std::sync::Arc<crate::access::jwt::JwtSettings>> {
    // Off: nothing in it is checked (the other system's configs carry
    // `enabled: false` with an empty secret).
    if raw.enabled != Some(true) {
        return None;
    }
    use crate::access::jwt::{JwtSettings, Source};
    let mut s = JwtSettings {
        leeway: raw.leeway_seconds.unwrap_or(30),
        ..JwtSettings::default()
    };
    if raw.jwks_url.is_none() && raw.jwks_refresh_interval_secs.is_some() {
        p.at(
            &format!("{at0}.jwks_refresh_interval_secs"),
            format_args!("applies only with {at0}.jwks_url"),
        );
    }
    if let Some(url) = &raw.jwks_url {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            p.at(
                &format!("{at0}.jwks_url"),
                format_args!("{url:?} must start with http:// or https://"),
            );
        }
        let secs = raw.jwks_refresh_interval_secs.unwrap_or(3600);
        p.positive(&format!("{at0}.jwks_refresh_interval_secs"), secs);
        s.jwks = Some((url.clone(), Duration::from_secs(secs.max(1))));
    }
    let default_alg = raw.algorithm.as_deref().unwrap_or("HS256");
    let material = (
        raw.secret.as_deref(),
        raw.rsa_public_key_path.as_deref(),
        raw.ecdsa_public_key_path.as_deref(),
    );
    if material != (None, None, None) {
        s.default_key = jwt_key(default_alg, material, at0, p);
    }
    for (i, k) in raw.keys.iter().flatten().enumerate() {
        let at = format!("{at0}.keys[{i}]");
        let (secret, path) = (k.secret.as_deref(), k.path.as_deref());
        let material = match k.algorithm.get(..2) {
            Some("RS") => (None, path, None),
            Some("ES") => (None, None, path),
            _ => (secret, None, None),
        };
        if let Some(key) = jwt_key(&k.algorithm, material, &at, p) {
            if s.keys.insert(k.id.clone(), key).is_some() {
                p.at(
                    &format!("{at}.id"),
                    format_args!("{:?} is listed twice", k.id),
                );
            }
        }
    }
    for (i, src) in raw.token_sources.iter().flatten().enumerate() {
        let at = format!("{at0}.token_sources[{i}]");
        let name = || src.name.clone().filter(|n| !n.is_empty());
        // `bearer_header` and `query_param`: names some of the other
        // system's configs use.
        let kind = match src.kind.as_str() {
            "bearer_header" => "bearer",
            "query_param" => "query",
            other => other,
        };
        let source = match (kind, name()) {
            ("bearer", _) => Some(Source::Bearer),
            ("header", Some(n)) => Some(Source::Header {
                name: n.to_ascii_lowercase(),
                prefix: src.prefix.clone().unwrap_or_default(),
            }),
            ("query", Some(n)) => Some(Source::Query(n)),
            ("cookie", Some(n)) => Some(Source::Cookie(n)),
            ("header" | "query" | "cookie", None) => {
                p.at(&format!("{at}.name"), "is required for this type");
                None
            }
            (other, _) => {
                p.at(
                    &format!("{at}.type"),
                    format_args!("{other:?} is not one of bearer, header, query, cookie"),
                );
                None
            }
        };
        s.sources.extend(source);
    }
    if raw.token_sources.is_none() {
        s.sources.push(Source::Bearer);
    }
    s.claims = claim_rules(raw.claims.as_deref(), &format!("{at0}.claims"), p);
    s.admin_claims = claim_rules(
        raw.admin_claims.as_deref(),
        &format!("{at0}.admin_claims"),
        p,
    );
    if s.default_key.is_none() && s.keys.is_empty() && s.jwks.is_none() {
        p.at(
            at0,
            "enabled with no key: set secret, rsa_public_key_path, ecdsa_public_key_path, keys or jwks_url",
        );
    }
    Some(std::sync::Arc::new(s))
}

/// Claim rules as written at `list_at`, each checked.
fn claim_rules(
    raw: Option<&[RawClaim]>,
    list_at: &str,
    p: &mut Problems,
) -> Vec<crate::access::jwt::ClaimRule> {
    use crate::access::jwt::{ClaimRule, Op};
    let mut out = Vec::new();
    for (i, c) in raw.unwrap_or_default().iter().enumerate() {
        let at = format!("{list_at}[{i}]");
        let Some(op) = Op::parse(&c.operator) else {
            p.at(
                &format!("{at}.operator"),
                format_args!(
                    "{:?} is not one of equals, not_equals, contains, ends_with, starts_with, in, exists, gt, gte, lt, lte",
                    c.operator
                ),
            );
            continue;
        };
        let value = serde_json::to_value(&c.value).unwrap_or(serde_json::Value::Null);
        if op == Op::In && !(value.is_array() || value.is_string()) {
            p.at(
                &format!("{at}.value"),
                "must be a list (or a comma-separated string) for the in operator",
            );
        }
        if matches!(op, Op::Gt | Op::Lt | Op::Gte | Op::Lte) && !value.is_number() {
            p.at(
                &format!("{at}.value"),
                "must be a number for gt, gte, lt and lte",
            );
        }
        if matches!(op, Op::EndsWith | Op::StartsWith) && !value.is_string() {
            p.at(
                &format!("{at}.value"),
                "must be a string for ends_with and starts_with",
            );
        }
        out.push(ClaimRule {
            claim: c.claim.clone(),
            op,
            value,
        });
    }
    out
}

/// One verification key: `alg` decides which of (secret, RSA PEM path, EC
/// PEM path) it needs.
fn jwt_key(
    alg: &str,
    (secret, rsa, ec): (Option<&str>, Option<&str>, Option<&str>),
    at: &str,
    p: &mut Problems,
) -> Option<crate::access::jwt::Key> {
    use jsonwebtoken::{Algorithm, DecodingKey};
    let algorithm = match alg {
        "HS256" => Algorithm::HS256,
        "HS384" => Algorithm::HS384,
        "HS512" => Algorithm::HS512,
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        other => {
            p.at(
                &format!("{at}.algorithm"),
                format_args!("{other:?} is not one of HS256, HS384, HS512, RS256, RS384, RS512, ES256, ES384"),
            );
            return None;
        }
    };
    let read = |path: &str| std::fs::read(path).map_err(|e| format!("cannot read {path:?}: {e}"));
    let key = match (&alg[..2], secret, rsa, ec) {
        ("HS", Some(s), _, _) if !s.is_empty() => Ok(DecodingKey::from_secret(s.as_bytes())),
        ("HS", ..) => Err("needs a non-empty secret".to_string()),
        ("RS", _, Some(path), _) => read(path).and_then(|pem| {
            DecodingKey::from_rsa_pem(&pem)
                .map_err(|e| format!("{path:?} is not an RSA public key in PEM: {e}"))
        }),
        ("RS", ..) => Err("needs an RSA public key file (rsa_public_key_path or path)".to_string()),
        (_, _, _, Some(path)) => read(path).and_then(|pem| {
            DecodingKey::from_ec_pem(&pem)
                .map_err(|e| format!("{path:?} is not an ECDSA public key in PEM: {e}"))
        }),
        _ => Err("needs an ECDSA public key file (ecdsa_public_key_path or path)".to_string()),
    };
    match key {
        Ok(key) => Some(crate::access::jwt::Key { algorithm, key }),
        Err(e) => {
            p.at(at, e);
            None
        }
    }
}

/// A list of CIDR ranges; each bad entry is reported with its index.
fn cidrs(list: &[String], at: &str, p: &mut Problems) -> Vec<crate::access::ip::Cidr> {
    list.iter()
        .enumerate()
        .filter_map(|(i, s)| match crate::access::ip::Cidr::parse(s) {
            Ok(c) => Some(c),
            Err(e) => {
                p.at(&format!("{at}[{i}]"), e);
                None
            }
        })
        .collect()
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

/// The bucket's replicas: its `replicas` list, each inheriting the bucket's
/// settings, or one replica named `default` made of the bucket's settings.
fn replicas(s3: &RawS3, at3: &str, p: &mut Problems) -> Vec<Replica> {
    p.non_empty(&format!("{at3}.bucket"), &s3.bucket);
    let region = s3.region.as_deref().unwrap_or(DEFAULT_REGION);
    p.non_empty(&format!("{at3}.region"), region);
    own_keys(s3.keys(), at3, p);
    let timeout = s3.timeout_seconds.unwrap_or(DEFAULT_REPLICA_TIMEOUT_SECS);
    p.positive(&format!("{at3}.timeout_seconds"), timeout);
    let Some(list) = &s3.replicas else {
        let implicit = RawReplica {
            name: IMPLICIT_REPLICA.into(),
            ..RawReplica::default()
        };
        return vec![replica(&implicit, s3, at3, p)];
    };
    if list.is_empty() {
        p.at(
            &format!("{at3}.replicas"),
            "must list at least one replica (or be removed)",
        );
    }
    if list.len() > MAX_REPLICAS {
        p.at(
            &format!("{at3}.replicas"),
            format_args!("at most {MAX_REPLICAS} replicas per bucket"),
        );
    }
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut out = Vec::with_capacity(list.len());
    for (r, rep) in list.iter().enumerate() {
        let atr = format!("{at3}.replicas[{r}]");
        if rep.name.trim().is_empty() {
            p.at(&format!("{atr}.name"), "must not be empty");
        } else if let Some(j) = names.insert(&rep.name, r) {
            p.at(
                &format!("{atr}.name"),
                format_args!("{:?} is already used by replicas[{j}]", rep.name),
            );
        }
        out.push(replica(rep, s3, &atr, p));
    }
    out
}

/// One replica: its own keys, else the bucket's (`s3`), else the defaults.
fn replica(rep: &RawReplica, s3: &RawS3, at: &str, p: &mut Problems) -> Replica {
    let bucket = rep.bucket.clone().unwrap_or_else(|| s3.bucket.clone());
    if rep.bucket.is_some() {
        p.non_empty(&format!("{at}.bucket"), &bucket);
    }
    let region = rep
        .region
        .as_deref()
        .or(s3.region.as_deref())
        .unwrap_or(DEFAULT_REGION)
        .to_string();
    let endpoint_src = rep.endpoint.as_deref().or(s3.endpoint.as_deref());
    let endpoint = resolve_endpoint(endpoint_src, &bucket, &region, &format!("{at}.endpoint"), p);
    own_keys(rep.keys(), at, p);
    let credentials = credentials(inherit(rep.keys(), s3.keys()), at, p);
    let timeout = rep
        .timeout_seconds
        .or(s3.timeout_seconds)
        .unwrap_or(DEFAULT_REPLICA_TIMEOUT_SECS);
    if rep.timeout_seconds.is_some() {
        p.positive(&format!("{at}.timeout_seconds"), timeout);
    }
    let weight = rep.weight.unwrap_or(DEFAULT_WEIGHT);
    if weight == 0 || weight > MAX_WEIGHT {
        p.at(
            &format!("{at}.weight"),
            format_args!("must be between 1 and {MAX_WEIGHT}"),
        );
    }
    let replica = Replica {
        name: rep.name.clone(),
        virtual_hosted: endpoint_src.is_none() && !bucket.contains('.'),
        endpoint,
        bucket,
        region,
        credentials,
        priority: rep.priority.unwrap_or(DEFAULT_PRIORITY),
        weight: weight.max(1),
        timeout: Duration::from_secs(timeout.max(1)),
        ca_file: rep.ca_file.clone().or_else(|| s3.ca_file.clone()),
        insecure_skip_verify: rep
            .insecure_skip_verify
            .or(s3.insecure_skip_verify)
            .unwrap_or(false),
    };
    check_tls(&replica, at, p);
    replica
}

/// The name of the one replica of a bucket without a `replicas` list.
const IMPLICIT_REPLICA: &str = "default";

/// Checks the credential keys written at one level (`s3` or a replica).
fn own_keys(k: RawKeys<'_>, at: &str, p: &mut Problems) {
    for (key, value) in [
        ("access_key", k.access_key),
        ("secret_key", k.secret_key),
        ("access_key_file", k.access_key_file),
        ("secret_key_file", k.secret_key_file),
    ] {
        if value.is_some_and(|v| v.is_empty()) {
            p.at(&format!("{at}.{key}"), "must not be empty");
        }
    }
}

/// A replica's credential keys: its own, and the bucket's for the ones it
/// leaves out, except that a replica choosing one kind of source (static
/// keys, or key files / a provider) does not inherit the other kind.
fn inherit<'a>(rep: RawKeys<'a>, bucket: RawKeys<'a>) -> RawKeys<'a> {
    let rep_static = rep.access_key.is_some() || rep.secret_key.is_some();
    let rep_other = rep.access_key_file.is_some()
        || rep.secret_key_file.is_some()
        || rep
            .credentials
            .is_some_and(|c| c.provider != RawProvider::Static);
    let from_bucket = |mine: Option<&'a str>, theirs: Option<&'a str>, allowed: bool| {
        mine.or(if allowed { theirs } else { None })
    };
    RawKeys {
        access_key: from_bucket(rep.access_key, bucket.access_key, !rep_other),
        secret_key: from_bucket(rep.secret_key, bucket.secret_key, !rep_other),
        access_key_file: from_bucket(rep.access_key_file, bucket.access_key_file, !rep_static),
        secret_key_file: from_bucket(rep.secret_key_file, bucket.secret_key_file, !rep_static),
        credentials: rep.credentials.or(if rep_static {
            bucket
                .credentials
                .filter(|c| c.provider == RawProvider::Static)
        } else {
            bucket.credentials
        }),
    }
}

/// Resolves where a replica's keys come from; exactly one source must be
/// given (no silent fallback to ambient credentials).
fn credentials(k: RawKeys<'_>, at: &str, p: &mut Problems) -> CredentialSource {
    let provider = k.credentials.map(|c| c.provider);
    let has_static = k.access_key.is_some() || k.secret_key.is_some();
    let has_files = k.access_key_file.is_some() || k.secret_key_file.is_some();
    let pair = |p: &mut Problems, a: (&str, Option<&str>), b: (&str, Option<&str>)| {
        for ((name, value), (other, _)) in [(a, b), (b, a)] {
            if value.is_none() {
                p.at(
                    &format!("{at}.{name}"),
                    format_args!("missing ({other} is set)"),
                );
            }
        }
        (
            a.1.unwrap_or_default().to_string(),
            b.1.unwrap_or_default().to_string(),
        )
    };
    let base = match provider {
        None | Some(RawProvider::Static) => {
            if has_static && has_files {
                p.at(
                    &format!("{at}.access_key_file"),
                    "cannot be combined with access_key/secret_key; choose one",
                );
            }
            if has_static {
                let (access_key, secret_key) = pair(
                    p,
                    ("access_key", k.access_key),
                    ("secret_key", k.secret_key),
                );
                CredentialBase::Static {
                    access_key,
                    secret_key,
                }
            } else if has_files {
                let (access_key_file, secret_key_file) = pair(
                    p,
                    ("access_key_file", k.access_key_file),
                    ("secret_key_file", k.secret_key_file),
                );
                for (key, path) in [
                    ("access_key_file", &access_key_file),
                    ("secret_key_file", &secret_key_file),
                ] {
                    if path.is_empty() {
                        continue;
                    }
                    match std::fs::read_to_string(path) {
                        Ok(v) if v.trim().is_empty() => {
                            p.at(&format!("{at}.{key}"), format_args!("{path} is empty"))
                        }
                        Ok(_) => {}
                        Err(e) => p.at(
                            &format!("{at}.{key}"),
                            format_args!("cannot read {path}: {e}"),
                        ),
                    }
                }
                CredentialBase::Files {
                    access_key_file,
                    secret_key_file,
                }
            } else {
                p.at(
                    at,
                    "no credentials: set access_key and secret_key, access_key_file and secret_key_file, or credentials.provider",
                );
                CredentialBase::Static {
                    access_key: String::new(),
                    secret_key: String::new(),
                }
            }
        }
        Some(kind) => {
            for (set, key) in [(has_static, "access_key"), (has_files, "access_key_file")] {
                if set {
                    p.at(
                        &format!("{at}.{key}"),
                        format_args!(
                            "cannot be combined with credentials.provider {:?} (remove one)",
                            provider_name(kind)
                        ),
                    );
                }
            }
            let profile = k.credentials.and_then(|c| c.profile.clone());
            CredentialBase::Provider(match kind {
                RawProvider::DefaultChain => ProviderKind::DefaultChain,
                RawProvider::Environment => ProviderKind::Environment,
                RawProvider::Profile => ProviderKind::Profile(profile.clone()),
                RawProvider::WebIdentity => ProviderKind::WebIdentity,
                RawProvider::Ecs => ProviderKind::Ecs,
                // (static is the arm above)
                RawProvider::Imds | RawProvider::Static => ProviderKind::Imds,
            })
        }
    };
    let Some(c) = k.credentials else {
        return CredentialSource {
            base,
            assume_role: None,
        };
    };
    if c.profile.is_some() && c.provider != RawProvider::Profile {
        p.at(
            &format!("{at}.credentials.profile"),
            "is only used with provider \"profile\"",
        );
    }
    if c.profile.as_deref() == Some("") {
        p.at(&format!("{at}.credentials.profile"), "must not be empty");
    }
    let assume_role = c.assume_role.as_ref().map(|r| {
        let at_role = format!("{at}.credentials.assume_role");
        if !r.role_arn.starts_with("arn:") {
            p.at(
                &format!("{at_role}.role_arn"),
                format_args!(
                    "{:?} is not a role ARN (arn:aws:iam::<account>:role/<name>)",
                    r.role_arn
                ),
            );
        }
        let session_name = r
            .session_name
            .clone()
            .unwrap_or_else(|| DEFAULT_SESSION_NAME.to_string());
        if session_name.is_empty() {
            p.at(&format!("{at_role}.session_name"), "must not be empty");
        }
        if r.external_id.as_deref() == Some("") {
            p.at(&format!("{at_role}.external_id"), "must not be empty");
        }
        AssumeRole {
            role_arn: r.role_arn.clone(),
            session_name,
            external_id: r.external_id.clone(),
        }
    });
    CredentialSource { base, assume_role }
}

fn provider_name(p: RawProvider) -> &'static str {
    match p {
        RawProvider::Static => "static",
        RawProvider::DefaultChain => "default_chain",
        RawProvider::Environment => "environment",
        RawProvider::Profile => "profile",
        RawProvider::WebIdentity => "web_identity",
        RawProvider::Ecs => "ecs",
        RawProvider::Imds => "imds",
    }
}

fn breaker(raw: Option<&RawCircuitBreaker>, at: &str, p: &mut Problems) -> BreakerSettings {
    let mut b = BreakerSettings::default();
    let Some(cb) = raw else { return b };
    b.failure_threshold = cb.failure_threshold.unwrap_or(b.failure_threshold);
    b.success_threshold = cb.success_threshold.unwrap_or(b.success_threshold);
    b.open_for = cb.timeout_seconds.map_or(b.open_for, Duration::from_secs);
    b.half_open_requests = cb.half_open_requests.unwrap_or(b.half_open_requests);
    for (v, key) in [
        (b.failure_threshold, "failure_threshold"),
        (b.success_threshold, "success_threshold"),
        (b.half_open_requests, "half_open_requests"),
    ] {
        p.positive(&format!("{at}.{key}"), v as u64);
    }
    p.positive(&format!("{at}.timeout_seconds"), b.open_for.as_secs());
    b
}

fn health(raw: Option<&RawHealthCheck>) -> HealthSettings {
    let mut h = HealthSettings::default();
    if let Some(r) = raw {
        h.enabled = r.enabled.unwrap_or(true);
        h.interval = r.interval_seconds.map_or(h.interval, Duration::from_secs);
        h.timeout = r.timeout_seconds.map_or(h.timeout, Duration::from_secs);
        h.path = r.path.clone().unwrap_or(h.path);
    }
    h
}

fn check_health(h: &RawHealthCheck, at: &str, p: &mut Problems) {
    if let Some(v) = h.interval_seconds {
        p.positive(&format!("{at}.interval_seconds"), v);
    }
    if let Some(v) = h.timeout_seconds {
        p.positive(&format!("{at}.timeout_seconds"), v);
    }
    if let Some(path) = &h.path {
        if !path.starts_with('/') || path.chars().any(|c| c.is_control() || c == ' ') {
            p.at(
                &format!("{at}.path"),
                format_args!("{path:?} must start with '/' and contain no spaces"),
            );
        }
    }
}

/// `ca_file` must be readable PEM, and TLS settings need an https endpoint.
fn check_tls(r: &Replica, at: &str, p: &mut Problems) {
    if !r.endpoint.tls && (r.ca_file.is_some() || r.insecure_skip_verify) {
        p.at(
            at,
            "ca_file and insecure_skip_verify apply to https:// endpoints only (this one is http://)",
        );
    }
    if let Some(path) = &r.ca_file {
        if let Err(e) = crate::tls::load_pem_certs(path) {
            p.at(&format!("{at}.ca_file"), e);
        }
    }
}

fn metrics(raw: Option<&RawMetrics>, server: SocketAddr, p: &mut Problems) -> Metrics {
    let Some(m) = raw else {
        return Metrics {
            enabled: true,
            address: SocketAddr::new(server.ip(), DEFAULT_METRICS_PORT),
        };
    };
    let port = m.port.unwrap_or(DEFAULT_METRICS_PORT);
    let ip = match &m.address {
        None => server.ip(),
        Some(a) => a.parse().unwrap_or_else(|_| {
            p.at(
                "metrics.address",
                format_args!("{a:?} is not an IP address"),
            );
            server.ip()
        }),
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

/// Parses `http://host[:port][/]`, or builds the AWS regional endpoint when absent.
fn resolve_endpoint(
    src: Option<&str>,
    bucket: &str,
    region: &str,
    at: &str,
    p: &mut Problems,
) -> Endpoint {
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
    parse_endpoint(src).unwrap_or_else(|e| {
        p.at(at, format_args!("{src:?} {e}"));
        Endpoint {
            tls: false,
            host: "invalid".into(),
            port: 80,
            authority: "invalid".into(),
        }
    })
}

/// `scheme://host[:port]` with no path; the error completes "<src> ...".
pub(super) fn parse_endpoint(src: &str) -> Result<Endpoint, &'static str> {
    let (tls, rest) = if let Some(r) = src.strip_prefix("http://") {
        (false, r)
    } else if let Some(r) = src.strip_prefix("https://") {
        (true, r)
    } else {
        return Err("must start with http:// or https://");
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
        return Err("must be scheme://host[:port] with no path");
    }
    let default_port = if tls { 443 } else { 80 };
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, tail) = v6.split_once(']').ok_or("has an unclosed IPv6 bracket")?;
        (format!("[{h}]"), tail.strip_prefix(':'))
    } else {
        match rest.rsplit_once(':') {
            Some((h, port)) => (h.to_string(), Some(port)),
            None => (rest.to_string(), None),
        }
    };
    let port = match port {
        None => default_port,
        Some(v) => match v.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => return Err("has an invalid port"),
        },
    };
    let authority = if port == default_port {
        host.clone()
    } else {
        format!("{host}:{port}")
    };
    Ok(Endpoint {
        tls,
        host,
        port,
        authority,
    })
}
