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
pub enum Method {
    Get,
    Head,
    Other,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Other => "OTHER",
        }
    }
}

/// Client request headers forwarded upstream unchanged.
pub const FORWARDED_REQUEST_HEADERS: [&str; 6] = [
    "range",
    "if-match",
    "if-none-match",
    "if-modified-since",
    "if-unmodified-since",
    "if-range",
];

/// The parts of a client request the proxy uses; reused across requests.
#[derive(Debug, Default)]
pub struct Request {
    pub method: Option<Method>,
    pub method_text: String,
    pub target: Vec<u8>,
    pub http10: bool,
    pub keep_alive: bool,
    pub request_id: String,
    /// `(index into FORWARDED_REQUEST_HEADERS, value)`.
    pub forwarded: Vec<(usize, String)>,
    spare: Vec<String>,
}

impl Request {
    pub fn method(&self) -> Method {
        self.method.unwrap_or(Method::Other)
    }

    pub fn header(&self, name_idx: usize) -> Option<&str> {
        self.forwarded
            .iter()
            .find(|(i, _)| *i == name_idx)
            .map(|(_, v)| v.as_str())
    }
}

/// Why a request head was refused; each maps to one status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// Not yet complete: read more.
    Partial,
    BadRequest(&'static str),
    UriTooLong,
    HeadersTooLarge,
}

impl HeadError {
    pub fn status(self) -> u16 {
        match self {
            HeadError::Partial | HeadError::BadRequest(_) => 400,
            HeadError::UriTooLong => 414,
            HeadError::HeadersTooLarge => 431,
        }
    }
}

/// Parses a request head from `buf`; on success returns the head's length.
pub fn parse_request(buf: &[u8], req: &mut Request) -> Result<usize, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let status = match parsed.parse(buf) {
        Ok(s) => s,
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::HeadersTooLarge),
        Err(httparse::Error::Version) => {
            return Err(HeadError::BadRequest("unsupported HTTP version"))
        }
        Err(_) => {
            if line_too_long(buf) {
                return Err(HeadError::UriTooLong);
            }
            return Err(HeadError::BadRequest("malformed request head"));
        }
    };
    let len = match status {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => {
            if line_too_long(buf) {
                return Err(HeadError::UriTooLong);
            }
            if buf.len() >= MAX_REQUEST_HEAD {
                return Err(HeadError::HeadersTooLarge);
            }
            return Err(HeadError::Partial);
        }
    };
    let path = parsed.path.unwrap_or("");
    if path.len() > MAX_REQUEST_LINE {
        return Err(HeadError::UriTooLong);
    }
    if len > MAX_REQUEST_HEAD {
        return Err(HeadError::HeadersTooLarge);
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
    req.request_id.clear();
    for (_, v) in req.forwarded.drain(..) {
        req.spare.push(v);
    }
    let mut connection_close = false;
    let mut connection_keep_alive = false;
    let mut has_host = false;
    for h in parsed.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("host") {
            if has_host {
                return Err(HeadError::BadRequest("duplicate Host header"));
            }
            has_host = true;
        } else if name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',') {
                let t = trim(token);
                if t.eq_ignore_ascii_case(b"close") {
                    connection_close = true;
                } else if t.eq_ignore_ascii_case(b"keep-alive") {
                    connection_keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HeadError::BadRequest("request bodies are not accepted"));
        } else if name.eq_ignore_ascii_case("content-length") {
            if trim(h.value) != b"0" {
                return Err(HeadError::BadRequest("request bodies are not accepted"));
            }
        } else if name.eq_ignore_ascii_case("x-request-id") {
            let v = trim(h.value);
            if !v.is_empty() && v.len() <= 128 && v.iter().all(|b| b.is_ascii_graphic()) {
                req.request_id.clear();
                req.request_id
                    .push_str(std::str::from_utf8(v).unwrap_or_default());
            }
        } else if let Some(idx) = FORWARDED_REQUEST_HEADERS
            .iter()
            .position(|f| name.eq_ignore_ascii_case(f))
        {
            let value = std::str::from_utf8(trim(h.value))
                .map_err(|_| HeadError::BadRequest("non-ASCII conditional or Range header"))?;
            if value.bytes().any(|b| b.is_ascii_control()) {
                return Err(HeadError::BadRequest("control character in header"));
            }
            let mut s = req.spare.pop().unwrap_or_default();
            s.clear();
            s.push_str(value);
            req.forwarded.push((idx, s));
        }
    }
    if !req.http10 && !has_host {
        return Err(HeadError::BadRequest(
            "HTTP/1.1 request without Host header",
        ));
    }
    req.keep_alive = if req.http10 {
        connection_keep_alive && !connection_close
    } else {
        !connection_close
    };
    Ok(len)
}

