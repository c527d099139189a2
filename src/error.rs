//! The one error of the proxy's exchanges (Pingora's `Error` is the
//! model): what went wrong ([`Cause`], whose label is the metric's), which
//! side it came from ([`Source`]: the replica, the client, or the proxy
//! itself), what happened in words, and what came with it. The upstream
//! client, the body pumps and the request's attempts all fail with it; the
//! blame rule (`upstream::blame`) and the breakers read its source and
//! cause.

use std::borrow::Cow;
use std::io;

/// Why an attempt at a replica failed. [`Cause::label`] is the
/// `reason` label of `yatagarasu_replica_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Connection refused, or the name did not resolve.
    Connect,
    /// No connection, head or body progress within the replica's timeout.
    Timeout,
    /// The replica reset or aborted the connection.
    Reset,
    /// TLS handshake or certificate failure.
    Tls,
    /// A response that is not valid HTTP/1.1 framing (bad status, bad
    /// Content-Length, unsupported transfer coding, 101, oversized head).
    Malformed,
    /// The connection ended before the head or the body was complete.
    Truncated,
    /// Any other socket error.
    Io,
    /// The replica answered with a 5xx status.
    Http(u16),
    /// No valid credentials for this replica: none fetched yet, expired, or
    /// a 403 whose S3 code says the replica refuses them.
    Credentials,
    /// The request could not be signed.
    Signing,
    /// The proxy itself ran out of file descriptors, socket buffers or
    /// memory while connecting: not the replica's failure, never counted
    /// against its breaker (a flood of clients must not open it).
    LocalResources,
    /// The bucket's upstream rate limit (`s3.rate_limit`, the S3 bill
    /// guard) had no token for this request in time: nothing was sent, and
    /// the replica's breaker is untouched.
    RateLimited,
}

impl Cause {
    /// The metric label; defined here once for every path (head, body, probe).
    pub fn label(self) -> &'static str {
        match self {
            Cause::Connect => "connect",
            Cause::Timeout => "timeout",
            Cause::Reset => "reset",
            Cause::Tls => "tls",
            Cause::Malformed => "malformed",
            Cause::Truncated => "truncated",
            Cause::Io => "io",
            Cause::Http(500) => "http_500",
            Cause::Http(502) => "http_502",
            Cause::Http(503) => "http_503",
            Cause::Http(504) => "http_504",
            Cause::Http(_) => "http_5xx",
            Cause::Credentials => "credentials",
            Cause::Signing => "signing",
            Cause::LocalResources => "local_resources",
            Cause::RateLimited => "rate_limited",
        }
    }

    /// The cause of a socket error.
    pub fn of_io(e: &io::Error) -> Cause {
        match e.kind() {
            io::ErrorKind::TimedOut => Cause::Timeout,
            io::ErrorKind::ConnectionRefused => Cause::Connect,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => Cause::Reset,
            io::ErrorKind::UnexpectedEof => Cause::Truncated,
            io::ErrorKind::InvalidData => Cause::Malformed,
            _ => Cause::Io,
        }
    }

    /// A failure the request rather than the replica may have caused
    /// (an HTTP answer, as opposed to a transport or protocol failure).
    pub fn is_http_status(self) -> bool {
        matches!(self, Cause::Http(_))
    }

    /// A failure of the proxy's own making (its resources, its limits):
    /// it says nothing about the replica, whose breaker is never charged.
    pub fn is_local(self) -> bool {
        matches!(self, Cause::LocalResources | Cause::RateLimited)
    }
}

/// Where a failure came from, which decides who is blamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The replica: judged by its breaker (unless the blame rule lays a
    /// 5xx at the request's door).
    Upstream,
    /// The replica broke the body, but only after the client had stopped
    /// reading for `http::body::CLIENT_STALL` (the pump stopped reading the
    /// replica too, and a replica drops a send that stalls): the client's
    /// doing, never the replica's failure.
    StalledClient,
    /// The client went away or stopped taking our writes.
    Downstream,
    /// The proxy itself: its resources or its limits; nobody is blamed.
    Internal,
}

/// A failure. `A` is what may come with it: the proxy's attempts carry
/// S3's 403 answer for broken credentials (relayed when no replica
/// answers); lower layers carry nothing.
#[derive(Debug)]
pub struct Error<A = ()> {
    /// Which side failed.
    pub source: Source,
    /// What went wrong (a replica failure's metric label).
    pub cause: Cause,
    /// What happened, for the log.
    pub detail: Cow<'static, str>,
    /// Some response bytes had arrived (a pooled connection that fails
    /// before any byte is retried once on a fresh connection).
    pub got_bytes: bool,
    /// The answer that came with the failure, if any.
    pub answer: Option<Box<A>>,
}

impl<A> Error<A> {
    /// A failure of `source` with `cause`.
    pub fn new(source: Source, cause: Cause, detail: impl Into<Cow<'static, str>>) -> Error<A> {
        Error {
            source,
            cause,
            detail: detail.into(),
            got_bytes: false,
            answer: None,
        }
    }

    /// The replica failed; a cause of the proxy's own making
    /// ([`Cause::is_local`]) is the proxy's.
    pub fn upstream(cause: Cause, detail: impl Into<Cow<'static, str>>) -> Error<A> {
        let source = if cause.is_local() {
            Source::Internal
        } else {
            Source::Upstream
        };
        Error::new(source, cause, detail)
    }

    /// A socket error talking to a replica.
    pub fn io(e: io::Error, got_bytes: bool) -> Error<A> {
        Error::upstream(Cause::of_io(&e), e.to_string()).after_bytes(got_bytes)
    }

    /// A replica's answer that is not valid HTTP/1.1 framing.
    pub fn malformed(detail: impl Into<Cow<'static, str>>) -> Error<A> {
        Error::upstream(Cause::Malformed, detail).after_bytes(true)
    }

    /// The body broke after the client stalled (see [`Source::StalledClient`]).
    pub fn stalled_client(cause: Cause) -> Error<A> {
        Error::new(Source::StalledClient, cause, "")
    }

    /// The client went away.
    pub fn client_gone() -> Error<A> {
        Error::new(Source::Downstream, Cause::Reset, "client went away")
    }

    /// Says whether response bytes had arrived.
    pub fn after_bytes(mut self, got_bytes: bool) -> Error<A> {
        self.got_bytes = got_bytes;
        self
    }

    /// The same failure carrying what else may come with it.
    pub fn carrying<B>(self) -> Error<B> {
        Error {
            source: self.source,
            cause: self.cause,
            detail: self.detail,
            got_bytes: self.got_bytes,
            answer: None,
        }
    }
}
