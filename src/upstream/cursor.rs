//! One request's walk over its plan of replicas: admit -> attempt -> record
//! or blame -> release, in one place.
//!
//! Every path that sends a request upstream for a client (the first answer,
//! a body resumed from the next replica, a cache slice) walks its plan with a
//! [`ReplicaCursor`], so there is one blame rule (`upstream::blame`) and one
//! half-open accounting: every admission the cursor takes is handed back
//! exactly once, as a success, a failure judged on the replica, a failure
//! judged on the request (released), or released unjudged; a cursor dropped
//! early (the client left, the future was cancelled) releases and judges
//! what it still holds. A half-open trial slot can never leak.
//!
//! The cursor makes decisions only; the breakers, metrics and clock are the
//! caller's, behind [`Ledger`] (one core's breaker copies in the proxy, a
//! fake with a fake clock in the tests below).

use super::blame::{blame, Blame};
use super::breaker::Admit;
use super::client::Cause;
use crate::config::MAX_REPLICAS;

/// What a cursor needs from one core's breakers, metrics and clock.
pub trait Ledger {
    /// Asks `rid`'s breaker to admit one request (may move OPEN to HALF-OPEN).
    fn admit(&self, rid: usize) -> Admit;
    /// A failure blamed on the replica: its breaker counts it.
    fn replica_failed(&self, rid: usize, admit: Admit, cause: Cause);
    /// A failure blamed on the request: counted as such, the admission given
    /// back, the breaker untouched.
    fn request_failed(&self, rid: usize, admit: Admit, cause: Cause);
    /// Gives an admission back unjudged (the attempt said nothing about the
    /// replica).
    fn release(&self, rid: usize, admit: Admit);
    /// `rid` answered with a head whose body is still to come.
    fn answered_head(&self, rid: usize, admit: Admit);
    /// `rid` answered with everything it had to send.
    fn answered_whole(&self, rid: usize, admit: Admit);
    /// The body `rid` started arrived whole.
    fn body_whole(&self, rid: usize);
    /// When `rid` last gave anyone a non-5xx answer (0: never), ms.
    fn last_answer_ms(&self, rid: usize) -> u64;
    /// The breakers' clock, ms.
    fn now_ms(&self) -> u64;
    /// The request moves on from `from` to `to`.
    fn failover(&self, from: usize, to: usize);
}

/// One request's position in its plan (see the module documentation).
pub struct ReplicaCursor<'a, L: Ledger> {
    ledger: &'a L,
    plan: &'a [usize],
    /// Index in `plan` of the next replica to consider.
    pos: usize,
    /// The replica being tried and what its breaker granted.
    turn: Option<(usize, Admit)>,
    /// The replica tried last (for failover counts).
    previous: Option<usize>,
    /// The replica whose answer is being relayed (its body may still break).
    answering: Option<usize>,
    /// Some replica gave this request a non-5xx answer.
    answered: bool,
    /// Times the request moved on to another replica.
    failovers: u32,
    /// 5xx answers, judged once the request's outcome is known (rare: an
    /// empty Vec allocates nothing, and the cursor stays small to move).
    deferred: Vec<(usize, Admit, Cause)>,
}

impl<'a, L: Ledger> ReplicaCursor<'a, L> {
    /// A cursor at the start of `plan` (replica ids in the order to try).
    pub fn new(ledger: &'a L, plan: &'a [usize]) -> Self {
        ReplicaCursor {
            ledger,
            plan,
            pos: 0,
            turn: None,
            previous: None,
            answering: None,
            answered: false,
            failovers: 0,
            deferred: Vec::new(),
        }
    }

    /// The next replica its breaker admits, now its turn; none when the plan
    /// is spent. A turn still held is released first.
    pub fn next_replica(&mut self) -> Option<usize> {
        self.release_turn();
        while let Some(&rid) = self.plan.get(self.pos) {
            self.pos += 1;
            let admit = self.ledger.admit(rid);
            if admit == Admit::Rejected {
                continue;
            }
            if let Some(from) = self.previous.or(self.answering) {
                self.ledger.failover(from, rid);
                self.failovers += 1;
            }
            self.previous = Some(rid);
            self.turn = Some((rid, admit));
            return Some(rid);
        }
        None
    }

