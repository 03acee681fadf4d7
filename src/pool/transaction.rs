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

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::Notify;

use super::relay::{write_out, RelayEnd};
use super::session_state::{effect, Effect, Pin};
use super::statements::ServerStatements;
use super::statements::{server_name, ClientStatements, Registry, Statement};
use super::{record_parameter, Server};
use crate::protocol::encode;
use crate::protocol::frame::HEADER_LEN;
use crate::protocol::message::{parameter_status, tag};
use crate::protocol::rewrite;
use crate::protocol::walk::{Seen, Walker};

/// The longest client message read whole (to rename a statement or
/// look for session state in its SQL); a longer one pins the client.
const INSPECTED_LIMIT: usize = 1 << 20;
/// A ParameterStatus PostgreSQL sends on its own (a promotion), not for
/// anything the client did.
const SERVER_OWN_PARAMETERS: &[&[u8]] = &[b"in_hot_standby"];

/// How a transaction's relay ended.
#[derive(Debug)]
pub enum TransactionEnd {
    /// The transaction is over and the server fit to go back.
    Idle,
    /// The session ended (or failed); see [`RelayEnd`].
    Ended(RelayEnd),
}

/// Who a request's answer is for.
#[derive(Debug)]
enum Answer {
    /// The client's.
    Pass,
    /// Rolegate's own request: swallowed.
    Skip,
    /// Rolegate answers this request itself, with these bytes, when its
    /// turn comes.
    Local(Bytes),
}

/// A request the server (or rolegate) owes an answer.
#[derive(Debug)]
struct Pending {
    /// The client message type it answers.
    kind: u8,
    answer: Answer,
    /// For a Parse: the statement it prepares and the client's name.
    parse: Option<(u64, Box<[u8]>)>,
}

/// What the two directions share for one transaction.
struct Flow<'a> {
    queue: VecDeque<Pending>,
    /// Extended-protocol messages sent since the last Sync.
    unsynced: bool,
    /// The last ReadyForQuery's transaction status.
    status: u8,
    /// The type of the server's last message.
    last_from_server: u8,
    statements: &'a mut ClientStatements,
    prepared: &'a mut ServerStatements,
    parameters: &'a mut Vec<(String, String)>,
    pin: &'a mut Option<Pin>,
    /// The server side is writing to the client, or holds part of a
    /// server message: the server cannot go back now.
    down_busy: bool,
    /// The server answered what rolegate did not expect: its state is
    /// not known, and it is closed when the session ends.
    unsure: bool,
    terminated: bool,
}

