//! Policy authorization: who may read what, decided by a policy engine per
//! bucket (`buckets[].authorization`), after authentication and before the
//! cache (so a cached object is never served to a request the policy
//! denies).
//!
//! Three engines:
//! - **OPA** (`type: opa`): `POST {opa_url}/v1/data/{opa_policy_path}` with
//!   `{"input": <input>}`; `{"result": true}` or `{"result": {"allow":
//!   true}}` allows, anything else a well-formed answer says denies.
//! - **OpenFGA** (`type: openfga`): `POST {endpoint}/stores/{store}/check`
//!   with the tuple (`user:<claim>`, `viewer`, [`openfga_object`]);
//!   `{"allowed": true}` allows.
//! - **Rego in process** (`type: rego`): the same policies evaluated by
//!   regorus on the core, no network hop.
//!
//! The input document (OPA and Rego), the other system's shape:
//! `{"jwt_claims": {...}, "bucket": "<name>", "path": "<request path>",
//! "method": "GET", "client_ip": "<address>"}`.
//!
//! This module holds the pure parts: the input, reading the engines'
//! answers, OpenFGA's names, the per-core decision cache. The calls are in
//! `proxy::authorize`.

use serde_json::Value;

/// What a policy said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// May read.
    Allow,
    /// May not; the policy's `reason` when it gave one.
    Deny(Option<String>),
}

/// The input document for OPA and Rego.
pub fn input(
    claims: Option<&Value>,
    bucket: &str,
    path: &str,
    method: &str,
    client_ip: &str,
) -> Value {
    serde_json::json!({
        "jwt_claims": claims.cloned().unwrap_or_else(|| Value::Object(Default::default())),
        "bucket": bucket,
        "path": path,
        "method": method,
        "client_ip": client_ip,
    })
}

/// Reads an OPA Data API answer (the body of a 200): `Err` when it is not
/// one (the decision then failed).
pub fn opa_verdict(body: &[u8]) -> Result<Verdict, String> {
    let answer: Value =
        serde_json::from_slice(body).map_err(|e| format!("OPA answer is not JSON: {e}"))?;
    let Value::Object(map) = &answer else {
        return Err("OPA answer is not a JSON object".into());
    };
    // An undefined decision has no `result`: denied.
    Ok(policy_result(map.get("result").unwrap_or(&Value::Null)))
}

/// A policy's value: `true`, or an object whose `allow` is `true`, allows;
/// anything else denies (with the object's `reason`, when a string).
pub fn policy_result(result: &Value) -> Verdict {
    match result {
        Value::Bool(true) => Verdict::Allow,
        Value::Object(o) if o.get("allow") == Some(&Value::Bool(true)) => Verdict::Allow,
        Value::Object(o) => {
            Verdict::Deny(o.get("reason").and_then(Value::as_str).map(str::to_string))
        }
        _ => Verdict::Deny(None),
    }
}

/// Reads an OpenFGA Check answer (the body of a 200).
pub fn openfga_verdict(body: &[u8]) -> Result<Verdict, String> {
    let answer: Value =
        serde_json::from_slice(body).map_err(|e| format!("OpenFGA answer is not JSON: {e}"))?;
    match answer.get("allowed") {
        Some(Value::Bool(true)) => Ok(Verdict::Allow),
        Some(Value::Bool(false)) => Ok(Verdict::Deny(None)),
        _ => Err("OpenFGA answer has no boolean \"allowed\"".into()),
    }
}

/// The OpenFGA object for `key` (the object key, decoded) in `bucket`:
/// `bucket:<b>` for the root, `folder:<b>/<dir>/` for a key ending in `/`,
/// else `file:<b>/<key>`, as the other system names them; with a `prefix`
/// (an object type and `:`), `<prefix><b>/<key>` for every key.
pub fn openfga_object(bucket: &str, key: &str, prefix: Option<&str>) -> String {
    let key = key.trim_start_matches('/');
    if let Some(prefix) = prefix {
        return format!("{prefix}{bucket}/{key}");
    }
    if key.is_empty() {
        format!("bucket:{bucket}")
    } else if key.ends_with('/') {
        format!("folder:{bucket}/{key}")
    } else {
        format!("file:{bucket}/{key}")
    }
}

/// The OpenFGA user for the claim at `path` (dotted) of `claims`:
/// `user:<value>`, when it is a string.
pub fn openfga_user(claims: &Value, path: &str) -> Option<String> {
    let mut v = claims;
    for part in path.split('.') {
        v = v.get(part)?;
    }
    v.as_str().map(|s| format!("user:{s}"))
}

