//! Step "relay": the answer's head and body go to the client, through the
//! copy pumps or splice(2). A body that breaks mid-way is handed to the
//! resume step; whatever cannot be completed ends in a reset (see `Outcome`).

use super::resume::Resumed;
use super::*;

/// Body bytes up to this size are copied behind the response head; more
/// go out with it in a vectored write (uncopied).
const COALESCE_MAX: usize = 16 * 1024;

impl CoreGeneration {
    /// Streams an answer to the client; if the body breaks, resumes it on the
    /// rest of the cursor's plan.
    pub(super) async fn relay(
        &self,
        c: &mut Client,
        ctx: &RequestCtx<'_>,
        mut answer: Answer,
        cursor: &mut Cursor<'_>,
    ) -> Outcome {
        let framing = answer.resp.framing();
        let timeouts = Timeouts {
            upstream: self.replica(answer.rid).timeout,
            client: self.shared.config.server.idle_timeout,
        };
        let (mut out, with_head) = self.head_for_client(c, &answer);
        let start = with_head.1;
        let mut fill = self.fill_start(c, &answer, start);
        if fill.is_none() {
            // Not cacheable: requests waiting on this fill go upstream now.
            self.abandon_fill(c);
        } else {
            c.s.trace.fill_start = self.span_start(c);
        }
        let (head, buf) = (&mut c.s.wbuf, &mut answer.conn.buf);
        if write_head_and_body(&mut c.stream, head, buf, with_head, timeouts.client)
            .await
            .is_err()
        {
            out.keep_alive = false;
            c.give_response(answer.resp);
            return out;
        }
        // A stored fill decouples the fetch from this client; a pass-through
        // one is paced by it (its waiters follow, or fall behind and
        // continue on their own).
        if let Some(f) = fill.take_if(|f| f.shared().is_some() && !f.passthrough()) {
            return Box::pin(self.relay_filling(c, ctx, answer, cursor, f, out, (start, timeouts)))
                .await;
        }
        let tee = fill.as_mut().map(|f| f as &mut dyn body::Tee);
        let pumped = self
            .pump(
                c,
                &mut answer.conn,
                framing,
                start,
                out.bytes,
                timeouts,
                tee,
            )
            .await;
        match pumped {
            Ok(p) => {
                cursor.body_whole();
                out.bytes += p.sent;
                let reusable =
                    upclient::reusable(&answer.resp, &answer.conn, answer.head_len, p.reusable);
                if reusable {
                    self.pool.put(answer.rid, answer.conn);
                }
                c.give_response(answer.resp);
            }
            Err((e, sent)) if e.source == Source::Downstream => {
                out.bytes += sent;
                out.keep_alive = false;
                if let Some(f) = fill.as_mut().filter(|f| f.has_waiters()) {
                    // Our client left; others stream this fill: finish it.
                    Box::pin(self.finish_for_waiters(&mut answer.conn, f, timeouts)).await;
                }
                c.give_response(answer.resp);
            }
            Err((e, sent)) if e.source == Source::StalledClient => {
                out.bytes += sent;
                cursor.body_abandoned();
                self.client_stalled(c, answer.rid, e.cause);
                if let Some(f) = &fill {
                    f.fail();
                }
                out.keep_alive = false;
                out.abort = true;
                c.give_response(answer.resp);
            }
            Err((e, sent)) => {
                let cause = e.cause;
                out.bytes += sent;
                c.s.flags.cause = cause.label();
                cursor.body_broke(cause);
                let tee = fill.as_mut().map(|f| f as &mut dyn body::Tee);
                // Boxed: a break mid-body is rare, and resuming holds a
                // whole attempt; inline, every relay's state would be that
                // much larger.
                let broken = (Some(answer.rid), answer.resp);
                let resumed =
                    Box::pin(self.resume(c, ctx, broken, out.bytes, cursor, (timeouts, tee))).await;
                if !resumed.complete {
                    if let Some(f) = &fill {
                        f.fail();
                    }
                }
                out.finish_resume(resumed);
            }
        }
        out
    }

