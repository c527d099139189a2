//! A TLS stream of our own over rustls's unbuffered API (issue #28), for
//! client connections and `https://` replicas alike.
//!
//! Why not monoio-rustls: it gives every connection two 16 KiB buffers for
//! the connection's life (an idle TLS client cost 36 KB against nginx's
//! 15 KB), sends one record and one system call per 16 KiB, writes only the
//! first buffer of a vectored write (a response head was a record of its
//! own) and its futures are large enough that ours boxed every TLS read and
//! write. Here:
//! - ciphertext in and out lives in buffers borrowed from the core's pool
//!   ([`super::buffers`]) only while an operation is in flight: an idle
//!   connection holds rustls's state and the socket, nothing else;
//! - a write seals up to four full 16 KiB records and sends them with one
//!   system call; pieces shorter than a record (a head, a small body) are
//!   gathered into one record, never a record each;
//! - a read takes up to 64 KiB of ciphertext per system call and decrypts
//!   the next record straight into the caller's buffer when it fits.
//!
//! rustls runs the handshake ([`TlsStream::drive`] is the one place that
//! runs its state machine). Once a handshake is over (TLS 1.3 or 1.2), the
//! records are ours ([`super::record`]: opened and sealed between the
//! callers' buffers and ours, no allocation per record) and rustls keeps
//! only what needs its secrets: the next keys on a TLS 1.3 key update,
//! and a client's session tickets. Dropping an
//! operation mid-flight while it owned bytes of the stream (ciphertext not
//! yet processed, records not yet sent) leaves the stream broken: every
//! later operation fails rather than send or read a damaged stream.

use super::buffers::{self, MAX_RECORD, RECORDS_PER_IO, RECORD_PLAIN};
use super::record::{self, Keys, PostHandshake, Protection};
use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use monoio::BufResult;
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::kernel::KernelConnection;
use rustls::pki_types::ServerName;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus,
    WriteTraffic,
};
use rustls::{
    ClientConfig, CommonState, ExtractedSecrets, HandshakeKind, ProtocolVersion, ServerConfig,
};
use std::io;
use std::mem::MaybeUninit;
use std::sync::Arc;

/// Ciphertext rustls may hold back while it waits for the rest of a
/// handshake message (a certificate chain split over many records); more
/// than this from a peer is refused.
const MAX_HELD: usize = 1 << 20;

/// Buffers one vectored write takes at most.
const MAX_PARTS: usize = 8;

/// One side of a connection (server or client) as [`TlsStream`] drives it.
pub trait Side {
    /// rustls's per-side connection data.
    type Data;
    /// Runs rustls over the ciphertext in `incoming`.
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    /// The connection's negotiated state.
    fn state(&self) -> &CommonState;
    /// Hands the records over once the handshake is complete: their keys,
    /// and the part of rustls that derives the next ones.
    fn into_kernel(self)
        -> Result<(ExtractedSecrets, KernelConnection<Self::Data>), rustls::Error>;
    /// A TLS 1.3 session ticket the peer sent after the handshake.
    fn ticket(kernel: &mut KernelConnection<Self::Data>, body: &[u8]) -> io::Result<()>;
    /// Whether what is sealed once the handshake is complete may wait for
    /// the first write: a TLS 1.3 server's session tickets may (the client
    /// needs none of them to go on); a client's Finished may not (a
    /// server's accept waits for it), nor a TLS 1.2 server's (the client's
    /// handshake waits for it).
    const HOLDS_POST_HANDSHAKE: bool;
}

impl Side for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, ServerConnectionData> {
        self.process_tls_records(incoming)
    }
    fn state(&self) -> &CommonState {
        self
    }
    fn into_kernel(
        self,
    ) -> Result<(ExtractedSecrets, KernelConnection<ServerConnectionData>), rustls::Error> {
        self.dangerous_into_kernel_connection()
    }
    fn ticket(_: &mut KernelConnection<ServerConnectionData>, _: &[u8]) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "TLS: a client sent a session ticket",
        ))
    }
    const HOLDS_POST_HANDSHAKE: bool = true;
}

impl Side for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, ClientConnectionData> {
        self.process_tls_records(incoming)
    }
    fn state(&self) -> &CommonState {
        self
    }
    fn into_kernel(
        self,
    ) -> Result<(ExtractedSecrets, KernelConnection<ClientConnectionData>), rustls::Error> {
        self.dangerous_into_kernel_connection()
    }
    fn ticket(kernel: &mut KernelConnection<ClientConnectionData>, body: &[u8]) -> io::Result<()> {
        kernel.handle_new_session_ticket(body).map_err(invalid)
    }
    const HOLDS_POST_HANDSHAKE: bool = false;
}

/// A client connection's TLS stream (we are the server).
pub type ServerTls = TlsStream<UnbufferedServerConnection>;
/// An upstream connection's TLS stream (we are the client).
pub type ClientTls = TlsStream<UnbufferedClientConnection>;

/// Accepts TLS clients with one server configuration (shared by every core).
#[derive(Clone)]
pub struct TlsAcceptor(Arc<ServerConfig>);

impl From<Arc<ServerConfig>> for TlsAcceptor {
    /// Secret extraction is switched on (a copy of the config, when it was
    /// off): TLS 1.3 records are ours after the handshake.
    fn from(config: Arc<ServerConfig>) -> Self {
        if config.enable_secret_extraction {
            return TlsAcceptor(config);
        }
        let mut config = (*config).clone();
        config.enable_secret_extraction = true;
        TlsAcceptor(Arc::new(config))
    }
}

impl TlsAcceptor {
    /// Runs the server side of the handshake over `tcp`.
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<ServerTls> {
        let conn = UnbufferedServerConnection::new(self.0.clone()).map_err(invalid)?;
        let mut stream = TlsStream::new(tcp, conn);
        stream.handshake().await?;
        Ok(stream)
    }
}

/// Opens TLS connections with one client configuration; its session store
/// keeps each server's resumption tickets, so a reconnect resumes.
#[derive(Clone)]
pub struct TlsConnector(Arc<ClientConfig>);

impl From<Arc<ClientConfig>> for TlsConnector {
    /// Secret extraction is switched on, as for [`TlsAcceptor`].
    fn from(config: Arc<ClientConfig>) -> Self {
        if config.enable_secret_extraction {
            return TlsConnector(config);
        }
        let mut config = (*config).clone();
        config.enable_secret_extraction = true;
        TlsConnector(Arc::new(config))
    }
}

impl TlsConnector {
    /// Runs the client side of the handshake with `name` over `tcp`.
    pub async fn connect(
        &self,
        name: ServerName<'static>,
        tcp: TcpStream,
    ) -> io::Result<ClientTls> {
        let conn = UnbufferedClientConnection::new(self.0.clone(), name).map_err(invalid)?;
        let mut stream = TlsStream::new(tcp, conn);
        stream.handshake().await?;
        Ok(stream)
    }
}

fn invalid(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// What an operation asks of [`TlsStream::drive`].
enum Want<'a> {
    /// Finish the handshake.
    Handshake,
    /// Plaintext, into this buffer.
    Read(&'a mut [MaybeUninit<u8>]),
    /// Seal these bytes (at most four records' worth of them).
    Write(&'a [&'a [u8]]),
    /// Seal a close_notify alert.
    Close,
}

/// What the operation must do next, as rustls says.
#[derive(Debug, PartialEq, Eq)]
enum Drive {
    /// Records are sealed in the output buffer: send them, then drive again.
    Transmit,
    /// More ciphertext from the peer is needed.
    NeedInput,
    /// This many plaintext bytes were put in the read buffer (more may wait
    /// in `plain`).
    Read(usize),
    /// This many bytes of the write were sealed into the output buffer (for
    /// a close: the alert).
    Sealed(usize),
    /// The handshake is complete.
    Ready,
    /// The peer sent close_notify: no more plaintext comes.
    PeerClosed,
}

