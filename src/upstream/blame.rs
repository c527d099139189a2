//! Who a failed attempt is blamed on: the replica (its circuit breaker counts
//! the failure) or the request (counted in its own metric, breakers untouched).
//!
//! Any client can send a request that every replica answers with a 5xx: s3s-fs
//! answers 500 to keys that begin with `/`, S3 answers 503 `SlowDown` to one hot
//! prefix. If those counted, five anonymous requests would open a healthy
//! replica's breaker and take the bucket down for everyone. The rule:
//!
//! - transport and protocol failures (connect refused or timed out, reset,
//!   head or body timeout, TLS, malformed or truncated response, a 403 for
//!   broken credentials) are always the replica's;
//! - a 5xx answer is the replica's when another replica answered the same
//!   request (it succeeded elsewhere, so this replica is worse), or when none
//!   of the replicas that answered this request with a 5xx has given a
//!   non-5xx answer to anyone for [`RECENT_ANSWER_MS`] (they fail everything,
//!   so they open after `failure_threshold` as before);
//! - otherwise (every replica tried answered this request with a 5xx while
//!   one of them serves other requests) the request is failing, not the
//!   replicas. The evidence is shared by the replicas that failed alike, so a
//!   backup that only ever sees failover traffic is not opened by requests
//!   its primary also fails.
//!
//! Pure: the caller passes the clock.

use super::client::Cause;

/// How long a replica's last non-5xx answer vouches for it.
pub const RECENT_ANSWER_MS: u64 = 10_000;

/// The verdict on one failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// Counted by the replica's breaker and `yatagarasu_replica_failures_total`.
    Replica,
    /// Counted in `yatagarasu_request_caused_failures_total` only.
    Request,
}

/// Judges a failed attempt. `answered_elsewhere`: another replica gave this
/// same request a non-5xx answer; `last_answer_ms`: the latest time any
/// replica that answered this request with a 5xx gave anyone a non-5xx
/// answer (0: never).
pub fn blame(cause: Cause, answered_elsewhere: bool, last_answer_ms: u64, now_ms: u64) -> Blame {
    if !cause.is_http_status() || answered_elsewhere {
        return Blame::Replica;
    }
    if last_answer_ms > 0 && now_ms.saturating_sub(last_answer_ms) < RECENT_ANSWER_MS {
        Blame::Request
    } else {
        Blame::Replica
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000_000;

    #[test]
    fn transport_failures_always_count() {
        for cause in [
            Cause::Connect,
            Cause::Timeout,
            Cause::Reset,
            Cause::Tls,
            Cause::Malformed,
            Cause::Truncated,
            Cause::Credentials,
        ] {
            assert_eq!(
                blame(cause, false, NOW - 1, NOW),
                Blame::Replica,
                "{cause:?}"
            );
        }
    }

    #[test]
    fn a_5xx_every_replica_gives_while_they_serve_others_is_the_requests() {
        assert_eq!(
            blame(Cause::Http(500), false, NOW - 50, NOW),
            Blame::Request
        );
        assert_eq!(
            blame(Cause::Http(503), false, NOW - RECENT_ANSWER_MS + 1, NOW),
            Blame::Request
        );
    }

    #[test]
    fn a_5xx_another_replica_did_not_give_is_the_replicas() {
        assert_eq!(blame(Cause::Http(500), true, NOW - 50, NOW), Blame::Replica);
    }

    #[test]
    fn a_replica_failing_everything_is_blamed() {
        assert_eq!(blame(Cause::Http(500), false, 0, NOW), Blame::Replica);
        assert_eq!(
            blame(Cause::Http(500), false, NOW - RECENT_ANSWER_MS, NOW),
            Blame::Replica
        );
    }
}
