//! HTTP/1.x heads: parsing client requests and upstream responses (with
//! `httparse`, the parser monoio-http itself uses), and writing response heads.
//!
//! Parsing copies the few fields the proxy needs into reusable owned buffers,
//! so the read buffer can go straight back to the next I/O operation.

use std::fmt::Write as _;

/// Largest request head accepted (431 beyond).
pub const MAX_REQUEST_HEAD: usize = 16 * 1024;
/// Longest request line accepted (414 beyond).
pub const MAX_REQUEST_LINE: usize = 8 * 1024;
/// Largest upstream response head accepted (a malformed response beyond).
pub const MAX_RESPONSE_HEAD: usize = 32 * 1024;
const MAX_HEADERS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
/// Request methods as the proxy tells them apart.
pub enum Method {
    /// `GET`.
    Get,
    /// `HEAD`.
    Head,
    /// Anything else (answered 405).
    Other,
}

impl Method {
    /// The method name.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Other => "OTHER",
        }
    }
}

/// Client request headers forwarded upstream unchanged: `Range` and the
/// conditionals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forwarded {
    /// `Range`.
    Range,
    /// `If-Match`.
    IfMatch,
    /// `If-None-Match`.
    IfNoneMatch,
    /// `If-Modified-Since`.
    IfModifiedSince,
    /// `If-Unmodified-Since`.
    IfUnmodifiedSince,
    /// `If-Range`.
    IfRange,
}

impl Forwarded {
    /// Every one, in the order written upstream.
    pub const ALL: [Forwarded; 6] = [
        Forwarded::Range,
        Forwarded::IfMatch,
        Forwarded::IfNoneMatch,
        Forwarded::IfModifiedSince,
        Forwarded::IfUnmodifiedSince,
        Forwarded::IfRange,
    ];

    /// The header name, lower-case.
    pub fn name(self) -> &'static str {
        match self {
            Forwarded::Range => "range",
            Forwarded::IfMatch => "if-match",
            Forwarded::IfNoneMatch => "if-none-match",
            Forwarded::IfModifiedSince => "if-modified-since",
            Forwarded::IfUnmodifiedSince => "if-unmodified-since",
            Forwarded::IfRange => "if-range",
        }
    }

    /// The one named `name` (any case).
    fn named(name: &[u8]) -> Option<Forwarded> {
        Forwarded::ALL
            .into_iter()
            .find(|f| name.eq_ignore_ascii_case(f.name().as_bytes()))
    }

    /// Its bit in a set of headers.
    fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

/// The parts of a client request the proxy uses; reused across requests.
#[derive(Debug, Default)]
pub struct Request {
    /// The method, once a head was parsed.
    pub method: Option<Method>,
    /// The method as sent (for the access log).
    pub method_text: String,
    /// The request target as sent (path and query).
    pub target: Vec<u8>,
    /// An HTTP/1.0 request.
    pub http10: bool,
    /// The client keeps the connection open after this request.
    pub keep_alive: bool,
    /// The request announced a body (`Content-Length` > 0 or
    /// `Transfer-Encoding`). Only accepted on methods answered with 405,
    /// and the connection is then closed: the body is never read.
    pub has_body: bool,
    /// `X-Request-ID` from the client (if sane) or generated.
    pub request_id: String,
    /// `X-Forwarded-For` as sent (several headers joined with `,`); only
    /// believed from trusted proxies (see `access::ip`).
    pub forwarded_for: String,
    /// The forwarded headers the client sent, with their values.
    pub forwarded: Vec<(Forwarded, String)>,
    /// Bytes of the read buffer this request's head takes (its headers end
    /// there; what follows belongs to the next pipelined request).
    pub head_len: usize,
    spare: Vec<String>,
}

impl Request {
    /// The method (`Other` before any head was parsed).
    pub fn method(&self) -> Method {
        self.method.unwrap_or(Method::Other)
    }

