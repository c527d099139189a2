//! The request's trace (`crate::trace`): started with the request (a
//! client's `traceparent` continued), a span per phase, per upstream
//! attempt, per resumed body and per cache fill, closed into the core's
//! batch when the request ends. Everything here is a no-op, one branch,
//! when tracing is off or the request is not recorded.

use super::*;
use crate::trace::{self, Attr, Span, Trace};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

impl CoreGeneration {
    /// Starts the request's trace: the client's, when its `traceparent`
    /// is valid (its sampling decision too), else a new one sampled at
    /// `sampling_ratio`.
    pub(super) fn trace_begin(&self, c: &mut Client) {
        let Some(settings) = &self.shared.config.tracing else {
            return;
        };
        let head = c.s.rbuf.get(..c.s.req.head_len).unwrap_or_default();
        let parent = head::find_header(head, "traceparent").and_then(trace::parse_traceparent);
        let state = head::find_header(head, "tracestate").unwrap_or("");
        let mut ids = self.core.trace_ids.borrow_mut();
        let t = &mut c.s.trace;
        t.spans.clear();
        t.state.clear();
        match parent {
            Some((trace_id, span, sampled)) => {
                t.trace_id = trace_id;
                t.remote_parent = Some(span);
                t.sampled = sampled;
                t.state.push_str(state.get(..512).unwrap_or(state));
            }
            None => {
                t.trace_id = ids.trace_id();
                t.remote_parent = None;
                t.sampled = ids.sample(settings.ratio);
            }
        }
        t.root = ids.span_id();
        t.fill_start = 0;
        t.start_ns = if t.sampled { trace::now_ns() } else { 0 };
    }

    /// When a span starts: 0 when the request is not recorded.
    pub(super) fn span_start(&self, c: &Client) -> u64 {
        match self.shared.config.tracing.is_some() && c.s.trace.sampled {
            true => trace::now_ns(),
            false => 0,
        }
    }

    /// Closes a span that started at `start` (from [`Self::span_start`]);
    /// its attributes are built only when the request is recorded.
    pub(super) fn span_end(
        &self,
        c: &mut Client,
        start: u64,
        name: &'static str,
        attrs: impl FnOnce() -> Vec<(&'static str, Attr)>,
        error: bool,
    ) {
        if start == 0 {
            return;
        }
        let id = self.core.trace_ids.borrow_mut().span_id();
        self.span_end_as(c, id, start, (name, SpanKind::Internal), attrs(), error);
    }

    /// Closes a span whose id was chosen when it started (an upstream
    /// attempt's, sent in its `traceparent`).
    pub(super) fn span_end_as(
        &self,
        c: &mut Client,
        id: [u8; 8],
        start: u64,
        (name, kind): (&'static str, SpanKind),
        attrs: Vec<(&'static str, Attr)>,
        error: bool,
    ) {
        if start == 0 {
            return;
        }
        let root = c.s.trace.root;
        c.s.trace.spans.push(Span {
            id,
            parent: root,
            name: name.to_string(),
            start_ns: start,
            end_ns: trace::now_ns(),
            attrs,
            error,
            kind,
        });
    }

    /// Closes the span of the cache fill this request led, if it did.
    pub(super) fn fill_span_end(&self, c: &mut Client, bytes: u64, stored: bool) {
        let start = std::mem::take(&mut c.s.trace.fill_start);
        let attrs = || vec![("yatagarasu.fill_bytes", Attr::Int(bytes as i64))];
        self.span_end(c, start, "fill", attrs, !stored);
    }

    /// An id for a span about to start (an upstream attempt's); none when
    /// tracing is off.
    pub(super) fn span_id(&self) -> [u8; 8] {
        match self.shared.config.tracing.is_some() {
            true => self.core.trace_ids.borrow_mut().span_id(),
            false => [0; 8],
        }
    }

    /// The `traceparent` to send upstream for the attempt `span`, when
    /// tracing propagates context.
    pub(super) fn upstream_traceparent(&self, c: &Client, span: [u8; 8]) -> Option<String> {
        let settings = self.shared.config.tracing.as_ref()?;
        settings
            .propagate
            .then(|| trace::traceparent(&c.s.trace.trace_id, &span, c.s.trace.sampled))
    }

    /// Ends the request's trace: its own span, then the whole trace to the
    /// core's batch (handed to the exporter at the next tick).
    pub(super) fn trace_finish(&self, c: &mut Client, o: &Outcome) {
        if self.shared.config.tracing.is_none() || !c.s.trace.sampled {
            return;
        }
        let bucket = c.s.routed;
        let name = match bucket {
            Some(b) => format!(
                "{} {}",
                c.s.req.method_text,
                self.shared.bucket(b).path_prefix
            ),
            None => c.s.req.method_text.clone(),
        };
        let mut attrs = vec![
            (
                "http.request.method",
                Attr::Str(c.s.req.method_text.clone()),
            ),
            ("url.path", Attr::Str(c.s.decoded_path.clone())),
            ("http.response.status_code", Attr::Int(i64::from(o.status))),
            (
                "yatagarasu.request_id",
                Attr::Str(c.s.req.request_id.clone()),
            ),
        ];
        if let Some(b) = bucket {
            attrs.push((
                "yatagarasu.bucket",
                Attr::Str(self.shared.bucket(b).name.clone()),
            ));
        }
        if !c.s.flags.x_cache.is_empty() {
            attrs.push(("yatagarasu.cache", Attr::Str(c.s.flags.x_cache.into())));
        }
        if c.s.flags.failovers > 0 {
            attrs.push((
                "yatagarasu.failovers",
                Attr::Int(i64::from(c.s.flags.failovers)),
            ));
        }
        let t = &mut c.s.trace;
        t.spans.push(Span {
            id: t.root,
            parent: [0; 8],
            name,
            start_ns: t.start_ns,
            end_ns: trace::now_ns(),
            attrs,
            error: o.status >= 500 || o.abort,
            kind: SpanKind::Server,
        });
        let finished = Trace {
            trace_id: t.trace_id,
            remote_parent: t.remote_parent,
            root: t.root,
            sampled: true,
            state: t.state.clone(),
            start_ns: t.start_ns,
            spans: std::mem::take(&mut t.spans),
            upstream: [0; 8],
            fill_start: 0,
        };
        self.core.trace_batch.borrow_mut().push(finished);
    }
}
