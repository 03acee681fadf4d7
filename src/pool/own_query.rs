//! rolegate's own queries on a pooled server: the `SET`s that give a
//! client its startup parameters, and the reset query before a server is
//! lent to the next client. The server's answers go nowhere but here;
//! its ParameterStatus messages update what the pool knows of it.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::{record_parameter, Server};
use crate::auth::server_login::next_message;
use crate::protocol::encode;
use crate::protocol::message::{parameter_status, tag};

/// The largest answer message rolegate reads for its own queries.
const MAX_ANSWER: usize = 1 << 20;

/// How one of rolegate's own queries went.
#[derive(Debug)]
pub enum Answered {
    /// ReadyForQuery with status idle, no error.
    Done,
    /// The server's ErrorResponse (whole); ReadyForQuery followed.
    Failed(Bytes),
}

/// Why the server cannot be used any more.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unusable(pub String);

/// Runs `sql` as a simple query and reads up to ReadyForQuery. A server
/// left in a transaction, or one that answered out of turn, is unusable.
pub async fn run<S>(server: &mut Server<S>, sql: &str) -> Result<Answered, Unusable>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    server
        .stream
        .write_all(&encode::query(sql))
        .await
        .map_err(|e| Unusable(format!("writing {sql:?}: {e}")))?;
    let mut buf = BytesMut::with_capacity(512);
    let mut failed = None;
    loop {
        let msg = next_message(&mut server.stream, &mut buf, MAX_ANSWER)
            .await
            .map_err(Unusable)?;
        match msg.tag() {
            tag::PARAMETER_STATUS => {
                if let Some((name, value)) = parameter_status(msg.body()) {
                    record_parameter(
                        &mut server.parameters,
                        &String::from_utf8_lossy(name),
                        &String::from_utf8_lossy(value),
                    );
                }
            }
            tag::ERROR_RESPONSE => failed = Some(msg.raw),
            tag::READY_FOR_QUERY => {
                if msg.body() != b"I" {
                    return Err(Unusable(format!(
                        "{sql:?} left the server in a transaction"
                    )));
                }
                if !buf.is_empty() {
                    return Err(Unusable("the server sent more than was asked".into()));
                }
                return Ok(match failed {
                    Some(error) => Answered::Failed(error),
                    None => Answered::Done,
                });
            }
            // CommandComplete, rows, notices: rolegate's own business.
            _ => {}
        }
    }
}

/// The statements that give a server a client's startup parameters:
/// `SET name TO 'value'` for each it does not have yet (as set by
/// rolegate for an earlier client, or as it reported), `RESET name` for
/// what rolegate set for an earlier client that this one did not ask
/// for; `None` when there is nothing to do. Names are GUC names
/// (letters, digits, `_` and `.`; anything else is refused before
/// this), values are escape-string literals, whatever
/// `standard_conforming_strings` is.
pub fn set_statements<S>(server: &Server<S>, wanted: &[(String, String)]) -> Option<String> {
    let mut sql = String::new();
    for (name, value) in wanted {
        let set_before = server.settings.iter().find(|(n, _)| n == name);
        let now = set_before
            .map(|(_, v)| v.as_str())
            .or_else(|| server.parameter(name));
        if now == Some(value.as_str()) {
            continue;
        }
        let quoted = value.replace('\\', "\\\\").replace('\'', "''");
        sql.push_str(&format!("SET {name} TO E'{quoted}';"));
    }
    for (name, _) in &server.settings {
        if !wanted.iter().any(|(n, _)| n == name) {
            sql.push_str(&format!("RESET {name};"));
        }
    }
    (!sql.is_empty()).then_some(sql)
}

/// Whether `name` can be a startup parameter set with `SET`.
pub fn settable_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
        && !name.as_bytes()[0].is_ascii_digit()
}