    /// The value of forwarded header `name`, if the client sent it.
    pub fn header(&self, name: Forwarded) -> Option<&str> {
        self.forwarded
            .iter()
            .find(|(h, _)| *h == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Why a request head was refused; each maps to one status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// Not yet complete: read more.
    Partial,
    /// A malformed head (400), with the reason.
    BadRequest(&'static str),
    /// The request target is too long (414).
    UriTooLong,
    /// The head is too large or has too many headers (431).
    HeadersTooLarge,
    /// The head was not complete within `request_head_timeout_seconds`.
    TimedOut,
}

impl HeadError {
    /// The status code this refusal is answered with.
    pub fn status(self) -> u16 {
        match self {
            HeadError::Partial | HeadError::BadRequest(_) => 400,
            HeadError::UriTooLong => 414,
            HeadError::HeadersTooLarge => 431,
            HeadError::TimedOut => 408,
        }
    }
}

/// Parses a request head from `buf`; on success returns the head's length.
pub fn parse_request(buf: &[u8], req: &mut Request) -> Result<usize, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if request_line_too_long(buf) => {
            return Err(HeadError::UriTooLong)
        }
        Ok(httparse::Status::Partial) if buf.len() >= MAX_REQUEST_HEAD => {
            return Err(HeadError::HeadersTooLarge)
        }
        Ok(httparse::Status::Partial) => return Err(HeadError::Partial),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::HeadersTooLarge),
        Err(httparse::Error::Version) if minor_version_above_one(buf) => {
            // HTTP/1.2 and later minors are handled as HTTP/1.1 (RFC 9112 §2.6).
            return parse_as_http11(buf, req);
        }
        Err(httparse::Error::Version) => {
            return Err(HeadError::BadRequest("unsupported HTTP version"))
        }
        Err(_) if request_line_too_long(buf) => return Err(HeadError::UriTooLong),
        Err(_) => return Err(HeadError::BadRequest("malformed request head")),
    };
    if len > MAX_REQUEST_HEAD {
        return Err(HeadError::HeadersTooLarge);
    }
    request_line(&parsed, req)?;
    request_headers(parsed.headers, req)?;
    req.head_len = len;
    Ok(len)
}

/// Copies the method, target and version; resets the per-request fields.
fn request_line(parsed: &httparse::Request<'_, '_>, req: &mut Request) -> Result<(), HeadError> {
    let path = parsed.path.unwrap_or("");
    if path.len() > MAX_REQUEST_LINE {
        return Err(HeadError::UriTooLong);
    }
    let method = parsed.method.unwrap_or("");
    req.method = Some(match method {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        _ => Method::Other,
    });
    req.method_text.clear();
    req.method_text.push_str(method);
    req.target.clear();
    req.target.extend_from_slice(path.as_bytes());
    req.http10 = parsed.version == Some(0);
    req.has_body = false;
    req.request_id.clear();
    req.forwarded_for.clear();
    for (_, v) in req.forwarded.drain(..) {
        req.spare.push(v);
    }
    Ok(())
}

/// What the `Connection` headers said.
#[derive(Default)]
struct ConnectionTokens {
    close: bool,
    keep_alive: bool,
    /// Forwarded headers named in `Connection`: hop-by-hop (RFC 9110 §7.6.1).
    hop_by_hop: u32,
}

impl ConnectionTokens {
    fn add(&mut self, value: &[u8]) {
        for token in value.split(|&b| b == b',').map(trim) {
            if token.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if let Some(h) = Forwarded::named(token) {
                self.hop_by_hop |= h.bit();
            }
        }
    }
}

