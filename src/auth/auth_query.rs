//! Secrets read from the cluster itself (`auth_query`): rolegate logs in
//! to a member as `auth_user` and asks for the role's stored secret, as
//! PgBouncer's `auth_query` does.
//!
//! The query is parameterised (the role is `$1`, never spliced into the
//! text) and runs with `search_path = pg_catalog, pg_temp`, so no object
//! the role's own schemas hold can stand in for the catalog. The default
//! query answers only for roles PostgreSQL itself would let in: able to
//! log in, and not past `VALID UNTIL` (PgBouncer's CVE-2025-2291 was a
//! query that did not check the latter). A custom query returns the secret
//! in its last column, so PgBouncer's recommended function
//! (`SELECT usename, passwd FROM pgbouncer.get_auth($1)`) works as it is.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::secret::Secret;
use super::server_login::next_message;
use crate::protocol::encode;
use crate::protocol::message::tag;

/// Roles that may log in now, and their secrets.
pub const DEFAULT_QUERY: &str = "SELECT rolpassword FROM pg_catalog.pg_authid \
     WHERE rolname = $1 AND rolcanlogin \
     AND (rolvaliduntil IS NULL OR rolvaliduntil > pg_catalog.now())";

/// The startup parameters of an `auth_user` session.
pub const SESSION_PARAMETERS: &[(&str, &str)] = &[
    ("search_path", "pg_catalog, pg_temp"),
    ("application_name", "rolegate auth_query"),
];

/// The largest answer message read (a secret is under 200 bytes).
const MAX_ANSWER: usize = 64 * 1024;

/// Why the query gave no answer to go by.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The server refused the query (its message).
    #[error("the query failed: {0}")]
    Refused(String),
    /// The answer was not a secret rolegate can use.
    #[error("the query's answer is {0}")]
    BadAnswer(String),
    #[error("the connection failed: {0}")]
    Io(String),
}

/// Runs `query` for `role` on a logged-in `auth_user` session: the role's
/// secret, or `None` when the query returns no row or a NULL (a role that
/// may not log in, or has no password).
pub async fn fetch<S>(server: &mut S, query: &str, role: &str) -> Result<Option<Secret>, QueryError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    server
        .write_all(&encode::extended_query(query, &[role]))
        .await
        .map_err(|e| QueryError::Io(e.to_string()))?;
    let mut buf = BytesMut::with_capacity(512);
    let mut secret = None;
    let mut failed = None;
    loop {
        let msg = next_message(server, &mut buf, MAX_ANSWER)
            .await
            .map_err(QueryError::Io)?;
        match msg.tag() {
            DATA_ROW if secret.is_none() => secret = Some(last_column(msg.body())?),
            tag::ERROR_RESPONSE => failed = Some(error_message(msg.body())),
            tag::READY_FOR_QUERY => break,
            // ParseComplete, BindComplete, more rows, CommandComplete,
            // notices.
            _ => {}
        }
    }
    let _ = server.write_all(&encode::terminate()).await;
    if let Some(message) = failed {
        return Err(QueryError::Refused(message));
    }
    match secret.flatten() {
        None => Ok(None),
        Some(text) => Secret::parse(&text)
            .map(Some)
            .map_err(|e| QueryError::BadAnswer(e.to_string())),
    }
}

const DATA_ROW: u8 = b'D';

/// The last column of a DataRow body, `None` for NULL.
fn last_column(body: &[u8]) -> Result<Option<String>, QueryError> {
    let bad = |what: &str| QueryError::BadAnswer(what.to_owned());
    let count = body
        .get(..2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .ok_or_else(|| bad("a malformed row"))?;
    if count == 0 {
        return Err(bad("a row without columns"));
    }
    let mut rest = &body[2..];
    let mut last = None;
    for _ in 0..count {
        let len = rest
            .get(..4)
            .map(|l| i32::from_be_bytes([l[0], l[1], l[2], l[3]]))
            .ok_or_else(|| bad("a malformed row"))?;
        rest = &rest[4..];
        if len < 0 {
            last = None;
            continue;
        }
        let len = len as usize;
        let value = rest.get(..len).ok_or_else(|| bad("a malformed row"))?;
        last = Some(
            std::str::from_utf8(value)
                .map_err(|_| bad("a secret that is not text"))?
                .to_owned(),
        );
        rest = &rest[len..];
    }
    Ok(last)
}

/// The `M` field of an ErrorResponse body.
pub(crate) fn error_message(body: &[u8]) -> String {
    body.split(|&b| b == 0)
        .find_map(|field| field.strip_prefix(b"M"))
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .unwrap_or_else(|| "an error without a message".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(columns: &[Option<&str>]) -> Vec<u8> {
        let mut body = (columns.len() as u16).to_be_bytes().to_vec();
        for column in columns {
            match column {
                None => body.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(text) => {
                    body.extend_from_slice(&(text.len() as i32).to_be_bytes());
                    body.extend_from_slice(text.as_bytes());
                }
            }
        }
        body
    }

    #[test]
    fn the_secret_is_the_last_column() {
        assert_eq!(
            last_column(&row(&[Some("app"), Some("md5abc")])).expect("row"),
            Some("md5abc".to_owned())
        );
        assert_eq!(last_column(&row(&[Some("app"), None])).expect("row"), None);
        for broken in [&b""[..], b"\0\x01", b"\0\x01\0\0\0\x09short", b"\0\0"] {
            assert!(last_column(broken).is_err(), "{broken:?}");
        }
    }

    #[test]
    fn the_error_message_is_kept() {
        assert_eq!(
            error_message(b"SERROR\0C42883\0Mfunction get_auth does not exist\0\0"),
            "function get_auth does not exist"
        );
    }
}
