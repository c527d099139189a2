//! What a request came to, as enums with fixed label sets, and the flat
//! counters a core keeps them in: an index into an array, no hashing and no
//! string keys on the request path. The labels are defined here once, for
//! the metrics and the access line.

use crate::upstream::client::Cause;

/// An outcome with a fixed set of values, each with its metric label.
pub trait Label: Copy + 'static {
    /// How many values there are.
    const COUNT: usize;
    /// Its position among the values (below `COUNT`).
    fn index(self) -> usize;
    /// The label of the value at `index`.
    fn label_at(index: usize) -> &'static str;
    /// Its label.
    fn label(self) -> &'static str {
        Self::label_at(self.index())
    }
}

/// Declares an outcome enum whose variants are labelled in order.
macro_rules! outcome {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $label:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl Label for $name {
            const COUNT: usize = [$($label),+].len();
            fn index(self) -> usize {
                self as usize
            }
            fn label_at(index: usize) -> &'static str {
                [$($label),+].get(index).copied().unwrap_or("other")
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.label())
            }
        }
    };
}

outcome! {
    /// How the cache took a request (`yatagarasu_cache_requests_total`).
    CacheResult {
        /// Served from a stored copy or a fill under way.
        Hit = "hit",
        /// Fetched and, when allowed, stored.
        Miss = "miss",
        /// Not answered from or stored in the cache.
        Bypass = "bypass",
        /// An expired copy answered because no replica could.
        Stale = "stale",
        /// An expired copy confirmed by the origin (304).
        Revalidated = "revalidated",
    }
}

outcome! {
    /// A JWT check's result (`yatagarasu_auth_requests_total`).
    AuthResult {
        /// Verified, claims hold.
        Ok = "ok",
        /// No token.
        Missing = "missing",
        /// Not a valid token for the bucket's keys.
        Invalid = "invalid",
        /// Past its `exp`.
        Expired = "expired",
        /// Valid, but its claims do not hold.
        Forbidden = "forbidden",
    }
}

outcome! {
    /// Which rate limit refused a request (`yatagarasu_rate_limited_total`).
    LimitScope {
        /// Every client request together.
        Global = "global",
        /// One client address.
        PerIp = "per_ip",
        /// A bucket's upstream limit.
        Bucket = "bucket",
    }
}

outcome! {
    /// A policy engine (`engine` label).
    Engine {
        /// OPA's REST Data API.
        Opa = "opa",
        /// OpenFGA's Check API.
        OpenFga = "openfga",
        /// Rego evaluated in process.
        Rego = "rego",
    }
}

outcome! {
    /// A policy decision's result (`yatagarasu_authz_decisions_total`; the
    /// access line's `authz`).
    Decision {
        /// The policy allowed.
        Allow = "allow",
        /// The policy denied.
        Deny = "deny",
        /// No decision; allowed by `fail_mode: open`.
        ErrorOpen = "error_open",
        /// No decision; refused (503) by `fail_mode: closed`.
        ErrorClosed = "error_closed",
    }
}

outcome! {
    /// A lookup in a cache of answers (`yatagarasu_authz_cache_total`).
    Lookup {
        /// Found.
        Hit = "hit",
        /// Not found.
        Miss = "miss",
    }
}

/// Why a 5xx or a broken body was not the replica's failure
/// (`yatagarasu_request_caused_failures_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestCaused {
    /// A 5xx judged to follow the request (see `upstream::blame`).
    Status(Cause),
    /// The body broke after the client stopped reading.
    ClientStalled,
}

impl Label for Cause {
    const COUNT: usize = CAUSES.len();
    fn index(self) -> usize {
        match self {
            Cause::Connect => 0,
            Cause::Timeout => 1,
            Cause::Reset => 2,
            Cause::Tls => 3,
            Cause::Malformed => 4,
            Cause::Truncated => 5,
            Cause::Io => 6,
            Cause::Http(500) => 7,
            Cause::Http(502) => 8,
            Cause::Http(503) => 9,
            Cause::Http(504) => 10,
            Cause::Http(_) => 11,
            Cause::Credentials => 12,
            Cause::Signing => 13,
            Cause::LocalResources => 14,
            Cause::RateLimited => 15,
        }
    }
    fn label_at(index: usize) -> &'static str {
        CAUSES.get(index).map_or("other", |c| c.label())
    }
}

/// One cause of each label, by [`Label::index`] (the labels are
/// `Cause::label`'s).
const CAUSES: [Cause; 16] = [
    Cause::Connect,
    Cause::Timeout,
    Cause::Reset,
    Cause::Tls,
    Cause::Malformed,
    Cause::Truncated,
    Cause::Io,
    Cause::Http(500),
    Cause::Http(502),
    Cause::Http(503),
    Cause::Http(504),
    Cause::Http(599),
    Cause::Credentials,
    Cause::Signing,
    Cause::LocalResources,
    Cause::RateLimited,
];