    /// Relays a body that fills the cache, the fill decoupled from the
    /// client (as Varnish streams): one future reads the upstream at the
    /// upstream's pace into the fill, another streams the fill to the
    /// client at the client's pace. A client that stops reading holds
    /// neither the fill (it completes, is stored, and its budget is given
    /// back) nor a copy (it reads on from the stored object, see
    /// `stream_fill`). A body that breaks is resumed as in the coupled
    /// relay, once the client has every byte the fill had.
    #[allow(clippy::too_many_arguments)]
    async fn relay_filling(
        &self,
        c: &mut Client,
        ctx: &RequestCtx<'_>,
        mut answer: Answer,
        cursor: &mut Cursor<'_>,
        mut fill: super::fill::Fill<'_>,
        mut out: Outcome,
        (start, timeouts): (usize, Timeouts),
    ) -> Outcome {
        use super::fill::{Signal, Streamed};
        let shared = fill.shared();
        let Some((shared, head)) = shared.and_then(|f| f.head().map(|h| (f, h))) else {
            // No head set: nothing shares this fill (not reached).
            fill.fail();
            c.give_response(answer.resp);
            out.keep_alive = false;
            out.abort = true;
            return out;
        };
        let stop = Signal::default();
        let already = out.bytes;
        let remaining = head.len.saturating_sub(already);
        let fetch = async {
            let (up, buf) = (&mut answer.conn.stream, &mut answer.conn.buf);
            let tee = Some(&mut fill as &mut dyn body::Tee);
            let mut sink = super::fill::Discard;
            let r = body::length(up, buf, start, remaining, &mut sink, timeouts, tee).await;
            if r.is_err() {
                stop.fire();
            }
            r
        };
        let stream = self.stream_fill(c, &shared, &head, already, Some(&stop));
        let (fetched, (streamed, sent)) = monoio::join!(fetch, stream);
        out.bytes = sent;
        match fetched {
            Ok(p) => {
                cursor.body_whole();
                let conn = &answer.conn;
                if upclient::reusable(&answer.resp, conn, answer.head_len, p.reusable) {
                    self.pool.put(answer.rid, answer.conn);
                }
            }
            Err((e, _)) if e.source != Source::Downstream => {
                cursor.body_broke(e.cause);
                if streamed == Streamed::Stopped && sent == fill.filled() {
                    // The client has all the fill had: both continue
                    // together from the next replicas.
                    let tee = Some(&mut fill as &mut dyn body::Tee);
                    let broken = (Some(answer.rid), answer.resp);
                    let resumed =
                        Box::pin(self.resume(c, ctx, broken, sent, cursor, (timeouts, tee))).await;
                    if !resumed.complete {
                        fill.fail();
                    }
                    out.finish_resume(resumed);
                    return out;
                }
                fill.fail();
                c.give_response(answer.resp);
                out.keep_alive = false;
                out.abort = streamed != Streamed::ClientGone;
                return out;
            }
            Err(_) => {
                // The sink takes everything; not reached.
                fill.fail();
                c.give_response(answer.resp);
                out.keep_alive = false;
                out.abort = true;
                return out;
            }
        }
        match streamed {
            Streamed::Whole => c.give_response(answer.resp),
            Streamed::ClientGone => {
                out.keep_alive = false;
                c.give_response(answer.resp);
            }
            Streamed::Detached => {
                // The stored copy went before this client caught up: the
                // rest from the replicas, with Range + If-Match.
                cursor.again();
                let broken = (Some(answer.rid), answer.resp);
                let resumed =
                    Box::pin(self.resume(c, ctx, broken, sent, cursor, (timeouts, None))).await;
                out.finish_resume(resumed);
            }
            Streamed::Broken | Streamed::Stopped => {
                c.give_response(answer.resp);
                out.keep_alive = false;
                out.abort = true;
            }
        }
        out
    }

    /// Pumps the rest of a body into a fill whose waiters still need it,
    /// after the leader's own client went away.
    async fn finish_for_waiters(
        &self,
        conn: &mut UpConn,
        fill: &mut super::fill::Fill<'_>,
        t: Timeouts,
    ) {
        let missing = fill.missing();
        conn.buf.clear();
        let (up, buf) = (&mut conn.stream, &mut conn.buf);
        let done = body::length(
            up,
            buf,
            0,
            missing,
            &mut super::fill::Discard,
            t,
            Some(fill),
        )
        .await;
        if done.is_err() {
            fill.fail();
        }
    }

    /// Writes the client's response head into `c.s.wbuf`, with the first body
    /// bytes when they are few; returns the outcome so far and the bytes of
    /// `answer.conn.buf` to send right behind the head (their end is where
    /// the rest of the body starts).
    fn head_for_client(&self, c: &mut Client, answer: &Answer) -> (Outcome, (usize, usize)) {
        let resp = &answer.resp;
        let framing = resp.framing();
        let rechunk = !c.s.req.http10;
        let delimited_by_us = matches!(framing, Framing::Chunked | Framing::Close);
        let keep = c.s.req.keep_alive && !self.core.draining.get() && (rechunk || !delimited_by_us);
        head::status_line(&mut c.s.wbuf, resp.status);
        c.s.wbuf.extend_from_slice(resp.forward.as_bytes());
        let x_cache = c.s.cache.x_cache();
        self.end_head(
            c,
            respond::HeadEnd {
                date: !resp.has_date,
                age: None,
                x_cache,
                chunked: delimited_by_us && rechunk,
                keep,
            },
        );
        let mut out = Outcome {
            status: resp.status,
            bytes: 0,
            keep_alive: keep,
            abort: false,
            replica: Some(answer.rid),
            bucket: None,
        };
        let start = answer.head_len;
        let mut with_head = (start, start);
        if let Framing::Length(len) = framing {
            let avail = answer.conn.buf.len() - start;
            let n = avail.min(usize::try_from(len).unwrap_or(usize::MAX));
            if n <= COALESCE_MAX {
                c.s.wbuf
                    .extend_from_slice(&answer.conn.buf[start..start + n]);
                with_head = (start + n, start + n);
            } else {
                with_head = (start, start + n);
            }
            out.bytes = n as u64;
        }
        (out, with_head)
    }