    /// The replicas not yet considered, in plan order.
    pub fn rest(&self) -> &'a [usize] {
        &self.plan[self.pos.min(self.plan.len())..]
    }

    /// Times the request moved on to another replica so far.
    pub fn failovers(&self) -> u32 {
        self.failovers
    }

    /// Whether any replica took a turn (false: every breaker refused).
    pub fn tried_any(&self) -> bool {
        self.previous.is_some()
    }

    /// The current turn failed with `cause`. A 5xx is judged once the
    /// request's outcome is known (`upstream::blame`); anything else is the
    /// replica's at once.
    pub fn failed(&mut self, cause: Cause) {
        let Some((rid, admit)) = self.turn.take() else {
            return;
        };
        if cause.is_http_status() && self.deferred.len() < MAX_REPLICAS {
            self.deferred.push((rid, admit, cause));
        } else {
            self.ledger.replica_failed(rid, admit, cause);
        }
    }

    /// The current turn ended without saying anything about the replica
    /// (an answer that is not what was asked for, a local refusal).
    pub fn release_turn(&mut self) {
        if let Some((rid, admit)) = self.turn.take() {
            self.ledger.release(rid, admit);
        }
    }

    /// The current turn answered with a head; its body is still to come
    /// ([`Self::body_whole`] or [`Self::body_broke`] follows). Returns the
    /// replica.
    pub fn answered_head(&mut self) -> Option<usize> {
        let (rid, admit) = self.turn.take()?;
        self.ledger.answered_head(rid, admit);
        self.now_answering(rid);
        Some(rid)
    }

    /// The current turn answered with all it had to send.
    pub fn answered_whole(&mut self) -> Option<usize> {
        let (rid, admit) = self.turn.take()?;
        self.ledger.answered_whole(rid, admit);
        self.now_answering(rid);
        self.answering = None;
        Some(rid)
    }

    fn now_answering(&mut self, rid: usize) {
        self.answered = true;
        self.answering = Some(rid);
        self.previous = None;
        self.judge_deferred();
    }

    /// The body of the answering replica arrived whole.
    pub fn body_whole(&mut self) {
        if let Some(rid) = self.answering.take() {
            self.ledger.body_whole(rid);
        }
    }

    /// The body of the answering replica broke with `cause` (its fault: a
    /// client that stalled is the caller's to count, see `client_stalled`).
    pub fn body_broke(&mut self, cause: Cause) {
        if let Some(rid) = self.answering.take() {
            self.ledger.replica_failed(rid, Admit::Normal, cause);
            self.previous = Some(rid);
        }
    }

    /// The answering replica's body was left unfinished for a reason that
    /// is not the replica's (the client left or stalled).
    pub fn body_abandoned(&mut self) -> Option<usize> {
        self.answering.take()
    }

    /// Starts over at the top of the plan (a body whose stored copy went
    /// before its reader caught up is continued from any replica, the one
    /// that first sent it included).
    pub fn again(&mut self) {
        self.release_turn();
        if let Some(rid) = self.answering.take() {
            self.previous = Some(rid);
        }
        self.pos = 0;
    }

    /// Judges the deferred 5xx answers with what is known now.
    fn judge_deferred(&mut self) {
        if self.deferred.is_empty() {
            return;
        }
        let deferred = std::mem::take(&mut self.deferred);
        let last = deferred
            .iter()
            .map(|&(rid, _, _)| self.ledger.last_answer_ms(rid))
            .max()
            .unwrap_or(0);
        let now = self.ledger.now_ms();
        for (rid, admit, cause) in deferred {
            match blame(cause, self.answered, last, now) {
                Blame::Replica => self.ledger.replica_failed(rid, admit, cause),
                Blame::Request => self.ledger.request_failed(rid, admit, cause),
            }
        }
    }
}

