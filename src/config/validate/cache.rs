//! `cache:` and `buckets[].cache`: the memory, disk and Redis tiers and
//! slices, resolved.

use super::super::schema::*;
use super::super::*;
use super::Problems;

pub(super) const MIB: u64 = 1024 * 1024;

/// Largest `cache.slice_size_mb`.
pub(super) const MAX_SLICE_MB: u64 = 1024;

/// `cache.disk.cache_dir` when it is left out.
const DEFAULT_CACHE_DIR: &str = "/var/cache/yatagarasu";

/// `cache:`: the memory and disk tiers and slices.
pub(super) fn cache(raw: Option<&RawCache>, p: &mut Problems) -> CacheSettings {
    let mut out = CacheSettings {
        enabled: false,
        memory_bytes: DEFAULT_CACHE_MEMORY_MB * MIB,
        max_item_bytes: DEFAULT_CACHE_ITEM_MB * MIB,
        default_ttl: Duration::from_secs(DEFAULT_CACHE_TTL_SECS),
        stale_if_error: Duration::ZERO,
        disk: None,
        slice_bytes: None,
        redis: None,
        warming: Warming::default(),
        lower_layers: vec![Layer::Disk, Layer::Redis],
    };
    let Some(c) = raw else { return out };
    out.enabled = c.enabled.unwrap_or(false);
    let disk_on = c.disk.as_ref().is_some_and(|d| d.enabled == Some(true));
    let Listed {
        memory: listed_memory,
        disk: listed_disk,
        redis: listed_redis,
        order: listed_order,
    } = layers(c, disk_on, p);
    if !listed_order.is_empty() {
        // The tiers listed, in their order; one not listed is not enabled
        // (refused below when it is).
        out.lower_layers = listed_order;
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
        let from_bytes = m.max_size.map(|b| b.div_ceil(MIB));
        if from_bytes.is_some() && m.max_cache_size_mb.is_some() {
            p.at(
                "cache.memory.max_size",
                "is the same bound as max_cache_size_mb (in bytes); keep one",
            );
        }
        let mb = m
            .max_cache_size_mb
            .or(from_bytes)
            .unwrap_or(DEFAULT_CACHE_MEMORY_MB);
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
        // The other system's default, and where our packages put it.
        let dir = d.cache_dir.as_deref().unwrap_or(DEFAULT_CACHE_DIR).trim();
        if disk_on && dir.is_empty() {
            p.at(
                "cache.disk.cache_dir",
                "is empty (leave it out for /var/cache/yatagarasu)",
            );
        }
        let mb = d.max_disk_cache_size_mb.unwrap_or(DEFAULT_CACHE_DISK_MB);
        p.positive("cache.disk.max_disk_cache_size_mb", mb);
        // Without a `sendfile` block, `server.zero_copy` alone decides.
        let send_from_file = match &d.sendfile {
            None => Some(0),
            Some(f) if f.enabled == Some(false) => None,
            Some(f) => Some(
                f.threshold_bytes
                    .unwrap_or(DiskCache::SENDFILE_THRESHOLD_BYTES),
            ),
        };
        if disk_on {
            out.disk = Some(DiskCache {
                dir: dir.to_string(),
                max_bytes: mb.max(1) * MIB,
                send_from_file,
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
        } else if r.redis_url.is_some() {
            p.warn(
                "cache.redis",
                "is not enabled (set enabled: true, or list \"redis\" in cache.cache_layers); the block has no effect",
            );
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
    if let Some(w) = &c.warming {
        out.warming = warming(w, p);
    }
    out
}

/// What `cache.cache_layers` lists: which tiers, and the order of those
/// below memory.
#[derive(Default)]
struct Listed {
    memory: bool,
    disk: bool,
    redis: bool,
    order: Vec<Layer>,
}

/// Reads `cache.cache_layers`: each entry a tier that is configured.
fn layers(c: &RawCache, disk_on: bool, p: &mut Problems) -> Listed {
    let mut listed = Listed::default();
    for (i, layer) in c.cache_layers.iter().flatten().enumerate() {
        let at = format!("cache.cache_layers[{i}]");
        match layer.as_str() {
            "memory" => {
                if i > 0 {
                    p.warn(
                        "cache.cache_layers",
                        "the memory tier is always asked first (a memory hit never needs a lower tier); the tiers below it are asked in the order written",
                    );
                }
                listed.memory = true;
            }
            "disk" if !disk_on => p.at(&at, "\"disk\" needs cache.disk.enabled: true"),
            "disk" => {
                listed.disk = true;
                listed.order.push(Layer::Disk);
            }
            "redis" if c.redis.is_none() => p.at(&at, "\"redis\" needs cache.redis (redis_url)"),
            "redis" => {
                listed.redis = true;
                listed.order.push(Layer::Redis);
            }
            other => p.at(
                &at,
                format_args!("{other:?} is not one of memory, disk, redis"),
            ),
        }
    }
    listed
}

/// `cache.warming`: a pre-warming task's concurrency and pace.
fn warming(w: &RawWarming, p: &mut Problems) -> Warming {
    let defaults = Warming::default();
    let concurrency = w.concurrency.unwrap_or(defaults.concurrency);
    let rate = w.rate_limit.unwrap_or(defaults.rate_limit);
    if !(1..=MAX_WARMING_CONCURRENCY).contains(&concurrency) {
        p.at(
            "cache.warming.concurrency",
            format_args!("must be between 1 and {MAX_WARMING_CONCURRENCY}"),
        );
    }
    p.positive("cache.warming.rate_limit", u64::from(rate));
    Warming {
        concurrency: concurrency.clamp(1, MAX_WARMING_CONCURRENCY),
        rate_limit: rate.max(1),
    }
}

/// Largest `cache.warming.concurrency`.
const MAX_WARMING_CONCURRENCY: usize = 64;

/// Default `cache.redis.redis_ttl_seconds` (the other system's).
pub(super) const DEFAULT_REDIS_TTL_SECS: u64 = 3600;

/// Default `cache.redis.redis_max_ttl_seconds` (the other system's).
pub(super) const DEFAULT_REDIS_MAX_TTL_SECS: u64 = 86_400;

/// Default `cache.redis.chunk_size_kb`: objects above 1 MiB are chunked.
const DEFAULT_REDIS_CHUNK_KB: u64 = 1024;

/// Largest `cache.redis.chunk_size_kb` (64 MiB; Redis takes values up to
/// 512 MB, but one chunk is read and checked whole).
const MAX_REDIS_CHUNK_KB: u64 = 64 * 1024;

/// `cache.redis`, when the tier is on.
pub(super) fn redis(
    r: &super::schema::RawCacheRedis,
    p: &mut Problems,
) -> Option<super::RedisCache> {
    let sentinel = r.sentinel.as_ref().and_then(|s| sentinel(s, p));
    let seeds = match &r.cluster {
        Some(c) => host_ports(
            c.nodes.as_deref().unwrap_or_default(),
            "cache.redis.cluster.nodes",
            p,
        ),
        None => Vec::new(),
    };
    if r.cluster.is_some() && seeds.is_empty() {
        p.at(
            "cache.redis.cluster.nodes",
            "is required: at least one node's host:port",
        );
    }
    if r.cluster.is_some() && r.sentinel.is_some() {
        p.at(
            "cache.redis.cluster",
            "and cache.redis.sentinel cannot both be set (a Cluster fails over by itself)",
        );
    }
    // With Sentinel, `redis_url` is optional: it carries credentials and a
    // database, and its host is asked while no Sentinel answers.
    let first_seed = seeds.first().map(|s| format!("redis://{s}"));
    let url = match r.redis_url.as_deref().map(str::trim) {
        Some(u) if !u.is_empty() => u,
        _ if r.sentinel.is_some() => "redis://sentinel",
        _ if first_seed.is_some() => first_seed.as_deref().unwrap_or_default(),
        _ => {
            p.at(
                "cache.redis.redis_url",
                "is required when the Redis tier is on (or cache.redis.sentinel, or cache.redis.cluster.nodes)",
            );
            return None;
        }
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
    let chunk_kb = r.chunk_size_kb.unwrap_or(DEFAULT_REDIS_CHUNK_KB);
    if !(1..=MAX_REDIS_CHUNK_KB).contains(&chunk_kb) {
        p.at(
            "cache.redis.chunk_size_kb",
            format!("must be between 1 and {MAX_REDIS_CHUNK_KB} (KiB), not {chunk_kb}"),
        );
    }
    let max_pool = r.max_pool_size.unwrap_or(10);
    p.positive("cache.redis.max_pool_size", max_pool as u64);
    if r.min_pool_size.is_some() {
        p.warn(
            "cache.redis.min_pool_size",
            "has no effect: each core opens its Redis connections when it first needs them",
        );
    }
    if parsed.tls_host.is_some() && r.sentinel.is_some() {
        p.at(
            "cache.redis.sentinel",
            "is not supported with a rediss:// redis_url (Sentinels and the primaries they name are reached over plain TCP)",
        );
    }
    let tls = match (&parsed.tls_host, &r.ca_file) {
        (None, Some(_)) => {
            p.at("cache.redis.ca_file", "needs a rediss:// redis_url");
            None
        }
        (None, None) => None,
        (Some(host), ca_file) => {
            if let Some(path) = ca_file {
                if let Err(e) = crate::tls::load_pem_certs(path) {
                    p.at("cache.redis.ca_file", e);
                }
            }
            Some(RedisTls {
                server_name: host.clone(),
                ca_file: ca_file.clone(),
            })
        }
    };
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
    // Without a `redis_url`, only the primary a Sentinel names is asked.
    let address = match r.redis_url.as_deref().map(str::trim) {
        Some(u) if !u.is_empty() => parsed.address,
        _ if r.sentinel.is_none() => parsed.address,
        _ => String::new(),
    };
    Some(super::RedisCache {
        address,
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
        chunk_bytes: chunk_kb.clamp(1, MAX_REDIS_CHUNK_KB) as usize * 1024,
        tls,
        sentinel,
        seeds,
    })
}

/// `host:port` entries at `at`, each checked.
fn host_ports(nodes: &[String], at: &str, p: &mut Problems) -> Vec<String> {
    let mut out = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        match crate::cache::redis::parse_url(&format!("redis://{}", node.trim())) {
            Ok(u) if !node.contains(['/', '@']) => out.push(u.address),
            Ok(_) => p.at(
                &format!("{at}[{i}]"),
                format_args!("{node:?} is not a host:port"),
            ),
            Err(why) => p.at(&format!("{at}[{i}]"), why),
        }
    }
    out
}

/// `cache.redis.sentinel`: a master name and at least one Sentinel.
fn sentinel(s: &super::schema::RawSentinel, p: &mut Problems) -> Option<super::RedisSentinel> {
    let master = s.master_name.as_deref().map(str::trim).unwrap_or("");
    if master.is_empty()
        || master
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        p.at(
            "cache.redis.sentinel.master_name",
            "is required: the name the Sentinels monitor the primary under (no spaces)",
        );
    }
    let nodes = host_ports(
        s.nodes.as_deref().unwrap_or_default(),
        "cache.redis.sentinel.nodes",
        p,
    );
    if s.nodes.as_ref().is_none_or(|n| n.is_empty()) {
        p.at(
            "cache.redis.sentinel.nodes",
            "is required: at least one Sentinel's host:port",
        );
    }
    (!master.is_empty() && !nodes.is_empty()).then(|| super::RedisSentinel {
        master: master.to_string(),
        nodes,
    })
}

/// `buckets[].cache`, resolved against the top-level settings.
pub(super) fn bucket_cache(
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
