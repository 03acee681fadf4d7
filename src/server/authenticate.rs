//! Relaying authentication between client and backend, unchanged.
//!
//! rolegate holds no passwords. After forwarding the StartupMessage it
//! reads the backend's messages one by one and passes them on; whenever an
//! Authentication request expects an answer (cleartext, MD5, SASL, GSS) it
//! reads exactly one message from the client, checks that it is a
//! password-type message of sane length, and forwards it. BackendKeyData
//! is captured for cancel routing. The exchange ends at the first
//! ReadyForQuery (the session is open) or at an ErrorResponse (the backend
//! refused, and the client has already been given its error).
//!
//! The one change made on the way: SCRAM-SHA-256-PLUS is removed from the
//! backend's SASL mechanism list (see [`crate::protocol::sasl`]).
//!
//! Backend messages are forwarded in batches: everything the backend sent
//! before it next waits for the client goes out in one write.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::protocol::message::{
    auth, auth_request_code, decode_message, tag, Message, MAX_BACKEND_HANDSHAKE_MESSAGE,
    MAX_CLIENT_AUTH_MESSAGE,
};
use crate::protocol::sasl::{announces_unoffered_channel_binding, without_channel_binding};
use crate::protocol::startup::CancelKey;
use crate::protocol::{ProtocolError, SqlState};

/// A session that reached ReadyForQuery.
pub struct Authenticated {
    pub backend_key: Option<CancelKey>,
    /// Backend bytes read past the ReadyForQuery, for the relay.
    pub to_client: BytesMut,
    /// Client bytes read past its last authentication message.
    pub to_backend: BytesMut,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The client broke the protocol; tell it.
    #[error("{0}")]
    Client(ProtocolError),
    /// The backend broke the protocol or vanished; tell the client.
    #[error("{0}")]
    Backend(ProtocolError),
    /// The backend refused the session and the client has its error.
    #[error("the server refused the session")]
    Refused,
    #[error("client ended the connection during authentication")]
    ClientGone,
    #[error("client connection failed during authentication: {0}")]
    ClientIo(std::io::Error),
}

/// Relays authentication until the session is ready or refused.
/// `backend_tls` says whether rolegate's connection to the member is
/// encrypted, which decides whether a client's channel-binding
/// announcement can succeed.
pub async fn relay_authentication<C, B>(
    client: &mut C,
    backend: &mut B,
    mut from_client: BytesMut,
    member: &str,
    backend_tls: bool,
) -> Result<Authenticated, AuthError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    // A login's backend messages (authentication, a dozen ParameterStatus,
    // BackendKeyData, ReadyForQuery) fit in well under 1 KiB; the buffers
    // grow when a server says more.
    let mut from_backend = BytesMut::with_capacity(1024);
    let mut to_client = BytesMut::with_capacity(512);
    let mut backend_key = None;
    loop {
        let msg = read_backend(backend, &mut from_backend, member).await?;
        match without_channel_binding_offer(&msg) {
            Ok(Some(rewritten)) => to_client.extend_from_slice(&rewritten),
            Ok(None) => to_client.extend_from_slice(&msg.raw),
            Err(e) => return Err(AuthError::Backend(backend_violation(member, &e.message))),
        }
        match msg.tag() {
            tag::AUTHENTICATION => {
                let code = auth_request_code(msg.body()).ok_or_else(|| {
                    AuthError::Backend(backend_violation(
                        member,
                        "an Authentication message without a code",
                    ))
                })?;
                if auth::expects_client_response(code) {
                    flush(client, &mut to_client).await?;
                    let answer = read_client(client, &mut from_client).await?;
                    if code == auth::SASL
                        && backend_tls
                        && announces_unoffered_channel_binding(answer.body())
                    {
                        return Err(AuthError::Client(channel_binding_unsupported()));
                    }
                    backend
                        .write_all(&answer.raw)
                        .await
                        .map_err(|e| AuthError::Backend(backend_gone(member, &e.to_string())))?;
                }
            }
            tag::BACKEND_KEY_DATA => {
                let key = CancelKey::from_backend_key_data(msg.body())
                    .map_err(|e| AuthError::Backend(backend_violation(member, &e.message)))?;
                backend_key = Some(key);
            }
            tag::ERROR_RESPONSE => {
                flush(client, &mut to_client).await?;
                return Err(AuthError::Refused);
            }
            tag::READY_FOR_QUERY => {
                flush(client, &mut to_client).await?;
                return Ok(Authenticated {
                    backend_key,
                    to_client: from_backend,
                    to_backend: from_client,
                });
            }
            // ParameterStatus, NoticeResponse, NegotiateProtocolVersion:
            // the client's business.
            _ => {}
        }
    }
}

