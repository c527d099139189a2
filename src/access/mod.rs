//! Who may read (issue #11), landing in steps. What is here, pure: IP
//! filters per bucket and the client address behind trusted proxies
//! ([`ip`]); token buckets for rate limits ([`rate`]). Not yet: JWT
//! authentication.

pub mod ip;
pub mod jwt;
pub mod rate;
