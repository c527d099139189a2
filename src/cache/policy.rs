//! Cache policy, pure: what may be stored and for how long (RFC 9111 for a
//! shared cache), how old a stored copy is, and how a stored copy answers a
//! conditional (`If-None-Match`, `If-Modified-Since`) or a single `Range`
//! request. No I/O and no clock: callers pass times in.

use std::time::{Duration, SystemTime};

/// The `Cache-Control` directives a shared cache acts on.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Directives {
    /// `no-store`: never stored.
    pub no_store: bool,
    /// `private`: for one user's cache only, never a shared one.
    pub private: bool,
    /// `no-cache`: stored, but revalidated before every use.
    pub no_cache: bool,
    /// `max-age=N`.
    pub max_age: Option<u64>,
    /// `s-maxage=N`: wins over `max-age` in a shared cache.
    pub s_maxage: Option<u64>,
}

/// Parses a `Cache-Control` value; unknown directives are ignored, a
/// malformed delta-seconds value is treated as 0 (stale: revalidate).
pub fn directives(value: &str) -> Directives {
    let mut d = Directives::default();
    for part in value.split(',') {
        let (name, arg) = match part.split_once('=') {
            Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
            None => (part.trim(), None),
        };
        let seconds = || arg.map(|a| a.parse::<u64>().unwrap_or(0));
        match name.to_ascii_lowercase().as_str() {
            "no-store" => d.no_store = true,
            "private" => d.private = true,
            "no-cache" => d.no_cache = true,
            "max-age" => d.max_age = seconds(),
            "s-maxage" => d.s_maxage = seconds(),
            _ => {}
        }
    }
    d
}

/// The headers of an upstream response that decide whether it is stored.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stored<'a> {
    /// Response status.
    pub status: u16,
    /// `Cache-Control`, if any.
    pub cache_control: Option<&'a str>,
    /// `Expires`, if any.
    pub expires: Option<&'a str>,
    /// `Date`, if any (the origin's clock, for `Expires`).
    pub date: Option<&'a str>,
}

/// How long a response to a `GET` stays fresh, or `None` when it must not
/// be stored: only 200s; never `no-store` or `private`; `s-maxage`, then
/// `max-age`, then `Expires` (relative to the origin's `Date`, else `now`),
/// else `default_ttl` (the configured TTL). `no-cache` stores it already
/// stale, so every use revalidates.
pub fn freshness(r: &Stored<'_>, default_ttl: Duration, now: SystemTime) -> Option<Duration> {
    if r.status != 200 {
        return None;
    }
    let d = r.cache_control.map(directives).unwrap_or_default();
    if d.no_store || d.private {
        return None;
    }
    if d.no_cache {
        return Some(Duration::ZERO);
    }
    if let Some(s) = d.s_maxage.or(d.max_age) {
        return Some(Duration::from_secs(s));
    }
    if let Some(expires) = r.expires {
        // An invalid Expires (often "0") means already expired.
        let Ok(at) = httpdate::parse_http_date(expires) else {
            return Some(Duration::ZERO);
        };
        let base = r
            .date
            .and_then(|d| httpdate::parse_http_date(d).ok())
            .unwrap_or(now);
        return Some(at.duration_since(base).unwrap_or(Duration::ZERO));
    }
    Some(default_ttl)
}

/// The `Age` of a copy stored at `stored_at`, in whole seconds.
pub fn age(stored_at: SystemTime, now: SystemTime) -> u64 {
    now.duration_since(stored_at).map_or(0, |d| d.as_secs())
}

/// How long ago a copy was stored: zero when the wall clock now reads
/// earlier than when it was stored (stepped back, as NTP may), never an
/// error that makes every recent copy look expired (RFC 9111 §4.2.3
/// clamps a negative age to zero).
fn elapsed(stored_at: SystemTime, now: SystemTime) -> Duration {
    now.duration_since(stored_at).unwrap_or(Duration::ZERO)
}

/// Whether a copy stored at `stored_at` with `fresh_for` is still fresh.
pub fn is_fresh(stored_at: SystemTime, fresh_for: Duration, now: SystemTime) -> bool {
    elapsed(stored_at, now) < fresh_for
}

/// Whether an expired copy may still answer when no replica can
/// (`stale_if_error_seconds` past its freshness; never when that is zero).
pub fn usable_when_failing(
    stored_at: SystemTime,
    fresh_for: Duration,
    stale_for: Duration,
    now: SystemTime,
) -> bool {
    !stale_for.is_zero() && elapsed(stored_at, now) < fresh_for + stale_for
}