/// An AuthenticationSASL message rewritten without SCRAM-SHA-256-PLUS, or
/// `None` for every other message (forwarded as it is).
fn without_channel_binding_offer(msg: &Message) -> Result<Option<Vec<u8>>, ProtocolError> {
    if msg.tag() != tag::AUTHENTICATION || auth_request_code(msg.body()) != Some(auth::SASL) {
        return Ok(None);
    }
    Ok(without_channel_binding(msg.body())?.map(|body| {
        let mut out = Vec::with_capacity(body.len() + 5);
        out.push(tag::AUTHENTICATION);
        out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }))
}

async fn flush<C: AsyncWrite + Unpin>(client: &mut C, out: &mut BytesMut) -> Result<(), AuthError> {
    client.write_all(out).await.map_err(AuthError::ClientIo)?;
    out.clear();
    Ok(())
}

async fn read_backend<B: AsyncRead + Unpin>(
    backend: &mut B,
    buf: &mut BytesMut,
    member: &str,
) -> Result<Message, AuthError> {
    loop {
        match decode_message(buf, MAX_BACKEND_HANDSHAKE_MESSAGE, "server") {
            Ok(Some(msg)) => return Ok(msg),
            Ok(None) => {}
            Err(e) => return Err(AuthError::Backend(backend_violation(member, &e.message))),
        }
        match backend.read_buf(buf).await {
            Ok(0) => {
                return Err(AuthError::Backend(backend_gone(
                    member,
                    "it closed the connection",
                )))
            }
            Ok(_) => {}
            Err(e) => return Err(AuthError::Backend(backend_gone(member, &e.to_string()))),
        }
    }
}

/// Reads the client's answer to an authentication request.
async fn read_client<C: AsyncRead + Unpin>(
    client: &mut C,
    buf: &mut BytesMut,
) -> Result<Message, AuthError> {
    loop {
        if let Some(msg) =
            decode_message(buf, MAX_CLIENT_AUTH_MESSAGE, "client").map_err(AuthError::Client)?
        {
            return match msg.tag() {
                tag::PASSWORD => Ok(msg),
                tag::TERMINATE => Err(AuthError::ClientGone),
                other => Err(AuthError::Client(ProtocolError::new(
                    SqlState::PROTOCOL_VIOLATION,
                    format!(
                        "expected a password or SASL response during authentication, got message type {:?}",
                        char::from(other)
                    ),
                ))),
            };
        }
        match client.read_buf(buf).await {
            Ok(0) => return Err(AuthError::ClientGone),
            Ok(_) => {}
            Err(e) => return Err(AuthError::ClientIo(e)),
        }
    }
}

/// The client announced channel-binding support (SCRAM GS2 flag `y`, what
/// libpq's `channel_binding=prefer` sends over TLS). PostgreSQL treats that
/// as a downgrade attack on a TLS connection, and rolegate's connection to
/// the member is TLS, so the exchange cannot succeed: say why, clearly,
/// before the server answers with a cryptic refusal.
fn channel_binding_unsupported() -> ProtocolError {
    ProtocolError::new(
        SqlState::FEATURE_NOT_SUPPORTED,
        "SCRAM channel binding cannot work through rolegate: the client announced channel binding support over TLS, and PostgreSQL refuses that announcement because rolegate's own connection to it is also TLS",
    )
    .with_hint("Connect with channel_binding=disable, or set backend_tls = \"disable\" for this cluster if the network between rolegate and PostgreSQL is trusted.")
}

