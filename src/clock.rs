//! Time helpers: the monotonic millisecond clock breakers run on, the wall
//! clock the cache ages copies by, and UTC civil time for log timestamps
//! and SigV4 dates (no date crate needed).
//!
//! Tests move time forward instead of sleeping: a process started with
//! `YATAGARASU_TEST_CLOCK=1` lets the admin API advance both clocks
//! ([`advance`]; `POST /admin/debug/advance-clock?ms=N`) or step the wall
//! clock back ([`step_back`]; `ms=-N`), as NTP may. Without it the
//! offsets stay 0. Signing, token expiry and log timestamps always read
//! the real clock (S3 and token issuers do).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

/// How far tests moved time forward, in ms.
static OFFSET_MS: AtomicU64 = AtomicU64::new(0);
/// How far tests stepped the wall clock back, in ms (as NTP may step a
/// real one; the monotonic clock never goes back).
static STEPPED_BACK_MS: AtomicU64 = AtomicU64::new(0);

/// Milliseconds since the process started: the clock breakers, limits and
/// idle timeouts run on.
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + OFFSET_MS.load(Ordering::Relaxed)
}

/// The wall clock copies are stored and aged by (the cache's clock).
pub fn now() -> SystemTime {
    SystemTime::now() + Duration::from_millis(OFFSET_MS.load(Ordering::Relaxed))
        - Duration::from_millis(STEPPED_BACK_MS.load(Ordering::Relaxed))
}

/// Whether this process lets tests move its clocks.
pub fn adjustable() -> bool {
    static ADJUSTABLE: OnceLock<bool> = OnceLock::new();
    *ADJUSTABLE.get_or_init(|| std::env::var_os("YATAGARASU_TEST_CLOCK").is_some())
}

/// Moves [`now`] and [`now_ms`] forward by `ms`; false (nothing moved)
/// unless the process was started with `YATAGARASU_TEST_CLOCK`.
pub fn advance(ms: u64) -> bool {
    if !adjustable() {
        return false;
    }
    OFFSET_MS.fetch_add(ms, Ordering::Relaxed);
    true
}

/// Steps [`now`] (the wall clock only) back by `ms`; false unless the
/// process was started with `YATAGARASU_TEST_CLOCK`.
pub fn step_back(ms: u64) -> bool {
    if !adjustable() {
        return false;
    }
    STEPPED_BACK_MS.fetch_add(ms, Ordering::Relaxed);
    true
}

/// UTC civil time from Unix seconds: (year, month, day, hour, minute, second).
pub fn civil(secs: u64) -> (i64, u32, u32, u64, u64, u64) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, rem / 3600, rem / 60 % 60, rem % 60)
}