/// Who protects the records.
enum Engine<S: Side> {
    /// rustls: the handshake (and the records of a connection the peer
    /// closed before it ended).
    Rustls(S),
    /// [`super::record`], with keys from rustls: a connection after its
    /// handshake (boxed: the rustls state it replaces is freed).
    Own(Box<Own<S::Data>>),
    /// Neither: a hand-over that failed (every operation fails).
    Gone,
}

/// A connection's records, once they are ours.
struct Own<D> {
    /// rustls's remains: the next keys on a key update, a client's tickets.
    kernel: KernelConnection<D>,
    tx: Keys,
    rx: Keys,
    /// A key update of ours goes before the next record we seal (the peer
    /// asked for one, or the key has sealed its share of records).
    update_tx: bool,
    kind: Option<HandshakeKind>,
}

impl<D> Own<D> {
    /// Seals one short message of inner type `typ` as a record of its own
    /// into `out[*out_len..]`.
    fn seal_message(
        &mut self,
        typ: u8,
        msg: &[u8],
        out: &mut Vec<u8>,
        out_len: &mut usize,
    ) -> io::Result<()> {
        room(out, *out_len + msg.len() + self.tx.overhead());
        out[*out_len + self.tx.body_at()..][..msg.len()].copy_from_slice(msg);
        *out_len += self.tx.seal(typ, &mut out[*out_len..], msg.len())?;
        Ok(())
    }

    /// Seals a KeyUpdate under the current key, then moves to the next key
    /// (RFC 8446 4.6.3).
    fn update_tx(&mut self, out: &mut Vec<u8>, out_len: &mut usize) -> io::Result<()> {
        self.seal_message(
            record::HANDSHAKE,
            &record::KEY_UPDATE_NOT_REQUESTED,
            out,
            out_len,
        )?;
        let (seq, secrets) = self.kernel.update_tx_secret().map_err(invalid)?;
        self.tx = Keys::new(seq, secrets, false)?;
        self.update_tx = false;
        Ok(())
    }

    /// Seals the start of `parts` into `out[*out_len..]`, at most four
    /// records' worth: full 16 KiB records sealed straight from a piece
    /// that holds one, shorter pieces copied into place and gathered into
    /// one record. A key update of ours goes first when one is due.
    /// Returns the bytes taken.
    fn seal_data(
        &mut self,
        parts: &[&[u8]],
        out: &mut Vec<u8>,
        out_len: &mut usize,
    ) -> io::Result<usize> {
        let worn = self.tx.seq() >= record::RECORDS_PER_KEY;
        if self.tx.protection() != Protection::Tls13 && worn {
            // TLS 1.2 has no key update: such a connection must end.
            return Err(io::Error::other(
                "TLS 1.2: the key has sealed its share of records",
            ));
        }
        if self.update_tx || worn {
            self.update_tx(out, out_len)?;
        }
        let budget = RECORDS_PER_IO * RECORD_PLAIN;
        let (mut taken, mut filled) = (0, 0);
        for part in parts {
            let mut piece = &part[..part.len().min(budget - taken)];
            taken += piece.len();
            while !piece.is_empty() {
                if filled == 0 && piece.len() >= RECORD_PLAIN {
                    // A whole record in one piece: sealed from where it lies.
                    room(out, *out_len + RECORD_PLAIN + self.tx.overhead());
                    let (whole, rest) = piece.split_at(RECORD_PLAIN);
                    *out_len +=
                        self.tx
                            .seal_from(record::APPLICATION_DATA, whole, &mut out[*out_len..])?;
                    piece = rest;
                    continue;
                }
                let n = (RECORD_PLAIN - filled).min(piece.len());
                let at = *out_len + self.tx.body_at() + filled;
                room(out, at + n + self.tx.overhead());
                out[at..at + n].copy_from_slice(&piece[..n]);
                filled += n;
                piece = &piece[n..];
                if filled == RECORD_PLAIN {
                    *out_len +=
                        self.tx
                            .seal(record::APPLICATION_DATA, &mut out[*out_len..], filled)?;
                    filled = 0;
                }
            }
            if taken == budget {
                break;
            }
        }
        if filled > 0 {
            *out_len += self
                .tx
                .seal(record::APPLICATION_DATA, &mut out[*out_len..], filled)?;
        }
        Ok(taken)
    }
}

/// Grows `out` to at least `len` bytes (a pooled buffer holds four full
/// records and the tickets; more only in a corner).
fn room(out: &mut Vec<u8>, len: usize) {
    if out.len() < len {
        out.resize(len, 0);
    }
}

/// A TLS connection over a monoio TCP stream (see the module's notes).
pub struct TlsStream<S: Side> {
    tcp: TcpStream,
    engine: Engine<S>,
    /// Ciphertext read and not yet consumed by rustls: `incoming[start..]`.
    /// Without capacity (back in the pool) when there is none.
    incoming: Vec<u8>,
    start: usize,
    /// Plaintext decrypted and not yet read: `plain[plain_at..]`.
    plain: Vec<u8>,
    plain_at: usize,
    /// Records sealed and not yet sent: `out[..out_len]` (`out` is a
    /// pooled output buffer only during an operation).
    out: Vec<u8>,
    out_len: usize,
    /// close_notify received: reads end once `plain` is empty.
    peer_closed: bool,
    /// close_notify sealed.
    closed: bool,
    /// An operation was dropped while it owned bytes of the stream.
    broken: bool,
}

impl<S: Side> TlsStream<S> {
    fn new(tcp: TcpStream, conn: S) -> Self {
        TlsStream {
            tcp,
            engine: Engine::Rustls(conn),
            incoming: Vec::new(),
            start: 0,
            plain: Vec::new(),
            plain_at: 0,
            out: Vec::new(),
            out_len: 0,
            peer_closed: false,
            closed: false,
            broken: false,
        }
    }

    /// The TCP stream underneath.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Whether the handshake was full or resumed (`None` before it ends).
    pub fn handshake_kind(&self) -> Option<HandshakeKind> {
        match &self.engine {
            Engine::Rustls(conn) => conn.state().handshake_kind(),
            Engine::Own(own) => own.kind,
            Engine::Gone => None,
        }
    }

    /// Whether the handshake is still under way.
    fn handshaking(&self) -> bool {
        match &self.engine {
            Engine::Rustls(conn) => conn.state().is_handshaking(),
            Engine::Own(_) | Engine::Gone => false,
        }
    }

    /// Whether bytes of the peer's are held here (decrypted or not): a
    /// readiness wait on the socket would miss them.
    pub fn holds_input(&self) -> bool {
        self.plain_at < self.plain.len() || self.start < self.incoming.len()
    }

