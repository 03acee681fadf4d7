//! Relaying a pooled client's session with a lent server, knowing at
//! every moment whether the server could be lent again.
//!
//! The two directions run as two futures of one task, each reading,
//! walking ([`crate::protocol::walk`]) and writing on its own, so neither
//! waits on the other (a client sending a large COPY while its server
//! answers cannot deadlock). What they share is three counters: the
//! client's Query, Sync and FunctionCall messages each await one
//! ReadyForQuery; extended-protocol messages since the last Sync leave the
//! server busy; and the last ReadyForQuery's transaction status.
//!
//! The client's Terminate is rolegate's to answer: it is not passed on,
//! and the session ends there. The server is clean then, fit to be reset
//! and lent, only when every request was answered, nothing is unsynced,
//! the status is idle (`I`) and no message is half-way in either
//! direction. Anything else (a client that vanished mid-query, a
//! protocol error) leaves the server in a state rolegate cannot vouch
//! for, and it is closed.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{record_parameter, Server};
use crate::protocol::frame::HEADER_LEN;
use crate::protocol::message::{parameter_status, tag};
use crate::protocol::walk::{Seen, Walker};
use crate::protocol::ProtocolError;

/// Client message types that each await one ReadyForQuery.
const QUERY: u8 = b'Q';
const SYNC: u8 = b'S';
const FUNCTION_CALL: u8 = b'F';
/// Extended-protocol messages that leave the server busy until a Sync.
const EXTENDED: &[u8] = b"PBDECH";

/// How a pooled relay ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// The client sent Terminate (not passed on).
    Terminated,
    ClientClosed,
    ClientError(io::Error),
    ServerClosed,
    ServerError(io::Error),
    /// A message that cannot be framed, from either side.
    Protocol(ProtocolError),
}

/// What the two directions share.
#[derive(Default)]
struct Counters {
    /// Requests the server has not answered with ReadyForQuery yet.
    awaiting: AtomicU32,
    /// Extended-protocol messages sent since the last Sync.
    unsynced: AtomicBool,
    /// The last ReadyForQuery's transaction status.
    status: AtomicU8,
    /// The type of the server's last message seen.
    last_from_server: AtomicU8,
}

impl Counters {
    /// Accounts for a client message; a Terminate is dropped and noted.
    fn client_header(&self, kind: u8, terminated: &mut bool) -> Seen {
        match kind {
            QUERY | FUNCTION_CALL => {
                self.awaiting.fetch_add(1, Ordering::AcqRel);
            }
            SYNC => {
                self.awaiting.fetch_add(1, Ordering::AcqRel);
                self.unsynced.store(false, Ordering::Release);
            }
            tag::TERMINATE => {
                *terminated = true;
                return Seen::Drop;
            }
            k if EXTENDED.contains(&k) => self.unsynced.store(true, Ordering::Release),
            // CopyData, CopyDone, CopyFail and anything else: part of a
            // request already counted, or the server's to refuse.
            _ => {}
        }
        Seen::Pass
    }

    fn server_header(&self, kind: u8) -> Seen {
        self.last_from_server.store(kind, Ordering::Release);
        match kind {
            tag::READY_FOR_QUERY | tag::PARAMETER_STATUS => Seen::Watch,
            _ => Seen::Pass,
        }
    }

    fn server_message(&self, kind: u8, body: &[u8], parameters: &mut Vec<(String, String)>) {
        if kind == tag::READY_FOR_QUERY {
            // Saturating: a server answering what was not asked is caught
            // by the clean check instead.
            let _ = self
                .awaiting
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
            self.status
                .store(body.first().copied().unwrap_or(0), Ordering::Release);
        } else if let Some((name, value)) = parameter_status(body) {
            record_parameter(
                parameters,
                &String::from_utf8_lossy(name),
                &String::from_utf8_lossy(value),
            );
        }
    }
}

/// The relay's state, kept outside the relay future so that the caller
/// may stop polling it (an end signal) and still judge the server.
#[derive(Default)]
pub struct PooledRelay {
    from_client: BytesMut,
    from_server: BytesMut,
    client_walker: Walker,
    server_walker: Walker,
    /// Bytes walked but not yet written, per direction.
    to_server: BytesMut,
    to_client: BytesMut,
    counters: Counters,
}

