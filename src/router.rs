//! Request path -> (bucket, object key), and object key -> S3 URI path.
//!
//! The raw request target is percent-decoded once; the longest configured
//! `path_prefix` that ends on a `/` boundary wins (`/data` never matches
//! `/database`). The remainder is the object key. Keys are re-encoded with
//! SigV4's rules (everything but `A-Za-z0-9-_.~` and `/` escaped), so a key
//! reaches S3 byte for byte as the client named it. Keys with a `.` or `..`
//! segment, NUL bytes or invalid UTF-8 are refused: no request can address
//! anything outside its bucket, whatever the upstream does with dot segments.

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

/// Percent-decodes the path part of a request target into `out`.
///
/// Accepts origin-form (`/a/b?q`) and absolute-form (`http://h/a/b`); the query
/// is dropped. Fails on malformed escapes, invalid UTF-8, NUL or dot segments.
pub fn decode_path(target: &[u8], out: &mut String) -> Result<(), RouteError> {
    let mut t = target;
    if t.first() != Some(&b'/') {
        let lower = |p: &[u8], s: &[u8]| p.len() >= s.len() && p[..s.len()].eq_ignore_ascii_case(s);
        let skip = if lower(t, b"http://") {
            7
        } else if lower(t, b"https://") {
            8
        } else {
            return Err(RouteError::BadPath("request target must be a path"));
        };
        t = &t[skip..];
        match t.iter().position(|&b| b == b'/') {
            Some(p) => t = &t[p..],
            None => return Err(RouteError::BadPath("request target has no path")),
        }
    }
    if let Some(q) = t.iter().position(|&b| b == b'?' || b == b'#') {
        t = &t[..q];
    }
    let mut bytes = std::mem::take(out).into_bytes();
    bytes.clear();
    let mut i = 0;
    while i < t.len() {
        let b = t[i];
        if b == b'%' {
            let hi = t.get(i + 1).and_then(|c| (*c as char).to_digit(16));
            let lo = t.get(i + 2).and_then(|c| (*c as char).to_digit(16));
            match (hi, lo) {
                (Some(h), Some(l)) => bytes.push((h * 16 + l) as u8),
                _ => {
                    *out = String::new();
                    return Err(RouteError::BadPath("malformed percent-encoding"));
                }
            }
            i += 3;
        } else {
            bytes.push(b);
            i += 1;
        }
    }
    if bytes.contains(&0) {
        return Err(RouteError::BadPath("NUL byte in path"));
    }
    let s = String::from_utf8(bytes).map_err(|_| RouteError::BadPath("path is not valid UTF-8"))?;
    if s.split('/').any(|seg| seg == "." || seg == "..") {
        *out = String::new();
        return Err(RouteError::BadPath(
            "'.' and '..' path segments are not allowed",
        ));
    }
    *out = s;
    Ok(())
}

/// Appends `key` URI-encoded for S3/SigV4: unreserved characters and `/` stay.
pub fn encode_key(key: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in key.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 15) as usize] as char);
        }
    }
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
    }

    #[test]
    fn encodes_for_sigv4() {
        let mut s = String::new();
        encode_key("dir/my file+日~.txt", &mut s);
        assert_eq!(s, "dir/my%20file%2B%E6%97%A5~.txt");
    }
}