/// How a stored copy answers a request's preconditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// 304 Not Modified.
    NotModified,
    /// Serve the copy (or its range).
    Serve,
}

/// `If-None-Match` (weak comparison, `*` matches) and, only when it is
/// absent, `If-Modified-Since` (RFC 9110 §13.2.2), against a stored copy's
/// `ETag` and `Last-Modified`.
pub fn precondition(
    if_none_match: Option<&str>,
    if_modified_since: Option<&str>,
    etag: &str,
    last_modified: Option<&str>,
) -> Precondition {
    if let Some(inm) = if_none_match {
        let ours = weak(etag);
        let hit = inm
            .split(',')
            .map(str::trim)
            .any(|t| t == "*" || (!etag.is_empty() && weak(t) == ours));
        return if hit {
            Precondition::NotModified
        } else {
            Precondition::Serve
        };
    }
    let (Some(ims), Some(lm)) = (if_modified_since, last_modified) else {
        return Precondition::Serve;
    };
    match (
        httpdate::parse_http_date(ims),
        httpdate::parse_http_date(lm),
    ) {
        (Ok(since), Ok(modified)) if modified <= since => Precondition::NotModified,
        _ => Precondition::Serve,
    }
}

fn weak(tag: &str) -> &str {
    tag.strip_prefix("W/").unwrap_or(tag)
}

/// How a stored copy of `len` bytes answers a `Range` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAnswer {
    /// No usable single range (absent, not `bytes=`, several ranges): 200.
    Whole,
    /// 206 with these inclusive offsets.
    Part {
        /// First byte offset.
        first: u64,
        /// Last byte offset (inclusive).
        last: u64,
    },
    /// 416 with `Content-Range: bytes */len`.
    Unsatisfiable,
}