    fn check(&self) -> io::Result<()> {
        if let Engine::Gone = self.engine {
            return Err(io::Error::other("TLS: the connection's records were lost"));
        }
        if self.broken {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "TLS stream interrupted in the middle of a record",
            ));
        }
        Ok(())
    }

    /// Runs rustls over the ciphertext held until the operation can go on:
    /// handshake records are sealed into `out`, decrypted records delivered
    /// (into the read buffer, the rest kept in `plain`), the write sealed.
    fn drive(&mut self, want: &mut Want<'_>) -> io::Result<Drive> {
        loop {
            let Self {
                engine,
                incoming,
                start,
                plain,
                plain_at,
                out,
                out_len,
                ..
            } = self;
            let Engine::Rustls(conn) = engine else {
                return Err(io::Error::other("TLS: rustls no longer holds the records"));
            };
            let UnbufferedStatus { mut discard, state } = conn.process(&mut incoming[*start..]);
            let step: io::Result<Option<Drive>> = match state {
                Err(e) => Err(invalid(e)),
                Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                    let mut delivered = 0;
                    let mut failed = None;
                    while let Some(record) = traffic.next_record() {
                        match record {
                            Ok(record) => {
                                discard += record.discard;
                                let mut payload = record.payload;
                                if let Want::Read(dst) = want {
                                    let n = payload.len().min(dst.len() - delivered);
                                    copy_into(&mut dst[delivered..delivered + n], &payload[..n]);
                                    delivered += n;
                                    payload = &payload[n..];
                                }
                                keep_plain(plain, plain_at, payload);
                            }
                            Err(e) => {
                                failed = Some(invalid(e));
                                break;
                            }
                        }
                    }
                    match (failed, &want) {
                        (Some(e), _) => Err(e),
                        (None, Want::Read(_)) if delivered > 0 => Ok(Some(Drive::Read(delivered))),
                        // Kept in `plain` for a later read (a pipelined
                        // request that came during a write, say).
                        (None, _) => Ok(None),
                    }
                }
                Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                    take_output(out);
                    loop {
                        match encode.encode(&mut out[*out_len..]) {
                            Ok(n) => {
                                *out_len += n;
                                break Ok(None);
                            }
                            Err(EncodeError::InsufficientSize(InsufficientSizeError {
                                required_size,
                            })) => out.resize(*out_len + required_size, 0),
                            Err(EncodeError::AlreadyEncoded) => break Ok(None),
                        }
                    }
                }
                Ok(ConnectionState::TransmitTlsData(transmit)) => {
                    transmit.done();
                    Ok(Some(Drive::Transmit))
                }
                Ok(ConnectionState::BlockedHandshake) => Ok(Some(Drive::NeedInput)),
                Ok(ConnectionState::WriteTraffic(mut traffic)) => match want {
                    Want::Write(parts) => {
                        take_output(out);
                        seal_parts(&mut traffic, parts, out, out_len)
                            .map(|n| Some(Drive::Sealed(n)))
                    }
                    Want::Close => {
                        take_output(out);
                        seal_close(&mut traffic, out, out_len).map(|()| Some(Drive::Sealed(0)))
                    }
                    Want::Handshake | Want::Read(_) => Ok(Some(Drive::Ready)),
                },
                Ok(ConnectionState::PeerClosed) | Ok(ConnectionState::Closed) => {
                    Ok(Some(Drive::PeerClosed))
                }
                Ok(_) => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "TLS: early data, which this server never accepts",
                )),
            };
            *start += discard;
            if *start >= incoming.len() {
                *start = 0;
                buffers::give_input(std::mem::take(incoming));
            }
            match step? {
                None => continue,
                // The server may write from its Finished on, before the
                // client's has come: the handshake ends with the client's.
                Some(Drive::Ready) if self.handshaking() => return Ok(Drive::NeedInput),
                Some(Drive::PeerClosed) => {
                    self.peer_closed = true;
                    match want {
                        Want::Read(_) => return Ok(Drive::PeerClosed),
                        // A client whose close_notify came with its
                        // Finished completed the handshake: the stream
                        // is whole, its reads at their end.
                        Want::Handshake if !self.handshaking() => return Ok(Drive::Ready),
                        Want::Handshake => {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the peer closed during the TLS handshake",
                            ))
                        }
                        // It may still be written to (edge-triggered: the
                        // next round offers writing).
                        Want::Write(_) | Want::Close if !self.closed => continue,
                        Want::Write(_) | Want::Close => {
                            return Err(io::Error::new(
                                io::ErrorKind::BrokenPipe,
                                "TLS connection closed",
                            ))
                        }
                    }
                }
                Some(d) => return Ok(d),
            }
        }
    }

    /// Sends the sealed records in `out`.
    async fn transmit(&mut self) -> io::Result<()> {
        if self.out_len == 0 {
            return Ok(());
        }
        let out = std::mem::take(&mut self.out);
        let len = std::mem::replace(&mut self.out_len, 0);
        // Dropped mid-send, the peer would see part of a record.
        self.broken = true;
        let (r, slice) = self.tcp.write_all(out.slice(0..len)).await;
        self.broken = false;
        self.out = slice.into_inner();
        r.map(|_| ())
    }

    /// The output buffer back to the pool (an operation's end).
    fn release_output(&mut self) {
        if self.out_len == 0 {
            buffers::give_output(std::mem::take(&mut self.out));
        }
    }

    /// Reads more ciphertext from the socket (at most 64 KiB at a time).
    /// `Ok(0)`: the peer closed the TCP connection.
    async fn fill(&mut self) -> io::Result<usize> {
        let mut buf = std::mem::take(&mut self.incoming);
        if buf.capacity() == 0 {
            buf = buffers::input();
            self.start = 0;
        }
        if buf.capacity() - buf.len() < MAX_RECORD {
            buf.drain(..self.start);
            self.start = 0;
            if buf.capacity() - buf.len() < MAX_RECORD {
                if buf.len() >= MAX_HELD {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "TLS peer sent over 1 MiB that rustls could not yet use",
                    ));
                }
                buf.reserve(MAX_RECORD);
            }
        }
        // Dropped mid-read, ciphertext already held would be lost with the
        // buffer (with none held, nothing is: the stream goes on).
        self.broken = buf.len() > self.start;
        let (len, cap) = (buf.len(), buf.capacity());
        let (r, slice) = self.tcp.read(buf.slice_mut(len..cap)).await;
        self.broken = false;
        let buf = slice.into_inner();
        if buf.len() > self.start {
            self.incoming = buf;
        } else {
            self.start = 0;
            buffers::give_input(buf);
        }
        r
    }

    /// The socket ended (no close_notify): the end of the stream at a
    /// record boundary after the handshake, an error anywhere else.
    fn tcp_eof(&mut self) -> io::Result<usize> {
        if self.start < self.incoming.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "TLS peer closed the connection in the middle of a record",
            ));
        }
        if self.handshaking() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed during the TLS handshake",
            ));
        }
        self.peer_closed = true;
        Ok(0)
    }

    /// Runs the handshake to its end. A server's session tickets, sealed
    /// once the handshake is complete, are held: they leave with the first
    /// write (tickets and the first response in one segment), or before a
    /// read has to wait for the peer (`read_into`), so a client that does
    /// not need them never waits for them, and none is lost.
    async fn handshake(&mut self) -> io::Result<()> {
        loop {
            match self.drive(&mut Want::Handshake)? {
                Drive::Transmit if self.may_hold() => {}
                Drive::Transmit => self.transmit().await?,
                Drive::NeedInput => {
                    self.transmit().await?;
                    if self.fill().await? == 0 {
                        self.tcp_eof()?;
                    }
                }
                Drive::Ready => break,
                other => return Err(unexpected(other)),
            }
        }
        if !self.may_hold() {
            self.transmit().await?;
        }
        self.release_output();
        self.take_records()
    }

    /// Whether the records sealed now may wait for the first write (see
    /// [`Side::HOLDS_POST_HANDSHAKE`]).
    fn may_hold(&self) -> bool {
        S::HOLDS_POST_HANDSHAKE
            && !self.handshaking()
            && self.version() == Some(ProtocolVersion::TLSv1_3)
    }

    /// The protocol version once negotiated.
    fn version(&self) -> Option<ProtocolVersion> {
        match &self.engine {
            Engine::Rustls(conn) => conn.state().protocol_version(),
            Engine::Own(own) => Some(match own.tx.protection() {
                Protection::Tls13 => ProtocolVersion::TLSv1_3,
                Protection::Tls12Gcm | Protection::Tls12Chacha => ProtocolVersion::TLSv1_2,
            }),
            Engine::Gone => None,
        }
    }

    /// The connection's records become ours (rustls has nothing left to
    /// send: the handshake ended in its WriteTraffic state, and a TLS 1.3
    /// server's tickets are already sealed, held in `out`); one the peer
    /// already closed stays with rustls.
    fn take_records(&mut self) -> io::Result<()> {
        let Engine::Rustls(conn) = &self.engine else {
            return Ok(());
        };
        let tls12 = match self.version() {
            Some(ProtocolVersion::TLSv1_3) => false,
            Some(ProtocolVersion::TLSv1_2) => true,
            _ => return Ok(()),
        };
        if self.peer_closed {
            return Ok(());
        }
        let kind = conn.state().handshake_kind();
        let Engine::Rustls(conn) = std::mem::replace(&mut self.engine, Engine::Gone) else {
            return Ok(());
        };
        let (secrets, kernel) = conn.into_kernel().map_err(invalid)?;
        let (tx_seq, tx) = secrets.tx;
        let (rx_seq, rx) = secrets.rx;
        self.engine = Engine::Own(Box::new(Own {
            kernel,
            tx: Keys::new(tx_seq, tx, tls12)?,
            rx: Keys::new(rx_seq, rx, tls12)?,
            update_tx: false,
            kind,
        }));
        Ok(())
    }

    /// Opens the complete records held into `dst` while it has room (what
    /// a record brings beyond it is kept in `plain`): `Some(n)` bytes read,
    /// `Some(0)` at close_notify with none, `None` when more ciphertext is
    /// needed for any. A record `dst` has room for is decrypted straight
    /// into it; one it has not, in place, then copied. Key updates and
    /// tickets are handled on the way.
    fn open_records(&mut self, dst: &mut [MaybeUninit<u8>]) -> io::Result<Option<usize>> {
        let Self {
            engine: Engine::Own(own),
            incoming,
            start,
            plain,
            plain_at,
            peer_closed,
            ..
        } = self
        else {
            return Err(io::Error::other("TLS: the records are rustls's"));
        };
        let mut delivered = 0;
        let got = loop {
            if delivered == dst.len() {
                break Some(delivered);
            }
            let held = &mut incoming[*start..];
            let Some(len) = own.rx.complete(held)? else {
                break (delivered > 0).then_some(delivered);
            };
            let inner = own.rx.plain_len(len);
            if inner <= dst.len() - delivered {
                let out = &mut dst[delivered..delivered + inner];
                // SAFETY: every bit pattern is a valid u8, and these bytes
                // are written by the AEAD before anything reads them (a
                // reader sees only the `delivered` bytes); the slice lives
                // only for this iteration.
                let out = unsafe { &mut *(out as *mut [MaybeUninit<u8>] as *mut [u8]) };
                let (typ, n) = own.rx.open_into(&held[..len], out)?;
                *start += len;
                if typ == record::APPLICATION_DATA {
                    delivered += n;
                } else if control::<S>(own, typ, &out[..n], peer_closed)? {
                    break Some(delivered);
                }
                continue;
            }
            let (typ, range) = own.rx.open(&mut held[..len])?;
            *start += len;
            let content = &held[range];
            if typ == record::APPLICATION_DATA {
                let n = content.len().min(dst.len() - delivered);
                copy_into(&mut dst[delivered..delivered + n], &content[..n]);
                delivered += n;
                if n < content.len() {
                    keep_plain(plain, plain_at, &content[n..]);
                    break Some(delivered);
                }
            } else if control::<S>(own, typ, content, peer_closed)? {
                break Some(delivered);
            }
        };
        if *start >= incoming.len() {
            *start = 0;
            buffers::give_input(std::mem::take(incoming));
        }
        Ok(got)
    }

    /// Seals what `want` asks (a write or a close_notify) with our own
    /// records into `out`; for a write, returns the bytes taken.
    fn seal_own(&mut self, want: Want<'_>) -> io::Result<usize> {
        let Self {
            engine: Engine::Own(own),
            out,
            out_len,
            ..
        } = self
        else {
            return Err(io::Error::other("TLS: the records are rustls's"));
        };
        take_output(out);
        match want {
            Want::Write(parts) => own.seal_data(parts, out, out_len),
            Want::Close => own
                .seal_message(record::ALERT, &record::CLOSE_NOTIFY, out, out_len)
                .map(|()| 0),
            Want::Handshake | Want::Read(_) => Err(io::Error::other("TLS: nothing to seal")),
        }
    }

    /// Reads plaintext into `cap` bytes at `dst`; `Ok(0)` only at the end.
    async fn read_into(&mut self, dst: *mut u8, cap: usize) -> io::Result<usize> {
        self.check()?;
        if cap == 0 {
            return Ok(0);
        }
        loop {
            if self.plain_at < self.plain.len() {
                let n = (self.plain.len() - self.plain_at).min(cap);
                // SAFETY: the caller's buffer is valid for writes of `cap`
                // bytes (IoBufMut's contract) and `n <= cap`; it does not
                // overlap `plain`, which is ours.
                unsafe {
                    std::ptr::copy_nonoverlapping(self.plain.as_ptr().add(self.plain_at), dst, n)
                };
                self.plain_at += n;
                if self.plain_at == self.plain.len() {
                    self.plain_at = 0;
                    buffers::give_input(std::mem::take(&mut self.plain));
                }
                return Ok(n);
            }
            if self.peer_closed {
                return Ok(0);
            }
            // SAFETY: as above; the slice is written, never read, through
            // MaybeUninit, and lives only for this call.
            let dst_slice = unsafe { std::slice::from_raw_parts_mut(dst.cast(), cap) };
            if let Engine::Own(_) = self.engine {
                match self.open_records(dst_slice) {
                    Ok(Some(n)) => return Ok(n),
                    Ok(None) => {}
                    // Fatal (RFC 8446 6): nothing more is read or sent.
                    Err(e) => {
                        self.engine = Engine::Gone;
                        return Err(e);
                    }
                }
                // Held tickets leave before the wait.
                self.transmit().await?;
                self.release_output();
                if self.fill().await? == 0 {
                    return self.tcp_eof();
                }
                continue;
            }
            match self.drive(&mut Want::Read(dst_slice))? {
                Drive::Read(n) => {
                    self.release_output();
                    return Ok(n);
                }
                Drive::Transmit => self.transmit().await?,
                Drive::NeedInput | Drive::Ready => {
                    self.transmit().await?;
                    self.release_output();
                    if self.fill().await? == 0 {
                        return self.tcp_eof();
                    }
                }
                Drive::PeerClosed => {}
                other => return Err(unexpected(other)),
            }
        }
    }

    /// Seals and sends the start of `parts` (up to four records); returns
    /// how many bytes of them went.
    async fn write_parts(&mut self, parts: &[&[u8]]) -> io::Result<usize> {
        self.check()?;
        if parts.iter().all(|p| p.is_empty()) {
            return Ok(0);
        }
        if let Engine::Own(_) = self.engine {
            let n = self.seal_own(Want::Write(parts))?;
            self.transmit().await?;
            self.release_output();
            return Ok(n);
        }
        loop {
            match self.drive(&mut Want::Write(parts))? {
                Drive::Sealed(n) => {
                    self.transmit().await?;
                    self.release_output();
                    return Ok(n);
                }
                Drive::Transmit => self.transmit().await?,
                Drive::NeedInput => {
                    if self.fill().await? == 0 {
                        self.tcp_eof()?;
                    }
                }
                other => return Err(unexpected(other)),
            }
        }
    }

    /// Sends close_notify (once), then the FIN.
    async fn close(&mut self) -> io::Result<()> {
        if !self.broken && !self.closed && !self.handshaking() {
            match self.engine {
                Engine::Own(_) => {
                    self.seal_own(Want::Close)?;
                    self.closed = true;
                }
                Engine::Rustls(_) => {
                    if let Drive::Sealed(_) = self.drive(&mut Want::Close)? {
                        self.closed = true;
                    }
                }
                Engine::Gone => {}
            }
            self.transmit().await?;
            self.release_output();
        }
        self.tcp.shutdown().await
    }
}

