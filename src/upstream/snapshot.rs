//! Cross-core publication of breaker state: one packed `AtomicU64` per replica.
//!
//! Layout: `generation` (24 bits) | `state` (2 bits) | `open_until` ms (38 bits).
//! A core (or the health prober) that changes a breaker publishes the new
//! state with a bumped generation. Every core compares the generation it last
//! adopted with one relaxed load at the start of each attempt and adopts newer
//! state, so a replica opened anywhere is skipped everywhere. No lock, and the
//! cache line is only written on transitions, which are rare.

use super::breaker::State;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

const UNTIL_BITS: u32 = 38;
const UNTIL_MASK: u64 = (1 << UNTIL_BITS) - 1;
const STATE_SHIFT: u32 = UNTIL_BITS;
const GEN_SHIFT: u32 = UNTIL_BITS + 2;
const GEN_MASK: u64 = (1 << (64 - GEN_SHIFT)) - 1;

/// The published view of one replica's breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerView {
    /// Bumped on every publication.
    pub generation: u32,
    /// The published state.
    pub state: State,
    /// When an open breaker may half-open (ms on the breaker clock).
    pub open_until: u64,
}

/// One replica's breaker state as published to every core (process-wide,
/// carried across generations while the replica is unchanged): one packed
/// word, padded to its own cache line.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct SharedBreaker {
    word: AtomicU64,
    /// Consecutive failures seen by all cores while CLOSED.
    failures: AtomicU32,
}

impl SharedBreaker {
    /// A closed breaker.
    pub fn new() -> SharedBreaker {
        SharedBreaker::default()
    }

    /// The published state, in one atomic load.
    pub fn load(&self) -> BreakerView {
        unpack(self.word.load(Ordering::Acquire))
    }

    /// Counts one more consecutive failure (any core); returns the new count.
    pub fn add_failure(&self) -> u32 {
        self.failures
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1)
    }

    /// A success (or a state change) ends the run of failures. Writes only
    /// when there is something to reset, so successes cost a read.
    pub fn clear_failures(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Release);
        }
    }

    /// Publishes `state`; returns the new generation.
    pub fn publish(&self, state: State, open_until: u64) -> u32 {
        let mut generation = 0;
        let _ = self
            .word
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                let g = ((w >> GEN_SHIFT) + 1) & GEN_MASK;
                generation = g as u32;
                Some((g << GEN_SHIFT) | (state.code() << STATE_SHIFT) | (open_until & UNTIL_MASK))
            });
        self.clear_failures();
        generation
    }
}

fn unpack(w: u64) -> BreakerView {
    BreakerView {
        generation: ((w >> GEN_SHIFT) & GEN_MASK) as u32,
        state: State::from_code((w >> STATE_SHIFT) & 3),
        open_until: w & UNTIL_MASK,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_bumps_generation() {
        let s = SharedBreaker::new();
        assert_eq!(
            s.load(),
            BreakerView {
                generation: 0,
                state: State::Closed,
                open_until: 0
            }
        );
        let g1 = s.publish(State::Open, 123_456_789);
        let g2 = s.publish(State::HalfOpen, 0);
        assert_eq!(g2, g1 + 1);
        s.publish(State::Open, 99);
        let p = s.load();
        assert_eq!(
            (p.state, p.open_until, p.generation),
            (State::Open, 99, g2 + 1)
        );
    }
}
