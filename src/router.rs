//! Request path -> (bucket, object key), and object key -> S3 URI path.
//!
//! The raw request target is percent-decoded once; the longest configured
//! `path_prefix` that ends on a `/` boundary wins (`/data` never matches
//! `/database`). The remainder is the object key. Keys are re-encoded with
//! SigV4's rules (everything but `A-Za-z0-9-_.~` and `/` escaped), so a key
//! reaches S3 byte for byte as the client named it. Keys with a `.` or `..`
//! segment, NUL bytes or invalid UTF-8 are refused: no request can address
//! anything outside its bucket, whatever the upstream does with dot segments.

use percent_encoding::{percent_decode, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use std::collections::HashMap;

/// Why a path could not be turned into a bucket and key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteError {
    /// Bad percent-encoding, invalid UTF-8, NUL, or a dot segment.
    BadPath(&'static str),
    /// No bucket's prefix matches.
    NoBucket,
    /// The prefix matched but named no object.
    NoKey,
    /// A query parameter the proxy will not serve (an S3 sub-resource such as
    /// `acl`), or a malformed value of a forwarded one; names the parameter.
    BadQuery(&'static str),
}

/// Maps normalised prefixes to bucket indexes.
#[derive(Debug, Clone, Default)]
pub struct Router {
    prefixes: HashMap<Box<str>, usize>,
}

impl Router {
    /// `prefixes[i]` is bucket `i`'s normalised prefix (see `config::normalize_prefix`).
    pub fn new<'a>(prefixes: impl IntoIterator<Item = &'a str>) -> Router {
        Router {
            prefixes: prefixes
                .into_iter()
                .enumerate()
                .map(|(i, p)| (Box::from(p), i))
                .collect(),
        }
    }

    /// Finds the bucket for a decoded path; returns its index and the key.
    pub fn route<'p>(&self, path: &'p str) -> Result<(usize, &'p str), RouteError> {
        // Candidates, longest first: each '/' boundary of the path, then the root.
        let mut end = path.len();
        loop {
            let candidate = &path[..end];
            if let Some(&idx) = self.prefixes.get(candidate) {
                let rest = &path[end..];
                let key = rest.strip_prefix('/').unwrap_or(rest);
                if key.is_empty() {
                    return Err(RouteError::NoKey);
                }
                return Ok((idx, key));
            }
            match candidate.rfind('/') {
                Some(pos) => end = pos,
                None => return Err(RouteError::NoBucket),
            }
        }
    }
}

/// Splits a request target into its path and query (without `?`).
///
/// Origin-form (`/a/b?q`) and absolute-form (`http://h/a/b?q`). An
/// absolute-form target must be a valid URI (checked with `http::Uri`); per
/// RFC 3986 its authority ends at the first `/`, `?` or `#`, so
/// `http://evil.example?/data/x` has an empty path and is refused.
pub fn split_target(target: &[u8]) -> Result<(&[u8], &[u8]), RouteError> {
    let mut t = target;
    if t.first() != Some(&b'/') {
        let uri = http::Uri::try_from(t)
            .map_err(|_| RouteError::BadPath("request target must be a path or an absolute URI"))?;
        match uri.scheme_str() {
            Some(s) if s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("https") => {}
            _ => return Err(RouteError::BadPath("request target must be a path")),
        }
        if uri.authority().is_none() {
            return Err(RouteError::BadPath("request target has no authority"));
        }
        let after_scheme = t
            .windows(3)
            .position(|w| w == b"://")
            .map(|p| p + 3)
            .ok_or(RouteError::BadPath("request target must be a path"))?;
        t = &t[after_scheme..];
        let end = t
            .iter()
            .position(|&b| matches!(b, b'/' | b'?' | b'#'))
            .unwrap_or(t.len());
        t = &t[end..];
        if t.first() != Some(&b'/') {
            return Err(RouteError::BadPath("request target has no path"));
        }
    }
    let t = match t.iter().position(|&b| b == b'#') {
        Some(f) => &t[..f],
        None => t,
    };
    Ok(match t.iter().position(|&b| b == b'?') {
        Some(q) => (&t[..q], &t[q + 1..]),
        None => (t, &[][..]),
    })
}

/// Percent-decodes the path part of a request target into `out`.
///
/// The query is not part of the path (see [`upstream_query`]). Fails on
/// malformed escapes, invalid UTF-8, NUL or dot segments.
pub fn decode_path(target: &[u8], out: &mut String) -> Result<(), RouteError> {
    let (t, _) = split_target(target)?;
    if !valid_escapes(t) {
        return Err(RouteError::BadPath("malformed percent-encoding"));
    }
    // Decoded into `out`'s own buffer: no allocation once it has grown.
    let mut bytes = std::mem::take(out).into_bytes();
    bytes.clear();
    bytes.extend(percent_decode(t));
    if bytes.contains(&0) {
        return Err(RouteError::BadPath("NUL byte in path"));
    }
    let s = String::from_utf8(bytes).map_err(|_| RouteError::BadPath("path is not valid UTF-8"))?;
    if s.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(RouteError::BadPath(
            "'.' and '..' path segments are not allowed",
        ));
    }
    *out = s;
    Ok(())
}

