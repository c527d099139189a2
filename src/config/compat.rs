//! Keys of the system we follow (julianshen/yatagarasu) that do nothing
//! there either: it parses them and never acts on them, or its parser
//! silently skips them, yet its published configs carry them. A user's
//! existing file must load here, so each is accepted, taken out before the
//! strict schema sees it, and named in one warning that says it has no
//! effect (`--check` prints it; the server logs it at WARN). Any other
//! unknown key stays an error.

use serde_yaml::Value;

/// `(path, why)`: dotted paths; `[]` stands for every element of a list.
const NO_EFFECT: &[(&str, &str)] = &[
    (
        "server.request_timeout",
        "parsed by the other system, which never acts on it; here the replica timeout (s3.timeout_seconds) and server.idle_timeout_seconds bound a request",
    ),
    (
        "buckets[].s3.connection_pool_size",
        "parsed by the other system, which never acts on it; upstream connections here are bounded by server.max_upstream_connections",
    ),
    (
        "compression",
        "parsed by the other system, which never acts on it; objects are relayed as stored",
    ),
    (
        "observability.request_logging",
        "parsed by the other system, which never acts on it; the access log has one line per request",
    ),
    (
        "observability.slow_query",
        "parsed by the other system, which never acts on it; the access log's duration_ms and the latency histograms show slow requests",
    ),
    (
        "cache.layers",
        "not a key of the other system either (it reads cache.cache_layers)",
    ),
    (
        "cache.memory.enabled",
        "not a key of the other system either; the memory tier is on whenever cache.enabled is",
    ),
    (
        "cache.memory.max_memory_cache_mb",
        "not read by the other system either (it reads max_cache_size_mb)",
    ),
    (
        "cache.memory.max_entry_size_mb",
        "not read by the other system either (it reads max_item_size_mb)",
    ),
    (
        "cache.memory.max_memory_cache_size_mb",
        "not read by the other system either (it reads max_cache_size_mb)",
    ),
    (
        "cache.memory.max_capacity",
        "not read by the other system either (it reads max_cache_size_mb)",
    ),
    (
        "cache.memory.ttl_seconds",
        "not read by the other system either (it reads default_ttl_seconds)",
    ),
    (
        "cache.memory.max_entry_size_bytes",
        "not read by the other system either (it reads max_item_size_mb)",
    ),
    // The other system's documentation site (website/configuration/cache.md)
    // shows cache keys its parser skips; users copy them from there.
    (
        "cache.memory.max_file_size",
        "not read by the other system either (it reads max_item_size_mb)",
    ),
    (
        "cache.disk.path",
        "not read by the other system either (it reads cache_dir)",
    ),
    (
        "cache.disk.max_capacity",
        "not read by the other system either (it reads max_disk_cache_size_mb)",
    ),
    (
        "cache.disk.max_file_size",
        "not read by the other system either; a disk entry is bounded by cache.memory.max_item_size_mb",
    ),
    (
        "cache.disk.ttl_seconds",
        "not read by the other system either; a disk entry stays fresh as long as its response says",
    ),
    (
        "cache.redis.max_capacity",
        "not read by the other system either; Redis's own maxmemory bounds the tier",
    ),
    (
        "cache.redis.max_file_size",
        "not read by the other system either; Redis entries have no size bound of their own (large objects are stored as chunks, cache.redis.chunk_size_kb; Redis's maxmemory bounds the tier)",
    ),
    (
        "cache.redis.ttl_seconds",
        "not read by the other system either (it reads redis_ttl_seconds)",
    ),
    (
        "cache.redis.pool_size",
        "not read by the other system either (it reads max_pool_size)",
    ),
    (
        "cache.redis.timeout_ms",
        "not read by the other system either (it reads operation_timeout_ms and connection_timeout_ms)",
    ),
    (
        "cache.redis.retry_attempts",
        "not read by the other system either; a failed Redis call is a miss, and a breaker keeps a dead Redis from costing every request",
    ),
    (
        "cache.redis.retry_delay_ms",
        "not read by the other system either; a failed Redis call is a miss, and a breaker keeps a dead Redis from costing every request",
    ),
    (
        "cache.warming.enabled",
        "not read by the other system either; a pre-warm runs when one is asked for (POST /admin/cache/prewarm)",
    ),
    (
        "cache.warming.paths",
        "not read by the other system either; the prefixes to warm are given with each pre-warm request",
    ),
    (
        "cache.warming.rate_limit_requests_per_second",
        "not read by the other system either (it reads rate_limit)",
    ),
    (
        "rate_limiting",
        "not read by the other system either (it reads server.rate_limit)",
    ),
    (
        "buckets[].image_optimization.quality",
        "not read by the other system either (it reads default_quality)",
    ),
    (
        "buckets[].image_optimization.auto_format",
        "not read by the other system either; the fmt=auto query parameter picks the format from Accept",
    ),
    (
        "buckets[].image_optimization.auto_rotate",
        "not read by the other system either; images are turned upright by their EXIF orientation unless the query says auto_rotate=0",
    ),
    (
        "buckets[].s3.path_style",
        "not read by the other system either; requests to an endpoint are always path-style (/bucket/key), as there",
    ),
    (
        "buckets[].cache.default_ttl_seconds",
        "not a bucket key of the other system either (it reads ttl_seconds)",
    ),
    (
        "buckets[].cache.max_size",
        "not read by the other system either; one memory tier (cache.memory) serves every bucket, and a bucket bounds its objects with max_item_size_mb",
    ),
];

