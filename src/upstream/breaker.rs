//! The circuit breaker of one replica, as pure state: no I/O, no clock of its own.
//!
//! Definitions (all times are milliseconds on the caller's clock):
//! - CLOSED: every request is admitted. `failure_threshold` *consecutive*
//!   failures open the breaker; any success resets the count. The count is
//!   shared by all cores: the caller passes the process-wide count to
//!   [`Breaker::record_failure_count`] before recording a failure.
//! - OPEN: nothing is admitted until `open_until`. The first admission at or
//!   after it moves the breaker to HALF-OPEN.
//! - HALF-OPEN: at most `half_open_requests` trial requests are in flight at
//!   once. `success_threshold` successful trials close the breaker; any failed
//!   trial reopens it for another `timeout_seconds`.
//! - A passing active health probe moves OPEN to HALF-OPEN at once; a failing
//!   probe opens a CLOSED or HALF-OPEN breaker (see `health.rs`).
//!
//! A failure is what a `crate::error::Error` from the replica says it is; everything else is a success.

use crate::config::BreakerSettings;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
/// Circuit breaker states.
pub enum State {
    /// Requests flow; failures are counted.
    Closed,
    /// Requests are refused until the open period ends.
    Open,
    /// A limited number of trial requests decide.
    HalfOpen,
}

impl State {
    /// Prometheus encoding: 0 closed, 1 open, 2 half-open.
    pub fn code(self) -> u64 {
        match self {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
        }
    }
    /// Decodes a state from its packed code.
    pub fn from_code(c: u64) -> State {
        match c {
            1 => State::Open,
            2 => State::HalfOpen,
            _ => State::Closed,
        }
    }
    /// The state as shown in logs and `/ready`.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half-open",
        }
    }
}

/// What `admit` granted; hand it back to `record` or `release`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// A normal request (breaker closed).
    Normal,
    /// A half-open trial request, holding one of the `half_open_requests` slots.
    Trial,
    /// Not admitted; the breaker is open (or its trial slots are taken).
    Rejected,
}

/// A state change, for publishing and logging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// The state before.
    pub from: State,
    /// The state after.
    pub to: State,
}

#[derive(Debug, Clone)]
/// One replica's breaker on one core: the pure state machine.
pub struct Breaker {
    failure_threshold: u32,
    success_threshold: u32,
    open_ms: u64,
    half_open_requests: u32,
    state: State,
    failures: u32,
    successes: u32,
    trials_in_flight: u32,
    open_until: u64,
}

