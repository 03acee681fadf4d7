//! Relaying one transaction of a pooled client (`pool_mode =
//! "transaction"`) on the server lent for it, and saying when the server
//! may go back: ReadyForQuery with status idle, every request answered,
//! nothing unsynced, nothing half-way in either direction.
//!
//! Two futures of one task, as in [`super::relay`], each walking its
//! direction; what they share sits behind one mutex held for a walk,
//! never across an await (the futures never run at once, so it is never
//! contended). What is shared: the queue of requests the server owes an
//! answer, in order, each marked pass (the client's answer), skip
//! (rolegate's own request: the answer goes nowhere) or local (rolegate
//! answers it itself, at its turn); the client's named statements and
//! the server's prepared ones ([`super::statements`]); and whether the
//! client pinned its server ([`super::session_state`]).
//!
//! Named statements: a client's Parse is sent as the statement's server
//! name, or answered locally when the server has it already; a Bind or
//! Describe of a statement the server lacks is preceded by a Parse of
//! rolegate's; a Close of a statement is answered locally (the server
//! keeps it for others). After an ErrorResponse the server skips
//! everything up to Sync: the queue drops those requests, and a Parse
//! among them is known not to have prepared anything.

mod flow;

use std::cell::RefCell;
use std::io;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::Notify;

use super::relay::{write_out, RelayEnd};
use super::session_state::Pin;
use super::statements::{ClientStatements, Registry};
use super::Server;
use crate::protocol::message::tag;
use crate::protocol::walk::Walker;
use flow::{client_header, client_message, server_header, server_message, Flow, INSPECTED_LIMIT};

/// How a transaction's relay ended.
#[derive(Debug)]
pub enum TransactionEnd {
    /// The transaction is over and the server fit to go back.
    Idle,
    /// The session ended (or failed); see [`RelayEnd`].
    Ended(RelayEnd),
}

/// What stays between a client's transactions.
pub struct TransactionRelay {
    from_client: BytesMut,
    from_server: BytesMut,
    client_walker: Walker,
    server_walker: Walker,
    to_server: BytesMut,
    to_client: BytesMut,
    statements: ClientStatements,
    registry: Arc<Registry>,
    max_prepared: usize,
    /// Set once the client left session state on its server.
    pin: Option<Pin>,
    status: u8,
    last_from_server: u8,
    unsure: bool,
    /// The server owed answers (or a Sync was missing) when the last
    /// relay ended.
    owed: bool,
}

impl TransactionRelay {
    /// A relay that starts with what the client sent past its login.
    pub fn new(pipelined: BytesMut, registry: Arc<Registry>, max_prepared: usize) -> Self {
        Self {
            from_client: pipelined,
            from_server: BytesMut::new(),
            client_walker: Walker::with_limit(INSPECTED_LIMIT),
            server_walker: Walker::default(),
            to_server: BytesMut::new(),
            to_client: BytesMut::new(),
            statements: ClientStatements::default(),
            registry,
            max_prepared,
            pin: None,
            status: b'I',
            last_from_server: 0,
            unsure: false,
            owed: false,
        }
    }

    /// Why the client keeps its server, once it does.
    pub fn pinned(&self) -> Option<Pin> {
        self.pin
    }

    /// Waits until the client sends something: the next transaction's
    /// first bytes. `Ok(false)`: the client closed or said Terminate.
    pub async fn wait_for_client<C: AsyncRead + Unpin>(
        &mut self,
        client: &mut C,
    ) -> io::Result<bool> {
        loop {
            if let Some(&kind) = self.from_client.first() {
                return Ok(kind != tag::TERMINATE);
            }
            if client.read_buf(&mut self.from_client).await? == 0 {
                return Ok(false);
            }
        }
    }