/// Reads the headers the proxy acts on; refuses the ones it must.
fn request_headers(headers: &[httparse::Header<'_>], req: &mut Request) -> Result<(), HeadError> {
    let reads = req.method() != Method::Other;
    let mut conn = ConnectionTokens::default();
    let mut has_host = false;
    for h in headers {
        let (name, value) = (h.name, trim(h.value));
        if name.eq_ignore_ascii_case("host") {
            if std::mem::replace(&mut has_host, true) {
                return Err(HeadError::BadRequest("duplicate Host header"));
            }
            if !valid_host(value) {
                return Err(HeadError::BadRequest("invalid Host header"));
            }
        } else if name.eq_ignore_ascii_case("connection") {
            conn.add(value);
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || (name.eq_ignore_ascii_case("content-length") && value != b"0")
        {
            if reads {
                return Err(HeadError::BadRequest("request bodies are not accepted"));
            }
            req.has_body = true;
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            if let Ok(v) = std::str::from_utf8(value) {
                if !req.forwarded_for.is_empty() {
                    req.forwarded_for.push(',');
                }
                req.forwarded_for.push_str(v);
            }
        } else if name.eq_ignore_ascii_case("x-request-id") {
            if !value.is_empty() && value.len() <= 128 && value.iter().all(u8::is_ascii_graphic) {
                req.request_id.clear();
                req.request_id
                    .push_str(std::str::from_utf8(value).unwrap_or_default());
            }
        } else if let Some(h) = Forwarded::named(name.as_bytes()) {
            forward_header(req, h, value)?;
        }
    }
    if conn.hop_by_hop != 0 {
        let spare = &mut req.spare;
        req.forwarded.retain_mut(|(i, v)| {
            let keep = conn.hop_by_hop & i.bit() == 0;
            if !keep {
                spare.push(std::mem::take(v));
            }
            keep
        });
    }
    if !req.http10 && !has_host {
        return Err(HeadError::BadRequest(
            "HTTP/1.1 request without Host header",
        ));
    }
    req.keep_alive = if req.http10 {
        conn.keep_alive && !conn.close
    } else {
        !conn.close
    };
    Ok(())
}

/// Keeps a `Range` or conditional header to forward upstream.
fn forward_header(req: &mut Request, h: Forwarded, value: &[u8]) -> Result<(), HeadError> {
    let value = std::str::from_utf8(value)
        .map_err(|_| HeadError::BadRequest("non-ASCII conditional or Range header"))?;
    if value.bytes().any(|b| b.is_ascii_control()) {
        return Err(HeadError::BadRequest("control character in header"));
    }
    if h == Forwarded::Range && req.header(Forwarded::Range).is_some() {
        return Err(HeadError::BadRequest("more than one Range header"));
    }
    let mut s = req.spare.pop().unwrap_or_default();
    s.clear();
    s.push_str(value);
    req.forwarded.push((h, s));
    Ok(())
}

/// The value of header `name` (lower-case) in a raw request head that
/// `parse_request` accepted; several headers of that name are not joined
/// (the first wins). For the headers the parser does not keep (tokens).
///
/// `head` must be exactly the head (`Request::head_len` bytes): nothing
/// here looks for its end, since lines may end in a bare LF (which
/// httparse accepts) and a search for `\r\n\r\n` would then run into the
/// next pipelined request.
pub fn find_header<'a>(head: &'a [u8], name: &str) -> Option<&'a str> {
    head.split(|&b| b == b'\n').skip(1).find_map(|line| {
        let colon = line.iter().position(|&b| b == b':')?;
        let (n, v) = (&line[..colon], &line[colon + 1..]);
        if !n.eq_ignore_ascii_case(name.as_bytes()) {
            return None;
        }
        std::str::from_utf8(trim(v)).ok()
    })
}

/// `Host` is `uri-host [ ":" port ]` (RFC 9112 §3.2, RFC 3986 §3.2.2): a
/// bracketed IP literal or a reg-name (unreserved, sub-delims and
/// percent-escapes, which covers IPv4), then an optional decimal port. No
/// user info, no path, no spaces. Empty is allowed (for targets without an
/// authority). Checked byte by byte: nothing is copied.
fn valid_host(v: &[u8]) -> bool {
    let (host_ok, rest) = match v.first() {
        None => return true,
        Some(b'[') => match v.iter().position(|&b| b == b']') {
            Some(end) => {
                let inner = &v[1..end];
                let ok = !inner.is_empty()
                    && inner.iter().all(|&b| b == b':' || host_byte(b))
                    && inner.iter().any(|&b| b == b':' || b == b'.');
                (ok, &v[end + 1..])
            }
            None => return false,
        },
        Some(_) => {
            let end = v.iter().position(|&b| b == b':').unwrap_or(v.len());
            (v[..end].iter().all(|&b| host_byte(b)), &v[end..])
        }
    };
    host_ok
        && match rest.split_first() {
            None => true,
            Some((b':', port)) => {
                port.is_empty() || parse_decimal(port).is_some_and(|n| n <= 65535)
            }
            Some(_) => false,
        }
}