impl Breaker {
    /// A closed breaker with `s`'s thresholds.
    pub fn new(s: &BreakerSettings) -> Breaker {
        Breaker {
            failure_threshold: s.failure_threshold.max(1),
            success_threshold: s.success_threshold.max(1),
            open_ms: s.open_for.as_millis() as u64,
            half_open_requests: s.half_open_requests.max(1),
            state: State::Closed,
            failures: 0,
            successes: 0,
            trials_in_flight: 0,
            open_until: 0,
        }
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// When an OPEN breaker will admit a trial (meaningless in other states).
    pub fn open_until(&self) -> u64 {
        self.open_until
    }

    /// Would `admit` let a request through now? Changes nothing.
    pub fn would_admit(&self, now: u64) -> bool {
        match self.state {
            State::Closed => true,
            State::Open => now >= self.open_until,
            State::HalfOpen => self.trials_in_flight < self.half_open_requests,
        }
    }

    /// Asks to send one request. May move OPEN to HALF-OPEN.
    pub fn admit(&mut self, now: u64) -> (Admit, Option<Transition>) {
        match self.state {
            State::Closed => (Admit::Normal, None),
            State::Open if now < self.open_until => (Admit::Rejected, None),
            State::Open => {
                let t = self.enter(State::HalfOpen, now);
                self.trials_in_flight = 1;
                (Admit::Trial, t)
            }
            State::HalfOpen if self.trials_in_flight < self.half_open_requests => {
                self.trials_in_flight += 1;
                (Admit::Trial, None)
            }
            State::HalfOpen => (Admit::Rejected, None),
        }
    }

    /// Reports the outcome of an admitted request.
    pub fn record(&mut self, admit: Admit, ok: bool, now: u64) -> Option<Transition> {
        match admit {
            Admit::Rejected => None,
            Admit::Trial => {
                if self.state != State::HalfOpen {
                    // The breaker moved on (another core's news, or a probe) meanwhile.
                    return self.record_normal(ok, now);
                }
                self.trials_in_flight = self.trials_in_flight.saturating_sub(1);
                if ok {
                    self.successes += 1;
                    if self.successes >= self.success_threshold {
                        return self.enter(State::Closed, now);
                    }
                    None
                } else {
                    self.enter(State::Open, now)
                }
            }
            Admit::Normal => self.record_normal(ok, now),
        }
    }

    fn record_normal(&mut self, ok: bool, now: u64) -> Option<Transition> {
        match self.state {
            State::Closed if ok => {
                self.failures = 0;
                None
            }
            State::Closed => {
                self.failures += 1;
                if self.failures >= self.failure_threshold {
                    self.enter(State::Open, now)
                } else {
                    None
                }
            }
            // A late answer from before the breaker opened says little; ignore it.
            State::Open | State::HalfOpen => None,
        }
    }

    /// Sets the consecutive-failure count (process-wide) while CLOSED, so the
    /// next recorded failure is compared against the threshold with it.
    pub fn record_failure_count(&mut self, consecutive_before: u32) {
        if self.state == State::Closed {
            self.failures = consecutive_before;
        }
    }

    /// Gives back an admission whose outcome says nothing about the replica
    /// (for example the client went away first).
    pub fn release(&mut self, admit: Admit) {
        if admit == Admit::Trial && self.state == State::HalfOpen {
            self.trials_in_flight = self.trials_in_flight.saturating_sub(1);
        }
    }

    /// A passing health probe: OPEN becomes HALF-OPEN at once.
    pub fn probe_passed(&mut self, now: u64) -> Option<Transition> {
        if self.state == State::Open {
            self.enter(State::HalfOpen, now)
        } else {
            None
        }
    }

    /// A failing health probe: the replica is out until the next passing probe or timeout.
    pub fn probe_failed(&mut self, now: u64) -> Option<Transition> {
        if self.state == State::Open {
            None
        } else {
            self.enter(State::Open, now)
        }
    }

    /// Adopts a state published by another core or the prober.
    pub fn adopt(&mut self, state: State, open_until: u64) {
        if self.state != state {
            self.failures = 0;
            self.successes = 0;
            self.trials_in_flight = 0;
        }
        self.state = state;
        self.open_until = open_until;
    }

    fn enter(&mut self, to: State, now: u64) -> Option<Transition> {
        let from = self.state;
        self.state = to;
        self.failures = 0;
        self.successes = 0;
        self.trials_in_flight = 0;
        if to == State::Open {
            self.open_until = now + self.open_ms;
        }
        (from != to).then_some(Transition { from, to })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn settings() -> BreakerSettings {
        BreakerSettings {
            failure_threshold: 3,
            success_threshold: 2,
            open_for: Duration::from_secs(30),
            half_open_requests: 1,
        }
    }

    fn fail(b: &mut Breaker, now: u64) -> Option<Transition> {
        let (a, _) = b.admit(now);
        b.record(a, false, now)
    }

    #[test]
    fn closed_opens_after_consecutive_failures() {
        let mut b = Breaker::new(&settings());
        assert_eq!(fail(&mut b, 0), None);
        assert_eq!(fail(&mut b, 1), None);
        let (a, _) = b.admit(2);
        assert_eq!(b.record(a, true, 2), None, "a success resets the count");
        assert_eq!(fail(&mut b, 3), None);
        assert_eq!(fail(&mut b, 4), None);
        let t = fail(&mut b, 5);
        assert_eq!(
            t,
            Some(Transition {
                from: State::Closed,
                to: State::Open
            })
        );
        assert_eq!(b.open_until(), 30_005);
    }

    #[test]
    fn open_rejects_until_timeout_then_half_opens() {
        let mut b = Breaker::new(&settings());
        for t in 0..3 {
            fail(&mut b, t);
        }
        assert_eq!(b.admit(10_000).0, Admit::Rejected);
        assert!(!b.would_admit(30_001));
        assert!(b.would_admit(30_002));
        let (a, t) = b.admit(30_002);
        assert_eq!(a, Admit::Trial);
        assert_eq!(
            t,
            Some(Transition {
                from: State::Open,
                to: State::HalfOpen
            })
        );
        assert_eq!(
            b.admit(30_003).0,
            Admit::Rejected,
            "only one trial at a time"
        );
    }

    #[test]
    fn half_open_closes_after_successes_and_reopens_on_failure() {
        let mut b = Breaker::new(&settings());
        for t in 0..3 {
            fail(&mut b, t);
        }
        let (a, _) = b.admit(40_000);
        assert_eq!(b.record(a, true, 40_001), None);
        let (a, _) = b.admit(40_002);
        assert_eq!(a, Admit::Trial);
        assert_eq!(
            b.record(a, true, 40_003),
            Some(Transition {
                from: State::HalfOpen,
                to: State::Closed
            })
        );
        for t in 0..3 {
            fail(&mut b, 50_000 + t);
        }
        let (a, _) = b.admit(90_000);
        assert_eq!(
            b.record(a, false, 90_001),
            Some(Transition {
                from: State::HalfOpen,
                to: State::Open
            })
        );
        assert_eq!(b.open_until(), 120_001);
    }

    #[test]
    fn shared_failure_count_opens_sooner() {
        let mut b = Breaker::new(&settings());
        // Two failures were seen on other cores; this core's first one is the third.
        b.record_failure_count(2);
        assert_eq!(
            fail(&mut b, 9),
            Some(Transition {
                from: State::Closed,
                to: State::Open
            })
        );
    }

    #[test]
    fn release_frees_a_trial_slot() {
        let mut b = Breaker::new(&settings());
        for t in 0..3 {
            fail(&mut b, t);
        }
        let (a, _) = b.admit(31_000);
        b.release(a);
        assert_eq!(b.admit(31_001).0, Admit::Trial);
    }

    #[test]
    fn probes_move_the_breaker() {
        let mut b = Breaker::new(&settings());
        assert_eq!(
            b.probe_failed(7),
            Some(Transition {
                from: State::Closed,
                to: State::Open
            })
        );
        assert_eq!(b.admit(8).0, Admit::Rejected);
        assert_eq!(
            b.probe_passed(9),
            Some(Transition {
                from: State::Open,
                to: State::HalfOpen
            })
        );
        assert_eq!(b.admit(10).0, Admit::Trial);
    }

    #[test]
    fn adopt_takes_foreign_state() {
        let mut b = Breaker::new(&settings());
        b.adopt(State::Open, 500);
        assert_eq!(b.admit(499).0, Admit::Rejected);
        assert_eq!(b.admit(500).0, Admit::Trial);
    }
}