/// The body of an OpenFGA Check request.
pub fn openfga_check(user: &str, relation: &str, object: &str, model: Option<&str>) -> Value {
    let mut body = serde_json::json!({
        "tuple_key": { "user": user, "relation": relation, "object": object },
    });
    if let Some(m) = model {
        body["authorization_model_id"] = Value::String(m.to_string());
    }
    body
}

/// Decisions a core remembers, per configuration generation.
pub const CACHED_DECISIONS: usize = 10_000;

/// One core's remembered decisions: by the whole request to the engine
/// (everything in the input), until `expires` (ms, process clock).
pub struct DecisionCache {
    entries: quick_cache::unsync::Cache<String, (Verdict, u64)>,
}

impl Default for DecisionCache {
    fn default() -> Self {
        DecisionCache {
            entries: quick_cache::unsync::Cache::new(CACHED_DECISIONS),
        }
    }
}

impl DecisionCache {
    /// The decision remembered for `key`, unless it expired at `now`.
    pub fn get(&mut self, key: &str, now: u64) -> Option<Verdict> {
        match self.entries.get(key) {
            Some((v, expires)) if *expires > now => Some(v.clone()),
            Some(_) => {
                self.entries.remove(key);
                None
            }
            None => None,
        }
    }

    /// Remembers `verdict` for `key` until `expires`.
    pub fn put(&mut self, key: String, verdict: Verdict, expires: u64) {
        self.entries.insert(key, (verdict, expires));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opa_answers_allow_only_when_they_say_so() {
        assert_eq!(opa_verdict(br#"{"result": true}"#), Ok(Verdict::Allow));
        assert_eq!(
            opa_verdict(br#"{"result": {"allow": true, "reason": "x"}}"#),
            Ok(Verdict::Allow)
        );
        assert_eq!(
            opa_verdict(br#"{"result": false}"#),
            Ok(Verdict::Deny(None))
        );
        assert_eq!(opa_verdict(br#"{"result": null}"#), Ok(Verdict::Deny(None)));
        assert_eq!(opa_verdict(br#"{}"#), Ok(Verdict::Deny(None)), "undefined");
        assert_eq!(
            opa_verdict(br#"{"result": "true"}"#),
            Ok(Verdict::Deny(None))
        );
        assert_eq!(
            opa_verdict(br#"{"result": {"allow": false, "reason": "not a viewer"}}"#),
            Ok(Verdict::Deny(Some("not a viewer".into())))
        );
        assert!(opa_verdict(b"<html>").is_err());
        assert!(opa_verdict(b"[true]").is_err());
    }

    #[test]
    fn openfga_answers_and_names() {
        assert_eq!(openfga_verdict(br#"{"allowed": true}"#), Ok(Verdict::Allow));
        assert_eq!(
            openfga_verdict(br#"{"allowed": false, "resolution": ""}"#),
            Ok(Verdict::Deny(None))
        );
        assert!(openfga_verdict(br#"{"code": "validation_error"}"#).is_err());
        assert_eq!(openfga_object("b", "", None), "bucket:b");
        assert_eq!(openfga_object("b", "/docs/", None), "folder:b/docs/");
        assert_eq!(openfga_object("b", "docs/a.txt", None), "file:b/docs/a.txt");
        assert_eq!(
            openfga_object("b", "docs/a.txt", Some("document:")),
            "document:b/docs/a.txt"
        );
        let claims = serde_json::json!({"sub": "alice", "user": {"id": "u1", "n": 3}});
        assert_eq!(openfga_user(&claims, "sub").as_deref(), Some("user:alice"));
        assert_eq!(openfga_user(&claims, "user.id").as_deref(), Some("user:u1"));
        assert_eq!(openfga_user(&claims, "user.n"), None);
        assert_eq!(openfga_user(&claims, "missing"), None);
        let body = openfga_check("user:alice", "viewer", "file:b/a", Some("m1"));
        assert_eq!(body["tuple_key"]["relation"], "viewer");
        assert_eq!(body["authorization_model_id"], "m1");
        let body = openfga_check("user:alice", "reader", "document:b/a", None);
        assert_eq!(body["tuple_key"]["relation"], "reader");
        assert!(body.get("authorization_model_id").is_none());
    }

    #[test]
    fn remembered_decisions_expire() {
        let mut cache = DecisionCache::default();
        cache.put("k".into(), Verdict::Deny(None), 1_000);
        assert_eq!(cache.get("k", 999), Some(Verdict::Deny(None)));
        assert_eq!(cache.get("k", 1_000), None);
        assert_eq!(cache.get("k", 999), None, "an expired entry is gone");
    }
}