fn unexpected(d: Drive) -> io::Error {
    io::Error::other(format!("TLS: unexpected state {d:?}"))
}

/// A record of ours that is not application data: an alert (`Ok(true)`
/// at close_notify: nothing more will be read) or post-handshake messages
/// (key updates followed, tickets kept); any other type is an error.
fn control<S: Side>(
    own: &mut Own<S::Data>,
    typ: u8,
    content: &[u8],
    peer_closed: &mut bool,
) -> io::Result<bool> {
    match typ {
        record::ALERT => {
            let closed = record::alert(content)?;
            *peer_closed |= closed;
            Ok(closed)
        }
        record::HANDSHAKE if own.rx.protection() != Protection::Tls13 => {
            record::tls12_post_handshake(content)?;
            Ok(false)
        }
        record::HANDSHAKE => {
            for message in record::post_handshake(content)? {
                match message {
                    PostHandshake::KeyUpdate { update_requested } => {
                        let (seq, secrets) = own.kernel.update_rx_secret().map_err(invalid)?;
                        own.rx = Keys::new(seq, secrets, false)?;
                        own.update_tx |= update_requested;
                    }
                    PostHandshake::NewSessionTicket(body) => S::ticket(&mut own.kernel, body)?,
                }
            }
            Ok(false)
        }
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("TLS: a record of content type {other}"),
        )),
    }
}