/// Evaluates a single-range `Range: bytes=A-B | A- | -N` against `len`
/// bytes (RFC 9110 §14.1.2). Multiple ranges are answered whole.
pub fn range(header: Option<&str>, len: u64) -> RangeAnswer {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return RangeAnswer::Whole;
    };
    if spec.contains(',') {
        return RangeAnswer::Whole;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeAnswer::Whole;
    };
    let num = |s: &str| crate::http::head::parse_decimal(s.trim().as_bytes());
    let (first, last) = match (a.trim().is_empty(), num(a), num(b)) {
        // -N: the last N bytes.
        (true, _, Some(n)) if n > 0 => (len.saturating_sub(n), len.saturating_sub(1)),
        (true, _, _) => return RangeAnswer::Unsatisfiable,
        (false, Some(f), _) if b.trim().is_empty() => (f, len.saturating_sub(1)),
        (false, Some(f), Some(l)) if l >= f => (f, l.min(len.saturating_sub(1))),
        _ => return RangeAnswer::Whole,
    };
    if len == 0 || first >= len {
        return RangeAnswer::Unsatisfiable;
    }
    RangeAnswer::Part { first, last }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    const DAY: Duration = Duration::from_secs(86_400);

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_790_000_000 + secs)
    }

    fn stored(cc: Option<&'static str>) -> Stored<'static> {
        Stored {
            status: 200,
            cache_control: cc,
            ..Stored::default()
        }
    }

    #[test]
    fn what_is_stored_and_for_how_long() {
        let ttl = Duration::from_secs(3600);
        let now = at(0);
        assert_eq!(freshness(&stored(None), ttl, now), Some(ttl));
        assert_eq!(freshness(&stored(Some("no-store")), ttl, now), None);
        assert_eq!(
            freshness(&stored(Some("private, max-age=60")), ttl, now),
            None
        );
        assert_eq!(
            freshness(&stored(Some("public, max-age=60")), ttl, now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            freshness(&stored(Some("max-age=60, s-maxage=600")), ttl, now),
            Some(Duration::from_secs(600))
        );
        assert_eq!(
            freshness(&stored(Some("no-cache")), ttl, now),
            Some(Duration::ZERO)
        );
        let mut r = stored(None);
        r.status = 206;
        assert_eq!(freshness(&r, ttl, now), None);
    }

    #[test]
    fn expires_counts_from_the_origins_date() {
        let ttl = Duration::from_secs(3600);
        let date = httpdate::fmt_http_date(at(0));
        let expires = httpdate::fmt_http_date(at(120));
        let r = Stored {
            status: 200,
            expires: Some(&expires),
            date: Some(&date),
            cache_control: None,
        };
        // Our clock is 30 s ahead of the origin's: the origin's Date counts.
        assert_eq!(freshness(&r, ttl, at(30)), Some(Duration::from_secs(120)));
        let r = Stored {
            expires: Some("0"),
            ..r
        };
        assert_eq!(freshness(&r, ttl, at(0)), Some(Duration::ZERO));
    }

    #[test]
    fn age_and_freshness_follow_the_clock() {
        assert_eq!(age(at(0), at(42)), 42);
        assert_eq!(age(at(10), at(0)), 0);
        assert!(is_fresh(at(0), DAY, at(100)));
        assert!(!is_fresh(at(0), Duration::from_secs(100), at(100)));
        assert!(!is_fresh(at(0), Duration::ZERO, at(0)));
    }

    #[test]
    fn a_wall_clock_stepped_back_leaves_recent_copies_fresh() {
        // Stored at 100 s; the clock was then stepped back to 95 s (issue
        // #23's warm object that went upstream: it looked expired).
        assert!(is_fresh(at(100), Duration::from_secs(60), at(95)));
        assert_eq!(age(at(100), at(95)), 0);
        let (fresh, stale) = (Duration::from_secs(10), Duration::from_secs(100));
        assert!(usable_when_failing(at(100), fresh, stale, at(95)));
        // Zero freshness stays expired, whatever the clock.
        assert!(!is_fresh(at(100), Duration::ZERO, at(95)));
    }

    #[test]
    fn stale_copies_serve_only_within_stale_if_error() {
        let fresh = Duration::from_secs(10);
        let stale = Duration::from_secs(100);
        assert!(usable_when_failing(at(0), fresh, stale, at(50)));
        assert!(usable_when_failing(at(0), fresh, stale, at(109)));
        assert!(!usable_when_failing(at(0), fresh, stale, at(110)));
        assert!(!usable_when_failing(at(0), fresh, Duration::ZERO, at(11)));
    }

    #[test]
    fn conditionals_against_a_stored_copy() {
        let lm = httpdate::fmt_http_date(at(0));
        let later = httpdate::fmt_http_date(at(10));
        let earlier = httpdate::fmt_http_date(at(0) - Duration::from_secs(10));
        use Precondition::*;
        assert_eq!(
            precondition(Some("\"a\""), None, "\"a\"", None),
            NotModified
        );
        assert_eq!(
            precondition(Some("W/\"a\", \"b\""), None, "\"a\"", None),
            NotModified
        );
        assert_eq!(precondition(Some("\"b\""), None, "\"a\"", None), Serve);
        assert_eq!(precondition(Some("*"), None, "\"a\"", None), NotModified);
        assert_eq!(
            precondition(None, Some(&later), "\"a\"", Some(&lm)),
            NotModified
        );
        assert_eq!(
            precondition(None, Some(&earlier), "\"a\"", Some(&lm)),
            Serve
        );
        // If-None-Match wins over If-Modified-Since.
        assert_eq!(
            precondition(Some("\"b\""), Some(&later), "\"a\"", Some(&lm)),
            Serve
        );
        assert_eq!(
            precondition(None, Some("garbage"), "\"a\"", Some(&lm)),
            Serve
        );
    }

    #[test]
    fn single_ranges_from_a_stored_copy() {
        use RangeAnswer::*;
        assert_eq!(range(None, 100), Whole);
        assert_eq!(range(Some("bytes=0-9"), 100), Part { first: 0, last: 9 });
        assert_eq!(
            range(Some("bytes=90-"), 100),
            Part {
                first: 90,
                last: 99
            }
        );
        assert_eq!(
            range(Some("bytes=-10"), 100),
            Part {
                first: 90,
                last: 99
            }
        );
        assert_eq!(range(Some("bytes=-500"), 100), Part { first: 0, last: 99 });
        assert_eq!(
            range(Some("bytes=50-500"), 100),
            Part {
                first: 50,
                last: 99
            }
        );
        assert_eq!(range(Some("bytes=100-"), 100), Unsatisfiable);
        assert_eq!(range(Some("bytes=-0"), 100), Unsatisfiable);
        assert_eq!(range(Some("bytes=0-1,5-6"), 100), Whole);
        assert_eq!(range(Some("bytes=9-1"), 100), Whole);
        assert_eq!(range(Some("items=0-1"), 100), Whole);
        assert_eq!(range(Some("bytes=0-0"), 0), Unsatisfiable);
    }
}
