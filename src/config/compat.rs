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
        "observability",
        "tracing and its settings are not implemented here yet",
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
        "cache.memory.max_entry_size_bytes",
        "not read by the other system either (it reads max_item_size_mb)",
    ),
    (
        "buckets[].cache.default_ttl_seconds",
        "not a bucket key of the other system either (it reads ttl_seconds)",
    ),
];

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
