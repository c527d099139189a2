//! JWKS: verification keys fetched from `jwt.jwks_url` on a thread of their
//! own (blocking HTTP with `ureq`, never on a core), refreshed every
//! `jwks_refresh_interval_secs` and, when a token names an unknown `kid`, at
//! most once per [`MIN_REFETCH`]. A failed fetch keeps the last good set
//! (WARN + `yatagarasu_jwks_refresh_total{result="failure"}`).
//!
//! Publication to the cores is one version counter: a worker compares it
//! with the version it holds (one relaxed load per authenticated request)
//! and takes the new set under the mutex only when it changed.

use super::jwt::Key;
use crate::config::Level;
use crate::log;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The soonest an unknown `kid` triggers another fetch.
pub const MIN_REFETCH: Duration = Duration::from_secs(30);

/// Keys by `kid`, as last fetched.
pub type KeyMap = HashMap<String, Key>;

/// The published key set and what the fetcher thread needs to be told.
#[derive(Default)]
pub struct Jwks {
    /// The key set, republished by every successful fetch.
    pub keys: crate::published::Published<KeyMap>,
    /// A request saw an unknown `kid`.
    wanted: AtomicBool,
    /// Fetch outcomes, for metrics.
    pub ok: AtomicU64,
    /// Failed fetches, for metrics.
    pub failed: AtomicU64,
}

impl Jwks {
    /// The current set.
    pub fn keys(&self) -> Arc<KeyMap> {
        self.keys.load()
    }

    /// Asks the fetcher for a refresh (an unknown `kid` was seen).
    pub fn want_refresh(&self) {
        self.wanted.store(true, Ordering::Relaxed);
    }

    fn publish(&self, keys: KeyMap) {
        self.keys.publish(keys);
    }
}

/// Fetches and publishes forever; `settings()` gives the current URL and
/// interval (they follow configuration reloads), `None` to idle.
pub fn run(jwks: Arc<Jwks>, settings: impl Fn() -> Option<(String, Duration)>, stop: &AtomicBool) {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .build();
    let mut last_fetch: Option<Instant> = None;
    let mut last_url = String::new();
    while !stop.load(Ordering::Relaxed) {
        let Some((url, interval)) = settings() else {
            std::thread::sleep(Duration::from_millis(250));
            continue;
        };
        let since = last_fetch.map(|t| t.elapsed());
        let wanted = jwks.wanted.load(Ordering::Relaxed);
        if due(url != last_url, since, interval, wanted) {
            jwks.wanted.store(false, Ordering::Relaxed);
            last_fetch = Some(Instant::now());
            last_url.clone_from(&url);
            match fetch(&agent, &url) {
                Ok(keys) => {
                    jwks.ok.fetch_add(1, Ordering::Relaxed);
                    log!(Level::Info, "JWKS fetched", url = url, keys = keys.len());
                    jwks.publish(keys);
                }
                Err(e) => {
                    jwks.failed.fetch_add(1, Ordering::Relaxed);
                    log!(
                        Level::Warn,
                        "JWKS fetch failed; keeping the last good key set",
                        url = url,
                        error = e
                    );
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether to fetch now: a new URL, the interval passed, or an unknown
/// `kid` was seen and the last fetch is at least [`MIN_REFETCH`] old.
pub fn due(
    url_changed: bool,
    since_last: Option<Duration>,
    interval: Duration,
    wanted: bool,
) -> bool {
    let Some(since) = since_last else {
        return true;
    };
    url_changed || since >= interval || (wanted && since >= MIN_REFETCH)
}

fn fetch(agent: &ureq::Agent, url: &str) -> Result<KeyMap, String> {
    let body = agent
        .get(url)
        .call()
        .map_err(|e| e.to_string())?
        .into_string()
        .map_err(|e| e.to_string())?;
    let set: JwkSet = serde_json::from_str(&body).map_err(|e| format!("not a JWK set: {e}"))?;
    let mut keys = KeyMap::new();
    for jwk in &set.keys {
        let Some(kid) = jwk.common.key_id.clone() else {
            continue;
        };
        let Some(algorithm) = algorithm_of(jwk) else {
            continue;
        };
        if let Ok(key) = DecodingKey::from_jwk(jwk) {
            keys.insert(kid, Key { algorithm, key });
        }
    }
    if keys.is_empty() {
        return Err("no usable signing key with a kid".into());
    }
    Ok(keys)
}

/// The key's algorithm: its `alg`, else the one its type and curve imply.
/// Symmetric keys from a URL are never accepted.
fn algorithm_of(jwk: &jsonwebtoken::jwk::Jwk) -> Option<Algorithm> {
    let from_alg = jwk.common.key_algorithm.and_then(|a| match a {
        KeyAlgorithm::RS256 => Some(Algorithm::RS256),
        KeyAlgorithm::RS384 => Some(Algorithm::RS384),
        KeyAlgorithm::RS512 => Some(Algorithm::RS512),
        KeyAlgorithm::ES256 => Some(Algorithm::ES256),
        KeyAlgorithm::ES384 => Some(Algorithm::ES384),
        _ => None,
    });
    match (&jwk.algorithm, from_alg) {
        (AlgorithmParameters::RSA(_), Some(a))
            if matches!(a, Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512) =>
        {
            Some(a)
        }
        (AlgorithmParameters::RSA(_), None) => Some(Algorithm::RS256),
        (AlgorithmParameters::EllipticCurve(p), alg) => {
            let by_curve = match p.curve {
                EllipticCurve::P256 => Algorithm::ES256,
                EllipticCurve::P384 => Algorithm::ES384,
                _ => return None,
            };
            alg.map_or(Some(by_curve), |a| (a == by_curve).then_some(a))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn when_to_fetch() {
        let hour = Duration::from_secs(3600);
        let s = Duration::from_secs;
        assert!(due(false, None, hour, false), "first fetch");
        assert!(!due(false, Some(s(10)), hour, false));
        assert!(due(false, Some(hour), hour, false), "interval");
        assert!(due(true, Some(s(1)), hour, false), "new URL");
        assert!(
            !due(false, Some(s(29)), hour, true),
            "unknown kid, too soon"
        );
        assert!(due(false, Some(s(30)), hour, true), "unknown kid, 30 s on");
    }
}
