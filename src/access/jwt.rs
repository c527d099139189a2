//! JWT authentication, in the tutorial system's configuration format.
//!
//! - The key decides the algorithm, never the token: a token whose `alg` is
//!   not its key's is refused (an RSA public key is never used as an HMAC
//!   secret), `alg: none` is refused, a `kid` names a key of `jwt.keys`
//!   (unknown: refused), a token without `kid` uses the default key
//!   (`secret`, `rsa_public_key_path` or `ecdsa_public_key_path`).
//! - `exp` is required and, with `nbf`, checked with `leeway_seconds` (30).
//! - `claims` must all hold ([`claims_hold`], pure): `equals`, `not_equals`,
//!   `contains` (a string's substring or an array's element), `in` (the
//!   claim is one of the rule's array), `exists`, `gt`/`lt` (numbers), on
//!   dotted paths (`realm.roles`).
//! - Tokens come from the configured sources in order ([`find_token`]):
//!   `Authorization: Bearer`, a header (with an optional prefix), a query
//!   parameter, a cookie.
//!
//! Verification uses the `jsonwebtoken` crate.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;

/// Where a token may be found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `Authorization: Bearer <token>`.
    Bearer,
    /// A header, with a prefix to strip (may be empty).
    Header {
        /// Header name.
        name: String,
        /// Prefix before the token.
        prefix: String,
    },
    /// A query parameter.
    Query(String),
    /// A cookie.
    Cookie(String),
}

/// One claim rule.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimRule {
    /// Dotted path of the claim (`realm.roles`).
    pub claim: String,
    /// The operator.
    pub op: Op,
    /// The operand (unused by `exists`).
    pub value: Value,
}

/// Claim operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// The claim equals the value.
    Equals,
    /// The claim is absent or differs.
    NotEquals,
    /// A string claim contains the value anywhere (a substring), or an
    /// array claim has it as an element. Not for domains:
    /// `x@example.com.evil` contains `@example.com`; use [`Op::EndsWith`].
    Contains,
    /// A string claim ends with the value (`@example.com` for an email
    /// domain: `x@example.com.evil` does not).
    EndsWith,
    /// A string claim starts with the value.
    StartsWith,
    /// The claim is one of the value's elements (an array, or a
    /// comma-separated string: `"admin, editor"`).
    In,
    /// The claim is present.
    Exists,
    /// The claim is a number greater than the value.
    Gt,
    /// The claim is a number less than the value.
    Lt,
    /// The claim is a number greater than or equal to the value.
    Gte,
    /// The claim is a number less than or equal to the value.
    Lte,
}

impl Op {
    /// Parses an operator name.
    pub fn parse(s: &str) -> Option<Op> {
        Some(match s {
            "equals" => Op::Equals,
            "not_equals" => Op::NotEquals,
            "contains" => Op::Contains,
            "ends_with" => Op::EndsWith,
            "starts_with" => Op::StartsWith,
            "in" => Op::In,
            "exists" => Op::Exists,
            "gt" => Op::Gt,
            "lt" => Op::Lt,
            "gte" => Op::Gte,
            "lte" => Op::Lte,
            _ => return None,
        })
    }
}

/// A verification key and the one algorithm it accepts.
#[derive(Clone)]
pub struct Key {
    /// The algorithm tokens signed with this key must name.
    pub algorithm: Algorithm,
    /// The key.
    pub key: DecodingKey,
}

/// Resolved `jwt:` settings (shared, immutable; rebuilt on reload).
#[derive(Clone, Default)]
pub struct JwtSettings {
    /// The key for tokens without `kid`.
    pub default_key: Option<Key>,
    /// Keys by `kid`.
    pub keys: HashMap<String, Key>,
    /// Token sources, tried in order.
    pub sources: Vec<Source>,
    /// Rules every token's claims must satisfy.
    pub claims: Vec<ClaimRule>,
    /// `admin_claims`: rules a token must also satisfy to call the admin
    /// API (none: tokens do not open it).
    pub admin_claims: Vec<ClaimRule>,
    /// Clock leeway for `exp` and `nbf`, seconds.
    pub leeway: u64,
    /// `jwks_url` and its refresh interval: keys fetched by `access::jwks`.
    pub jwks: Option<(String, std::time::Duration)>,
}