/// The other system's older shape for policies (its Kubernetes example): a
/// top-level `authorization: {opa: {enabled, url, policy_path}, openfga:
/// {enabled, url, store_id}}` naming the engines, and
/// `buckets[].auth.authorization: {type, relation, object_prefix}` choosing
/// one per bucket. Each bucket's block is rewritten into its
/// `authorization` (the shape both systems read today) with the engine's
/// settings, and said in a warning. `Err` lists what cannot be moved (a
/// bucket naming an engine that is absent or disabled: its requests would
/// otherwise go unchecked).
pub fn move_legacy_authorization(tree: &mut Value) -> Result<Vec<String>, Vec<String>> {
    let (mut warnings, mut errors) = (Vec::new(), Vec::new());
    let Some(root) = tree.as_mapping_mut() else {
        return Ok(warnings);
    };
    let engines = root.remove("authorization");
    let mut used = false;
    let Some(buckets) = root.get_mut("buckets").and_then(Value::as_sequence_mut) else {
        return Ok(warnings);
    };
    for (i, bucket) in buckets.iter_mut().enumerate() {
        let Some(b) = bucket.as_mapping_mut() else {
            continue;
        };
        let old = b
            .get_mut("auth")
            .and_then(Value::as_mapping_mut)
            .and_then(|auth| auth.remove("authorization"));
        let Some(Value::Mapping(old)) = old else {
            continue;
        };
        let at = format!("buckets[{i}].auth.authorization");
        let kind = old
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let engine = engines.as_ref().and_then(|e| e.get(kind.as_str()));
        let enabled = engine
            .and_then(|e| e.get("enabled"))
            .is_none_or(|v| v.as_bool() != Some(false));
        let Some(engine) = engine.filter(|_| enabled) else {
            errors.push(format!(
                "{at}: names {kind:?}, which the top-level authorization.{kind} does not configure (or disables)"
            ));
            continue;
        };
        if b.contains_key("authorization") {
            errors.push(format!(
                "{at}: the bucket has an authorization block too; keep one"
            ));
            continue;
        }
        used = true;
        let mut new = serde_yaml::Mapping::new();
        new.insert("type".into(), kind.clone().into());
        let copy = |from: &Value, key: &str, to: &str, new: &mut serde_yaml::Mapping| {
            if let Some(v) = from.get(key) {
                new.insert(to.into(), v.clone());
            }
        };
        match kind.as_str() {
            "opa" => {
                copy(engine, "url", "opa_url", &mut new);
                copy(engine, "policy_path", "opa_policy_path", &mut new);
            }
            "openfga" => {
                copy(engine, "url", "openfga_endpoint", &mut new);
                copy(engine, "store_id", "openfga_store_id", &mut new);
                copy(
                    engine,
                    "authorization_model_id",
                    "openfga_authorization_model_id",
                    &mut new,
                );
            }
            _ => {}
        }
        for key in ["timeout_ms", "cache_ttl_seconds", "fail_mode"] {
            copy(engine, key, key, &mut new);
        }
        let own = Value::Mapping(old.clone());
        copy(&own, "relation", "openfga_relation", &mut new);
        copy(&own, "object_prefix", "openfga_object_prefix", &mut new);
        for key in old.keys().filter_map(Value::as_str) {
            if !["type", "relation", "object_prefix"].contains(&key) {
                errors.push(format!("{at}.{key}: unknown key"));
            }
        }
        b.insert("authorization".into(), Value::Mapping(new));
        warnings.push(format!(
            "{at}: read as buckets[{i}].authorization (type {kind}, with authorization.{kind}'s settings); the other system's current shape is the bucket's authorization block"
        ));
    }
    if engines.is_some() && !used {
        warnings.push(
            "authorization: has no effect (no bucket's auth.authorization names an engine)".into(),
        );
    }
    if errors.is_empty() {
        Ok(warnings)
    } else {
        Err(errors)
    }
}