/// SigV4's URI encoding: everything but `A-Za-z0-9-_.~` is escaped.
const SIGV4_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');
/// The same for an object key, whose `/` separators stay.
const SIGV4_KEY: &AsciiSet = &SIGV4_COMPONENT.remove(b'/');

/// Appends `key` URI-encoded for S3/SigV4: unreserved characters and `/` stay.
pub fn encode_key(key: &str, out: &mut String) {
    out.extend(utf8_percent_encode(key, SIGV4_KEY));
}

/// Query parameters forwarded to S3 and signed: they select *which* object
/// bytes are read. In SigV4 canonical (byte) order.
const FORWARDED_QUERY: [&str; 2] = ["partNumber", "versionId"];

/// S3 sub-resources: they address something other than the object's bytes
/// (or a write), so a read-only object proxy refuses them with a 400 naming
/// the parameter. Every other parameter (cache-busters like `?v=123`) is
/// dropped.
const SUBRESOURCES: &[&str] = &[
    "accelerate",
    "acl",
    "analytics",
    "attributes",
    "cors",
    "delete",
    "encryption",
    "intelligent-tiering",
    "inventory",
    "legal-hold",
    "lifecycle",
    "list-type",
    "location",
    "logging",
    "metrics",
    "notification",
    "object-lock",
    "ownershipControls",
    "policy",
    "policyStatus",
    "publicAccessBlock",
    "replication",
    "requestPayment",
    "restore",
    "retention",
    "select",
    "select-type",
    "tagging",
    "torrent",
    "uploadId",
    "uploads",
    "versioning",
    "versions",
    "website",
];

/// Every `%` is followed by two hex digits (the crate passes others through).
fn valid_escapes(v: &[u8]) -> bool {
    let mut rest = v;
    while let Some(p) = rest.iter().position(|&b| b == b'%') {
        match rest.get(p + 1..p + 3) {
            Some(hex) if hex.iter().all(u8::is_ascii_hexdigit) => rest = &rest[p + 3..],
            _ => return false,
        }
    }
    true
}

/// Percent-decodes `v` (`+` stays `+`, as S3 reads it); `None` when an
/// escape is malformed.
fn decode_component(v: &[u8]) -> Option<Vec<u8>> {
    valid_escapes(v).then(|| percent_decode(v).collect())
}

/// The query to send upstream, in SigV4 canonical form (sorted, each value
/// encoded with SigV4's rules), appended to `out`: `partNumber` and
/// `versionId` when the client gave them; empty otherwise.
pub fn upstream_query(target: &[u8], out: &mut String) -> Result<(), RouteError> {
    let (_, query) = split_target(target)?;
    if query.is_empty() {
        return Ok(());
    }
    let mut values: [Option<Vec<u8>>; FORWARDED_QUERY.len()] = Default::default();
    for pair in query.split(|&b| b == b'&') {
        if pair.is_empty() {
            continue;
        }
        let (name, value) = match pair.iter().position(|&b| b == b'=') {
            Some(p) => (&pair[..p], &pair[p + 1..]),
            None => (pair, &[][..]),
        };
        let Some(name) = decode_component(name) else {
            continue;
        };
        if let Some(i) = FORWARDED_QUERY.iter().position(|f| f.as_bytes() == name) {
            let v = decode_component(value)
                .filter(|v| !v.is_empty() && std::str::from_utf8(v).is_ok())
                .ok_or(RouteError::BadQuery(FORWARDED_QUERY[i]))?;
            if values[i].is_some()
                || (FORWARDED_QUERY[i] == "partNumber"
                    && !(v.iter().all(u8::is_ascii_digit) && v.len() <= 5))
            {
                return Err(RouteError::BadQuery(FORWARDED_QUERY[i]));
            }
            values[i] = Some(v);
        } else if let Some(sub) = SUBRESOURCES.iter().find(|s| s.as_bytes() == name) {
            return Err(RouteError::BadQuery(sub));
        }
    }
    for (name, value) in FORWARDED_QUERY.iter().zip(values.iter()) {
        let Some(v) = value else { continue };
        if !out.is_empty() {
            out.push('&');
        }
        out.push_str(name);
        out.push('=');
        // Valid UTF-8 (checked above): encode every byte but unreserved ones.
        encode_component(std::str::from_utf8(v).unwrap_or_default(), out);
    }
    Ok(())
}

