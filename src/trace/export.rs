//! The span exporter: a thread of its own that takes the cores' finished
//! traces (one hand-over per core per tick, never waiting), batches them
//! (up to [`BATCH_SPANS`] spans or one second) and POSTs each batch as an
//! OTLP/HTTP protobuf `ExportTraceServiceRequest`. A batch the collector
//! does not take (down, slow, an error status) is dropped and counted; so
//! are traces arriving while [`MAX_PENDING`] spans wait.

use super::Trace;
use crate::config::Tracing;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans};
use prost::Message;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Spans sent in one request to the collector.
const BATCH_SPANS: usize = 512;
/// Spans waiting at most; more are dropped.
const MAX_PENDING: usize = 8192;
/// Hand-overs (one per core per tick) queued at most.
const QUEUE: usize = 256;

/// The process's exporter: its queue and counters.
pub struct Exporter {
    queue: SyncSender<Vec<Trace>>,
    /// Spans the collector accepted.
    pub exported: AtomicU64,
    /// Spans dropped: the queue or the pending batch full.
    pub dropped_queue: AtomicU64,
    /// Spans dropped: the collector did not take them.
    pub dropped_export: AtomicU64,
}

impl Exporter {
    /// Starts the export thread.
    pub fn start(settings: Tracing) -> Result<Arc<Exporter>, String> {
        let (tx, rx) = sync_channel(QUEUE);
        let exporter = Arc::new(Exporter {
            queue: tx,
            exported: AtomicU64::new(0),
            dropped_queue: AtomicU64::new(0),
            dropped_export: AtomicU64::new(0),
        });
        let mine = exporter.clone();
        std::thread::Builder::new()
            .name("yatagarasu-traces".into())
            .spawn(move || run(&mine, &settings, &rx))
            .map_err(|e| format!("trace export thread: {e}"))?;
        Ok(exporter)
    }

    /// A core's finished traces; never waits (a full queue drops them).
    pub fn submit(&self, traces: Vec<Trace>) {
        if let Err(TrySendError::Full(t) | TrySendError::Disconnected(t)) =
            self.queue.try_send(traces)
        {
            let spans: usize = t.iter().map(|t| t.spans.len()).sum();
            self.dropped_queue
                .fetch_add(spans as u64, Ordering::Relaxed);
        }
    }
}

fn run(exporter: &Exporter, settings: &Tracing, rx: &Receiver<Vec<Trace>>) {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(2))
        .user_agent(concat!("yatagarasu/", env!("CARGO_PKG_VERSION")))
        .build();
    let resource = Resource {
        attributes: vec![
            super::key_value(
                "service.name",
                super::Attr::Str(settings.service_name.clone()),
            ),
            super::key_value(
                "service.version",
                super::Attr::Str(env!("CARGO_PKG_VERSION").into()),
            ),
        ],
        ..Default::default()
    };
    let mut pending = Vec::new();
    let mut last_send = Instant::now();
    let mut warned: Option<Instant> = None;
    loop {
        let disconnected = match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(traces) => {
                for t in traces {
                    if pending.len() + t.spans.len() > MAX_PENDING {
                        exporter
                            .dropped_queue
                            .fetch_add(t.spans.len() as u64, Ordering::Relaxed);
                        continue;
                    }
                    pending.extend(super::to_otlp(&t));
                }
                false
            }
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => true,
        };
        let due = pending.len() >= BATCH_SPANS || last_send.elapsed() >= Duration::from_secs(1);
        if !pending.is_empty() && (due || disconnected) {
            last_send = Instant::now();
            let spans = std::mem::take(&mut pending);
            let n = spans.len() as u64;
            let body = ExportTraceServiceRequest {
                resource_spans: vec![ResourceSpans {
                    resource: Some(resource.clone()),
                    scope_spans: vec![ScopeSpans {
                        scope: Some(InstrumentationScope {
                            name: "yatagarasu".into(),
                            version: env!("CARGO_PKG_VERSION").into(),
                            ..Default::default()
                        }),
                        spans,
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            }
            .encode_to_vec();
            let sent = agent
                .post(&settings.endpoint)
                .set("Content-Type", "application/x-protobuf")
                .send_bytes(&body);
            match sent {
                Ok(_) => {
                    exporter.exported.fetch_add(n, Ordering::Relaxed);
                }
                Err(e) => {
                    exporter.dropped_export.fetch_add(n, Ordering::Relaxed);
                    if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                        warned = Some(Instant::now());
                        crate::log!(
                            crate::config::Level::Warn,
                            "Trace export failed; spans dropped (counted in yatagarasu_trace_spans_dropped_total)",
                            endpoint = settings.endpoint,
                            error = e,
                        );
                    }
                }
            }
        }
        if disconnected {
            return;
        }
    }
}