impl std::fmt::Debug for JwtSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys and secrets are never printed.
        f.debug_struct("JwtSettings")
            .field("keys", &self.keys.keys().collect::<Vec<_>>())
            .field("sources", &self.sources)
            .field("claims", &self.claims)
            .field("leeway", &self.leeway)
            .finish_non_exhaustive()
    }
}

impl PartialEq for JwtSettings {
    fn eq(&self, other: &Self) -> bool {
        // Reload comparisons: settings are rebuilt from the file every time.
        std::ptr::eq(self, other)
    }
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No token in any source (401).
    Missing,
    /// A token that does not verify (401, `error="invalid_token"`).
    Invalid(String),
    /// A token past its `exp` (401, `error="invalid_token"`).
    Expired,
    /// A valid token whose claims do not satisfy the rules (403).
    Forbidden(String),
}

impl Refusal {
    /// The metric label of `yatagarasu_auth_requests_total`.
    pub fn result(&self) -> crate::metrics::outcome::AuthResult {
        use crate::metrics::outcome::AuthResult;
        match self {
            Refusal::Missing => AuthResult::Missing,
            Refusal::Invalid(_) => AuthResult::Invalid,
            Refusal::Expired => AuthResult::Expired,
            Refusal::Forbidden(_) => AuthResult::Forbidden,
        }
    }
}

/// A token that verified and whose claims hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorized {
    /// The `sub` claim (empty when absent), for the access log.
    pub sub: String,
    /// The `exp` claim: until when the verdict holds (plus the leeway).
    pub exp: u64,
    /// Every claim, for a policy engine's input (`authz`).
    pub claims: std::sync::Arc<Value>,
}

/// Verifies `token` and checks its claims; `Ok` when it may read. `fetched` are the JWKS keys; `unknown_kid` is
/// called when a token names a key neither set has.
pub fn authorize(
    settings: &JwtSettings,
    fetched: &HashMap<String, Key>,
    unknown_kid: &dyn Fn(),
    token: &str,
) -> Result<Authorized, Refusal> {
    let claims = verify(settings, fetched, unknown_kid, token)?;
    Ok(Authorized {
        sub: claims
            .get("sub")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        exp: claims.get("exp").and_then(Value::as_u64).unwrap_or(0),
        claims: std::sync::Arc::new(claims.clone()),
    })
}

/// [`authorize`], and the token's claims must also satisfy
/// `admin_claims`: whether it may call the admin API (never when no
/// admin rules are configured).
pub fn authorize_admin(
    settings: &JwtSettings,
    fetched: &HashMap<String, Key>,
    token: &str,
) -> Result<(), Refusal> {
    if settings.admin_claims.is_empty() {
        return Err(Refusal::Forbidden("no jwt.admin_claims configured".into()));
    }
    let claims = verify(settings, fetched, &|| {}, token)?;
    claims_hold(&claims, &settings.admin_claims).map_err(Refusal::Forbidden)
}

/// The token's claims, once its signature, algorithm, `crit`, `exp`,
/// `nbf` and the settings' claim rules all hold.
fn verify(
    settings: &JwtSettings,
    fetched: &HashMap<String, Key>,
    unknown_kid: &dyn Fn(),
    token: &str,
) -> Result<Value, Refusal> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| Refusal::Invalid(e.to_string()))?;
    refuse_critical_extensions(token)?;
    let key = match &header.kid {
        Some(kid) => match settings.keys.get(kid).or_else(|| fetched.get(kid)) {
            Some(k) => k,
            None => {
                unknown_kid();
                return Err(Refusal::Invalid(format!("unknown kid {kid:?}")));
            }
        },
        None => settings.default_key.as_ref().ok_or_else(|| {
            Refusal::Invalid("token has no kid and there is no default key".into())
        })?,
    };
    if header.alg != key.algorithm {
        return Err(Refusal::Invalid(format!(
            "token alg {:?} is not its key's {:?}",
            header.alg, key.algorithm
        )));
    }
    let mut validation = Validation::new(key.algorithm);
    validation.leeway = settings.leeway;
    validation.validate_nbf = true;
    validation.validate_aud = false;
    validation.set_required_spec_claims(&["exp"]);
    let data = jsonwebtoken::decode::<Value>(token, &key.key, &validation).map_err(|e| match e
        .kind()
    {
        jsonwebtoken::errors::ErrorKind::ExpiredSignature => Refusal::Expired,
        _ => Refusal::Invalid(e.to_string()),
    })?;
    claims_hold(&data.claims, &settings.claims).map_err(Refusal::Forbidden)?;
    Ok(data.claims)
}