fn line_too_long(buf: &[u8]) -> bool {
    let line_end = buf.iter().position(|&b| b == b'\n').unwrap_or(buf.len());
    line_end > MAX_REQUEST_LINE
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
    Length(u64),
    Chunked,
    /// Read until the upstream closes.
    Close,
}

/// Response headers copied from S3 to the client.
const FORWARDED_RESPONSE_HEADERS: [&str; 14] = [
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
];

/// The parts of an upstream response the proxy uses; reused across requests.
#[derive(Debug, Default)]
pub struct Response {
    pub status: u16,
    pub framing: Option<Framing>,
    pub keep_alive: bool,
    pub etag: String,
    pub content_range_start: Option<u64>,
    pub content_range_total: Option<u64>,
    /// Headers to pass to the client, already formatted as `Name: value\r\n`.
    pub forward: String,
}

impl Response {
    pub fn framing(&self) -> Framing {
        self.framing.unwrap_or(Framing::Close)
    }
}

/// Parses an upstream response head; `head_request` marks responses to HEAD.
pub fn parse_response(
    buf: &[u8],
    head_request: bool,
    resp: &mut Response,
) -> Result<Option<usize>, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut headers);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() >= MAX_RESPONSE_HEAD {
                return Err("response head too large");
            }
            return Ok(None);
        }
        Err(_) => return Err("malformed response head"),
    };
    let status = parsed.code.unwrap_or(0);
    resp.status = status;
    resp.etag.clear();
    resp.forward.clear();
    resp.content_range_start = None;
    resp.content_range_total = None;
    let http10 = parsed.version == Some(0);
    let mut keep_alive = !http10;
    let mut length: Option<u64> = None;
    let mut chunked = false;
    for h in parsed.headers.iter() {
        let name = h.name;
        let value = trim(h.value);
        if name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(value)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or("invalid Content-Length")?;
            if length.is_some_and(|l| l != v) {
                return Err("conflicting Content-Length headers");
            }
            length = Some(v);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            let last = value
                .rsplit(|&b| b == b',')
                .next()
                .map(trim)
                .unwrap_or_default();
            if !last.eq_ignore_ascii_case(b"chunked") {
                return Err("unsupported Transfer-Encoding");
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(|&b| b == b',') {
                let t = trim(token);
                if t.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if t.eq_ignore_ascii_case(b"keep-alive") && http10 {
                    keep_alive = true;
                }
            }
        }
        let forwarded = FORWARDED_RESPONSE_HEADERS
            .iter()
            .any(|f| name.eq_ignore_ascii_case(f))
            || (name.len() > 11 && name[..11].eq_ignore_ascii_case("x-amz-meta-"));
        if !forwarded || name.eq_ignore_ascii_case("content-length") {
            continue;
        }
        let Ok(v) = std::str::from_utf8(value) else {
            continue;
        };
        if name.eq_ignore_ascii_case("etag") {
            resp.etag.push_str(v);
        }
        if name.eq_ignore_ascii_case("content-range") {
            // "bytes START-END/TOTAL"
            if let Some(spec) = v.strip_prefix("bytes ") {
                if let Some((range, total)) = spec.split_once('/') {
                    resp.content_range_start =
                        range.split_once('-').and_then(|(s, _)| s.parse().ok());
                    resp.content_range_total = total.parse().ok();
                }
            }
        }
        resp.forward.push_str(name);
        resp.forward.push_str(": ");
        resp.forward.push_str(v);
        resp.forward.push_str("\r\n");
    }
    let no_body = head_request || status == 204 || status == 304 || (100..200).contains(&status);
    resp.framing = Some(if no_body {
        Framing::None
    } else if chunked {
        Framing::Chunked
    } else if let Some(l) = length {
        Framing::Length(l)
    } else {
        keep_alive = false;
        Framing::Close
    });
    // Content-Length is re-emitted by the proxy from the framing it decided on;
    // a HEAD response keeps the object's length.
    if let Some(l) = length {
        if !chunked {
            let _ = write!(resp.forward, "Content-Length: {l}\r\n");
        }
    }
    resp.keep_alive = keep_alive;
    Ok(Some(len))
}

/// Standard reason phrase for the statuses the proxy produces or relays.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        412 => "Precondition Failed",
        414 => "URI Too Long",
        416 => "Range Not Satisfiable",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
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
        assert_eq!(r.header(0), Some("bytes=0-9"));
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
            (r.content_range_start, r.content_range_total),
            (Some(5), Some(100))
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
}
