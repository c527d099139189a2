//! Who may read (issue #11), landing in steps. What is here: IP filters per
//! bucket and the client address behind trusted proxies ([`ip`], pure).
//! Not yet: JWT authentication and rate limits.

pub mod ip;
