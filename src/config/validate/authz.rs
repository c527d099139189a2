//! `buckets[].authorization` -> [`Authorization`]: which policy engine
//! decides, and how it fails. The other system's keys (`opa_*`,
//! `openfga_*`) and the unprefixed spellings of its load-test configs are
//! read alike; `type: rego` compiles its policy here, so `--check` reports a
//! policy that does not compile.

use super::super::schema::RawAuthorization;
use super::super::{Authorization, AuthzEngine, Endpoint};
use super::{parse_endpoint, Problems};
use std::time::Duration;

/// `opa_timeout_ms` / `openfga_timeout_ms` default (the other system's).
const DEFAULT_TIMEOUT_MS: u64 = 100;
/// `*_cache_ttl_seconds` default (the other system's).
const DEFAULT_CACHE_TTL_SECS: u64 = 60;
/// The rule evaluated when no `policy_path` is given.
const DEFAULT_POLICY_PATH: &str = "yatagarasu/authz/allow";

/// Resolves a bucket's `authorization` (`at` is its YAML path); `auth`: the
/// bucket authenticates its clients (a JWT's claims are available).
pub(super) fn authorization(
    raw: &RawAuthorization,
    at: &str,
    auth: bool,
    p: &mut Problems,
) -> Option<Authorization> {
    let kind = raw.kind.trim().to_ascii_lowercase();
    // The engine's own key, or the unprefixed one; not both.
    let either =
        |own: Option<u64>, own_key: &str, plain: Option<u64>, plain_key: &str, p: &mut Problems| {
            if own.is_some() && plain.is_some() {
                p.at(
                    &format!("{at}.{plain_key}"),
                    format_args!("is the same setting as {own_key}; keep one"),
                );
            }
            own.or(plain)
        };
    let (timeout, ttl, fail) = match kind.as_str() {
        "opa" => (
            either(
                raw.opa_timeout_ms,
                "opa_timeout_ms",
                raw.timeout_ms,
                "timeout_ms",
                p,
            ),
            either(
                raw.opa_cache_ttl_seconds,
                "opa_cache_ttl_seconds",
                raw.cache_ttl_seconds,
                "cache_ttl_seconds",
                p,
            ),
            raw.opa_fail_mode.as_ref().or(raw.fail_mode.as_ref()),
        ),
        "openfga" => (
            either(
                raw.openfga_timeout_ms,
                "openfga_timeout_ms",
                raw.timeout_ms,
                "timeout_ms",
                p,
            ),
            either(
                raw.openfga_cache_ttl_seconds,
                "openfga_cache_ttl_seconds",
                raw.cache_ttl_seconds,
                "cache_ttl_seconds",
                p,
            ),
            raw.openfga_fail_mode.as_ref().or(raw.fail_mode.as_ref()),
        ),
        _ => (
            raw.timeout_ms,
            raw.cache_ttl_seconds,
            raw.fail_mode.as_ref(),
        ),
    };
    let timeout = timeout.unwrap_or(DEFAULT_TIMEOUT_MS);
    p.positive(&format!("{at}.timeout_ms"), timeout);
    let fail_open = match fail.map(|f| f.trim().to_ascii_lowercase()).as_deref() {
        None | Some("closed") => false,
        Some("open") => true,
        Some(other) => {
            p.at(
                &format!("{at}.fail_mode"),
                format_args!("{other:?} is not one of open, closed"),
            );
            false
        }
    };
    let engine = match kind.as_str() {
        "opa" => opa(raw, at, p),
        "openfga" => openfga(raw, at, auth, p),
        "rego" => rego(raw, at, p),
        other => {
            p.at(
                &format!("{at}.type"),
                format_args!("{other:?} is not one of opa, openfga, rego"),
            );
            None
        }
    }?;
    Some(Authorization {
        engine,
        timeout: Duration::from_millis(timeout.max(1)),
        cache_ttl: Duration::from_secs(ttl.unwrap_or(DEFAULT_CACHE_TTL_SECS)),
        fail_open,
    })
}

/// A policy path (`a/b/c` or `a.b.c`) as its segments; `None` when it has
/// an empty or unusual segment.
fn policy_segments(path: &str) -> Option<Vec<&str>> {
    let segments: Vec<&str> = path.trim_matches('/').split(['/', '.']).collect();
    segments
        .iter()
        .all(|s| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        })
        .then_some(segments)
}

fn policy_path<'r>(raw: &'r RawAuthorization, at: &str, p: &mut Problems) -> Option<Vec<&'r str>> {
    let path = raw
        .opa_policy_path
        .as_deref()
        .unwrap_or(DEFAULT_POLICY_PATH);
    // The Data API's own prefix, as some of the other system's files write it.
    let path = path
        .trim_start_matches('/')
        .strip_prefix("v1/data/")
        .unwrap_or(path);
    let segments = policy_segments(path);
    if segments.is_none() {
        p.at(
            &format!("{at}.opa_policy_path"),
            format_args!("{path:?} is not a policy path like \"yatagarasu/authz/allow\""),
        );
    }
    segments
}

