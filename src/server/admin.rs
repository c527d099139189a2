//! Admin endpoints on the metrics listener (never the public port), on only
//! when `admin.token` or `jwt.admin_claims` is configured; every request
//! needs `Authorization: Bearer <credential>`: the admin token (compared in
//! constant time), or a JWT that verifies under the top-level `jwt`
//! settings and whose claims satisfy both `jwt.claims` and
//! `jwt.admin_claims` (the other system's guard).
//!
//! - `POST /admin/reload`: re-reads the config file, exactly as SIGHUP does
//!   (200 with the new bucket and replica counts, or 422 listing every
//!   problem, the running configuration kept);
//! - `POST /admin/cache/purge`: drops every object of every bucket;
//! - `POST /admin/cache/purge/<bucket>/<key>`: drops the object (all its
//!   versions and parts) from the cache;
//! - `POST /admin/cache/purge/<bucket>`: drops every object of the bucket;
//! - `GET /admin/cache/stats`: items, bytes, bound and evictions, as JSON;
//! - `GET /admin/cache/stats/<bucket>`: the bucket's items and bytes in
//!   memory;
//! - `GET /admin/cache/info`: the cache's settings;
//! - `POST /admin/cache/prewarm` (`{bucket, path, recursive, max_depth,
//!   max_files}`), `GET /admin/cache/prewarm/tasks`,
//!   `GET /admin/cache/prewarm/status/<id>`, `DELETE
//!   /admin/cache/prewarm/<id>`: pre-warming tasks (`crate::prewarm`).
//!
//! The endpoint names are the other system's. A purge during a fill wins:
//! the fill is not stored.

use crate::cache::store;
use crate::shared::Process;

