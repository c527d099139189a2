//! The worker's local breaker copies: synchronised with the shared snapshot on
//! every use, transitions published for the other cores and logged.

use super::*;
use crate::upstream::cursor::{Ledger, ReplicaCursor};

impl CoreGeneration {
    // ---- breakers: local copy, synchronised with the shared snapshot ----

    pub(super) fn sync(&self, rid: usize, b: &mut LocalBreaker) {
        let p = self.shared.replicas[rid].breaker.load();
        if p.generation != b.seen {
            b.breaker.adopt(p.state, p.open_until);
            b.seen = p.generation;
        }
    }

    pub(super) fn usable(&self, rid: usize, now: u64) -> bool {
        let mut all = self.breakers.borrow_mut();
        let b = &mut all[rid];
        self.sync(rid, b);
        b.breaker.would_admit(now)
    }

    pub(super) fn admit(&self, rid: usize, now: u64) -> Admit {
        let mut all = self.breakers.borrow_mut();
        let b = &mut all[rid];
        self.sync(rid, b);
        let (admit, t) = b.breaker.admit(now);
        if let Some(t) = t {
            b.seen = self.shared.replicas[rid]
                .breaker
                .publish(t.to, b.breaker.open_until());
            self.log_transition(rid, t.from, t.to);
        }
        admit
    }

    pub(super) fn record(&self, rid: usize, admit: Admit, ok: bool) {
        self.record_as(rid, admit, ok, true);
    }

    /// [`Self::record`]; `clears`: a success ends the run of consecutive
    /// failures counted across cores (not yet when only a head arrived and
    /// its body may still break, see [`Self::record_head`]).
    fn record_as(&self, rid: usize, admit: Admit, ok: bool, clears: bool) {
        let mut all = self.breakers.borrow_mut();
        let b = &mut all[rid];
        let shared = &self.shared.replicas[rid].breaker;
        if admit == Admit::Normal {
            if ok {
                if clears {
                    shared.clear_failures();
                }
            } else {
                // Consecutive failures are counted across cores.
                let n = shared.add_failure();
                b.breaker.record_failure_count(n - 1);
            }
        }
        if let Some(t) = b.breaker.record(admit, ok, now_ms()) {
            b.seen = self.shared.replicas[rid]
                .breaker
                .publish(t.to, b.breaker.open_until());
            drop(all);
            self.log_transition(rid, t.from, t.to);
            if t.to == State::Open {
                self.pool.clear(rid);
            }
        }
    }

    /// A replica answered with a head whose body is still to come: a
    /// success for its breaker's state (a half-open trial passes) and
    /// fresh evidence that it serves, but the run of consecutive failures
    /// goes on until the body is whole ([`Self::record_body_whole`]): an
    /// upstream that cuts every body after its head still opens its
    /// breaker after `failure_threshold` of them.
    pub(super) fn record_head(&self, rid: usize, admit: Admit) {
        self.note_answered(rid);
        self.record_as(rid, admit, true, false);
    }

    /// The body of an answer recorded with [`Self::record_head`] arrived
    /// whole: the replica's run of consecutive failures ends.
    pub(super) fn record_body_whole(&self, rid: usize) {
        self.shared.replicas[rid].breaker.clear_failures();
    }

    /// A replica answered (any non-5xx status) with all it had to send: a
    /// success for its breaker, and fresh evidence that it serves (see
    /// `upstream::blame`).
    pub(super) fn record_answer(&self, rid: usize, admit: Admit) {
        self.note_answered(rid);
        self.record(rid, admit, true);
    }

    /// Fresh evidence that `rid` serves (see `upstream::blame`).
    fn note_answered(&self, rid: usize) {
        // 0 means "never" (the clock starts at 0 with the process).
        let now = now_ms().max(1);
        let last = &self.shared.replicas[rid].last_answer_ms;
        let seen = last.load(Ordering::Relaxed);
        // At most one shared write a second per core.
        if seen == 0 || now.saturating_sub(seen) >= 1000 {
            last.store(now, Ordering::Relaxed);
        }
    }

    /// A failure blamed on the replica: counted by reason and by its breaker.
    /// The one place a replica failure is recorded.
    pub(super) fn record_failure(&self, rid: usize, admit: Admit, cause: Cause) {
        if cause == Cause::RateLimited {
            // Nothing was sent (counted by `pay_upstream`).
            self.release(rid, admit);
            return;
        }
        self.core
            .metrics
            .borrow_mut()
            .replica_failure(self.mid(rid), cause);
        if cause.is_local() {
            // The proxy's own exhaustion says nothing about the replica.
            self.release(rid, admit);
            return;
        }
        self.record(rid, admit, false);
    }

    pub(super) fn release(&self, rid: usize, admit: Admit) {
        self.breakers.borrow_mut()[rid].breaker.release(admit);
    }

    pub(super) fn log_transition(&self, rid: usize, from: State, to: State) {
        let r = &self.shared.replicas[rid];
        let level = if to == State::Open {
            Level::Warn
        } else {
            Level::Info
        };
        log!(
            level,
            "Circuit breaker state changed",
            bucket = self.shared.bucket(r.bucket).name,
            replica = r.config.name,
            from = from.as_str(),
            to = to.as_str(),
        );
    }
}

/// A request's walk over its replicas (`upstream::cursor`) on this core's
/// breakers.
pub(super) type Cursor<'a> = ReplicaCursor<'a, CoreGeneration>;

impl Ledger for CoreGeneration {
    fn admit(&self, rid: usize) -> Admit {
        CoreGeneration::admit(self, rid, now_ms())
    }
    fn replica_failed(&self, rid: usize, admit: Admit, cause: Cause) {
        self.record_failure(rid, admit, cause);
    }
    fn request_failed(&self, rid: usize, admit: Admit, cause: Cause) {
        self.core
            .metrics
            .borrow_mut()
            .request_caused(self.mid(rid), RequestCaused::Status(cause));
        CoreGeneration::release(self, rid, admit);
    }
    fn release(&self, rid: usize, admit: Admit) {
        CoreGeneration::release(self, rid, admit);
    }
    fn answered_head(&self, rid: usize, admit: Admit) {
        self.record_head(rid, admit);
    }
    fn answered_whole(&self, rid: usize, admit: Admit) {
        self.record_answer(rid, admit);
    }
    fn body_whole(&self, rid: usize) {
        self.record_body_whole(rid);
    }
    fn last_answer_ms(&self, rid: usize) -> u64 {
        self.shared.replicas[rid]
            .last_answer_ms
            .load(Ordering::Relaxed)
    }
    fn now_ms(&self) -> u64 {
        now_ms()
    }
    fn failover(&self, from: usize, to: usize) {
        let (from, to) = (self.mid(from), self.mid(to));
        self.core.metrics.borrow_mut().failover(from, to);
    }
}