impl Flow<'_> {
    fn pin(&mut self, why: Pin) {
        self.pin.get_or_insert(why);
    }

    /// Whether the transaction is over with nothing owed either way.
    fn idle(&self) -> bool {
        self.queue.is_empty() && !self.unsynced && self.status == b'I' && !self.down_busy
    }

    /// Writes the local answers now at the front of the queue.
    fn answer_locally(&mut self, out: &mut BytesMut) {
        while let Some(Pending {
            answer: Answer::Local(_),
            ..
        }) = self.queue.front()
        {
            if let Some(Pending {
                answer: Answer::Local(bytes),
                ..
            }) = self.queue.pop_front()
            {
                out.extend_from_slice(&bytes);
            }
        }
    }

    fn pop(&mut self) -> Option<Pending> {
        self.queue.pop_front()
    }

    /// A request the server will never answer (skipped after an error):
    /// what its Parse would have prepared does not exist.
    fn dropped(&mut self, pending: Pending) {
        if let Some((id, name)) = pending.parse {
            if !matches!(pending.answer, Answer::Local(_)) {
                self.prepared.remove(id);
            }
            if !name.is_empty() {
                self.statements.remove(&name);
            }
        }
    }

    fn push(&mut self, kind: u8, answer: Answer) {
        self.queue.push_back(Pending {
            kind,
            answer,
            parse: None,
        });
    }
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
        let flow = Mutex::new(Flow {
            queue: VecDeque::new(),
            unsynced: false,
            status: *status,
            last_from_server: 0,
            statements,
            prepared,
            parameters,
            pin,
            down_busy: false,
            unsure: *unsure,
            terminated: false,
        });
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
                        |kind, len, out| client_header(&mut cell.borrow_mut(), kind, len, out),
                        |kind, message, out| {
                            let mut flow = cell.borrow_mut();
                            client_message(&mut flow, registry, max_prepared, kind, message, out)
                        },
                    );
                    if flow
                        .queue
                        .front()
                        .is_some_and(|p| matches!(p.answer, Answer::Local(_)))
                    {
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
        *owed = !flow.queue.is_empty() || flow.unsynced;
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

/// A client message's header: what it awaits, and whether to read it
/// whole.
fn client_header(flow: &mut Flow<'_>, kind: u8, len: usize, _out: &mut BytesMut) -> Seen {
    match kind {
        tag::TERMINATE => {
            flow.terminated = true;
            return Seen::Drop;
        }
        b'Q' | b'P' | b'B' | b'D' | b'C' if len <= INSPECTED_LIMIT => return Seen::Watch,
        b'Q' => {
            flow.pin(Pin::Unread);
            flow.push(kind, Answer::Pass);
        }
        b'P' | b'B' | b'D' | b'C' => {
            flow.pin(Pin::Unread);
            flow.unsynced = true;
            flow.push(kind, Answer::Pass);
        }
        b'S' => {
            flow.unsynced = false;
            flow.push(kind, Answer::Pass);
        }
        b'F' => flow.push(kind, Answer::Pass),
        b'E' | b'H' => {
            flow.unsynced = true;
            if kind == b'E' {
                flow.push(kind, Answer::Pass);
            }
        }
        // CopyData, CopyDone, CopyFail: part of a request counted already.
        _ => {}
    }
    Seen::Pass
}

/// A client message read whole: renamed, answered locally or passed.
fn client_message(
    flow: &mut Flow<'_>,
    registry: &Registry,
    max_prepared: usize,
    kind: u8,
    message: &[u8],
    out: &mut BytesMut,
) -> Result<(), crate::protocol::ProtocolError> {
    match kind {
        b'Q' => {
            let sql = message[HEADER_LEN..]
                .strip_suffix(b"\0")
                .unwrap_or_default();
            match effect(sql) {
                Effect::Forget(command) if flow.pin.is_none() && flow.idle() => {
                    flow.statements.clear();
                    let mut answer = BytesMut::new();
                    answer.extend_from_slice(&encode::command_complete(command));
                    answer.extend_from_slice(&encode::ready_for_query(b'I'));
                    flow.push(kind, Answer::Local(answer.freeze()));
                    return Ok(());
                }
                Effect::Forget(_) => {
                    flow.pin(Pin::Discard);
                    flow.statements.clear();
                    flow.prepared.clear();
                }
                Effect::Pins(why) => flow.pin(why),
                Effect::None => {}
            }
            flow.push(kind, Answer::Pass);
            out.extend_from_slice(message);
        }
        b'P' => {
            flow.unsynced = true;
            let (name, rest) = rewrite::parse(message)?;
            let sql = rest.split(|&b| b == 0).next().unwrap_or_default();
            match effect(sql) {
                Effect::Pins(why) => flow.pin(why),
                Effect::Forget(_) => flow.pin(Pin::Discard),
                Effect::None => {}
            }
            if name.is_empty() {
                flow.push(kind, Answer::Pass);
                out.extend_from_slice(message);
                return Ok(());
            }
            let statement = registry.statement(rest);
            flow.statements.insert(name, Arc::clone(&statement));
            let answer = if flow.prepared.touch(statement.id) {
                Answer::Local(encode::parse_complete())
            } else {
                evict_for(flow, max_prepared, statement.id, out);
                rewrite::put_parse(out, &statement.name, rest);
                Answer::Pass
            };
            flow.queue.push_back(Pending {
                kind,
                answer,
                parse: Some((statement.id, name.into())),
            });
        }
        b'B' => {
            flow.unsynced = true;
            let (portal, name, rest) = rewrite::bind(message)?;
            match known(flow, name) {
                Some(statement) => {
                    prepare(flow, max_prepared, &statement, out);
                    rewrite::put_bind(out, portal, &statement.name, rest);
                }
                None => out.extend_from_slice(message),
            }
            flow.push(kind, Answer::Pass);
        }
        b'D' => {
            flow.unsynced = true;
            let (target, name) = rewrite::target(message)?;
            match known(flow, name).filter(|_| target == b'S') {
                Some(statement) => {
                    prepare(flow, max_prepared, &statement, out);
                    rewrite::put_statement_target(out, b'D', &statement.name);
                }
                None => out.extend_from_slice(message),
            }
            flow.push(kind, Answer::Pass);
        }
        b'C' => {
            flow.unsynced = true;
            let (target, name) = rewrite::target(message)?;
            if target == b'S' && !name.is_empty() {
                flow.statements.remove(name);
                flow.push(kind, Answer::Local(encode::close_complete()));
            } else {
                out.extend_from_slice(message);
                flow.push(kind, Answer::Pass);
            }
        }
        _ => out.extend_from_slice(message),
    }
    Ok(())
}

/// The client's statement `name`, if it named one.
fn known(flow: &Flow<'_>, name: &[u8]) -> Option<Arc<Statement>> {
    if name.is_empty() {
        return None;
    }
    flow.statements.get(name).cloned()
}

/// Prepares `statement` on the server first, unless it has it.
fn prepare(flow: &mut Flow<'_>, max_prepared: usize, statement: &Statement, out: &mut BytesMut) {
    if flow.prepared.touch(statement.id) {
        return;
    }
    evict_for(flow, max_prepared, statement.id, out);
    rewrite::put_parse(out, &statement.name, &statement.rest);
    flow.queue.push_back(Pending {
        kind: b'P',
        answer: Answer::Skip,
        parse: Some((statement.id, Box::default())),
    });
}

/// Records `id` as prepared on the server, closing the least recently
/// used statement first when the server is full.
fn evict_for(flow: &mut Flow<'_>, max_prepared: usize, id: u64, out: &mut BytesMut) {
    if let Some(evicted) = flow.prepared.add(id, max_prepared) {
        rewrite::put_statement_target(out, b'C', &server_name(evicted));
        flow.push(b'C', Answer::Skip);
    }
}

/// A server message's header: which request it answers.
fn server_header(flow: &mut Flow<'_>, kind: u8, out: &mut BytesMut) -> Seen {
    flow.answer_locally(out);
    flow.last_from_server = kind;
    let front = flow.queue.front().map(|p| p.kind);
    let seen = match kind {
        // ParseComplete, BindComplete, CloseComplete.
        b'1' | b'2' | b'3' => {
            let expected = match kind {
                b'1' => b'P',
                b'2' => b'B',
                _ => b'C',
            };
            if front != Some(expected) {
                flow.unsure = true;
                flow.pin(Pin::Unsure);
                return Seen::Pass;
            }
            match flow.pop() {
                Some(Pending {
                    answer: Answer::Skip,
                    ..
                }) => Seen::Drop,
                _ => Seen::Pass,
            }
        }
        // A Describe ends with RowDescription or NoData.
        b'T' | b'n' if front == Some(b'D') => {
            flow.pop();
            Seen::Pass
        }
        // An Execute ends with CommandComplete, EmptyQueryResponse or
        // PortalSuspended.
        b'C' | b'I' | b's' if front == Some(b'E') => {
            flow.pop();
            Seen::Pass
        }
        tag::ERROR_RESPONSE => {
            // A Query, FunctionCall or Sync still ends with ReadyForQuery;
            // an extended request fails, and the server skips the rest
            // up to the Sync.
            if !matches!(front, None | Some(b'Q' | b'F' | b'S')) {
                while flow.queue.front().is_some_and(|p| p.kind != b'S') {
                    if let Some(pending) = flow.queue.pop_front() {
                        flow.dropped(pending);
                    }
                }
            }
            Seen::Pass
        }
        tag::READY_FOR_QUERY | tag::PARAMETER_STATUS => Seen::Watch,
        _ => Seen::Pass,
    };
    if seen != Seen::Watch {
        flow.answer_locally(out);
    }
    seen
}

/// A ReadyForQuery or ParameterStatus, whole.
fn server_message(flow: &mut Flow<'_>, kind: u8, message: &[u8], out: &mut BytesMut) {
    let body = &message[HEADER_LEN..];
    if kind == tag::READY_FOR_QUERY {
        // Ends the Query, FunctionCall or Sync at the front, and whatever
        // an error left before it.
        while let Some(pending) = flow.queue.pop_front() {
            let ends = matches!(pending.kind, b'Q' | b'F' | b'S');
            if !ends {
                flow.dropped(pending);
            } else {
                break;
            }
        }
        flow.status = body.first().copied().unwrap_or(0);
    } else if let Some((name, value)) = parameter_status(body) {
        if !SERVER_OWN_PARAMETERS.contains(&name) {
            flow.pin(Pin::Set);
        }
        record_parameter(
            flow.parameters,
            &String::from_utf8_lossy(name),
            &String::from_utf8_lossy(value),
        );
    }
    out.extend_from_slice(message);
    flow.answer_locally(out);
}