/// A byte of a reg-name: unreserved, a sub-delim, or `%` (of an escape).
fn host_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%".contains(&b)
}

/// The request line ends in `HTTP/1.N` with N > 1.
fn minor_version_above_one(buf: &[u8]) -> bool {
    let line = match buf.iter().position(|&b| b == b'\n') {
        Some(p) => &buf[..p],
        None => return false,
    };
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    line.len() >= 9
        && line[line.len() - 9..line.len() - 1] == *b" HTTP/1."
        && matches!(line[line.len() - 1], b'2'..=b'9')
}

/// Re-parses a head whose version is `HTTP/1.N` (N > 1) as HTTP/1.1.
fn parse_as_http11(buf: &[u8], req: &mut Request) -> Result<usize, HeadError> {
    let mut copy = buf.to_vec();
    let end = copy.iter().position(|&b| b == b'\n').unwrap_or(0);
    let digit = if copy[..end].ends_with(b"\r") {
        end - 2
    } else {
        end - 1
    };
    copy[digit] = b'1';
    parse_request(&copy, req)
}

/// The buffer starts like a request line (`TOKEN SP target`) whose target
/// runs past [`MAX_REQUEST_LINE`]: 414. Garbage without that shape is a 400
/// (or 431 when it is simply too big), never "URI too long".
fn request_line_too_long(buf: &[u8]) -> bool {
    let Some(sp) = buf.iter().take(32).position(|&b| b == b' ') else {
        return false;
    };
    if sp == 0 || !buf[..sp].iter().all(|b| b.is_ascii_uppercase()) {
        return false;
    }
    let target = &buf[sp + 1..];
    let end = target
        .iter()
        .position(|&b| b == b' ' || b == b'\r' || b == b'\n')
        .unwrap_or(target.len());
    end > MAX_REQUEST_LINE && target.first().is_some_and(|&b| b == b'/' || b == b'h')
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &v[start..end]
}

/// How an upstream response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (HEAD, 204, 304, 1xx).
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Read until the upstream closes.
    Close,
}

/// Response headers copied from S3 to the client.
const FORWARDED_RESPONSE_HEADERS: [&str; 15] = [
    "content-type",
    "content-length",
    "content-range",
    "etag",
    "last-modified",
    "accept-ranges",
    "cache-control",
    "content-encoding",
    "content-disposition",
    "content-language",
    "expires",
    "date",
    "vary",
    "x-amz-version-id",
    "location",
];

/// A single-range `Content-Range: bytes FIRST-LAST/TOTAL` (TOTAL may be `*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentRange {
    /// First byte offset.
    pub first: u64,
    /// Last byte offset (inclusive).
    pub last: u64,
    /// The representation's length, unless `*`.
    pub total: Option<u64>,
}

impl ContentRange {
    /// Parses `bytes FIRST-LAST/TOTAL` strictly; anything else is `None`.
    pub fn parse(v: &str) -> Option<ContentRange> {
        let spec = v.strip_prefix("bytes ")?;
        let (range, total) = spec.split_once('/')?;
        let (first, last) = range.split_once('-')?;
        let first = parse_decimal(first.as_bytes())?;
        let last = parse_decimal(last.as_bytes())?;
        let total = match total {
            "*" => None,
            t => Some(parse_decimal(t.as_bytes())?),
        };
        if last < first || total.is_some_and(|t| last >= t) {
            return None;
        }
        Some(ContentRange { first, last, total })
    }
}

