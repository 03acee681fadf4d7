//! What each message of a transaction-pooled session means for the
//! server lent to it: the queue of answers the server owes (pass, skip,
//! or answered locally at its turn), named statements renamed or
//! prepared first, session state that pins the client, and what an
//! ErrorResponse or ReadyForQuery settles. Pure bookkeeping over whole
//! messages and headers; the relay ([`super`]) does the I/O.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::pool::record_parameter;
use crate::pool::session_state::{effect, Effect, Pin};
use crate::pool::statements::{
    server_name, ClientStatements, Registry, ServerStatements, Statement,
};
use crate::protocol::encode;
use crate::protocol::frame::HEADER_LEN;
use crate::protocol::message::{parameter_status, tag};
use crate::protocol::rewrite;
use crate::protocol::walk::Seen;

/// The longest client message read whole (to rename a statement or
/// look for session state in its SQL); a longer one pins the client.
pub(super) const INSPECTED_LIMIT: usize = 1 << 20;
/// A ParameterStatus PostgreSQL sends on its own (a promotion), not for
/// anything the client did.
const SERVER_OWN_PARAMETERS: &[&[u8]] = &[b"in_hot_standby"];

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
pub(super) struct Flow<'a> {
    queue: VecDeque<Pending>,
    /// Extended-protocol messages sent since the last Sync.
    unsynced: bool,
    /// The last ReadyForQuery's transaction status.
    pub(super) status: u8,
    /// The type of the server's last message.
    pub(super) last_from_server: u8,
    pub(super) statements: &'a mut ClientStatements,
    pub(super) prepared: &'a mut ServerStatements,
    pub(super) parameters: &'a mut Vec<(String, String)>,
    pub(super) pin: &'a mut Option<Pin>,
    /// The server side is writing to the client, or holds part of a
    /// server message: the server cannot go back now.
    pub(super) down_busy: bool,
    /// The server answered what rolegate did not expect: its state is
    /// not known, and it is closed when the session ends.
    pub(super) unsure: bool,
    pub(super) terminated: bool,
}

impl<'a> Flow<'a> {
    /// The flow of one transaction, from where the last one left the
    /// client's session.
    pub(super) fn new(
        status: u8,
        unsure: bool,
        statements: &'a mut ClientStatements,
        prepared: &'a mut ServerStatements,
        parameters: &'a mut Vec<(String, String)>,
        pin: &'a mut Option<Pin>,
    ) -> Self {
        Self {
            queue: VecDeque::new(),
            unsynced: false,
            status,
            last_from_server: 0,
            statements,
            prepared,
            parameters,
            pin,
            down_busy: false,
            unsure,
            terminated: false,
        }
    }

    /// Whether the server owes answers, or a Sync is missing.
    pub(super) fn owes(&self) -> bool {
        !self.queue.is_empty() || self.unsynced
    }

    pub(super) fn pin(&mut self, why: Pin) {
        self.pin.get_or_insert(why);
    }

    /// Whether the transaction is over with nothing owed either way.
    pub(super) fn idle(&self) -> bool {
        self.queue.is_empty() && !self.unsynced && self.status == b'I' && !self.down_busy
    }

    /// Whether an answer of rolegate's own is at the front of the queue:
    /// the server side must write it even if the server says nothing.
    pub(super) fn local_answer_due(&self) -> bool {
        self.queue
            .front()
            .is_some_and(|p| matches!(p.answer, Answer::Local(_)))
    }

    /// Writes the local answers now at the front of the queue.
    pub(super) fn answer_locally(&mut self, out: &mut BytesMut) {
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

/// A client message's header: what it awaits, and whether to read it
/// whole.
pub(super) fn client_header(flow: &mut Flow<'_>, kind: u8, len: usize) -> Seen {
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
pub(super) fn client_message(
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
pub(super) fn server_header(flow: &mut Flow<'_>, kind: u8, out: &mut BytesMut) -> Seen {
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
            match flow.queue.pop_front() {
                Some(Pending {
                    answer: Answer::Skip,
                    ..
                }) => Seen::Drop,
                _ => Seen::Pass,
            }
        }
        // A Describe ends with RowDescription or NoData.
        b'T' | b'n' if front == Some(b'D') => {
            flow.queue.pop_front();
            Seen::Pass
        }
        // An Execute ends with CommandComplete, EmptyQueryResponse or
        // PortalSuspended.
        b'C' | b'I' | b's' if front == Some(b'E') => {
            flow.queue.pop_front();
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
pub(super) fn server_message(flow: &mut Flow<'_>, kind: u8, message: &[u8], out: &mut BytesMut) {
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
