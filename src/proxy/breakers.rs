//! The shard's local breaker copies: synchronised with the shared snapshot on
//! every use, transitions published for the other cores and logged.

use super::*;

impl Shard {
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
        let mut all = self.breakers.borrow_mut();
        let b = &mut all[rid];
        let shared = &self.shared.replicas[rid].breaker;
        if admit == Admit::Normal {
            if ok {
                shared.clear_failures();
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