    /// Moves the body with the pump its framing needs; `already` bytes of a
    /// Content-Length body went out with the head. A cache fill (`tee`) is
    /// copied, never spliced.
    #[allow(clippy::too_many_arguments)]
    async fn pump(
        &self,
        c: &mut Client,
        conn: &mut UpConn,
        framing: Framing,
        start: usize,
        already: u64,
        timeouts: Timeouts,
        tee: Option<&mut dyn body::Tee>,
    ) -> Result<Pumped, (Error, u64)> {
        let rechunk = !c.s.req.http10;
        let t = timeouts;
        match framing {
            Framing::None => Ok(Pumped {
                sent: 0,
                reusable: true,
            }),
            Framing::Length(len) => {
                let remaining = len - already;
                // Decided on the whole body: the bytes that went out with
                // the head do not make a large body small.
                let splice = tee.is_none() && self.shared.config.server.zero_copy.splice(len);
                match (splice, &mut c.stream) {
                    (true, MaybeTls::Plain(client)) => {
                        self.splice_body(conn, start, remaining, client, t).await
                    }
                    (_, client) => {
                        let (up, buf) = (&mut conn.stream, &mut conn.buf);
                        body::length(up, buf, start, remaining, client, t, tee).await
                    }
                }
            }
            Framing::Chunked => {
                let (up, buf, client) = (&mut conn.stream, &mut conn.buf, &mut c.stream);
                body::chunked(up, buf, start, client, rechunk, t).await
            }
            Framing::Close => {
                let (up, buf, client) = (&mut conn.stream, &mut conn.buf, &mut c.stream);
                body::until_close(up, buf, start, client, rechunk, t).await
            }
        }
    }

    /// Sends the bytes already buffered, then splices the rest of the body.
    pub(super) async fn splice_body(
        &self,
        conn: &mut UpConn,
        start: usize,
        remaining: u64,
        client: &mut TcpStream,
        t: Timeouts,
    ) -> Result<Pumped, (Error, u64)> {
        let buffered = (conn.buf.len() - start).min(remaining as usize);
        if buffered > 0
            && write_range(client, &mut conn.buf, start, start + buffered, t.client)
                .await
                .is_err()
        {
            return Err((Error::client_gone(), 0));
        }
        // Splicing needs a plain-TCP upstream and a pipe (none when the
        // worker's pipe budget is spent or descriptors ran out); otherwise
        // the bytes are copied.
        let pipe = match conn.stream {
            MaybeTls::Plain(_) => self.core.pipe_for_splice(),
            MaybeTls::Tls(_) => None,
        };
        let (Some(mut pipe), MaybeTls::Plain(upstream)) = (pipe, &mut conn.stream) else {
            let end = conn.buf.len();
            return body::length(
                &mut conn.stream,
                &mut conn.buf,
                end,
                remaining - buffered as u64,
                client,
                t,
                None,
            )
            .await
            .map(|p| Pumped {
                sent: p.sent + buffered as u64,
                ..p
            })
            .map_err(|(e, n)| (e, n + buffered as u64));
        };
        match body::splice_length(upstream, &mut pipe, remaining - buffered as u64, client, t).await
        {
            Ok(p) => {
                self.core.keep_pipe(pipe);
                self.core.metrics.borrow_mut().spliced += p.sent;
                conn.buf.clear();
                Ok(Pumped {
                    sent: p.sent + buffered as u64,
                    ..p
                })
            }
            Err((e, n)) => Err((e, n + buffered as u64)),
        }
    }
}

impl CoreGeneration {
    /// The upstream broke a body while our client was not reading (see
    /// `error::Source::StalledClient`): the request's doing, counted as
    /// such (`yatagarasu_request_caused_failures_total{reason=
    /// "client_stalled"}`), the breaker untouched. The client's response
    /// ends as an abort: resuming would stall the same way.
    pub(super) fn client_stalled(&self, c: &Client, rid: usize, cause: Cause) {
        self.core
            .metrics
            .borrow_mut()
            .request_caused(self.mid(rid), RequestCaused::ClientStalled);
        log!(
            Level::Info,
            "Upstream closed while the client was not reading; aborting the client connection",
            replica = self.replica(rid).name,
            request_id = c.s.req.request_id,
            cause = cause.label(),
        );
    }
}

impl Outcome {
    /// Folds a resume's result in: an incomplete body aborts the connection.
    fn finish_resume(&mut self, r: Resumed) {
        self.bytes = r.sent;
        if !r.complete {
            self.keep_alive = false;
            self.abort = true;
        }
        if let Some(rid) = r.replica {
            self.replica = Some(rid);
        }
    }
}