/// RFC 7515 §4.1.11: a header whose `crit` names extensions the recipient
/// must understand is refused when it does not understand them; this
/// proxy understands none, so any `crit` is refused (the JWT library
/// does not look at it).
fn refuse_critical_extensions(token: &str) -> Result<(), Refusal> {
    use base64::Engine;
    let encoded = token.split('.').next().unwrap_or("");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(encoded.trim_end_matches('='))
        .map_err(|e| Refusal::Invalid(format!("header: {e}")))?;
    let header: Value =
        serde_json::from_slice(&raw).map_err(|e| Refusal::Invalid(format!("header: {e}")))?;
    match header.get("crit") {
        None => Ok(()),
        Some(crit) => Err(Refusal::Invalid(format!(
            "header names critical extensions this proxy does not understand: {crit}"
        ))),
    }
}

/// Every rule holds for `claims`; otherwise which one failed.
pub fn claims_hold(claims: &Value, rules: &[ClaimRule]) -> Result<(), String> {
    for r in rules {
        let found = r.claim.split('.').try_fold(claims, |v, part| v.get(part));
        let ok = match (r.op, found) {
            (Op::Exists, f) => f.is_some(),
            (Op::NotEquals, f) => f != Some(&r.value),
            (_, None) => false,
            (Op::Equals, Some(v)) => v == &r.value,
            (Op::Contains, Some(Value::Array(items))) => items.contains(&r.value),
            (Op::Contains, Some(Value::String(s))) => {
                r.value.as_str().is_some_and(|needle| s.contains(needle))
            }
            (Op::Contains, Some(_)) => false,
            (Op::EndsWith, Some(Value::String(s))) => {
                r.value.as_str().is_some_and(|tail| s.ends_with(tail))
            }
            (Op::StartsWith, Some(Value::String(s))) => {
                r.value.as_str().is_some_and(|head| s.starts_with(head))
            }
            (Op::EndsWith | Op::StartsWith, Some(_)) => false,
            (Op::In, Some(v)) => match &r.value {
                Value::Array(set) => set.contains(v),
                Value::String(list) => v
                    .as_str()
                    .is_some_and(|v| list.split(',').any(|item| item.trim() == v)),
                _ => false,
            },
            (Op::Gt, Some(v)) => num(v).zip(num(&r.value)).is_some_and(|(a, b)| a > b),
            (Op::Lt, Some(v)) => num(v).zip(num(&r.value)).is_some_and(|(a, b)| a < b),
            (Op::Gte, Some(v)) => num(v).zip(num(&r.value)).is_some_and(|(a, b)| a >= b),
            (Op::Lte, Some(v)) => num(v).zip(num(&r.value)).is_some_and(|(a, b)| a <= b),
        };
        if !ok {
            return Err(format!("claim {:?} fails {:?}", r.claim, r.op));
        }
    }
    Ok(())
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64()
}

/// The first token found in `sources`, from a request's raw head and query.
/// `header(name)` returns a request header's value.
pub fn find_token<'h>(
    sources: &[Source],
    header: &dyn Fn(&str) -> Option<&'h str>,
    query: &'h str,
) -> Option<&'h str> {
    sources
        .iter()
        .find_map(|s| match s {
            Source::Bearer => header("authorization").and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            }),
            Source::Header { name, prefix } => header(name)
                .and_then(|v| v.trim().strip_prefix(prefix.as_str()))
                .map(str::trim),
            Source::Query(name) => query.split('&').find_map(|pair| {
                let (k, v) = pair.split_once('=')?;
                (k == name).then_some(v)
            }),
            Source::Cookie(name) => header("cookie").and_then(|c| {
                c.split(';').find_map(|pair| {
                    let (k, v) = pair.trim().split_once('=')?;
                    (k == name).then_some(v)
                })
            }),
        })
        .filter(|t| !t.is_empty())
}