/// Copies `src` into the start of `dst` (`dst.len() == src.len()`).
fn copy_into(dst: &mut [MaybeUninit<u8>], src: &[u8]) {
    debug_assert_eq!(dst.len(), src.len());
    // SAFETY: both are valid for `src.len()` bytes (the lengths match) and
    // distinct (one is rustls's record, the other the caller's buffer);
    // writing u8s through MaybeUninit needs no initialisation first.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr().cast(), src.len()) };
}

/// Keeps `payload` in `plain` for later reads.
fn keep_plain(plain: &mut Vec<u8>, plain_at: &mut usize, payload: &[u8]) {
    if payload.is_empty() {
        return;
    }
    if plain.capacity() == 0 {
        *plain = buffers::input();
    } else if *plain_at > 0 && plain.capacity() - plain.len() < payload.len() {
        plain.drain(..*plain_at);
        *plain_at = 0;
    }
    plain.extend_from_slice(payload);
}

/// An output buffer for this operation, if it has none yet.
fn take_output(out: &mut Vec<u8>) {
    if out.is_empty() {
        *out = buffers::output();
    }
}

/// Seals the start of `parts`, at most four records' worth, into
/// `out[out_len..]`: full 16 KiB records, pieces shorter than a record
/// gathered into one (a head and a small body: one record). Returns the
/// plaintext bytes taken.
fn seal_parts<D>(
    traffic: &mut WriteTraffic<'_, D>,
    parts: &[&[u8]],
    out: &mut Vec<u8>,
    out_len: &mut usize,
) -> io::Result<usize> {
    let budget = RECORDS_PER_IO * RECORD_PLAIN;
    let mut stage = [0u8; RECORD_PLAIN];
    let mut staged = 0;
    let mut taken = 0;
    for part in parts {
        let mut piece = &part[..part.len().min(budget - taken)];
        taken += piece.len();
        if staged > 0 || piece.len() < RECORD_PLAIN {
            let n = (RECORD_PLAIN - staged).min(piece.len());
            stage[staged..staged + n].copy_from_slice(&piece[..n]);
            staged += n;
            piece = &piece[n..];
            if staged == RECORD_PLAIN {
                seal(traffic, &stage, out, out_len)?;
                staged = 0;
            }
        }
        if !piece.is_empty() {
            let whole = piece.len() / RECORD_PLAIN * RECORD_PLAIN;
            seal(traffic, &piece[..whole], out, out_len)?;
            let rest = &piece[whole..];
            stage[..rest.len()].copy_from_slice(rest);
            staged = rest.len();
        }
        if taken == budget {
            break;
        }
    }
    seal(traffic, &stage[..staged], out, out_len)?;
    Ok(taken)
}

/// Seals `data` (rustls cuts it into records) into `out[out_len..]`.
fn seal<D>(
    traffic: &mut WriteTraffic<'_, D>,
    data: &[u8],
    out: &mut Vec<u8>,
    out_len: &mut usize,
) -> io::Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    loop {
        match traffic.encrypt(data, &mut out[*out_len..]) {
            Ok(n) => {
                *out_len += n;
                return Ok(());
            }
            Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size })) => {
                out.resize(*out_len + required_size, 0)
            }
            Err(e) => return Err(io::Error::other(format!("TLS: {e}"))),
        }
    }
}

/// Seals a close_notify alert into `out[out_len..]`.
fn seal_close<D>(
    traffic: &mut WriteTraffic<'_, D>,
    out: &mut Vec<u8>,
    out_len: &mut usize,
) -> io::Result<()> {
    loop {
        match traffic.queue_close_notify(&mut out[*out_len..]) {
            Ok(n) => {
                *out_len += n;
                return Ok(());
            }
            Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size })) => {
                out.resize(*out_len + required_size, 0)
            }
            Err(e) => return Err(io::Error::other(format!("TLS: {e}"))),
        }
    }
}

impl<S: Side> Drop for TlsStream<S> {
    fn drop(&mut self) {
        buffers::give_input(std::mem::take(&mut self.incoming));
        buffers::give_input(std::mem::take(&mut self.plain));
        buffers::give_output(std::mem::take(&mut self.out));
    }
}

impl<S: Side> AsyncReadRent for TlsStream<S> {
    async fn read<B: IoBufMut>(&mut self, mut buf: B) -> BufResult<usize, B> {
        let (ptr, cap) = (buf.write_ptr(), buf.bytes_total());
        match self.read_into(ptr, cap).await {
            Ok(n) => {
                // SAFETY: `read_into` wrote `n` bytes at the buffer's start.
                unsafe { buf.set_init(n) };
                (Ok(n), buf)
            }
            Err(e) => (Err(e), buf),
        }
    }

    async fn readv<B: IoVecBufMut>(&mut self, mut buf: B) -> BufResult<usize, B> {
        // The first non-empty buffer only (a short read is a read).
        let (ptr, count) = (buf.write_iovec_ptr(), buf.write_iovec_len());
        // SAFETY: IoVecBufMut's contract: `count` iovecs at `ptr`.
        let iovecs = unsafe { std::slice::from_raw_parts(ptr, count) };
        let Some(first) = iovecs.iter().find(|v| v.iov_len > 0) else {
            return (Ok(0), buf);
        };
        let (base, len) = (first.iov_base.cast::<u8>(), first.iov_len);
        let before: usize = iovecs
            .iter()
            .take_while(|v| v.iov_len == 0)
            .map(|v| v.iov_len)
            .sum();
        match self.read_into(base, len).await {
            Ok(n) => {
                // SAFETY: the first `before + n` bytes of the vector are written.
                unsafe { buf.set_init(before + n) };
                (Ok(n), buf)
            }
            Err(e) => (Err(e), buf),
        }
    }
}

impl<S: Side> AsyncWriteRent for TlsStream<S> {
    async fn write<B: IoBuf>(&mut self, buf: B) -> BufResult<usize, B> {
        // SAFETY: IoBuf's contract: `bytes_init` bytes at `read_ptr`, at a
        // stable address while `buf` lives (it lives in this future).
        let bytes = unsafe { std::slice::from_raw_parts(buf.read_ptr(), buf.bytes_init()) };
        let r = self.write_parts(&[bytes]).await;
        (r, buf)
    }