/// A non-empty run of ASCII digits as a u64 (no sign, no spaces, no overflow).
pub fn parse_decimal(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |acc, d| {
        acc.checked_mul(10)?.checked_add((d - b'0') as u64)
    })
}

/// The parts of an upstream response the proxy uses; reused across requests.
#[derive(Debug, Default)]
pub struct Response {
    /// The status code (100-599).
    pub status: u16,
    /// How the body is delimited (`None` until parsed).
    pub framing: Option<Framing>,
    /// The upstream keeps the connection open after this response.
    pub keep_alive: bool,
    /// The `ETag`, empty when absent.
    pub etag: String,
    /// A valid single-range `Content-Range`, if the response carried one.
    pub content_range: Option<ContentRange>,
    /// `Content-Type: multipart/...` (a multi-range 206): never resumed.
    pub multipart: bool,
    /// The upstream sent a `Date` header.
    pub has_date: bool,
    /// Headers to pass to the client, already formatted as `Name: value\r\n`.
    pub forward: String,
}

impl Response {
    /// How the body is delimited (read-to-close until parsed).
    pub fn framing(&self) -> Framing {
        self.framing.unwrap_or(Framing::Close)
    }
}

/// Parses an upstream response head; `head_request` marks responses to HEAD.
///
/// Malformed (an error): a status outside 100-599, a `Content-Length` that is
/// not plain digits or that disagrees with another, any `Transfer-Encoding`
/// other than exactly `chunked`, and both `Content-Length` and
/// `Transfer-Encoding` (RFC 9112 §6.3: a proxy must not guess).
pub fn parse_response(
    buf: &[u8],
    head_request: bool,
    resp: &mut Response,
) -> Result<Option<usize>, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut headers);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_RESPONSE_HEAD => {
            return Err("response head too large")
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err("too many response headers"),
        Err(_) => return Err("malformed response head"),
    };
    let status = parsed.code.unwrap_or(0);
    if !(100..=599).contains(&status) {
        return Err("response status outside 100-599");
    }
    resp.status = status;
    let http10 = parsed.version == Some(0);
    let f = response_headers(parsed.headers, http10, resp)?;
    let no_body = head_request || status == 204 || status == 304 || (100..200).contains(&status);
    resp.keep_alive = f.keep_alive;
    resp.framing = Some(if no_body {
        Framing::None
    } else if f.chunked {
        Framing::Chunked
    } else if let Some(l) = f.length {
        Framing::Length(l)
    } else {
        resp.keep_alive = false;
        Framing::Close
    });
    // Content-Length is re-emitted by the proxy from the framing it decided on;
    // a HEAD response keeps the object's length.
    if let Some(l) = f.length {
        let _ = write!(resp.forward, "Content-Length: {l}\r\n");
    }
    Ok(Some(len))
}

/// The framing headers of a response.
struct FramingHeaders {
    length: Option<u64>,
    chunked: bool,
    keep_alive: bool,
}

/// Reads framing, keeps the headers to forward (formatted) and the fields
/// the proxy uses (ETag, Content-Range, multipart, Date).
fn response_headers(
    headers: &[httparse::Header<'_>],
    http10: bool,
    resp: &mut Response,
) -> Result<FramingHeaders, &'static str> {
    resp.etag.clear();
    resp.forward.clear();
    resp.content_range = None;
    resp.multipart = false;
    resp.has_date = false;
    let mut f = FramingHeaders {
        length: None,
        chunked: false,
        keep_alive: !http10,
    };
    for h in headers {
        let (name, value) = (h.name, trim(h.value));
        if name.eq_ignore_ascii_case("content-length") {
            let v = parse_decimal(value).ok_or("invalid Content-Length")?;
            if f.length.is_some_and(|l| l != v) {
                return Err("conflicting Content-Length headers");
            }
            f.length = Some(v);
            continue;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Only `chunked`, once: any other coding (gzip, ...) would reach
            // the client decoded by nobody.
            if f.chunked || !value.eq_ignore_ascii_case(b"chunked") {
                return Err("unsupported Transfer-Encoding (only chunked is accepted)");
            }
            f.chunked = true;
        } else if name.eq_ignore_ascii_case("connection") {
            for t in value.split(|&b| b == b',').map(trim) {
                if t.eq_ignore_ascii_case(b"close") {
                    f.keep_alive = false;
                } else if t.eq_ignore_ascii_case(b"keep-alive") && http10 {
                    f.keep_alive = true;
                }
            }
        }
        keep_response_header(resp, name, value);
    }
    if f.chunked && f.length.is_some() {
        return Err("both Content-Length and Transfer-Encoding");
    }
    Ok(f)
}