impl<L: Ledger> Drop for ReplicaCursor<'_, L> {
    /// The request is over: what is still held is handed back.
    fn drop(&mut self) {
        self.release_turn();
        self.judge_deferred();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BreakerSettings;
    use crate::upstream::blame::RECENT_ANSWER_MS;
    use crate::upstream::breaker::{Breaker, State};
    use std::cell::{Cell, RefCell};
    use std::time::Duration;

    /// Real breakers on a fake clock; every call written down.
    struct Fake {
        now: Cell<u64>,
        breakers: RefCell<Vec<Breaker>>,
        last_answer: RefCell<Vec<u64>>,
        events: RefCell<Vec<String>>,
    }

    impl Fake {
        fn new(replicas: usize, half_open_requests: u32) -> Fake {
            let settings = BreakerSettings {
                failure_threshold: 1,
                success_threshold: 1,
                open_for: Duration::from_secs(30),
                half_open_requests,
            };
            Fake {
                now: Cell::new(1_000_000),
                breakers: RefCell::new(vec![Breaker::new(&settings); replicas]),
                last_answer: RefCell::new(vec![0; replicas]),
                events: RefCell::new(Vec::new()),
            }
        }
        fn note(&self, e: String) {
            self.events.borrow_mut().push(e);
        }
        fn state(&self, rid: usize) -> State {
            self.breakers.borrow()[rid].state()
        }
        fn open(&self, rid: usize) {
            let now = self.now.get();
            self.breakers.borrow_mut()[rid].record(Admit::Normal, false, now);
            assert_eq!(self.state(rid), State::Open);
        }
        fn events(&self) -> Vec<String> {
            self.events.borrow().clone()
        }
    }

    impl Ledger for Fake {
        fn admit(&self, rid: usize) -> Admit {
            self.breakers.borrow_mut()[rid].admit(self.now.get()).0
        }
        fn replica_failed(&self, rid: usize, admit: Admit, cause: Cause) {
            self.note(format!("replica {rid} {}", cause.label()));
            self.breakers.borrow_mut()[rid].record(admit, false, self.now.get());
        }
        fn request_failed(&self, rid: usize, admit: Admit, cause: Cause) {
            self.note(format!("request {rid} {}", cause.label()));
            self.breakers.borrow_mut()[rid].release(admit);
        }
        fn release(&self, rid: usize, admit: Admit) {
            self.note(format!("release {rid}"));
            self.breakers.borrow_mut()[rid].release(admit);
        }
        fn answered_head(&self, rid: usize, admit: Admit) {
            self.note(format!("head {rid}"));
            self.breakers.borrow_mut()[rid].record(admit, true, self.now.get());
        }
        fn answered_whole(&self, rid: usize, admit: Admit) {
            self.note(format!("whole {rid}"));
            self.breakers.borrow_mut()[rid].record(admit, true, self.now.get());
        }
        fn body_whole(&self, rid: usize) {
            self.note(format!("body {rid}"));
        }
        fn last_answer_ms(&self, rid: usize) -> u64 {
            self.last_answer.borrow()[rid]
        }
        fn now_ms(&self) -> u64 {
            self.now.get()
        }
        fn failover(&self, from: usize, to: usize) {
            self.note(format!("failover {from}->{to}"));
        }
    }

    /// A replica past its open period with one trial slot, whose trial gets
    /// a 5xx while it serves other requests: the request is blamed and the
    /// slot comes back, so the next request is admitted as a trial.
    #[test]
    fn a_5xx_trial_blamed_on_the_request_gives_its_slot_back() {
        let fake = Fake::new(1, 1);
        fake.open(0);
        fake.now.set(fake.now.get() + 30_000);
        fake.last_answer.borrow_mut()[0] = fake.now.get() - 10;
        let plan = [0];
        {
            let mut cursor = ReplicaCursor::new(&fake, &plan);
            assert_eq!(cursor.next_replica(), Some(0));
            assert_eq!(fake.state(0), State::HalfOpen);
            cursor.failed(Cause::Http(500));
            assert_eq!(cursor.next_replica(), None);
        }
        assert_eq!(fake.events(), ["request 0 http_500"]);
        assert_eq!(fake.state(0), State::HalfOpen);
        let mut cursor = ReplicaCursor::new(&fake, &plan);
        assert_eq!(cursor.next_replica(), Some(0), "the trial slot leaked");
    }

    /// The same trial, when the replica has answered nobody lately: its
    /// failure, and the breaker opens again for the whole period.
    #[test]
    fn a_5xx_trial_of_a_replica_that_serves_nobody_reopens_its_breaker() {
        let fake = Fake::new(1, 1);
        fake.open(0);
        let reopened_at = fake.now.get() + 30_000;
        fake.now.set(reopened_at);
        let plan = [0];
        {
            let mut cursor = ReplicaCursor::new(&fake, &plan);
            assert_eq!(cursor.next_replica(), Some(0));
            cursor.failed(Cause::Http(503));
        }
        assert_eq!(fake.events(), ["replica 0 http_503"]);
        assert_eq!(fake.state(0), State::Open);
        fake.now.set(reopened_at + 29_999);
        assert_eq!(ReplicaCursor::new(&fake, &plan).next_replica(), None);
        fake.now.set(reopened_at + 30_000);
        assert_eq!(ReplicaCursor::new(&fake, &plan).next_replica(), Some(0));
    }

    /// A trial whose turn is neither answered nor failed (the client left,
    /// the future was dropped) is released when the cursor goes.
    #[test]
    fn a_dropped_cursor_releases_its_trial() {
        let fake = Fake::new(1, 1);
        fake.open(0);
        fake.now.set(fake.now.get() + 30_000);
        let plan = [0];
        {
            let mut cursor = ReplicaCursor::new(&fake, &plan);
            assert_eq!(cursor.next_replica(), Some(0));
        }
        assert_eq!(fake.events(), ["release 0"]);
        assert_eq!(ReplicaCursor::new(&fake, &plan).next_replica(), Some(0));
    }

    /// A 5xx from the first replica and an answer from the second: the
    /// first is worse than the second at this request, so it is blamed,
    /// even while it serves others; the failover is counted once.
    #[test]
    fn a_5xx_another_replica_answered_is_the_replicas() {
        let fake = Fake::new(2, 1);
        fake.last_answer.borrow_mut()[0] = fake.now.get() - 10;
        let plan = [0, 1];
        let mut cursor = ReplicaCursor::new(&fake, &plan);
        assert_eq!(cursor.next_replica(), Some(0));
        cursor.failed(Cause::Http(500));
        assert_eq!(cursor.next_replica(), Some(1));
        assert_eq!(cursor.answered_head(), Some(1));
        cursor.body_whole();
        drop(cursor);
        assert_eq!(
            fake.events(),
            ["failover 0->1", "head 1", "replica 0 http_500", "body 1"]
        );
    }

    /// A body that broke is resumed on the rest of the plan: a 5xx there is
    /// judged with the first answer known (the replica's), and the resume
    /// is counted as a failover from the broken replica.
    #[test]
    fn a_resume_judges_5xx_with_the_first_answer_known() {
        let fake = Fake::new(3, 1);
        for rid in 0..3 {
            fake.last_answer.borrow_mut()[rid] = fake.now.get() - 10;
        }
        let plan = [0, 1, 2];
        let mut cursor = ReplicaCursor::new(&fake, &plan);
        assert_eq!(cursor.next_replica(), Some(0));
        cursor.answered_head();
        cursor.body_broke(Cause::Reset);
        assert_eq!(cursor.next_replica(), Some(1));
        cursor.failed(Cause::Http(500));
        assert_eq!(cursor.next_replica(), Some(2));
        cursor.answered_head();
        cursor.body_whole();
        drop(cursor);
        assert_eq!(
            fake.events(),
            [
                "head 0",
                "replica 0 reset",
                "failover 0->1",
                "failover 1->2",
                "head 2",
                "replica 1 http_500",
                "body 2"
            ]
        );
    }

    /// Every replica answered this request with a 5xx while they serve
    /// others: the request's fault, every admission given back.
    #[test]
    fn a_request_every_replica_fails_is_blamed_on_the_request() {
        let fake = Fake::new(2, 1);
        let now = fake.now.get();
        fake.last_answer.borrow_mut()[1] = now - RECENT_ANSWER_MS + 1;
        let plan = [0, 1];
        let mut cursor = ReplicaCursor::new(&fake, &plan);
        while cursor.next_replica().is_some() {
            cursor.failed(Cause::Http(500));
        }
        assert!(cursor.tried_any());
        drop(cursor);
        assert_eq!(
            fake.events(),
            ["failover 0->1", "request 0 http_500", "request 1 http_500"]
        );
        assert_eq!(fake.state(0), State::Closed);
    }

    /// Transport failures are the replica's at once, and an open breaker is
    /// skipped without a turn.
    #[test]
    fn transport_failures_count_at_once_and_open_breakers_are_skipped() {
        let fake = Fake::new(3, 1);
        fake.open(1);
        let plan = [0, 1, 2];
        let mut cursor = ReplicaCursor::new(&fake, &plan);
        assert_eq!(cursor.next_replica(), Some(0));
        cursor.failed(Cause::Connect);
        assert_eq!(fake.events(), ["replica 0 connect"]);
        assert_eq!(cursor.next_replica(), Some(2));
        assert_eq!(cursor.rest(), &[] as &[usize]);
        assert_eq!(cursor.answered_whole(), Some(2));
        assert_eq!(
            fake.events(),
            ["replica 0 connect", "failover 0->2", "whole 2"]
        );
    }
}
