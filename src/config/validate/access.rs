//! Who may read: `server.rate_limit`, `s3.rate_limit`, `jwt` (keys and
//! claim rules) and IP filter ranges, resolved.

use super::super::schema::*;
use super::super::*;
use super::Problems;

/// `server.rate_limit`: nothing unless `enabled`.
pub(super) fn rate_limits(raw: Option<&RawRateLimit>, p: &mut Problems) -> RateLimits {
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
pub(super) fn rate(r: &RawRate, at: &str, p: &mut Problems) -> Rate {
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
    let fleet = match r.scope.as_deref() {
        None | Some("instance") => false,
        Some("fleet") => true,
        Some(other) => {
            p.at(
                &format!("{at}.scope"),
                format_args!("{other:?} is not one of instance, fleet"),
            );
            false
        }
    };
    Rate {
        per_second: r.requests_per_second.max(0.000_001),
        burst: burst.max(1.0),
        fleet,
    }
}

/// `jwt:`: the keys (each built now, so a bad file names its key), token
/// sources and claim rules. `None` unless `enabled`.
pub(super) fn jwt(
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
pub(super) fn claim_rules(
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
pub(super) fn jwt_key(
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
pub(super) fn cidrs(list: &[String], at: &str, p: &mut Problems) -> Vec<crate::access::ip::Cidr> {
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