/// Appends `name: value` to the forwarded headers if it is one the client
/// gets, noting the fields the proxy reads itself.
fn keep_response_header(resp: &mut Response, name: &str, value: &[u8]) {
    let forwarded = FORWARDED_RESPONSE_HEADERS
        .iter()
        .any(|f| name.eq_ignore_ascii_case(f))
        || (name.len() > 11 && name[..11].eq_ignore_ascii_case("x-amz-meta-"));
    if !forwarded {
        return;
    }
    let Ok(v) = std::str::from_utf8(value) else {
        return;
    };
    if name.eq_ignore_ascii_case("etag") {
        resp.etag.push_str(v);
    } else if name.eq_ignore_ascii_case("content-range") {
        resp.content_range = ContentRange::parse(v);
    } else if name.eq_ignore_ascii_case("content-type") {
        resp.multipart = v.len() >= 10 && v[..10].eq_ignore_ascii_case("multipart/");
    } else if name.eq_ignore_ascii_case("date") {
        resp.has_date = true;
    }
    for part in [name, ": ", v, "\r\n"] {
        resp.forward.push_str(part);
    }
}

/// The standard reason phrase of `status`, or none for a status without one
/// (the status line then ends `NNN \r\n`, which RFC 9112 §4 allows).
pub fn reason(status: u16) -> &'static str {
    http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("")
}