/// An answer: status, content type, body.
pub type Answer = (u16, &'static str, String);

/// Answers one admin request (`path` starts with `/admin/`).
pub fn handle(
    process: &std::sync::Arc<Process>,
    method: &str,
    path: &str,
    authorization: Option<&str>,
    body: &[u8],
) -> Answer {
    let generation = process.current();
    let token = generation.config.admin_token.clone();
    let by_claims = generation
        .config
        .jwt
        .clone()
        .filter(|j| !j.admin_claims.is_empty());
    if token.is_none() && by_claims.is_none() {
        return text(
            404,
            "not found; admin endpoints are off (set admin.token or jwt.admin_claims)\n",
        );
    }
    let given = authorization
        .and_then(|a| a.strip_prefix("Bearer "))
        .unwrap_or("");
    let by_token = token
        .as_deref()
        .is_some_and(|t| constant_time_eq(given.as_bytes(), t.as_bytes()));
    if !by_token {
        let Some(jwt) = by_claims else {
            return text(
                401,
                "admin endpoints need Authorization: Bearer <admin.token>\n",
            );
        };
        use crate::access::jwt::Refusal;
        match crate::access::jwt::authorize_admin(&jwt, &process.jwks.keys(), given) {
            Ok(()) => {}
            Err(Refusal::Forbidden(_)) => {
                return text(
                    403,
                    "admin access denied: the token's claims do not satisfy jwt.admin_claims\n",
                );
            }
            Err(_) => {
                return text(
                    401,
                    "admin endpoints need Authorization: Bearer <admin.token or a valid admin JWT>\n",
                );
            }
        }
    }
    drop(generation);
    if (method, path) == ("POST", "/admin/reload") {
        return reload(process);
    }
    if method == "POST" && path.starts_with("/admin/debug/advance-clock") {
        return advance_clock(path);
    }
    let Some(cache) = process.cache.as_ref() else {
        return text(404, "the cache is not enabled\n");
    };
    match (method, path) {
        ("GET", "/admin/cache/info") => info(process),
        ("GET", p) if p.starts_with("/admin/cache/stats/") => {
            bucket_stats(process, cache, &p["/admin/cache/stats/".len()..])
        }
        ("POST", "/admin/cache/purge") => purge_all(process),
        ("GET", "/admin/cache/stats") => stats(process, cache),
        ("POST", p) if p.starts_with("/admin/cache/purge/") => {
            purge(process, &p["/admin/cache/purge/".len()..])
        }
        ("POST", "/admin/cache/prewarm") => crate::prewarm::create(process, body),
        ("GET", "/admin/cache/prewarm/tasks") => crate::prewarm::list(process),
        ("GET", p) if p.starts_with("/admin/cache/prewarm/status/") => {
            crate::prewarm::status(process, &p["/admin/cache/prewarm/status/".len()..])
        }
        ("DELETE", p) if p.starts_with("/admin/cache/prewarm/") => {
            crate::prewarm::cancel(process, &p["/admin/cache/prewarm/".len()..])
        }
        _ => text(404, "not found\n"),
    }
}

/// `GET /admin/cache/info`: the cache's settings.
fn info(process: &Process) -> Answer {
    let config = &process.current().config;
    let c = &config.cache;
    // In lookup order.
    let mut layers = vec!["memory"];
    for layer in &c.lower_layers {
        match layer {
            crate::config::Layer::Disk if c.disk.is_some() => layers.push("disk"),
            crate::config::Layer::Redis if c.redis.is_some() => layers.push("redis"),
            _ => {}
        }
    }
    let body = serde_json::json!({
        "enabled": c.enabled,
        "layers": layers,
        "memory": {
            "max_bytes": c.memory_bytes,
            "max_item_bytes": c.max_item_bytes,
            "default_ttl_seconds": c.default_ttl.as_secs(),
            "fill_budget_bytes": store::fill_budget(c.memory_bytes, c.max_item_bytes),
        },
        "disk": c.disk.as_ref().map(|d| serde_json::json!({
            "dir": d.dir,
            "max_bytes": d.max_bytes,
        })),
        "slice_bytes": c.slice_bytes,
        "stale_if_error_seconds": c.stale_if_error.as_secs(),
        "buckets": config.buckets.iter().map(|b| serde_json::json!({
            "name": b.name,
            "enabled": b.cache.enabled,
            "ttl_seconds": b.cache.ttl.as_secs(),
            "max_item_bytes": b.cache.max_item_bytes,
        })).collect::<Vec<_>>(),
    });
    (200, "application/json", body.to_string())
}

/// `GET /admin/cache/stats/<bucket>`: the bucket's items and bytes in memory.
fn bucket_stats(process: &Process, cache: &store::MemoryStore, bucket: &str) -> Answer {
    if !process
        .current()
        .config
        .buckets
        .iter()
        .any(|b| b.name == bucket)
    {
        return text(404, "no such bucket\n");
    }
    let (items, bytes) = cache.prefix_stats(&store::bucket_prefix(bucket));
    let body = serde_json::json!({
        "bucket": bucket,
        "layers": [{ "layer": "memory", "items": items, "bytes": bytes }],
    });
    (200, "application/json", body.to_string())
}

/// `GET /admin/cache/stats`: each tier's items, bytes and evictions.
fn stats(process: &Process, cache: &store::MemoryStore) -> Answer {
    let mut layers = vec![serde_json::json!({
        "layer": "memory",
        "items": cache.items(),
        "bytes": cache.bytes(),
        "max_bytes": cache.max_bytes(),
        "evictions": cache.evictions(),
    })];
    if let Some(disk) = &process.disk {
        layers.push(serde_json::json!({
            "layer": "disk",
            "items": disk.items(),
            "bytes": disk.bytes(),
            "evictions": disk.evictions(),
            "corrupt_dropped": disk.corrupt.load(std::sync::atomic::Ordering::Relaxed),
            "writes": if disk.degraded() { "off (disk unusable)" } else { "on" },
        }));
    }
    let body = serde_json::json!({ "layers": layers });
    (200, "application/json", body.to_string())
}

/// `<bucket>` or `<bucket>/<key>` (the key as a client writes it in a URL).
fn purge(process: &Process, target: &str) -> Answer {
    match purge_counts(process, target) {
        Ok((purged, purged_disk)) => (
            200,
            "application/json",
            serde_json::json!({ "purged": purged, "purged_disk": purged_disk }).to_string(),
        ),
        Err(refused) => refused,
    }
}

/// Purges `<bucket>` or `<bucket>/<key>`: entries dropped from memory and
/// from disk, or the answer refusing it.
fn purge_counts(process: &Process, target: &str) -> Result<(usize, usize), Answer> {
    let (bucket, key) = match target.split_once('/') {
        Some((b, k)) => (b, Some(k)),
        None => (target, None),
    };
    let generation = process.current();
    if !generation.config.buckets.iter().any(|b| b.name == bucket) {
        return Err(text(404, "no such bucket\n"));
    }
    let prefix = match key {
        None => store::bucket_prefix(bucket),
        Some(k) => {
            let mut decoded = String::new();
            if crate::router::decode_path(format!("/{k}").as_bytes(), &mut decoded).is_err() {
                return Err(text(400, "malformed key\n"));
            }
            let mut encoded = String::new();
            crate::router::encode_key(&decoded[1..], &mut encoded);
            store::object_prefix(bucket, &encoded)
        }
    };
    let (purged, purged_disk) = process.purge_local(&prefix);
    // The shared tier and every other instance of the fleet.
    let fleet = process.redis.as_ref().map(|r| r.purge_fleet(&prefix));
    if let Some(Err(e)) = &fleet {
        crate::log!(
            crate::config::Level::Error,
            "Cache purge did not reach Redis; other instances keep their copies",
            bucket = bucket,
            error = e,
        );
        let body = serde_json::json!({
            "purged": purged,
            "purged_disk": purged_disk,
            "error": format!("Redis: {e}"),
        });
        return Err((502, "application/json", body.to_string()));
    }
    crate::log!(
        crate::config::Level::Info,
        "Cache purged",
        bucket = bucket,
        key = key.unwrap_or("*"),
        entries = purged,
        disk_entries = purged_disk
    );
    Ok((purged, purged_disk))
}

/// `POST /admin/debug/advance-clock?ms=N`: moves the cache's and the
/// breakers' clocks forward (`ms=-N`: steps the wall clock back), in a
/// process started with `YATAGARASU_TEST_CLOCK` (tests); not found
/// otherwise.
fn advance_clock(target: &str) -> Answer {
    let ms = target
        .split_once("?ms=")
        .and_then(|(_, v)| v.parse::<i64>().ok());
    let moved = match ms {
        Some(ms) if ms < 0 => crate::clock::step_back(ms.unsigned_abs()),
        Some(ms) => crate::clock::advance(ms.unsigned_abs()),
        None => return text(400, "ms=<milliseconds> expected\n"),
    };
    match moved {
        true => text(200, "advanced\n"),
        false => text(404, "not found\n"),
    }
}

/// `POST /admin/reload`: the SIGHUP path (`server::reload`).
fn reload(process: &std::sync::Arc<Process>) -> Answer {
    match super::reload(process) {
        Ok((buckets, replicas)) => (
            200,
            "application/json",
            serde_json::json!({ "reloaded": true, "buckets": buckets, "replicas": replicas })
                .to_string(),
        ),
        Err(problems) => (
            422,
            "application/json",
            serde_json::json!({ "reloaded": false, "problems": problems }).to_string(),
        ),
    }
}

/// `POST /admin/cache/purge`: every configured bucket, as its own purge.
fn purge_all(process: &Process) -> Answer {
    let names: Vec<String> = process
        .current()
        .config
        .buckets
        .iter()
        .map(|b| b.name.clone())
        .collect();
    let (mut purged, mut purged_disk) = (0, 0);
    for name in &names {
        if let Ok((memory, disk)) = purge_counts(process, name) {
            purged += memory;
            purged_disk += disk;
        }
    }
    (
        200,
        "application/json",
        serde_json::json!({ "purged": purged, "purged_disk": purged_disk, "buckets": names.len() })
            .to_string(),
    )
}

fn text(status: u16, body: &str) -> Answer {
    (status, "text/plain", body.to_string())
}

/// Compares without an early exit, so the time taken does not reveal how
/// much of a guess matched.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, &x) in b.iter().enumerate() {
        diff |= (x ^ a.get(i).copied().unwrap_or(0)) as usize;
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret-token-123", b"secret-token-123"));
        assert!(!constant_time_eq(b"secret-token-124", b"secret-token-123"));
        assert!(!constant_time_eq(b"secret", b"secret-token-123"));
        assert!(!constant_time_eq(b"secret-token-1234", b"secret-token-123"));
        assert!(!constant_time_eq(b"", b"secret-token-123"));
    }
}