    async fn writev<B: IoVecBuf>(&mut self, buf: B) -> BufResult<usize, B> {
        let mut parts: [&[u8]; MAX_PARTS] = [&[]; MAX_PARTS];
        let (ptr, count) = (buf.read_iovec_ptr(), buf.read_iovec_len());
        // SAFETY: IoVecBuf's contract: `count` iovecs at `ptr`, each valid
        // for its length while `buf` lives (it lives in this future).
        let iovecs = unsafe { std::slice::from_raw_parts(ptr, count) };
        for (part, v) in parts.iter_mut().zip(iovecs) {
            // SAFETY: as above.
            *part = unsafe { std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len) };
        }
        let r = self.write_parts(&parts[..count.min(MAX_PARTS)]).await;
        (r, buf)
    }

    async fn flush(&mut self) -> io::Result<()> {
        // Nothing is kept back: every write is sent before it returns.
        self.check()
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        self.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{loopback_pair, run};
    use monoio::io::{AsyncReadRentExt, AsyncWriteRentExt};
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A server and a client config over one self-signed certificate.
    fn configs() -> (TlsAcceptor, TlsConnector, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&c, cert.pem()).expect("cert file");
        std::fs::write(&k, key.serialize_pem()).expect("key file");
        let (c, k) = (c.display().to_string(), k.display().to_string());
        let acceptor = super::super::acceptor(&c, &k).expect("acceptor");
        let connector = TlsConnector::from(super::super::pinned_config(&c).expect("client"));
        (acceptor, connector, dir)
    }

    /// A monoio listener on a loopback port, and its address.
    fn listen() -> (monoio::net::TcpListener, std::net::SocketAddr) {
        let listener = monoio::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        (listener, addr)
    }

    fn name() -> ServerName<'static> {
        ServerName::try_from("localhost").expect("name")
    }

    /// A connected (client, server) TLS pair over loopback.
    async fn pair() -> (ClientTls, ServerTls) {
        let (acceptor, connector, _dir) = configs();
        let (a, b) = loopback_pair().await;
        let server = monoio::spawn(async move { acceptor.accept(b).await });
        let client = connector
            .connect(name(), a)
            .await
            .expect("client handshake");
        let server = server.await.expect("server handshake");
        (client, server)
    }

    /// Bytes pass between two threads, the records from client to server
    /// counted from their headers.
    struct Tap {
        addr: std::net::SocketAddr,
        records: Arc<AtomicUsize>,
    }

    fn tap(to: std::net::SocketAddr) -> Tap {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let records = Arc::new(AtomicUsize::new(0));
        let counted = records.clone();
        std::thread::spawn(move || {
            let Ok((mut client, _)) = listener.accept() else {
                return;
            };
            let Ok(mut server) = std::net::TcpStream::connect(to) else {
                return;
            };
            let (mut c2, mut s2) = (
                client.try_clone().expect("clone"),
                server.try_clone().expect("clone"),
            );
            std::thread::spawn(move || std::io::copy(&mut s2, &mut c2));
            // Client to server, record by record.
            loop {
                let mut head = [0u8; 5];
                if client.read_exact(&mut head).is_err() {
                    let _ = server.shutdown(std::net::Shutdown::Write);
                    return;
                }
                let len = u16::from_be_bytes([head[3], head[4]]) as usize;
                let mut body = vec![0u8; len];
                if client.read_exact(&mut body).is_err() {
                    return;
                }
                counted.fetch_add(1, Ordering::SeqCst);
                if server
                    .write_all(&head)
                    .and_then(|_| server.write_all(&body))
                    .is_err()
                {
                    return;
                }
            }
        });
        Tap { addr, records }
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn bytes_of_every_size_arrive_intact_both_ways_into_small_and_large_buffers() {
        run(async {
            let (mut client, mut server) = pair().await;
            for size in [1, 1000, 16_384, 16_385, 100_000, 1 << 20] {
                let sent = pattern(size);
                let (r, _) = client.write_all(sent.clone()).await;
                r.expect("client write");
                // Small reads: records larger than the buffer wait in `plain`.
                let mut got = Vec::new();
                while got.len() < size {
                    let (r, buf) = server.read(Vec::with_capacity(1000)).await;
                    assert!(r.expect("server read") > 0);
                    got.extend_from_slice(&buf);
                }
                assert_eq!(got, sent, "{size} bytes to the server");
                let (r, _) = server.write_all(sent.clone()).await;
                r.expect("server write");
                let (r, back) = client.read_exact(vec![0u8; size]).await;
                r.expect("client read");
                assert_eq!(back, sent, "{size} bytes to the client");
            }
        });
    }

    #[test]
    fn an_idle_connection_holds_no_buffer() {
        run(async {
            let (mut client, mut server) = pair().await;
            let (r, _) = client.write_all(pattern(70_000)).await;
            r.expect("write");
            let (r, _) = server.read_exact(vec![0u8; 70_000]).await;
            r.expect("read");
            let (r, _) = server.write_all(pattern(200_000)).await;
            r.expect("write");
            let (r, _) = client.read_exact(vec![0u8; 200_000]).await;
            r.expect("read");
            for (side, held) in [
                (
                    "server",
                    server.incoming.capacity() + server.plain.capacity() + server.out.capacity(),
                ),
                (
                    "client",
                    client.incoming.capacity() + client.plain.capacity() + client.out.capacity(),
                ),
            ] {
                assert_eq!(held, 0, "{side} still holds buffers");
            }
            let (input, output) = buffers::pooled();
            assert!(input > 0 && output > 0, "buffers went back to the pool");
        });
    }

    #[test]
    fn a_head_and_a_small_body_are_one_record_and_a_large_body_full_records() {
        run(async {
            let (acceptor, connector, _dir) = configs();
            let (listener, addr) = listen();
            let tap = tap(addr);
            let server = monoio::spawn(async move {
                let (tcp, _) = listener.accept().await.expect("accept");
                acceptor.accept(tcp).await
            });
            let tcp = monoio::net::TcpStream::connect(tap.addr)
                .await
                .expect("connect");
            let mut client = connector.connect(name(), tcp).await.expect("handshake");
            let mut server = server.await.expect("server handshake");
            // The handshake's records have passed once the server has a byte.
            let (r, _) = client.write_all(vec![b'x']).await;
            r.expect("write");
            let (r, _) = server.read_exact(vec![0u8; 1]).await;
            r.expect("read");
            let before = tap.records.load(Ordering::SeqCst);

            let head = pattern(300);
            let body = pattern(1000);
            let (r, _) = client
                .writev(monoio::buf::VecBuf::from(vec![head.clone(), body.clone()]))
                .await;
            assert_eq!(r.expect("writev"), 1300);
            let (r, got) = server.read_exact(vec![0u8; 1300]).await;
            r.expect("read");
            assert_eq!(&got[..300], &head[..]);
            assert_eq!(&got[300..], &body[..]);
            assert_eq!(tap.records.load(Ordering::SeqCst) - before, 1, "one record");

            // 300 + 65,236 bytes: four full records, nothing smaller (a
            // write takes four records' worth at most).
            let body = pattern(65_236);
            let both = monoio::buf::VecBuf::from(vec![head.clone(), body.clone()]);
            let (r, _) = client.writev(both).await;
            assert_eq!(r.expect("writev"), 4 * RECORD_PLAIN);
            let (r, got) = server.read_exact(vec![0u8; 65_536]).await;
            r.expect("read");
            assert_eq!(&got[300..], &body[..]);
            assert_eq!(tap.records.load(Ordering::SeqCst) - before, 1 + 4);
        });
    }

    /// A handshake over loopback with these configs: (client, server).
    async fn handshake_with(
        acceptor: &TlsAcceptor,
        connector: &TlsConnector,
    ) -> (ClientTls, ServerTls) {
        let (a, b) = loopback_pair().await;
        let acceptor = acceptor.clone();
        let accepted = monoio::spawn(async move { acceptor.accept(b).await });
        let client = connector
            .connect(name(), a)
            .await
            .expect("client handshake");
        (client, accepted.await.expect("server handshake"))
    }

    #[test]
    fn session_tickets_leave_with_the_first_write_or_before_a_read_waits() {
        run(async {
            // Held after the handshake; sent with the first response (a
            // client that got them resumes with one).
            let (acceptor, connector, _dir) = configs();
            let (mut client, mut server) = handshake_with(&acceptor, &connector).await;
            assert!(
                server.out_len > 0,
                "the tickets are held after the handshake"
            );
            let (r, _) = server.write_all(b"response".to_vec()).await;
            r.expect("write");
            assert_eq!(server.out_len, 0, "the tickets left with the response");
            let (r, got) = client.read_exact(vec![0u8; 8]).await;
            r.expect("read");
            assert_eq!(got, b"response");
            let (again, _) = handshake_with(&acceptor, &connector).await;
            assert_eq!(again.handshake_kind(), Some(HandshakeKind::Resumed));

            // A read that has to wait sends them first.
            let (acceptor, connector, _dir) = configs();
            let (mut client, mut server) = handshake_with(&acceptor, &connector).await;
            assert!(server.out_len > 0);
            let waited = monoio::time::timeout(
                std::time::Duration::from_millis(20),
                server.read(Vec::with_capacity(10)),
            )
            .await;
            assert!(waited.is_err(), "nothing was sent");
            assert_eq!(server.out_len, 0, "the tickets left before the read waited");
            let (r, _) = client.write_all(b"ping".to_vec()).await;
            r.expect("write");
            let (r, _) = server.read_exact(vec![0u8; 4]).await;
            r.expect("read");
            let (r, _) = server.write_all(b"pong".to_vec()).await;
            r.expect("write");
            let (r, _) = client.read_exact(vec![0u8; 4]).await;
            r.expect("read");
            let (again, _) = handshake_with(&acceptor, &connector).await;
            assert_eq!(again.handshake_kind(), Some(HandshakeKind::Resumed));
        });
    }

    #[test]
    fn a_client_that_closes_with_its_finished_completed_the_handshake() {
        run(async {
            let (acceptor, connector, _dir) = configs();
            let (listener, addr) = listen();
            let config = connector.0.clone();
            // rustls's buffered client on a thread: its Finished and its
            // close_notify leave in one write, so they arrive together.
            let client = std::thread::spawn(move || {
                let mut tcp = std::net::TcpStream::connect(addr).expect("connect");
                let mut conn = rustls::ClientConnection::new(config, name()).expect("client");
                while conn.is_handshaking() {
                    while conn.wants_write() {
                        conn.write_tls(&mut tcp).expect("write");
                    }
                    conn.read_tls(&mut tcp).expect("read");
                    conn.process_new_packets().expect("server flight");
                }
                conn.send_close_notify();
                let mut both = Vec::new();
                while conn.wants_write() {
                    conn.write_tls(&mut both).expect("buffer");
                }
                tcp.write_all(&both).expect("finished and close_notify");
                let mut rest = Vec::new();
                let _ = tcp.read_to_end(&mut rest);
            });
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut server = acceptor.accept(tcp).await.expect("a completed handshake");
            let (r, _) = server.read(Vec::with_capacity(10)).await;
            assert_eq!(r.expect("a clean end"), 0);
            server.shutdown().await.expect("close");
            drop(server);
            client.join().expect("client thread");
        });
    }

    #[test]
    fn a_pipelined_message_read_during_a_write_is_kept_for_the_next_read() {
        run(async {
            let (mut client, mut server) = pair().await;
            let (r, _) = client.write_all(b"first-request".to_vec()).await;
            r.expect("write");
            let (r, _) = client.write_all(b"second".to_vec()).await;
            r.expect("write");
            let (r, first) = server.read_exact(vec![0u8; 13]).await;
            r.expect("read");
            assert_eq!(first, b"first-request");
            // Whatever of the second request came with the first, rustls
            // hands over while the server writes; it stays for the read.
            let (r, _) = server.write_all(pattern(50_000)).await;
            r.expect("write");
            let (r, second) = server.read(Vec::with_capacity(100)).await;
            assert_eq!(r.expect("read"), 6);
            assert_eq!(second, b"second");
        });
    }

    #[test]
    fn close_notify_is_the_end_and_a_cut_record_is_an_error() {
        run(async {
            let (mut client, mut server) = pair().await;
            client.shutdown().await.expect("close");
            let (r, _) = server.read(Vec::with_capacity(10)).await;
            assert_eq!(r.expect("clean end"), 0);

            // A FIN in the middle of a record: an error, never an end.
            let (acceptor, _connector, _dir) = configs();
            let (mut a, b) = loopback_pair().await;
            let server = monoio::spawn(async move { acceptor.accept(b).await });
            // A record header promising 100 bytes, then 3 of them and FIN.
            let (r, _) = a.write_all(vec![22u8, 3, 1, 0, 100, 1, 2, 3]).await;
            r.expect("write");
            a.shutdown().await.expect("fin");
            let e = server.await.err().expect("a cut handshake fails");
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
        });
    }

    #[test]
    fn bytes_that_are_not_tls_fail_the_handshake_with_an_error() {
        run(async {
            let (acceptor, _connector, _dir) = configs();
            let (mut a, b) = loopback_pair().await;
            let server = monoio::spawn(async move { acceptor.accept(b).await });
            let (r, _) = a
                .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec())
                .await;
            r.expect("write");
            let e = server.await.err().expect("not TLS");
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        });
    }

    fn owned<S: Side>(s: &TlsStream<S>) -> bool {
        matches!(s.engine, Engine::Own(_))
    }

    fn tx_seq<S: Side>(s: &TlsStream<S>) -> u64 {
        match &s.engine {
            Engine::Own(own) => own.tx.seq(),
            _ => u64::MAX,
        }
    }

    /// rustls's buffered server on a thread, over the acceptor's config:
    /// for each connection, it sends `size` bytes, updates its keys
    /// (asking for ours), sends them again, then echoes what comes.
    fn rustls_server(config: Arc<ServerConfig>, size: usize, conns: usize) -> std::net::SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            for _ in 0..conns {
                let Ok((tcp, _)) = listener.accept() else {
                    return;
                };
                let conn = rustls::ServerConnection::new(config.clone()).expect("server");
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let run = (|| -> io::Result<()> {
                    tls.write_all(&pattern(size))?;
                    tls.conn.refresh_traffic_keys().map_err(io::Error::other)?;
                    tls.write_all(&pattern(size))?;
                    let mut back = vec![0u8; size];
                    tls.read_exact(&mut back)?;
                    tls.write_all(&back)?;
                    tls.conn.send_close_notify();
                    tls.flush()
                })();
                let _ = run;
            }
        });
        addr
    }

    /// rustls's configs (server, client) that speak only TLS 1.2 with one
    /// cipher suite, trusting and using the certificate in `dir`.
    fn tls12_only(
        dir: &tempfile::TempDir,
        suite: rustls::CipherSuite,
    ) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
        use rustls::pki_types::pem::PemObject;
        let c = dir.path().join("c.pem").display().to_string();
        let certs = super::super::load_pem_certs(&c).expect("certs");
        let key =
            rustls::pki_types::PrivateKeyDer::from_pem_file(dir.path().join("k.pem")).expect("key");
        let mut provider = (*super::super::provider()).clone();
        provider.cipher_suites.retain(|s| s.suite() == suite);
        assert_eq!(provider.cipher_suites.len(), 1, "{suite:?}");
        let provider = Arc::new(provider);
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .expect("TLS 1.2")
            .with_no_client_auth()
            .with_single_cert(certs.clone(), key)
            .expect("config");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(certs[0].clone()).expect("root");
        let client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS12])
            .expect("TLS 1.2")
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    /// rustls's side of a TLS 1.2 exchange: it echoes `size` bytes, then
    /// sends `size + 1` of its own (close_notify is the caller's).
    fn echo_then_send(tls: &mut (impl Read + Write), size: usize) -> io::Result<()> {
        let mut got = vec![0u8; size];
        tls.read_exact(&mut got)?;
        tls.write_all(&got)?;
        tls.write_all(&pattern(size + 1))
    }

    #[test]
    fn tls12_connections_are_ours_too_and_interwork_with_rustls_records_for_each_suite() {
        run(async {
            let (client, server) = pair().await;
            assert!(owned(&client) && owned(&server), "TLS 1.3: our records");
            assert_eq!(client.version(), Some(ProtocolVersion::TLSv1_3));

            let (acceptor, _, dir) = configs();
            let size = 40_000;
            for suite in [
                rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            ] {
                let (server_config, client_config) = tls12_only(&dir, suite);

                // Our client, rustls's TLS 1.2 server.
                let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
                let addr = listener.local_addr().expect("addr");
                let peer = std::thread::spawn(move || -> io::Result<()> {
                    let (tcp, _) = listener.accept()?;
                    let conn =
                        rustls::ServerConnection::new(server_config).map_err(io::Error::other)?;
                    let mut tls = rustls::StreamOwned::new(conn, tcp);
                    echo_then_send(&mut tls, size)?;
                    tls.conn.send_close_notify();
                    tls.flush()
                });
                let tcp = monoio::net::TcpStream::connect(addr)
                    .await
                    .expect("connect");
                let mut ours = TlsConnector::from(client_config.clone())
                    .connect(name(), tcp)
                    .await
                    .expect("handshake");
                assert!(owned(&ours), "{suite:?}: our records");
                assert_eq!(ours.version(), Some(ProtocolVersion::TLSv1_2));
                exchange_with_tls12_peer(&mut ours, size, suite).await;
                peer.join().expect("peer thread").expect("rustls server");

                // rustls's TLS 1.2 client, our server.
                let (listener, addr) = listen();
                let peer = std::thread::spawn(move || -> io::Result<()> {
                    let tcp = std::net::TcpStream::connect(addr)?;
                    let conn = rustls::ClientConnection::new(client_config, name())
                        .map_err(io::Error::other)?;
                    let mut tls = rustls::StreamOwned::new(conn, tcp);
                    echo_then_send(&mut tls, size)?;
                    tls.conn.send_close_notify();
                    tls.flush()
                });
                let (tcp, _) = listener.accept().await.expect("accept");
                let mut ours = acceptor.accept(tcp).await.expect("handshake");
                assert!(owned(&ours), "{suite:?}: our records");
                assert_eq!(ours.version(), Some(ProtocolVersion::TLSv1_2));
                exchange_with_tls12_peer(&mut ours, size, suite).await;
                peer.join().expect("peer thread").expect("rustls client");
            }
        });
    }

    /// Our side of [`echo_then_send`]: `size` bytes out and echoed
    /// back, `size + 1` of the peer's, then its close_notify.
    async fn exchange_with_tls12_peer<S: Side>(
        ours: &mut TlsStream<S>,
        size: usize,
        suite: rustls::CipherSuite,
    ) {
        let (r, _) = ours.write_all(pattern(size)).await;
        r.expect("write");
        let (r, back) = ours.read_exact(vec![0u8; size]).await;
        r.expect("read the echo");
        assert_eq!(back, pattern(size), "{suite:?}");
        let (r, more) = ours.read_exact(vec![0u8; size + 1]).await;
        r.expect("read");
        assert_eq!(more, pattern(size + 1), "{suite:?}");
        let (r, _) = ours.read(Vec::with_capacity(10)).await;
        assert_eq!(r.expect("close_notify"), 0, "{suite:?}");
    }

    #[test]
    fn a_rustls_client_that_updates_its_keys_is_followed_and_answered() {
        run(async {
            let (acceptor, connector, _dir) = configs();
            let (listener, addr) = listen();
            let config = connector.0.clone();
            let client = std::thread::spawn(move || -> io::Result<()> {
                let tcp = std::net::TcpStream::connect(addr)?;
                let conn =
                    rustls::ClientConnection::new(config, name()).map_err(io::Error::other)?;
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                for _ in 0..3 {
                    tls.write_all(&pattern(20_000))?;
                    let mut back = vec![0u8; 20_000];
                    tls.read_exact(&mut back)?;
                    if back != pattern(20_000) {
                        return Err(io::Error::other("the echo differs"));
                    }
                    // Asks for ours to be updated too.
                    tls.conn.refresh_traffic_keys().map_err(io::Error::other)?;
                }
                tls.conn.send_close_notify();
                tls.flush()
            });
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut server = acceptor.accept(tcp).await.expect("handshake");
            assert!(owned(&server));
            for _ in 0..3 {
                let (r, got) = server.read_exact(vec![0u8; 20_000]).await;
                r.expect("read under the client's current key");
                assert_eq!(got, pattern(20_000));
                let (r, _) = server.write_all(got).await;
                r.expect("write");
            }
            let (r, _) = server.read(Vec::with_capacity(10)).await;
            assert_eq!(r.expect("close_notify under the third key"), 0);
            client.join().expect("client thread").expect("client");
            // Two records under the key our answer to the last update
            // started (without the answers: 2 tickets + 3 x 2 records).
            assert_eq!(tx_seq(&server), 2);
        });
    }

    #[test]
    fn a_rustls_server_that_updates_its_keys_and_sends_tickets_is_followed() {
        run(async {
            let (acceptor, connector, _dir) = configs();
            let size = 30_000;
            let addr = rustls_server(acceptor.0.clone(), size, 2);
            for round in 0..2 {
                let tcp = monoio::net::TcpStream::connect(addr)
                    .await
                    .expect("connect");
                let mut client = connector.connect(name(), tcp).await.expect("handshake");
                assert!(owned(&client));
                let want = if round == 0 {
                    HandshakeKind::Full
                } else {
                    HandshakeKind::Resumed
                };
                assert_eq!(client.handshake_kind(), Some(want), "a ticket of the first");
                for _ in 0..2 {
                    let (r, got) = client.read_exact(vec![0u8; size]).await;
                    r.expect("read");
                    assert_eq!(got, pattern(size));
                }
                let (r, _) = client.write_all(pattern(size)).await;
                r.expect("write after answering the update");
                assert_eq!(tx_seq(&client), 2, "our key was updated first");
                let (r, back) = client.read_exact(vec![0u8; size]).await;
                r.expect("the echo");
                assert_eq!(back, pattern(size));
                let (r, _) = client.read(Vec::with_capacity(10)).await;
                assert_eq!(r.expect("close_notify"), 0);
            }
        });
    }

    #[test]
    fn records_that_do_not_decrypt_fail_the_read_and_nothing_of_them_is_read() {
        run(async {
            let (acceptor, connector, _dir) = configs();
            let (listener, addr) = listen();
            let mut next = crate::testing::xorshift(0x2545_f491_4f6c_dd1du64);
            for case in 0..24u64 {
                let config = connector.0.clone();
                let len = 17 + (next() % 3000) as usize;
                let garbage: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                let flip = next() as usize % (len + 5 + 100);
                let client = std::thread::spawn(move || -> io::Result<()> {
                    let tcp = std::net::TcpStream::connect(addr)?;
                    let conn =
                        rustls::ClientConnection::new(config, name()).map_err(io::Error::other)?;
                    let mut tls = rustls::StreamOwned::new(conn, tcp);
                    tls.write_all(b"good")?;
                    tls.flush()?;
                    if case % 2 == 0 {
                        // A record of random bytes under a valid header.
                        let mut record = vec![23u8, 3, 3];
                        record.extend_from_slice(&(len as u16).to_be_bytes());
                        record.extend_from_slice(&garbage);
                        tls.sock.write_all(&record)?;
                    } else {
                        // A real record with one bit flipped.
                        let mut sealed = Vec::new();
                        tls.conn.writer().write_all(&pattern(100))?;
                        while tls.conn.wants_write() {
                            tls.conn.write_tls(&mut sealed)?;
                        }
                        // In the body: a damaged length would only wait.
                        let at = 5 + flip % (sealed.len() - 5);
                        sealed[at] ^= 1 << (case % 8);
                        tls.sock.write_all(&sealed)?;
                    }
                    let mut rest = Vec::new();
                    let _ = tls.sock.read_to_end(&mut rest);
                    Ok(())
                });
                let (tcp, _) = listener.accept().await.expect("accept");
                let mut server = acceptor.accept(tcp).await.expect("handshake");
                let (r, got) = server.read_exact(vec![0u8; 4]).await;
                r.expect("the good record");
                assert_eq!(got, b"good");
                let (r, _) = server.read(Vec::with_capacity(200)).await;
                let e = r.expect_err("a damaged record is an error");
                assert_eq!(e.kind(), io::ErrorKind::InvalidData, "case {case}: {e}");
                let (r, _) = server.read(Vec::with_capacity(200)).await;
                assert!(r.is_err(), "case {case}: the stream stays failed");
                let (r, _) = server.write_all(b"x".to_vec()).await;
                assert!(r.is_err(), "case {case}: nothing is sent after it");
                drop(server);
                client.join().expect("client thread").expect("client");
            }
        });
    }

    #[test]
    fn a_read_given_up_with_nothing_held_leaves_the_stream_usable() {
        run(async {
            let (mut client, mut server) = pair().await;
            let waited = monoio::time::timeout(
                std::time::Duration::from_millis(20),
                server.read(Vec::with_capacity(10)),
            )
            .await;
            assert!(waited.is_err(), "nothing was sent");
            let (r, _) = client.write_all(b"later".to_vec()).await;
            r.expect("write");
            let (r, got) = server.read_exact(vec![0u8; 5]).await;
            r.expect("read after the timeout");
            assert_eq!(got, b"later");
        });
    }
}
