//! The origin cache (issue #10): the parts that know nothing of sockets.
//!
//! - [`policy`]: the pure decisions (is a response storable and for how
//!   long, how old is a copy, may an expired copy serve when no replica can,
//!   does a stored copy answer a conditional or a `Range` request),
//!   unit-tested with a fake clock;
//! - [`store`]: the process-wide memory tier, bounded by bytes;
//! - [`collapse`]: fills under way, which concurrent misses stream from.
//!
//! The request-path step is `proxy/cache.rs`. Not yet: the disk tier and
//! slices (their configuration keys are refused, never ignored).

pub mod collapse;
pub mod disk;
pub mod policy;
pub mod slice;
pub mod store;