/// Writes a status line into `out` (cleared first).
pub fn status_line(out: &mut Vec<u8>, status: u16) {
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    let s = status.min(999);
    out.extend_from_slice(&[
        b'0' + (s / 100) as u8,
        b'0' + (s / 10 % 10) as u8,
        b'0' + (s % 10) as u8,
        b' ',
    ]);
    out.extend_from_slice(reason(status).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// A response of the metrics listener (metrics, `/ready`, the admin API):
/// its head, whole. (Heads on the main port end in `proxy::respond`, which
/// adds the request's id and the cache's headers.)
pub struct Generated<'a> {
    /// The status code.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: &'a str,
    /// `Content-Length` of the body that follows.
    pub content_length: usize,
    /// `Date` header value (RFC 9110 §6.6.1).
    pub date: &'a str,
    /// Extra headers (`X-Request-ID`, `Allow`, `Retry-After`, ...).
    pub extra: &'a [(&'a str, &'a str)],
    /// Keep the connection open; otherwise `Connection: close`.
    pub keep_alive: bool,
    /// An HTTP/1.0 client, told `Connection: keep-alive` when kept open.
    pub http10: bool,
}

impl Generated<'_> {
    /// Writes the complete head (status line to the blank line) into `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        status_line(out, self.status);
        header(out, "Content-Type", self.content_type);
        let mut len = [0u8; 20];
        header(
            out,
            "Content-Length",
            decimal(self.content_length as u64, &mut len),
        );
        header(out, "Date", self.date);
        for (k, v) in self.extra {
            header(out, k, v);
        }
        if !self.keep_alive {
            header(out, "Connection", "close");
        } else if self.http10 {
            header(out, "Connection", "keep-alive");
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// `v` in decimal, written at the end of `buf`.
pub fn decimal(mut v: u64, buf: &mut [u8; 20]) -> &str {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[i..]).unwrap_or("0")
}

/// Appends one `name: value` header line.
pub fn header(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_get_with_forwarded_headers() {
        let mut r = Request::default();
        let raw = b"GET /data/a%20b HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\r\nX-Request-ID: abc\r\nAuthorization: secret\r\n\r\nrest";
        let n = parse_request(raw, &mut r).unwrap();
        assert_eq!(&raw[n..], b"rest");
        assert_eq!(r.method(), Method::Get);
        assert_eq!(r.target, b"/data/a%20b");
        assert_eq!(r.request_id, "abc");
        assert_eq!(r.header(Forwarded::Range), Some("bytes=0-9"));
        assert_eq!(r.forwarded.len(), 1, "Authorization is never kept");
        assert!(r.keep_alive);
    }

    #[test]
    fn refuses_bad_heads_with_the_right_status() {
        let mut r = Request::default();
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\nHo", &mut r),
            Err(HeadError::Partial)
        );
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\n\r\n", &mut r)
                .unwrap_err()
                .status(),
            400
        );
        assert_eq!(
            parse_request(b"G\x01T / HTTP/1.1\r\n\r\n", &mut r)
                .unwrap_err()
                .status(),
            400
        );
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_REQUEST_LINE + 10));
        assert_eq!(
            parse_request(long.as_bytes(), &mut r).unwrap_err().status(),
            414
        );
        let big = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n",
            "a".repeat(MAX_REQUEST_HEAD)
        );
        assert_eq!(
            parse_request(big.as_bytes(), &mut r).unwrap_err().status(),
            431
        );
        let smuggle = b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(parse_request(smuggle, &mut r).unwrap_err().status(), 400);
    }

    #[test]
    fn http10_keep_alive_rules() {
        let mut r = Request::default();
        parse_request(b"GET / HTTP/1.0\r\n\r\n", &mut r).unwrap();
        assert!(!r.keep_alive);
        parse_request(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", &mut r).unwrap();
        assert!(r.keep_alive);
        parse_request(
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            &mut r,
        )
        .unwrap();
        assert!(!r.keep_alive);
    }

    #[test]
    fn response_framing() {
        let mut r = Response::default();
        let raw = b"HTTP/1.1 206 Partial Content\r\nContent-Length: 10\r\nContent-Range: bytes 5-14/100\r\nETag: \"e1\"\r\nx-amz-request-id: z\r\nx-amz-meta-color: red\r\n\r\n";
        let n = parse_response(raw, false, &mut r).unwrap().unwrap();
        assert_eq!(n, raw.len());
        assert_eq!(r.framing(), Framing::Length(10));
        assert_eq!(r.etag, "\"e1\"");
        assert_eq!(
            r.content_range,
            Some(ContentRange {
                first: 5,
                last: 14,
                total: Some(100)
            })
        );
        assert!(r.forward.contains("x-amz-meta-color: red\r\n"));
        assert!(!r.forward.contains("x-amz-request-id"));
        parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
            true,
            &mut r,
        )
        .unwrap();
        assert_eq!(r.framing(), Framing::None);
        assert!(r.forward.contains("Content-Length: 10"));
        parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
            &mut r,
        )
        .unwrap();
        assert_eq!(r.framing(), Framing::Chunked);
        assert!(parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            false,
            &mut r
        )
        .is_err());
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\n", false, &mut r),
            Ok(None)
        );
    }

    fn response(raw: &str) -> Result<Option<usize>, &'static str> {
        parse_response(raw.as_bytes(), false, &mut Response::default())
    }

    #[test]
    fn malformed_responses_are_refused() {
        for raw in [
            "HTTP/1.1 000 Zero\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 600 Big\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5 5\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
        ] {
            assert!(response(raw).is_err(), "{raw:?}");
        }
        assert!(response("HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n").is_ok());
    }

    #[test]
    fn content_range_is_parsed_strictly_and_multipart_is_flagged() {
        assert_eq!(
            ContentRange::parse("bytes 0-9/*"),
            Some(ContentRange {
                first: 0,
                last: 9,
                total: None
            })
        );
        for bad in [
            "bytes 9-0/10",
            "bytes 0-10/10",
            "bytes -1-2/5",
            "bytes 0-+1/5",
            "0-1/5",
        ] {
            assert_eq!(ContentRange::parse(bad), None, "{bad}");
        }
        let mut r = Response::default();
        parse_response(
            b"HTTP/1.1 206 Partial Content\r\nContent-Type: multipart/byteranges; boundary=x\r\nContent-Length: 10\r\n\r\n",
            false,
            &mut r,
        )
        .unwrap();
        assert!(r.multipart);
        assert_eq!(r.content_range, None);
    }

    #[test]
    fn location_is_forwarded_and_reasons_are_standard_or_empty() {
        let mut r = Response::default();
        parse_response(
            b"HTTP/1.1 301 Moved\r\nLocation: https://x/y\r\nContent-Length: 0\r\n\r\n",
            false,
            &mut r,
        )
        .unwrap();
        assert!(r.forward.contains("Location: https://x/y\r\n"));
        assert_eq!(reason(404), "Not Found");
        assert_eq!(reason(299), "");
        let mut line = Vec::new();
        status_line(&mut line, 299);
        assert_eq!(line, b"HTTP/1.1 299 \r\n");
    }

    #[test]
    fn request_conformance() {
        let mut r = Request::default();
        // Methods with bodies are parsed (to answer 405); GET with a body is not.
        parse_request(
            b"PUT /d/k HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n",
            &mut r,
        )
        .unwrap();
        assert!(r.has_body);
        assert_eq!(r.method(), Method::Other);
        assert!(parse_request(
            b"GET /d/k HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n",
            &mut r
        )
        .is_err());
        // Headers named in Connection are hop-by-hop.
        parse_request(
            b"GET /d/k HTTP/1.1\r\nHost: a\r\nRange: bytes=0-1\r\nIf-Match: \"e\"\r\nConnection: Range, close\r\n\r\n",
            &mut r,
        )
        .unwrap();
        assert_eq!(r.header(Forwarded::Range), None);
        assert_eq!(r.header(Forwarded::IfMatch), Some("\"e\""));
        assert!(!r.keep_alive);
        // Two Range headers, a bad Host.
        let two = b"GET /d/k HTTP/1.1\r\nHost: a\r\nRange: bytes=0-1\r\nRange: bytes=2-3\r\n\r\n";
        assert_eq!(parse_request(two, &mut r).unwrap_err().status(), 400);
        for host in [
            "a b/c@d", "u@h", "h/p", "h:x", "h:1:2", "[::1", "[]", "[::1]x", "h?", "h#", "h:99999",
            "[::1]:x", "h\"",
        ] {
            let raw = format!("GET /d/k HTTP/1.1\r\nHost: {host}\r\n\r\n");
            assert!(parse_request(raw.as_bytes(), &mut r).is_err(), "{host}");
        }
        for host in [
            "example.com",
            "127.0.0.1:8080",
            "[::1]:80",
            "",
            "h:",
            "[fe80::1%25eth0]",
            "a-b_c.d~",
        ] {
            let raw = format!("GET /d/k HTTP/1.1\r\nHost: {host}\r\n\r\n");
            assert!(parse_request(raw.as_bytes(), &mut r).is_ok(), "{host}");
        }
        // HTTP/1.2 is handled as HTTP/1.1; HTTP/2.0 is not HTTP/1.x.
        let n = parse_request(b"GET /d/k HTTP/1.2\r\nHost: a\r\n\r\nnext", &mut r).unwrap();
        assert_eq!(n, b"GET /d/k HTTP/1.2\r\nHost: a\r\n\r\n".len());
        assert!(!r.http10 && r.keep_alive);
        assert!(parse_request(b"GET /d/k HTTP/2.0\r\nHost: a\r\n\r\n", &mut r).is_err());
        // Garbage is 400 (or 431 when huge), never 414.
        let garbage = vec![b'x'; 20_000];
        assert_ne!(parse_request(&garbage, &mut r).unwrap_err().status(), 414);
        let garbage = vec![0x01u8; 20_000];
        assert_ne!(parse_request(&garbage, &mut r).unwrap_err().status(), 414);
    }
}
