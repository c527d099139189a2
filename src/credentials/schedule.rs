//! When to fetch credentials again: pure arithmetic on times passed in, so
//! the rules are unit-tested with a fake clock.
//!
//! Keys with an expiry are refreshed [`LEAD`] before it, less a jitter of up
//! to [`MAX_JITTER`] (so many proxies started together do not call STS or the
//! metadata service in step), and never sooner than [`MIN_GAP`] after the
//! last fetch. A failed fetch is retried with doubling backoff from
//! [`BACKOFF_FIRST`] to [`BACKOFF_MAX`]; the current keys stay in use until
//! they expire.

use std::time::{Duration, SystemTime};

/// How long before expiry keys are refreshed (at least).
pub const LEAD: Duration = Duration::from_secs(5 * 60);
/// Largest extra advance, spread by the jitter.
pub const MAX_JITTER: Duration = Duration::from_secs(60);
/// Shortest time between two scheduled fetches (keys that live shorter
/// than [`LEAD`] are fetched this often).
pub const MIN_GAP: Duration = Duration::from_secs(5);
/// Provider keys that carry no expiry are fetched again this often.
pub const NO_EXPIRY_REFRESH: Duration = Duration::from_secs(15 * 60);
/// First retry after a failed fetch.
pub const BACKOFF_FIRST: Duration = Duration::from_secs(1);
/// Longest wait between retries.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Requests asking for a refresh (a 403 naming the keys) within this time of
/// the last fetch a request asked for share its keys instead of starting
/// another: a replica refusing every key cannot flood the provider.
pub const ON_DEMAND_GAP: Duration = Duration::from_secs(1);
/// How often key files are checked for a change.
pub const FILE_POLL: Duration = Duration::from_secs(1);

/// Time from a successful fetch at `now` to the next one, for keys expiring
/// at `expires`; `jitter` is uniform in `[0, 1)`.
pub fn after_success(now: SystemTime, expires: Option<SystemTime>, jitter: f64) -> Duration {
    let Some(expires) = expires else {
        return NO_EXPIRY_REFRESH;
    };
    let until_lead = expires
        .duration_since(now)
        .unwrap_or_default()
        .saturating_sub(LEAD);
    let spread = MAX_JITTER
        .min(until_lead / 2)
        .mul_f64(jitter.clamp(0.0, 1.0));
    (until_lead - spread).max(MIN_GAP)
}

/// Time from the `failures`-th failed fetch in a row (1 for the first) to
/// the next try.
pub fn after_failure(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    BACKOFF_FIRST
        .saturating_mul(1 << doublings)
        .min(BACKOFF_MAX)
}

/// Whether a request's call for a refresh starts a fetch, given the time
/// since the last fetch a request started.
pub fn on_demand_fetch(since_last: Option<Duration>) -> bool {
    since_last.is_none_or(|d| d >= ON_DEMAND_GAP)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn refreshes_at_least_five_minutes_ahead() {
        // One-hour keys: 55 minutes, less up to a minute of jitter.
        let now = at(T0);
        let exp = Some(at(T0 + 3600));
        assert_eq!(after_success(now, exp, 0.0), Duration::from_secs(55 * 60));
        assert_eq!(
            after_success(now, exp, 0.5),
            Duration::from_secs(54 * 60 + 30)
        );
        let latest = after_success(now, exp, 0.999);
        assert!(latest > Duration::from_secs(54 * 60) && latest <= Duration::from_secs(55 * 60));
        for j in [0.0, 0.3, 0.9999] {
            let next = now + after_success(now, exp, j);
            assert!(next + LEAD <= at(T0 + 3600), "jitter {j}");
        }
    }

    #[test]
    fn jitter_never_reaches_back_past_half_the_wait() {
        // 6 minutes left: 60 s to the lead point, jitter at most 30 s.
        let d = after_success(at(T0), Some(at(T0 + 360)), 0.999);
        assert!(
            d > Duration::from_secs(30) && d <= Duration::from_secs(60),
            "{d:?}"
        );
    }

    #[test]
    fn short_lived_keys_are_fetched_every_min_gap() {
        assert_eq!(after_success(at(T0), Some(at(T0 + 30)), 0.5), MIN_GAP);
        assert_eq!(after_success(at(T0), Some(at(T0 - 30)), 0.5), MIN_GAP);
    }

    #[test]
    fn keys_without_expiry() {
        assert_eq!(after_success(at(T0), None, 0.7), NO_EXPIRY_REFRESH);
    }

    #[test]
    fn backoff_doubles_to_a_cap() {
        let waits: Vec<u64> = (1..=9).map(|n| after_failure(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(after_failure(u32::MAX), BACKOFF_MAX);
        assert_eq!(after_failure(0), BACKOFF_FIRST);
    }

    #[test]
    fn on_demand_requests_share_a_recent_fetch() {
        assert!(on_demand_fetch(None));
        assert!(!on_demand_fetch(Some(Duration::from_millis(300))));
        assert!(on_demand_fetch(Some(ON_DEMAND_GAP)));
    }
}