/// The target as the access log shows it: the path, then the query's
/// parameter names with every value redacted (URLs of CDN origins carry
/// signatures and tokens).
pub fn loggable_target(target: &[u8], out: &mut String) {
    out.clear();
    let (path, query) = match target.iter().position(|&b| b == b'?') {
        Some(q) => (&target[..q], &target[q + 1..]),
        None => (target, &[][..]),
    };
    out.push_str(&String::from_utf8_lossy(path));
    let mut first = true;
    for pair in query.split(|&b| b == b'&').filter(|p| !p.is_empty()) {
        let name = pair.split(|&b| b == b'=').next().unwrap_or_default();
        out.push(if first { '?' } else { '&' });
        first = false;
        out.push_str(&String::from_utf8_lossy(name));
        if name.len() < pair.len() {
            out.push_str("=REDACTED");
        }
    }
}

/// Appends `v` URI-encoded for a SigV4 query component (`/` escaped too).
pub fn encode_component(v: &str, out: &mut String) {
    out.extend(utf8_percent_encode(v, SIGV4_COMPONENT));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        Router::new(["/data", "/data/archive", "/assets/img", ""])
    }

    #[test]
    fn longest_prefix_on_segment_boundary() {
        let r = router();
        assert_eq!(r.route("/data/a.txt"), Ok((0, "a.txt")));
        assert_eq!(r.route("/data/archive/x/y"), Ok((1, "x/y")));
        assert_eq!(r.route("/database/x"), Ok((3, "database/x")));
        assert_eq!(r.route("/assets/img/p.png"), Ok((2, "p.png")));
        assert_eq!(r.route("/data/"), Err(RouteError::NoKey));
        assert_eq!(r.route("/data"), Err(RouteError::NoKey));
        let no_root = Router::new(["/data"]);
        assert_eq!(no_root.route("/database/x"), Err(RouteError::NoBucket));
        assert_eq!(no_root.route("/dat"), Err(RouteError::NoBucket));
    }

    #[test]
    fn decodes_and_rejects() {
        let mut s = String::new();
        decode_path(b"/data/my%20file%2Bx+y%2Fz.txt?versionId=1", &mut s).unwrap();
        assert_eq!(s, "/data/my file+x+y/z.txt");
        decode_path(b"http://example.com/data/%E6%97%A5", &mut s).unwrap();
        assert_eq!(s, "/data/日");
        decode_path(b"/data/a..b", &mut s).unwrap();
        assert_eq!(s, "/data/a..b");
        assert!(decode_path(b"/data/../etc/passwd", &mut s).is_err());
        assert!(decode_path(b"/data/%2e%2e/x", &mut s).is_err());
        assert!(decode_path(b"/data/%2", &mut s).is_err());
        assert!(decode_path(b"/data/%ff", &mut s).is_err());
        assert!(decode_path(b"/data/a%00", &mut s).is_err());
        assert!(decode_path(b"*", &mut s).is_err());
        // RFC 3986: the authority ends at '?', so this target has no path.
        assert!(decode_path(b"http://evil.example?/data/x", &mut s).is_err());
        assert!(decode_path(b"http://evil.example#/data/x", &mut s).is_err());
        decode_path(b"http://example.com/data/x?y", &mut s).unwrap();
        assert_eq!(s, "/data/x");
    }

    #[test]
    fn forwards_version_and_part_refuses_subresources_drops_the_rest() {
        let q = |t: &str| {
            let mut out = String::new();
            upstream_query(t.as_bytes(), &mut out).map(|_| out)
        };
        assert_eq!(q("/d/k").unwrap(), "");
        assert_eq!(q("/d/k?v=123&token=abc").unwrap(), "");
        assert_eq!(
            q("/d/k?versionId=a/b%2Bc&partNumber=2&v=1").unwrap(),
            "partNumber=2&versionId=a%2Fb%2Bc"
        );
        assert_eq!(q("/d/k?acl"), Err(RouteError::BadQuery("acl")));
        assert_eq!(
            q("/d/k?x=1&legal-hold"),
            Err(RouteError::BadQuery("legal-hold"))
        );
        assert_eq!(
            q("/d/k?partNumber=x"),
            Err(RouteError::BadQuery("partNumber"))
        );
        assert_eq!(
            q("/d/k?versionId=1&versionId=2"),
            Err(RouteError::BadQuery("versionId"))
        );
        assert_eq!(q("/d/k?versionId="), Err(RouteError::BadQuery("versionId")));
    }

    #[test]
    fn log_target_keeps_names_and_redacts_values() {
        let mut s = String::new();
        loggable_target(b"/data/x?token=secret&v&sig=zz", &mut s);
        assert_eq!(s, "/data/x?token=REDACTED&v&sig=REDACTED");
        loggable_target(b"/data/x", &mut s);
        assert_eq!(s, "/data/x");
    }

    #[test]
    fn encodes_for_sigv4() {
        let mut s = String::new();
        encode_key("dir/my file+日~.txt", &mut s);
        assert_eq!(s, "dir/my%20file%2B%E6%97%A5~.txt");
    }
}