fn endpoint(value: Option<&str>, key: &str, at: &str, p: &mut Problems) -> Option<Endpoint> {
    let Some(url) = value.map(str::trim).filter(|u| !u.is_empty()) else {
        p.at(&format!("{at}.{key}"), "is required for this type");
        return None;
    };
    match parse_endpoint(url) {
        Ok(e) => Some(e),
        Err(why) => {
            p.at(&format!("{at}.{key}"), format_args!("{url:?} {why}"));
            None
        }
    }
}

fn opa(raw: &RawAuthorization, at: &str, p: &mut Problems) -> Option<AuthzEngine> {
    let endpoint = endpoint(raw.opa_url.as_deref(), "opa_url", at, p);
    let segments = policy_path(raw, at, p)?;
    Some(AuthzEngine::Opa {
        endpoint: endpoint?,
        path: format!("/v1/data/{}", segments.join("/")),
    })
}

fn openfga(raw: &RawAuthorization, at: &str, auth: bool, p: &mut Problems) -> Option<AuthzEngine> {
    let endpoint = endpoint(raw.openfga_endpoint.as_deref(), "openfga_endpoint", at, p);
    let store = raw.openfga_store_id.as_deref().map(str::trim).unwrap_or("");
    let url_safe = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if store.is_empty() || !url_safe(store) {
        p.at(
            &format!("{at}.openfga_store_id"),
            "is required for this type (letters, digits, - and _)",
        );
    }
    if !auth {
        p.at(
            &format!("{at}.type"),
            "openfga checks the token's user: the bucket needs auth.enabled: true",
        );
    }
    let user_claim = raw
        .openfga_user_claim
        .clone()
        .unwrap_or_else(|| "sub".into());
    if user_claim.split('.').any(str::is_empty) {
        p.at(
            &format!("{at}.openfga_user_claim"),
            "is not a claim name or dotted path",
        );
    }
    let model = raw
        .openfga_authorization_model_id
        .clone()
        .filter(|m| !m.trim().is_empty());
    let relation = raw
        .openfga_relation
        .clone()
        .unwrap_or_else(|| "viewer".into());
    if relation.is_empty()
        || !relation
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        p.at(
            &format!("{at}.openfga_relation"),
            format_args!("{relation:?} is not a relation name"),
        );
    }
    let object_prefix = raw.openfga_object_prefix.clone();
    if object_prefix
        .as_deref()
        .is_some_and(|o| !o.ends_with(':') || o.len() < 2)
    {
        p.at(
            &format!("{at}.openfga_object_prefix"),
            "must be an object type followed by ':' (as \"document:\")",
        );
    }
    Some(AuthzEngine::OpenFga {
        endpoint: endpoint?,
        store: store.to_string(),
        model,
        token: raw.openfga_api_token.clone().filter(|t| !t.is_empty()),
        user_claim,
        relation,
        object_prefix,
    })
}

fn rego(raw: &RawAuthorization, at: &str, p: &mut Problems) -> Option<AuthzEngine> {
    let Some(file) = raw.policy_file.as_deref().filter(|f| !f.trim().is_empty()) else {
        p.at(&format!("{at}.policy_file"), "is required for type: rego");
        return None;
    };
    let segments = policy_path(raw, at, p)?;
    let mut engine = regorus::Engine::new();
    if let Err(e) = engine.add_policy_from_file(file) {
        p.at(&format!("{at}.policy_file"), format_args!("{file}: {e}"));
        return None;
    }
    if let Some(data) = raw.data_file.as_deref() {
        let added = std::fs::read_to_string(data)
            .map_err(|e| e.to_string())
            .and_then(|text| engine.add_data_json(&text).map_err(|e| e.to_string()));
        if let Err(e) = added {
            p.at(&format!("{at}.data_file"), format_args!("{data}: {e}"));
            return None;
        }
    }
    let rule = format!("data.{}", segments.join("."));
    // Evaluated once with an empty input: a rule that does not exist in the
    // policy is an error now, not a 403 for every request.
    engine.set_input(regorus::Value::new_object());
    if let Err(e) = engine.eval_rule(rule.clone()) {
        p.at(
            &format!("{at}.opa_policy_path"),
            format_args!("{rule} cannot be evaluated in {file}: {e}"),
        );
        return None;
    }
    Some(AuthzEngine::Rego {
        file: file.to_string(),
        engine: Box::new(engine),
        rule,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_paths_take_slashes_or_dots() {
        assert_eq!(
            policy_segments("yatagarasu/authz/allow"),
            Some(vec!["yatagarasu", "authz", "allow"])
        );
        assert_eq!(policy_segments("/a.b/c/"), Some(vec!["a", "b", "c"]));
        assert_eq!(policy_segments("a//b"), None);
        assert_eq!(policy_segments("a/b c"), None);
    }
}