impl Label for RequestCaused {
    const COUNT: usize = CAUSES.len() + 1;
    fn index(self) -> usize {
        match self {
            RequestCaused::Status(c) => Label::index(c),
            RequestCaused::ClientStalled => CAUSES.len(),
        }
    }
    fn label_at(index: usize) -> &'static str {
        CAUSES.get(index).map_or("client_stalled", |c| c.label())
    }
}

/// Counts of an outcome `E` per key (a bucket's or a replica's metric id),
/// flat: `counts[key * E::COUNT + value]`, grown on first use of a key.
#[derive(Debug, Clone)]
pub struct Counts<E: Label> {
    counts: Vec<u64>,
    _of: std::marker::PhantomData<E>,
}

impl<E: Label> Default for Counts<E> {
    fn default() -> Self {
        Counts {
            counts: Vec::new(),
            _of: std::marker::PhantomData,
        }
    }
}

impl<E: Label> Counts<E> {
    /// Adds `n` to `(key, value)`.
    pub fn add(&mut self, key: usize, value: E, n: u64) {
        let at = key * E::COUNT + value.index();
        if self.counts.len() <= at {
            self.counts.resize((key + 1) * E::COUNT, 0);
        }
        self.counts[at] += n;
    }

    /// The count of `(key, value)`.
    pub fn get(&self, key: usize, value: E) -> u64 {
        self.counts
            .get(key * E::COUNT + value.index())
            .copied()
            .unwrap_or(0)
    }

    /// Adds every count of `other` (scrape-time merge).
    pub fn merge(&mut self, other: &Counts<E>) {
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
    }

    /// `(key, label, count)` of every count above zero, by key then value.
    pub fn nonzero(&self) -> impl Iterator<Item = (usize, &'static str, u64)> + '_ {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(i, &n)| (i / E::COUNT, E::label_at(i % E::COUNT), n))
    }
}

/// A counter per key (a bucket's metric id), grown on first use.
#[derive(Debug, Clone, Default)]
pub struct PerKey(Vec<u64>);

impl PerKey {
    /// Adds `n` to `key`.
    pub fn add(&mut self, key: usize, n: u64) {
        if self.0.len() <= key {
            self.0.resize(key + 1, 0);
        }
        self.0[key] += n;
    }

    /// The count of `key`.
    pub fn get(&self, key: usize) -> u64 {
        self.0.get(key).copied().unwrap_or(0)
    }

    /// Adds every count of `other`.
    pub fn merge(&mut self, other: &PerKey) {
        for (key, &n) in other.0.iter().enumerate() {
            if n > 0 {
                self.add(key, n);
            }
        }
    }

    /// `(key, count)` of every count above zero.
    pub fn nonzero(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.0
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(k, &n)| (k, n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_follow_the_variants() {
        assert_eq!(CacheResult::Revalidated.label(), "revalidated");
        assert_eq!(CacheResult::COUNT, 5);
        assert_eq!(Decision::ErrorClosed.label(), "error_closed");
        assert_eq!(LimitScope::PerIp.label(), "per_ip");
        // Every cause's label is the one its own `label` gives.
        for (i, cause) in CAUSES.iter().enumerate() {
            assert_eq!(Label::index(*cause), i, "{cause:?}");
        }
        assert_eq!(
            Label::index(Cause::Http(507)),
            Label::index(Cause::Http(599))
        );
        assert_eq!(RequestCaused::ClientStalled.label(), "client_stalled");
        assert_eq!(RequestCaused::Status(Cause::Http(500)).label(), "http_500");
    }

    #[test]
    fn counts_grow_merge_and_list() {
        let mut a = Counts::<CacheResult>::default();
        let mut b = Counts::<CacheResult>::default();
        a.add(0, CacheResult::Hit, 2);
        b.add(3, CacheResult::Stale, 1);
        b.add(0, CacheResult::Hit, 1);
        a.merge(&b);
        assert_eq!(a.get(0, CacheResult::Hit), 3);
        assert_eq!(a.get(3, CacheResult::Stale), 1);
        assert_eq!(a.get(7, CacheResult::Miss), 0);
        let listed: Vec<_> = a.nonzero().collect();
        assert_eq!(listed, vec![(0, "hit", 3), (3, "stale", 1)]);
        let mut p = PerKey::default();
        p.add(2, 5);
        let mut q = PerKey::default();
        q.add(0, 1);
        q.merge(&p);
        assert_eq!(q.nonzero().collect::<Vec<_>>(), vec![(0, 1), (2, 5)]);
    }
}