impl PooledRelay {
    /// A relay that starts with what the client sent past its login.
    pub fn new(pipelined: BytesMut) -> Self {
        let relay = Self {
            from_client: pipelined,
            ..Self::default()
        };
        relay.counters.status.store(b'I', Ordering::Release);
        relay
    }

    /// Relays until either side ends.
    pub async fn run<C, S>(&mut self, client: &mut C, server: &mut Server<S>) -> RelayEnd
    where
        C: AsyncRead + AsyncWrite + Unpin,
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let Self {
            from_client,
            from_server,
            client_walker,
            server_walker,
            to_server,
            to_client,
            counters,
        } = self;
        let counters = &*counters;
        let Server {
            stream, parameters, ..
        } = server;
        let (mut client_read, mut client_write) = tokio::io::split(client);
        let (mut server_read, mut server_write) = tokio::io::split(stream);
        let up = async {
            loop {
                let mut terminated = false;
                if let Err(e) = client_walker.walk(
                    from_client,
                    to_server,
                    "client",
                    |kind, _, _| counters.client_header(kind, &mut terminated),
                    |_, message, out| {
                        out.extend_from_slice(message);
                        Ok(())
                    },
                ) {
                    return RelayEnd::Protocol(e);
                }
                if let Err(e) = write_out(&mut server_write, to_server).await {
                    return RelayEnd::ServerError(e);
                }
                if terminated {
                    return RelayEnd::Terminated;
                }
                match client_read.read_buf(from_client).await {
                    Ok(0) => return RelayEnd::ClientClosed,
                    Ok(_) => {}
                    Err(e) => return RelayEnd::ClientError(e),
                }
            }
        };
        let down = async {
            loop {
                if let Err(e) = server_walker.walk(
                    from_server,
                    to_client,
                    "server",
                    |kind, _, _| counters.server_header(kind),
                    |kind, message, out| {
                        counters.server_message(kind, &message[HEADER_LEN..], parameters);
                        out.extend_from_slice(message);
                        Ok(())
                    },
                ) {
                    return RelayEnd::Protocol(e);
                }
                if let Err(e) = write_out(&mut client_write, to_client).await {
                    return RelayEnd::ClientError(e);
                }
                match server_read.read_buf(from_server).await {
                    Ok(0) => return RelayEnd::ServerClosed,
                    Ok(_) => {}
                    Err(e) => return RelayEnd::ServerError(e),
                }
            }
        };
        tokio::select! {
            end = up => end,
            end = down => end,
        }
    }

    /// Whether the server is fit to be reset and lent again: every
    /// request answered, nothing unsynced, idle, nothing half-way.
    pub fn server_is_clean(&self) -> bool {
        let counters = &self.counters;
        counters.awaiting.load(Ordering::Acquire) == 0
            && !counters.unsynced.load(Ordering::Acquire)
            && counters.status.load(Ordering::Acquire) == b'I'
            && self.to_server.is_empty()
            && self.to_client.is_empty()
            && self.client_walker.at_boundary(&self.from_client)
            && self.server_walker.at_boundary(&self.from_server)
    }

    /// Whether the server's last message was an ErrorResponse: a server
    /// that closes after its own FATAL has said why.
    pub fn server_sent_error_last(&self) -> bool {
        self.counters.last_from_server.load(Ordering::Acquire) == tag::ERROR_RESPONSE
    }

    /// Whether a message of rolegate's own may be written to the client
    /// now: nothing of the server's is half-way to it.
    pub fn client_at_boundary(&self) -> bool {
        self.to_client.is_empty() && self.server_walker.at_boundary(&BytesMut::new())
    }
}

/// Writes what was walked out and clears it, so that a write cut short
/// by the caller leaves the unwritten bytes visible to the clean check.
pub(super) async fn write_out<W: AsyncWrite + Unpin>(
    writer: &mut W,
    out: &mut BytesMut,
) -> io::Result<()> {
    if !out.is_empty() {
        writer.write_all(out).await?;
        out.clear();
    }
    Ok(())
}