    /// Relays until the transaction is over and the server may go back
    /// (never, once the client is pinned), or until either side ends.
    pub async fn run<C, S>(&mut self, client: &mut C, server: &mut Server<S>) -> TransactionEnd
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
            statements,
            registry,
            max_prepared,
            pin,
            status,
            last_from_server,
            unsure,
            owed,
        } = self;
        let Server {
            stream,
            parameters,
            prepared,
            ..
        } = server;
        let flow = Mutex::new(Flow::new(
            *status, *unsure, statements, prepared, parameters, pin,
        ));
        let lock = || flow.lock().unwrap_or_else(|p| p.into_inner());
        // The server side wrote something: the transaction may be over,
        // or a local answer is due.
        let wrote = Notify::new();
        let local_due = Notify::new();
        let (mut client_read, mut client_write) = tokio::io::split(client);
        let (mut server_read, mut server_write) = tokio::io::split(stream);
        let registry = &**registry;
        let max_prepared = *max_prepared;
        let up = async {
            loop {
                let walked = {
                    let mut flow = lock();
                    // Both callbacks change the flow, one at a time.
                    let cell = RefCell::new(&mut *flow);
                    let walked = client_walker.walk(
                        from_client,
                        to_server,
                        "client",
                        |kind, len, _| client_header(&mut cell.borrow_mut(), kind, len),
                        |kind, message, out| {
                            let mut flow = cell.borrow_mut();
                            client_message(&mut flow, registry, max_prepared, kind, message, out)
                        },
                    );
                    if flow.local_answer_due() {
                        local_due.notify_one();
                    }
                    walked.map(|()| flow.terminated)
                };
                let terminated = match walked {
                    Ok(terminated) => terminated,
                    Err(e) => return TransactionEnd::Ended(RelayEnd::Protocol(e)),
                };
                if let Err(e) = write_out(&mut server_write, to_server).await {
                    return TransactionEnd::Ended(RelayEnd::ServerError(e));
                }
                if terminated {
                    return TransactionEnd::Ended(RelayEnd::Terminated);
                }
                loop {
                    let idle = {
                        let flow = lock();
                        flow.idle() && flow.pin.is_none() && !flow.unsure
                    };
                    if idle && client_walker.at_boundary(from_client) {
                        return TransactionEnd::Idle;
                    }
                    tokio::select! {
                        read = client_read.read_buf(from_client) => match read {
                            Ok(0) => return TransactionEnd::Ended(RelayEnd::ClientClosed),
                            Ok(_) => break,
                            Err(e) => return TransactionEnd::Ended(RelayEnd::ClientError(e)),
                        },
                        () = wrote.notified() => {}
                    }
                }
            }
        };
        let down = async {
            loop {
                {
                    let mut flow = lock();
                    flow.answer_locally(to_client);
                    let cell = RefCell::new(&mut *flow);
                    let walked = server_walker.walk(
                        from_server,
                        to_client,
                        "server",
                        |kind, _, out| server_header(&mut cell.borrow_mut(), kind, out),
                        |kind, message, out| {
                            server_message(&mut cell.borrow_mut(), kind, message, out);
                            Ok(())
                        },
                    );
                    if let Err(e) = walked {
                        return TransactionEnd::Ended(RelayEnd::Protocol(e));
                    }
                    flow.down_busy = true;
                }
                if let Err(e) = write_out(&mut client_write, to_client).await {
                    return TransactionEnd::Ended(RelayEnd::ClientError(e));
                }
                let busy = !server_walker.at_boundary(from_server);
                lock().down_busy = busy;
                if !busy {
                    wrote.notify_one();
                }
                tokio::select! {
                    read = server_read.read_buf(from_server) => match read {
                        Ok(0) => return TransactionEnd::Ended(RelayEnd::ServerClosed),
                        Ok(_) => {}
                        Err(e) => return TransactionEnd::Ended(RelayEnd::ServerError(e)),
                    },
                    () = local_due.notified() => {}
                }
            }
        };
        let end = tokio::select! {
            end = up => end,
            end = down => end,
        };
        let flow = flow.into_inner().unwrap_or_else(|p| p.into_inner());
        *status = flow.status;
        *last_from_server = flow.last_from_server;
        *unsure = flow.unsure;
        *owed = flow.owes();
        end
    }

    /// Whether the server's last message was an ErrorResponse.
    pub fn server_sent_error_last(&self) -> bool {
        self.last_from_server == tag::ERROR_RESPONSE
    }

    /// Whether a message of rolegate's own may be written to the client
    /// now: nothing of the server's is half-way to it.
    pub fn client_at_boundary(&self) -> bool {
        self.to_client.is_empty() && self.server_walker.at_boundary(&BytesMut::new())
    }

    /// Whether the server was left clean when the session ended: every
    /// request answered, idle, nothing half-way.
    pub fn server_is_clean(&self) -> bool {
        !self.owed
            && !self.unsure
            && self.status == b'I'
            && self.to_server.is_empty()
            && self.to_client.is_empty()
            && self.client_walker.at_boundary(&self.from_client)
            && self.server_walker.at_boundary(&self.from_server)
    }
}
