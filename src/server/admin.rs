//! Admin endpoints on the metrics listener (never the public port), on only
//! when `admin.token` is configured; every request needs
//! `Authorization: Bearer <token>`, compared in constant time.
//!
//! - `POST /admin/cache/purge/<bucket>/<key>`: drops the object (all its
//!   versions and parts) from the cache;
//! - `POST /admin/cache/purge/<bucket>`: drops every object of the bucket;
//! - `GET /admin/cache/stats`: items, bytes, bound and evictions, as JSON.
//!
//! A purge during a fill wins: the fill is not stored.

use crate::cache::store;
use crate::shared::Process;

/// An answer: status, content type, body.
pub type Answer = (u16, &'static str, String);

/// Answers one admin request (`path` starts with `/admin/`).
pub fn handle(process: &Process, method: &str, path: &str, authorization: Option<&str>) -> Answer {
    let Some(token) = process.current().config.admin_token.clone() else {
        return text(
            404,
            "not found; admin endpoints are off (set admin.token)\n",
        );
    };
    let given = authorization
        .and_then(|a| a.strip_prefix("Bearer "))
        .unwrap_or("");
    if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
        return text(
            401,
            "admin endpoints need Authorization: Bearer <admin.token>\n",
        );
    }
    let Some(cache) = process.cache.as_ref() else {
        return text(404, "the cache is not enabled\n");
    };
    match (method, path) {
        ("GET", "/admin/cache/stats") => {
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
        ("POST", p) if p.starts_with("/admin/cache/purge/") => {
            purge(process, cache, &p["/admin/cache/purge/".len()..])
        }
        _ => text(404, "not found\n"),
    }
}

/// `<bucket>` or `<bucket>/<key>` (the key as a client writes it in a URL).
fn purge(process: &Process, cache: &store::MemoryStore, target: &str) -> Answer {
    let (bucket, key) = match target.split_once('/') {
        Some((b, k)) => (b, Some(k)),
        None => (target, None),
    };
    let generation = process.current();
    if !generation.config.buckets.iter().any(|b| b.name == bucket) {
        return text(404, "no such bucket\n");
    }
    let prefix = match key {
        None => store::bucket_prefix(bucket),
        Some(k) => {
            let mut decoded = String::new();
            if crate::router::decode_path(format!("/{k}").as_bytes(), &mut decoded).is_err() {
                return text(400, "malformed key\n");
            }
            let mut encoded = String::new();
            crate::router::encode_key(&decoded[1..], &mut encoded);
            store::object_prefix(bucket, &encoded)
        }
    };
    let purged = cache.purge(&prefix);
    let purged_disk = process
        .disk
        .as_ref()
        .map_or(0, |d| d.remove_prefix(&prefix));
    crate::log!(
        crate::config::Level::Info,
        "Cache purged",
        bucket = bucket,
        key = key.unwrap_or("*"),
        entries = purged,
        disk_entries = purged_disk
    );
    (
        200,
        "application/json",
        serde_json::json!({ "purged": purged, "purged_disk": purged_disk }).to_string(),
    )
}

fn text(status: u16, body: &str) -> Answer {
    (status, "text/plain", body.to_string())
}

/// Compares without an early exit, so the time taken does not reveal how
/// much of a guess matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
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