/// Removes every no-effect key found in `tree`; returns one warning each,
/// `path: has no effect (why)`, with list indexes filled in.
pub fn strip_no_effect_keys(tree: &mut Value) -> Vec<String> {
    let mut warnings = Vec::new();
    for (path, why) in NO_EFFECT {
        let parts: Vec<&str> = path.split('.').collect();
        strip(tree, &parts, String::new(), why, &mut warnings);
    }
    warnings
}

fn strip(node: &mut Value, parts: &[&str], at: String, why: &str, out: &mut Vec<String>) {
    let Some((first, rest)) = parts.split_first() else {
        return;
    };
    let (key, each) = match first.strip_suffix("[]") {
        Some(k) => (k, true),
        None => (*first, false),
    };
    let Some(map) = node.as_mapping_mut() else {
        return;
    };
    let here = if at.is_empty() {
        key.to_string()
    } else {
        format!("{at}.{key}")
    };
    if rest.is_empty() && !each {
        if map.remove(key).is_some() {
            out.push(format!("{here}: has no effect ({why})"));
        }
        return;
    }
    let Some(child) = map.get_mut(key) else {
        return;
    };
    if each {
        if let Some(items) = child.as_sequence_mut() {
            for (i, item) in items.iter_mut().enumerate() {
                strip(item, rest, format!("{here}[{i}]"), why, out);
            }
        }
    } else {
        strip(child, rest, here, why, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_effect_keys_are_taken_out_and_named_with_their_paths() {
        let mut tree: Value = serde_yaml::from_str(
            "server:\n  address: x\n  request_timeout: 30\ncompression:\n  enabled: true\nbuckets:\n  - name: a\n    s3:\n      connection_pool_size: 9\n      bucket: b\n  - name: c\n    cache:\n      default_ttl_seconds: 5\n      ttl_seconds: 5\ncache:\n  memory:\n    enabled: true\n    max_cache_size_mb: 5\n",
        )
        .expect("yaml");
        let w = strip_no_effect_keys(&mut tree);
        let paths: Vec<&str> = w
            .iter()
            .map(|l| l.split(':').next().unwrap_or(""))
            .collect();
        assert_eq!(
            paths,
            [
                "server.request_timeout",
                "buckets[0].s3.connection_pool_size",
                "compression",
                "cache.memory.enabled",
                "buckets[1].cache.default_ttl_seconds",
            ]
        );
        assert!(w.iter().all(|l| l.contains("has no effect")));
        let left = serde_yaml::to_string(&tree).expect("yaml");
        assert!(!left.contains("request_timeout") && !left.contains("connection_pool_size"));
        assert!(left.contains("ttl_seconds: 5") && left.contains("max_cache_size_mb: 5"));
        assert!(!left.contains("compression") && !left.contains("default_ttl_seconds"));
    }
}
