//! Streaming an answer to the client (copy or splice pump), and resuming a
//! body that broke mid-way from the next replica with `Range` + `If-Match`.

use super::*;

/// Bodies up to this size are sent in the same write as the response head.
const COALESCE_MAX: usize = 16 * 1024;

/// How a resume ended.
struct Resumed {
    /// Payload bytes sent to the client in total (before and during the resume).
    sent: u64,
    /// The body reached its end.
    complete: bool,
    /// The replica that finished (or last tried) the body.
    replica: Option<usize>,
}

impl Shard {
    /// Streams an answer to the client; resumes on `rest` if the body breaks.
    pub(super) async fn relay(
        &self,
        c: &mut Client,
        rid: usize,
        answer: Answer,
        rest: &[usize],
        bucket: usize,
        encoded_key: &str,
    ) -> Outcome {
        let Answer { mut conn, head_len } = answer;
        let framing = c.resp.framing();
        let status = c.resp.status;
        let mut keep = c.req.keep_alive && !self.core.draining.get();
        let rechunk = !c.req.http10;
        if matches!(framing, Framing::Chunked | Framing::Close) && !rechunk {
            keep = false;
        }
        head::status_line(&mut c.wbuf, status);
        c.wbuf.extend_from_slice(c.resp.forward.as_bytes());
        if !c.resp.has_date {
            self.core.date_header(&mut c.wbuf);
        }
        head::header(&mut c.wbuf, "X-Request-ID", &c.req.request_id);
        if matches!(framing, Framing::Chunked | Framing::Close) && rechunk {
            head::header(&mut c.wbuf, "Transfer-Encoding", "chunked");
        }
        connection_header(&mut c.wbuf, keep, c.req.http10);
        c.wbuf.extend_from_slice(b"\r\n");
        let timeouts = Timeouts {
            upstream: self.replica(rid).timeout,
            client: self.shared.config.server.idle_timeout,
        };
        let mut out = Outcome {
            status,
            bytes: 0,
            keep_alive: keep,
            abort: false,
            replica: Some(rid),
        };
        let mut start = head_len;
        if let Framing::Length(len) = framing {
            let avail = conn.buf.len() - head_len;
            if avail <= COALESCE_MAX {
                let n = avail.min(len as usize);
                c.wbuf.extend_from_slice(&conn.buf[head_len..head_len + n]);
                start = head_len + n;
                out.bytes = n as u64;
            }
        }
        if write_all(&mut c.stream, &mut c.wbuf, timeouts.client)
            .await
            .is_err()
        {
            out.keep_alive = false;
            return out;
        }
        let result = self
            .pump(c, &mut conn, framing, start, out.bytes, timeouts)
            .await;
        match result {
            Ok(p) => {
                out.bytes += p.sent;
                if upclient::reusable(&c.resp, &conn, head_len, p.reusable) {
                    self.pool.put(rid, conn);
                }
            }
            Err((PumpError::Client, sent)) => {
                out.bytes += sent;
                out.keep_alive = false;
            }
            Err((PumpError::Upstream(cause), sent)) => {
                out.bytes += sent;
                self.record_failure(rid, Admit::Normal, cause);
                drop(conn);
                let resumed = match (framing, resumable(&c.resp)) {
                    (Framing::Length(len), Some(base)) => {
                        let plan = ResumePlan {
                            failed: rid,
                            base,
                            sent: out.bytes,
                            len,
                        };
                        self.resume(c, bucket, encoded_key, plan, rest, timeouts)
                            .await
                    }
                    _ => {
                        log!(
                            Level::Error,
                            "Upstream failed mid-body and the body cannot be resumed; aborting the client connection",
                            bucket = self.shared.bucket(bucket).name,
                            replica = self.replica(rid).name,
                            request_id = c.req.request_id,
                            cause = cause.label(),
                        );
                        Resumed {
                            sent: out.bytes,
                            complete: false,
                            replica: None,
                        }
                    }
                };
                out.bytes = resumed.sent;
                if !resumed.complete {
                    out.keep_alive = false;
                    out.abort = true;
                }
                if let Some(r) = resumed.replica {
                    out.replica = Some(r);
                }
            }
        }
        out
    }