/// Shared handle to settings built once per configuration.
pub type Shared = Arc<JwtSettings>;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rule(claim: &str, op: Op, value: Value) -> ClaimRule {
        ClaimRule {
            claim: claim.into(),
            op,
            value,
        }
    }

    #[test]
    fn claim_operators() {
        let c = json!({"role": "reader", "buckets": ["assets", "logs"], "level": 5,
                       "realm": {"roles": ["admin"]}, "email": "a@example.com"});
        let ok = |r: ClaimRule| claims_hold(&c, &[r]).is_ok();
        assert!(ok(rule("role", Op::Equals, json!("reader"))));
        assert!(!ok(rule("role", Op::Equals, json!("writer"))));
        assert!(ok(rule("role", Op::NotEquals, json!("writer"))));
        assert!(ok(rule("missing", Op::NotEquals, json!("x"))));
        assert!(ok(rule("buckets", Op::Contains, json!("assets"))));
        assert!(!ok(rule("buckets", Op::Contains, json!("other"))));
        assert!(ok(rule("email", Op::Contains, json!("@example.com"))));
        assert!(ok(rule("email", Op::EndsWith, json!("@example.com"))));
        let evil = json!({"email": "x@example.com.evil", "level": 5, "role": "editor"});
        let holds = |r: ClaimRule| claims_hold(&evil, &[r]).is_ok();
        assert!(
            holds(rule("email", Op::Contains, json!("@example.com"))),
            "contains is a substring test"
        );
        assert!(!holds(rule("email", Op::EndsWith, json!("@example.com"))));
        assert!(holds(rule("email", Op::StartsWith, json!("x@"))));
        assert!(holds(rule("level", Op::Gte, json!(5))));
        assert!(holds(rule("level", Op::Lte, json!(5))));
        assert!(!holds(rule("level", Op::Gte, json!(6))));
        assert!(holds(rule("role", Op::In, json!("admin, editor"))));
        assert!(!holds(rule("role", Op::In, json!("admin,editors"))));
        assert!(ok(rule("role", Op::In, json!(["reader", "admin"]))));
        assert!(!ok(rule("role", Op::In, json!(["admin"]))));
        assert!(ok(rule("realm.roles", Op::Contains, json!("admin"))));
        assert!(ok(rule("realm", Op::Exists, Value::Null)));
        assert!(!ok(rule("realm.missing", Op::Exists, Value::Null)));
        assert!(ok(rule("level", Op::Gt, json!(3))));
        assert!(!ok(rule("level", Op::Lt, json!(3))));
        assert!(!ok(rule("role", Op::Gt, json!(3))));
        assert!(!ok(rule("missing", Op::Equals, json!("x"))));
    }

    #[test]
    fn token_sources_in_order() {
        let headers = [
            ("authorization", "Bearer abc"),
            ("x-auth-token", "Token def"),
            ("cookie", "a=1; session=ghi"),
        ];
        let h = |n: &str| headers.iter().find(|(k, _)| *k == n).map(|(_, v)| *v);
        let q = "v=1&token=jkl";
        let bearer = [Source::Bearer];
        assert_eq!(find_token(&bearer, &h, q), Some("abc"));
        let header = [Source::Header {
            name: "x-auth-token".into(),
            prefix: "Token ".into(),
        }];
        assert_eq!(find_token(&header, &h, q), Some("def"));
        assert_eq!(
            find_token(&[Source::Query("token".into())], &h, q),
            Some("jkl")
        );
        assert_eq!(
            find_token(&[Source::Cookie("session".into())], &h, q),
            Some("ghi")
        );
        assert_eq!(
            find_token(&[Source::Cookie("none".into()), Source::Bearer], &h, q),
            Some("abc")
        );
        let none = |_: &str| None;
        assert_eq!(find_token(&bearer, &none, ""), None);
    }
}
