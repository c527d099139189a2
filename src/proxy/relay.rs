//! Streaming an answer to the client (copy or splice pump), and resuming a
//! body that broke mid-way from the next replica with `Range` + `If-Match`.

use super::*;

/// Bodies up to this size are sent in the same write as the response head.
const COALESCE_MAX: usize = 16 * 1024;

impl Shard {
    /// Streams an answer to the client; resumes on `rest` if the body breaks.
    #[allow(clippy::too_many_arguments)]
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
        let result: Result<Pumped, (PumpError, u64)> = match framing {
            Framing::None => Ok(Pumped {
                sent: 0,
                reusable: true,
            }),
            Framing::Length(len) => {
                let remaining = len - out.bytes;
                let splice = self.shared.config.server.zero_copy.splice(remaining);
                if let (true, MaybeTls::Plain(client)) = (splice, &mut c.stream) {
                    self.splice_body(&mut conn, start, remaining, client, timeouts)
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
        };
        match result {
            Ok(p) => {
                out.bytes += p.sent;
                if p.reusable && c.resp.keep_alive {
                    self.pool.put(rid, conn);
                }
            }
            Err((PumpError::Client, sent)) => {
                out.bytes += sent;
                out.keep_alive = false;
            }
            Err((PumpError::Upstream(reason), sent)) => {
                out.bytes += sent;
                self.core
                    .metrics
                    .borrow_mut()
                    .replica_failure(self.mid(rid), reason);
                self.record(rid, Admit::Normal, false);
                drop(conn);
                match framing {
                    Framing::Length(len) => {
                        let resumed = self
                            .resume(c, rid, bucket, encoded_key, out.bytes, len, rest, timeouts)
                            .await;
                        out.bytes = resumed.0;
                        out.keep_alive = out.keep_alive && resumed.1;
                        if let Some(r) = resumed.2 {
                            out.replica = Some(r);
                        }
                    }
                    _ => {
                        log!(
                            Level::Error,
                            "Upstream failed mid-body; closing client connection",
                            bucket = self.shared.bucket(bucket).name,
                            replica = self.replica(rid).name,
                            request_id = c.req.request_id,
                            cause = reason,
                        );
                        out.keep_alive = false;
                    }
                }
            }
        }
        out
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

    /// Continues a Content-Length body that broke after `sent` of `len` bytes.
    /// Returns (bytes sent in total, body complete, replica that finished it).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn resume(
        &self,
        c: &mut Client,
        failed: usize,
        bucket: usize,
        encoded_key: &str,
        mut sent: u64,
        len: u64,
        rest: &[usize],
        timeouts: Timeouts,
    ) -> (u64, bool, Option<usize>) {
        let etag = c.resp.etag.clone();
        // Offset of the body's first byte within the object.
        let base = c.resp.content_range_start.unwrap_or(0);
        let bucket_name = &self.shared.bucket(bucket).name;
        let mut from = failed;
        if etag.is_empty() {
            log!(
                Level::Error,
                "Upstream failed mid-body and the object has no ETag to resume with; closing client connection",
                bucket = bucket_name,
                request_id = c.req.request_id,
            );
            return (sent, false, None);
        }
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
                offset = base + sent,
            );
            self.core
                .metrics
                .borrow_mut()
                .failover(self.mid(from), self.mid(rid));
            let r = Resume {
                first: base + sent,
                last: base + len - 1,
                etag: &etag,
            };
            let original_status = c.resp.status;
            let attempt = self.attempt(c, rid, encoded_key, Some(r)).await;
            let Answer { mut conn, head_len } = match attempt {
                Ok(a) => a,
                Err(f) => {
                    self.core
                        .metrics
                        .borrow_mut()
                        .replica_failure(self.mid(rid), f.reason);
                    self.record(rid, admit, false);
                    from = rid;
                    continue;
                }
            };
            let same = c.resp.status == 206
                && c.resp.etag == etag
                && c.resp.content_range_start == Some(r.first)
                && c.resp.framing() == Framing::Length(r.last - r.first + 1);
            c.resp.status = original_status;
            if !same {
                // 412 (ETag changed) or an unexpected answer: this replica cannot continue the body.
                self.release(rid, admit);
                log!(
                    Level::Warn,
                    "Replica cannot resume the body with the same ETag",
                    bucket = bucket_name,
                    replica = self.replica(rid).name,
                    request_id = c.req.request_id,
                );
                from = rid;
                continue;
            }
            self.record(rid, admit, true);
            self.core.metrics.borrow_mut().resume(self.mid(rid));
            let remaining = r.last - r.first + 1;
            match body::length(
                &mut conn.stream,
                &mut conn.buf,
                head_len,
                remaining,
                &mut c.stream,
                timeouts,
            )
            .await
            {
                Ok(p) => {
                    sent += p.sent;
                    if p.reusable && c.resp.keep_alive {
                        self.pool.put(rid, conn);
                    }
                    return (sent, true, Some(rid));
                }
                Err((PumpError::Client, n)) => return (sent + n, false, Some(rid)),
                Err((PumpError::Upstream(reason), n)) => {
                    sent += n;
                    self.core
                        .metrics
                        .borrow_mut()
                        .replica_failure(self.mid(rid), reason);
                    self.record(rid, Admit::Normal, false);
                    from = rid;
                }
            }
        }
        log!(
            Level::Error,
            "No replica could resume the body; closing client connection",
            bucket = bucket_name,
            request_id = c.req.request_id,
            sent = sent,
            expected = len,
        );
        (sent, false, None)
    }
}