fn backend_violation(member: &str, what: &str) -> ProtocolError {
    ProtocolError::new(
        SqlState::PROTOCOL_VIOLATION,
        format!("member {member} sent an invalid message during authentication: {what}"),
    )
}

fn backend_gone(member: &str, what: &str) -> ProtocolError {
    ProtocolError::new(
        SqlState::CONNECTION_FAILURE,
        format!("the connection to member {member} failed during authentication: {what}"),
    )
    .with_hint("Reconnect; if this persists, check the member's PostgreSQL log.")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    use crate::protocol::message::encode as msg;

    #[tokio::test]
    async fn md5_exchange_captures_the_key() {
        let (mut client_app, mut client) = duplex(1 << 16);
        let (mut backend, mut server_app) = duplex(1 << 16);
        let server = tokio::spawn(async move {
            server_app
                .write_all(&msg(b'R', b"\0\0\0\x05salt"))
                .await
                .expect("write");
            let mut answer = vec![0u8; 5 + 4];
            server_app.read_exact(&mut answer).await.expect("read");
            assert_eq!(answer, msg(b'p', b"md5\0"));
            let mut rest = msg(b'R', b"\0\0\0\0");
            rest.extend(msg(b'K', b"\0\0\0\x2aKEY!"));
            rest.extend(msg(b'Z', b"I"));
            server_app.write_all(&rest).await.expect("write");
            server_app
        });
        client_app
            .write_all(&msg(b'p', b"md5\0"))
            .await
            .expect("write");
        let done = relay_authentication(&mut client, &mut backend, BytesMut::new(), "pg1", false)
            .await
            .expect("authenticated");
        let key = done.backend_key.expect("key");
        assert_eq!(key.pid, 42);
        assert_eq!(&key.secret[..], b"KEY!");
        drop(server.await.expect("server"));
    }

    #[tokio::test]
    async fn wrong_client_message_is_a_violation() {
        let (mut client_app, mut client) = duplex(1 << 16);
        let (mut backend, mut server_app) = duplex(1 << 16);
        server_app
            .write_all(&msg(b'R', b"\0\0\0\x03"))
            .await
            .expect("write");
        client_app
            .write_all(&msg(b'Q', b"select 1\0"))
            .await
            .expect("write");
        let err = relay_authentication(&mut client, &mut backend, BytesMut::new(), "pg1", false)
            .await
            .err()
            .expect("violation");
        assert!(
            matches!(err, AuthError::Client(ref e) if e.sqlstate == SqlState::PROTOCOL_VIOLATION)
        );
    }

    #[tokio::test]
    async fn backend_error_is_forwarded_and_ends() {
        let (mut client_app, mut client) = duplex(1 << 16);
        let (mut backend, mut server_app) = duplex(1 << 16);
        let error = msg(b'E', b"SFATAL\0C28P01\0\0");
        server_app.write_all(&error).await.expect("write");
        let err = relay_authentication(&mut client, &mut backend, BytesMut::new(), "pg1", false)
            .await
            .err()
            .expect("refused");
        assert!(matches!(err, AuthError::Refused));
        let mut got = vec![0u8; error.len()];
        client_app.read_exact(&mut got).await.expect("read");
        assert_eq!(got, error);
    }

    #[tokio::test]
    async fn backend_vanishing_is_08006() {
        let (_client_app, mut client) = duplex(1 << 16);
        let (mut backend, server_app) = duplex(1 << 16);
        drop(server_app);
        let err = relay_authentication(&mut client, &mut backend, BytesMut::new(), "pg1", false)
            .await
            .err()
            .expect("gone");
        assert!(
            matches!(err, AuthError::Backend(ref e) if e.sqlstate == SqlState::CONNECTION_FAILURE)
        );
    }
}
