//! Step "resume": a Content-Length body that broke after bytes went out
//! continues from the next replicas, in plan order, with
//! `Range: bytes=N-M` (offset by the client's own range) and
//! `If-Match: <ETag>`. Only a 200 or a single-range 206 is resumed, and only
//! from a 206 whose `Content-Range` is exactly the range asked for, with the
//! same ETag; otherwise the body cannot be completed and the relay resets the
//! client connection.

use super::attempt::Resume;
use super::*;

/// How a resume ended.
pub(super) struct Resumed {
    /// Payload bytes sent to the client in total (before and during the resume).
    pub sent: u64,
    /// The body reached its end.
    pub complete: bool,
    /// The replica that finished (or last tried) the body.
    pub replica: Option<usize>,
}

impl Resumed {
    fn incomplete(sent: u64) -> Resumed {
        Resumed {
            sent,
            complete: false,
            replica: None,
        }
    }
}

/// What one replica did with a resume request.
enum Continued {
    /// It sent the rest: done (complete or not, see `Resumed`).
    Finished(Resumed),
    /// It sent part of the rest before failing: try the next replica.
    Partly(u64),
    /// It could not continue (failure, 412, another answer).
    Refused,
}

/// Whether a broken body can be continued from another replica, and if so
/// the object offset of its first byte: a 200 (offset 0) or a single-range
/// 206 with a valid `Content-Range`. A multipart/byteranges 206 never is:
/// object bytes would be pasted into multipart framing.
fn resumable(resp: &Response) -> Option<u64> {
    match resp.status {
        200 => Some(0),
        206 if !resp.multipart => resp.content_range.map(|cr| cr.first),
        _ => None,
    }
}

/// The answer to a resume request is exactly the rest of the same body: a
/// single-range 206 at the offset asked for, of the length asked for, with
/// the same ETag.
fn continues(resp: &Response, want: &Resume<'_>) -> bool {
    resp.status == 206
        && resp.etag == want.etag
        && !resp.multipart
        && resp
            .content_range
            .is_some_and(|cr| cr.first == want.first && cr.last == want.last)
        && resp.framing() == Framing::Length(want.last - want.first + 1)
}

impl CoreGeneration {
    /// Continues the body of `resp`, which `rid` sent and which broke (or
    /// which a reader could no longer follow) after `sent` payload bytes,
    /// on the rest of the cursor's plan.
    pub(super) async fn resume(
        &self,
        c: &mut Client,
        ctx: &RequestCtx<'_>,
        broken: (Option<usize>, Response),
        sent: u64,
        cursor: &mut Cursor<'_>,
        step: (Timeouts, Option<&mut dyn body::Tee>),
    ) -> Resumed {
        let span = self.span_start(c);
        let r = self
            .resume_untraced(c, ctx, broken, sent, cursor, step)
            .await;
        let attrs = || {
            vec![
                (
                    "yatagarasu.resumed_at",
                    crate::trace::Attr::Int(sent as i64),
                ),
                ("yatagarasu.sent", crate::trace::Attr::Int(r.sent as i64)),
            ]
        };
        self.span_end(c, span, "resume", attrs, !r.complete);
        r
    }

    /// [`Self::resume`] without its span.
    async fn resume_untraced(
        &self,
        c: &mut Client,
        ctx: &RequestCtx<'_>,
        (from, resp): (Option<usize>, Response),
        mut sent: u64,
        cursor: &mut Cursor<'_>,
        (timeouts, mut tee): (Timeouts, Option<&mut dyn body::Tee>),
    ) -> Resumed {
        let (Framing::Length(len), Some(base), false) =
            (resp.framing(), resumable(&resp), resp.etag.is_empty())
        else {
            self.log_unresumable(c, ctx, from, "the response cannot be resumed (no ETag, no Content-Length, or a multipart or unparsed range)");
            c.give_response(resp);
            return Resumed::incomplete(sent);
        };
        let mut from = from;
        while let Some(next) = cursor.next_replica() {
            self.log_resume(c, ctx, from, next, base + sent);
            from = Some(next);
            let want = Resume {
                first: base + sent,
                last: base + len - 1,
                etag: &resp.etag,
            };
            let step = (
                timeouts,
                tee.as_mut().map(|t| &mut **t as &mut dyn body::Tee),
            );
            match self.continue_on(c, ctx, cursor, next, want, step).await {
                Continued::Finished(mut r) => {
                    r.sent += sent;
                    c.give_response(resp);
                    return r;
                }
                Continued::Partly(n) => sent += n,
                Continued::Refused => {}
            }
        }
        self.log_unresumable(c, ctx, from, "no replica could resume the body");
        c.give_response(resp);
        Resumed::incomplete(sent)
    }