    /// Moves the body with the pump its framing needs; `already` bytes of a
    /// Content-Length body went out with the head.
    async fn pump(
        &self,
        c: &mut Client,
        conn: &mut UpConn,
        framing: Framing,
        start: usize,
        already: u64,
        timeouts: Timeouts,
    ) -> Result<Pumped, (PumpError, u64)> {
        let rechunk = !c.req.http10;
        match framing {
            Framing::None => Ok(Pumped {
                sent: 0,
                reusable: true,
            }),
            Framing::Length(len) => {
                let remaining = len - already;
                let splice = self.shared.config.server.zero_copy.splice(remaining);
                if let (true, MaybeTls::Plain(client)) = (splice, &mut c.stream) {
                    self.splice_body(conn, start, remaining, client, timeouts)
                        .await
                } else {
                    body::length(
                        &mut conn.stream,
                        &mut conn.buf,
                        start,
                        remaining,
                        &mut c.stream,
                        timeouts,
                    )
                    .await
                }
            }
            Framing::Chunked => {
                body::chunked(
                    &mut conn.stream,
                    &mut conn.buf,
                    start,
                    &mut c.stream,
                    rechunk,
                    timeouts,
                )
                .await
            }
            Framing::Close => {
                body::until_close(
                    &mut conn.stream,
                    &mut conn.buf,
                    start,
                    &mut c.stream,
                    rechunk,
                    timeouts,
                )
                .await
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
    ) -> Result<Pumped, (PumpError, u64)> {
        let buffered = (conn.buf.len() - start).min(remaining as usize);
        if buffered > 0
            && write_range(client, &mut conn.buf, start, start + buffered, t.client)
                .await
                .is_err()
        {
            return Err((PumpError::Client, 0));
        }
        // Splicing needs a plain-TCP upstream and a pipe (none when out of
        // file descriptors); otherwise the bytes are copied.
        let pipe = match conn.stream {
            MaybeTls::Plain(_) => {
                let pooled = self.core.pipes.borrow_mut().pop();
                pooled.map_or_else(monoio::net::unix::new_pipe, Ok).ok()
            }
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
                self.core.pipes.borrow_mut().push(pipe);
                conn.buf.clear();
                Ok(Pumped {
                    sent: p.sent + buffered as u64,
                    ..p
                })
            }
            Err((e, n)) => Err((e, n + buffered as u64)),
        }
    }

    /// Continues a Content-Length body that broke mid-way on `rest`, in
    /// plan order, with `Range` + `If-Match`.
    async fn resume(
        &self,
        c: &mut Client,
        bucket: usize,
        encoded_key: &str,
        plan: ResumePlan,
        rest: &[usize],
        timeouts: Timeouts,
    ) -> Resumed {
        let etag = c.resp.etag.clone();
        let bucket_name = &self.shared.bucket(bucket).name;
        let mut from = plan.failed;
        let mut sent = plan.sent;
        if etag.is_empty() {
            log!(
                Level::Error,
                "Upstream failed mid-body and the object has no ETag to resume with; aborting the client connection",
                bucket = bucket_name,
                request_id = c.req.request_id,
            );
            return Resumed {
                sent,
                complete: false,
                replica: None,
            };
        }
        let original_status = c.resp.status;
        for &rid in rest {
            let admit = self.admit(rid, now_ms());
            if admit == Admit::Rejected {
                continue;
            }
            log!(
                Level::Warn,
                &format!(
                    "Replica '{}' failed mid-body, resuming from '{}'",
                    self.replica(from).name,
                    self.replica(rid).name
                ),
                bucket = bucket_name,
                request_id = c.req.request_id,
                offset = plan.base + sent,
            );
            self.core
                .metrics
                .borrow_mut()
                .failover(self.mid(from), self.mid(rid));
            from = rid;
            let r = Resume {
                first: plan.base + sent,
                last: plan.base + plan.len - 1,
                etag: &etag,
            };
            let Answer { mut conn, head_len } =
                match self.attempt(c, rid, encoded_key, Some(r)).await {
                    Ok(a) => a,
                    Err(f) => {
                        self.record_failure(rid, admit, f.cause);
                        continue;
                    }
                };
            let continues = c.resp.status == 206
                && c.resp.etag == etag
                && !c.resp.multipart
                && c.resp
                    .content_range
                    .is_some_and(|cr| cr.first == r.first && cr.last == r.last)
                && c.resp.framing() == Framing::Length(r.last - r.first + 1);
            c.resp.status = original_status;
            if !continues {
                // 412 (ETag changed) or another answer: this replica cannot
                // continue the body.
                self.release(rid, admit);
                log!(
                    Level::Warn,
                    "Replica cannot resume the body with the same ETag at the same offset",
                    bucket = bucket_name,
                    replica = self.replica(rid).name,
                    request_id = c.req.request_id,
                );
                continue;
            }
            self.record_answer(rid, admit);
            self.core.metrics.borrow_mut().resume(self.mid(rid));
            let remaining = r.last - r.first + 1;
            let pumped = body::length(
                &mut conn.stream,
                &mut conn.buf,
                head_len,
                remaining,
                &mut c.stream,
                timeouts,
            )
            .await;
            match pumped {
                Ok(p) => {
                    if upclient::reusable(&c.resp, &conn, head_len, p.reusable) {
                        self.pool.put(rid, conn);
                    }
                    return Resumed {
                        sent: sent + p.sent,
                        complete: true,
                        replica: Some(rid),
                    };
                }
                Err((PumpError::Client, n)) => {
                    return Resumed {
                        sent: sent + n,
                        complete: false,
                        replica: Some(rid),
                    }
                }
                Err((PumpError::Upstream(cause), n)) => {
                    sent += n;
                    self.record_failure(rid, Admit::Normal, cause);
                }
            }
        }
        log!(
            Level::Error,
            "No replica could resume the body; aborting the client connection",
            bucket = bucket_name,
            request_id = c.req.request_id,
            sent = sent,
            expected = plan.len,
        );
        Resumed {
            sent,
            complete: false,
            replica: None,
        }
    }
}

/// Where a broken Content-Length body stands.
#[derive(Debug, Clone, Copy)]
struct ResumePlan {
    /// The replica whose body broke.
    failed: usize,
    /// Offset of the body's first byte within the object.
    base: u64,
    /// Payload bytes already sent to the client.
    sent: u64,
    /// The body's length.
    len: u64,
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
