//! Signing credentials: where each replica's keys come from and how new keys
//! reach the cores.
//!
//! Static keys from the config file are published once. Every other source
//! (key files, the AWS SDK's providers, an assumed role) is served by one
//! thread of its own ([`fetch`]), which fetches, refreshes ahead of expiry
//! ([`schedule`]) and publishes into a [`KeyCell`] cell per source. Cells
//! are shared by every replica with the same source and region and live in
//! the process-wide [`Hub`], so a reload that keeps a replica's source keeps
//! its keys.
//!
//! Publication is the pattern used for breakers and JWKS keys: a version
//! counter read with one atomic load per upstream request; a worker takes
//! the new keys under the cell's mutex only when the version moved.

pub mod fetch;
pub mod schedule;

use crate::config::CredentialSource;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// One set of keys. `Debug` shows no key material.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// Access key id.
    pub access_key: String,
    /// Secret key.
    pub secret_key: String,
    /// Session token of temporary credentials, sent as `x-amz-security-token`.
    pub session_token: Option<String>,
    /// When they stop working (`None`: never).
    pub expires: Option<SystemTime>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("session_token", &self.session_token.is_some())
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Whether they have expired at `now`.
    pub fn expired(&self, now: SystemTime) -> bool {
        self.expires.is_some_and(|e| e <= now)
    }
}

/// A source's state as `/ready` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum KeyState {
    /// Nothing fetched yet.
    Pending = 0,
    /// The last fetch worked.
    Fresh = 1,
    /// The last fetch failed; the previous keys are still valid.
    RefreshFailing = 2,
    /// The keys held have expired (and no fetch has replaced them).
    Expired = 3,
    /// Keys from the config file, never refreshed.
    Static = 4,
}

impl KeyState {
    /// The label in `/ready`.
    pub fn label(self) -> &'static str {
        match self {
            KeyState::Pending => "pending",
            KeyState::Fresh => "ok",
            KeyState::RefreshFailing => "refresh_failing",
            KeyState::Expired => "expired",
            KeyState::Static => "static",
        }
    }

    fn from_u8(v: u8) -> KeyState {
        match v {
            1 => KeyState::Fresh,
            2 => KeyState::RefreshFailing,
            3 => KeyState::Expired,
            4 => KeyState::Static,
            _ => KeyState::Pending,
        }
    }
}

/// The keys of one source, published to every core.
pub struct KeyCell {
    /// What this cell serves.
    pub source: CredentialSource,
    /// The region STS calls use.
    pub region: String,
    /// The keys, republished by each fetch (version 0: none yet).
    keys: crate::published::Published<Option<Arc<Credentials>>>,
    /// A request asked for an immediate refresh (a 403 naming the keys).
    wanted: AtomicBool,
    /// Fetches finished, successful or not (requests waiting on a refresh
    /// watch it).
    finished: AtomicU64,
    state: AtomicU8,
    /// Successful fetches, for metrics.
    pub ok: AtomicU64,
    /// Failed fetches, for metrics.
    pub failed: AtomicU64,
}

impl KeyCell {
    fn new(source: CredentialSource, region: String) -> KeyCell {
        let cell = KeyCell {
            keys: crate::published::Published::new(None),
            wanted: AtomicBool::new(false),
            finished: AtomicU64::new(0),
            state: AtomicU8::new(KeyState::Pending as u8),
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            region,
            source,
        };
        if let crate::config::CredentialBase::Static {
            access_key,
            secret_key,
        } = &cell.source.base
        {
            if cell.source.assume_role.is_none() {
                cell.publish(Credentials {
                    access_key: access_key.clone(),
                    secret_key: secret_key.clone(),
                    session_token: None,
                    expires: None,
                });
                cell.state.store(KeyState::Static as u8, Ordering::Release);
            }
        }
        cell
    }

    /// The publication counter (one atomic load; 0 until the first keys).
    pub fn version(&self) -> u64 {
        self.keys.version()
    }

    /// The keys published last.
    pub fn current(&self) -> Option<Arc<Credentials>> {
        (*self.keys.load()).clone()
    }

    /// Fetches finished so far.
    pub fn finished(&self) -> u64 {
        self.finished.load(Ordering::Acquire)
    }

    /// Asks the fetcher thread for a refresh now.
    pub fn want_refresh(&self) {
        self.wanted.store(true, Ordering::Release);
    }

    /// Whether a refresh can give different keys (anything but static keys).
    pub fn refreshable(&self) -> bool {
        !self.source.is_static()
    }

    /// The state for `/ready`, with expiry taken into account.
    pub fn state(&self, now: SystemTime) -> KeyState {
        let s = KeyState::from_u8(self.state.load(Ordering::Acquire));
        match self.current() {
            Some(c) if c.expired(now) && s != KeyState::Static => KeyState::Expired,
            _ => s,
        }
    }

    /// Seconds until the current keys expire (`None`: they never do, or
    /// there are none).
    pub fn expires_in(&self, now: SystemTime) -> Option<f64> {
        let e = self.current()?.expires?;
        Some(match e.duration_since(now) {
            Ok(left) => left.as_secs_f64(),
            Err(past) => -past.duration().as_secs_f64(),
        })
    }

    /// Publishes new keys to every core.
    pub fn publish(&self, creds: Credentials) {
        self.keys.publish(Some(Arc::new(creds)));
        self.state.store(KeyState::Fresh as u8, Ordering::Release);
    }

    fn fetch_failed(&self) {
        if self.version() > 0 {
            self.state
                .store(KeyState::RefreshFailing as u8, Ordering::Release);
        }
    }

    fn fetch_finished(&self) {
        self.finished.fetch_add(1, Ordering::AcqRel);
    }

    fn take_wanted(&self) -> bool {
        self.wanted.swap(false, Ordering::AcqRel)
    }
}

/// Every credential cell of the process, by (source, region); the fetcher
/// thread serves the ones a generation still uses.
#[derive(Default)]
pub struct Hub {
    cells: Mutex<Vec<Arc<KeyCell>>>,
}

impl Hub {
    /// The cell for `source` in `region`, created (and, for static keys,
    /// filled) on first use.
    pub fn cell(&self, source: &CredentialSource, region: &str) -> Arc<KeyCell> {
        let mut cells = match self.cells.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(c) = cells
            .iter()
            .find(|c| c.source == *source && c.region == region)
        {
            return c.clone();
        }
        let cell = Arc::new(KeyCell::new(source.clone(), region.to_string()));
        cells.push(cell.clone());
        cell
    }

    /// Cells still referenced by a generation; forgets the others.
    fn live(&self) -> Vec<Arc<KeyCell>> {
        let mut cells = match self.cells.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        cells.retain(|c| Arc::strong_count(c) > 1);
        cells.clone()
    }
}

/// Waits (polling, without blocking the core) until `cell` has keys or
/// `deadline` passes: the cold-start path.
pub async fn wait_for_first(cell: &KeyCell, deadline: Instant) -> bool {
    while cell.version() == 0 {
        if Instant::now() >= deadline {
            return false;
        }
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

/// Asks for a refresh and waits until a fetch finishes after the request
/// or `deadline` passes.
pub async fn refresh_now(cell: &KeyCell, deadline: Instant) {
    let seen = cell.finished();
    cell.want_refresh();
    while cell.finished() == seen && Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
}