    /// Asks `rid` (the cursor's turn) for the rest of the body and streams
    /// what it sends.
    async fn continue_on(
        &self,
        c: &mut Client,
        ctx: &RequestCtx<'_>,
        cursor: &mut Cursor<'_>,
        rid: usize,
        want: Resume<'_>,
        (timeouts, tee): (Timeouts, Option<&mut dyn body::Tee>),
    ) -> Continued {
        let mut a = match self.attempt(c, ctx, rid, Some(want)).await {
            Ok(a) => a,
            Err(f) => {
                c.s.flags.cause = f.cause.label();
                cursor.failed(f.cause);
                return Continued::Refused;
            }
        };
        let remaining = want.last - want.first + 1;
        if !continues(&a.resp, &want) {
            // 412 (the ETag changed) or another answer: not this body.
            cursor.release_turn();
            c.give_response(a.resp);
            let msg = "Replica cannot resume the body with the same ETag at the same offset";
            let why = "not a single-range 206 of that ETag at the offset asked for";
            self.log_replica(Level::Warn, msg, c, ctx, Some(rid), why);
            return Continued::Refused;
        }
        cursor.answered_head();
        c.s.flags.resumed = true;
        self.core.metrics.borrow_mut().resume(self.mid(rid));
        let (up, buf) = (&mut a.conn.stream, &mut a.conn.buf);
        let client = &mut c.stream;
        let pumped = body::length(up, buf, a.head_len, remaining, client, timeouts, tee).await;
        let finished = |sent, complete| {
            Continued::Finished(Resumed {
                sent,
                complete,
                replica: Some(rid),
            })
        };
        let result = match pumped {
            Ok(p) => {
                cursor.body_whole();
                if upclient::reusable(&a.resp, &a.conn, a.head_len, p.reusable) {
                    self.pool.put(rid, a.conn);
                }
                finished(p.sent, true)
            }
            Err((e, sent)) if e.source == Source::Downstream => {
                cursor.body_abandoned();
                finished(sent, false)
            }
            Err((e, sent)) if e.source == Source::StalledClient => {
                cursor.body_abandoned();
                self.client_stalled(c, rid, e.cause);
                finished(sent, false)
            }
            Err((e, n)) => {
                cursor.body_broke(e.cause);
                Continued::Partly(n)
            }
        };
        c.give_response(a.resp);
        result
    }

    fn log_resume(
        &self,
        c: &Client,
        ctx: &RequestCtx<'_>,
        from: Option<usize>,
        to: usize,
        offset: u64,
    ) {
        let message = match from {
            Some(from) => format!(
                "Replica '{}' failed mid-body, resuming from '{}'",
                self.replica(from).name,
                self.replica(to).name
            ),
            None => format!(
                "A shared fetch went on without this reader; continuing from '{}'",
                self.replica(to).name
            ),
        };
        log!(
            Level::Warn,
            &message,
            bucket = self.shared.bucket(ctx.bucket).name,
            request_id = c.s.req.request_id,
            offset = offset,
        );
    }

    fn log_unresumable(&self, c: &Client, ctx: &RequestCtx<'_>, rid: Option<usize>, why: &str) {
        let msg = "Upstream failed mid-body; aborting the client connection";
        self.log_replica(Level::Error, msg, c, ctx, rid, why);
    }

    fn log_replica(
        &self,
        level: Level,
        msg: &str,
        c: &Client,
        ctx: &RequestCtx<'_>,
        rid: Option<usize>,
        why: &str,
    ) {
        log!(
            level,
            msg,
            bucket = self.shared.bucket(ctx.bucket).name,
            replica = rid.map_or("-", |r| self.replica(r).name.as_str()),
            request_id = c.s.req.request_id,
            cause = why,
        );
    }
}
