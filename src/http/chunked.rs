//! Streaming `Transfer-Encoding: chunked` decoder that works in place.
//!
//! `decode` takes whatever bytes arrived, moves the payload bytes to the front
//! of the same buffer and reports how many there are, so a body of any size
//! passes through one fixed buffer. Chunk extensions and trailers are dropped.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Size,
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    TrailerLine,
    EndLf,
    Done,
}

#[derive(Debug, Clone)]
/// Incremental chunked-body decoder (state kept across reads).
pub struct ChunkedDecoder {
    st: St,
    size: u64,
    digits: u8,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder {
            st: St::Size,
            size: 0,
            digits: 0,
        }
    }
}

/// Result of one `decode` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    /// Payload bytes now at `buf[..payload]`.
    pub payload: usize,
    /// Input bytes consumed (less than the input only once `done`).
    pub consumed: usize,
    /// The last chunk and trailers were read.
    pub done: bool,
}

impl ChunkedDecoder {
    /// The last chunk and trailers were read.
    pub fn is_done(&self) -> bool {
        self.st == St::Done
    }

    /// Decodes `buf` in place.
    pub fn decode(&mut self, buf: &mut [u8]) -> Result<Decoded, &'static str> {
        let mut r = 0; // read position
        let mut w = 0; // write position (payload)
        while r < buf.len() && self.st != St::Done {
            let b = buf[r];
            match self.st {
                St::Size => {
                    if let Some(d) = (b as char).to_digit(16) {
                        if self.digits >= 15 {
                            return Err("chunk size too large");
                        }
                        self.size = self.size * 16 + d as u64;
                        self.digits += 1;
                    } else if self.digits == 0 {
                        return Err("missing chunk size");
                    } else if b == b';' || b == b' ' || b == b'\t' {
                        self.st = St::Ext;
                    } else if b == b'\r' {
                        self.st = St::SizeLf;
                    } else if b == b'\n' {
                        self.after_size();
                    } else {
                        return Err("invalid chunk size");
                    }
                    r += 1;
                }
                St::Ext => {
                    if b == b'\n' {
                        self.after_size();
                    }
                    r += 1;
                }
                St::SizeLf => {
                    if b != b'\n' {
                        return Err("invalid chunk size line");
                    }
                    self.after_size();
                    r += 1;
                }
                St::Data => {
                    let n = (self.size as usize).min(buf.len() - r);
                    buf.copy_within(r..r + n, w);
                    r += n;
                    w += n;
                    self.size -= n as u64;
                    if self.size == 0 {
                        self.st = St::DataCr;
                    }
                }
                St::DataCr => {
                    self.st = match b {
                        b'\r' => St::DataLf,
                        b'\n' => St::Size,
                        _ => return Err("missing CRLF after chunk"),
                    };
                    r += 1;
                }
                St::DataLf => {
                    if b != b'\n' {
                        return Err("missing LF after chunk");
                    }
                    self.st = St::Size;
                    r += 1;
                }
                St::TrailerStart => {
                    self.st = match b {
                        b'\r' => St::EndLf,
                        b'\n' => St::Done,
                        _ => St::TrailerLine,
                    };
                    r += 1;
                }
                St::TrailerLine => {
                    if b == b'\n' {
                        self.st = St::TrailerStart;
                    }
                    r += 1;
                }
                St::EndLf => {
                    if b != b'\n' {
                        return Err("invalid end of chunked body");
                    }
                    self.st = St::Done;
                    r += 1;
                }
                St::Done => break,
            }
        }
        Ok(Decoded {
            payload: w,
            consumed: r,
            done: self.st == St::Done,
        })
    }

    fn after_size(&mut self) {
        self.st = if self.size == 0 {
            St::TrailerStart
        } else {
            St::Data
        };
        self.digits = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8], step: usize) -> Result<(Vec<u8>, bool), &'static str> {
        let mut d = ChunkedDecoder::default();
        let mut out = Vec::new();
        for piece in input.chunks(step) {
            let mut buf = piece.to_vec();
            let r = d.decode(&mut buf)?;
            out.extend_from_slice(&buf[..r.payload]);
            if r.done {
                return Ok((out, true));
            }
        }
        Ok((out, false))
    }

    #[test]
    fn decodes_in_any_split() {
        let body = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\n";
        for step in 1..body.len() {
            let (out, done) = decode_all(body, step).unwrap();
            assert_eq!(out, b"hello world", "step {step}");
            assert!(done);
        }
    }

    #[test]
    fn reports_truncation_and_garbage() {
        let (out, done) = decode_all(b"5\r\nhel", 100).unwrap();
        assert_eq!((out.as_slice(), done), (&b"hel"[..], false));
        assert!(decode_all(b"zz\r\n", 100).is_err());
        assert!(decode_all(b"5\r\nhelloXX", 100).is_err());
        assert!(decode_all(b"ffffffffffffffffff\r\n", 100).is_err());
    }
}
