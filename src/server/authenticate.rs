//! Relaying authentication between client and backend.
//!
//! rolegate holds no passwords. After forwarding the StartupMessage it
//! reads the backend's messages one by one and passes them on; whenever an
//! Authentication request expects an answer (cleartext, MD5, SASL, GSS) it
//! reads exactly one message from the client, checks that it is a
//! password-type message of sane length, and forwards it. After a GSSAPI
//! continuation (or SSPI) either side may speak next, so rolegate relays
//! whichever does first. BackendKeyData is captured for cancel routing,
//! and the client gets the key that `issue_key` returns for it (the same,
//! or in a fleet rolegate's own). The exchange ends at the first
//! ReadyForQuery (the session is open) or at an ErrorResponse (the backend
//! refused, and the client has already been given its error).
//!
//! Two changes are made on the way: SCRAM-SHA-256-PLUS is removed from the
//! backend's SASL mechanism list (see [`crate::protocol::sasl`]), and in a
//! fleet BackendKeyData carries rolegate's key (see [`crate::fleet::key`]).
//!
//! One check is made at the end: a write session's server must not report
//! `in_hot_standby = on`. Patroni restarts a demoted leader as a replica
//! within a second, faster than a REST check interval while etcd is out
//! of reach, so the view can still name it leader when it already accepts
//! logins in recovery; PostgreSQL's own word at login closes that gap.
//! The client is refused before it sees AuthenticationOk.
//!
//! Backend messages are forwarded in batches: everything the backend sent
//! before it next waits for the client goes out in one write.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::login_gate::LoginSlot;
use crate::protocol::message::auth::{self, Next};
use crate::protocol::message::{
    auth_request_code, decode_message, parameter_status, tag, Message,
    MAX_BACKEND_HANDSHAKE_MESSAGE, MAX_CLIENT_AUTH_MESSAGE,
};
use crate::protocol::sasl::{announces_unoffered_channel_binding, without_channel_binding};
use crate::protocol::startup::CancelKey;
use crate::protocol::{ProtocolError, SqlState};

/// A session that reached ReadyForQuery.
pub struct Authenticated {
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
    /// A write session's server reported `in_hot_standby = on` at login:
    /// the member rolegate took for the leader is in recovery (it was
    /// demoted, or is about to be promoted, faster than the view moved).
    /// PostgreSQL reports the setting from version 14 on.
    #[error("{0}")]
    InRecovery(ProtocolError),
    #[error("client ended the connection during authentication")]
    ClientGone,
    #[error("client connection failed during authentication: {0}")]
    ClientIo(std::io::Error),
}

/// The member a login is relayed to.
pub struct LoginTarget<'a> {
    /// Its name, for errors.
    pub member: &'a str,
    /// Whether rolegate's connection to it is encrypted, which decides
    /// whether a client's channel-binding announcement can succeed.
    pub tls: bool,
    /// Whether the session is for writes: a server that reports itself
    /// in hot standby is then refused (see [`AuthError::InRecovery`]).
    pub for_writes: bool,
}

/// Relays authentication until the session is ready or refused.
/// `issue_key` is given the backend's cancel key and returns the one the
/// client gets. `login` is the member's login slot, which each wait for
/// the client's answer may give up (see [`LoginSlot::client_turn`]).
pub async fn relay_authentication<C, B>(
    client: &mut C,
    backend: &mut B,
    mut from_client: BytesMut,
    target: &LoginTarget<'_>,
    issue_key: &mut (dyn FnMut(CancelKey) -> CancelKey + Send),
    login: &mut LoginSlot,
) -> Result<Authenticated, AuthError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let member = target.member;
    // A login's backend messages (authentication, a dozen ParameterStatus,
    // BackendKeyData, ReadyForQuery) fit in well under 1 KiB; the buffers
    // grow when a server says more.
    let mut from_backend = BytesMut::with_capacity(1024);
    let mut to_client = BytesMut::with_capacity(512);
    // A backend message that arrived while either side could speak.
    let mut spoke_first = None;
    let mut in_hot_standby = false;
    loop {
        let msg = match spoke_first.take() {
            Some(msg) => msg,
            None => read_backend(backend, &mut from_backend, member).await?,
        };
        queue_for_client(&msg, &mut to_client, member)?;
        match msg.tag() {
            tag::AUTHENTICATION => {
                let code = auth_request_code(msg.body()).ok_or_else(|| {
                    AuthError::Backend(backend_violation(
                        member,
                        "an Authentication message without a code",
                    ))
                })?;
                let answer = match auth::next_speaker(code) {
                    Next::Backend => None,
                    Next::Client => {
                        flush(client, &mut to_client).await?;
                        Some(
                            login
                                .client_turn(read_client(client, &mut from_client))
                                .await?,
                        )
                    }
                    Next::Either => {
                        flush(client, &mut to_client).await?;
                        let first = login
                            .client_turn(first_to_speak(
                                client,
                                backend,
                                &mut from_client,
                                &mut from_backend,
                                member,
                            ))
                            .await?;
                        match first {
                            Spoke::Client(answer) => Some(answer),
                            Spoke::Backend(msg) => {
                                spoke_first = Some(msg);
                                None
                            }
                        }
                    }
                };
                if let Some(answer) = answer {
                    pass_answer(backend, &answer, code, target.tls, member).await?;
                }
            }
            tag::BACKEND_KEY_DATA => {
                let key = CancelKey::from_backend_key_data(msg.body())
                    .map_err(|e| AuthError::Backend(backend_violation(member, &e.message)))?;
                to_client.extend_from_slice(&issue_key(key).encode_backend_key_data());
            }
            tag::ERROR_RESPONSE => {
                flush(client, &mut to_client).await?;
                return Err(AuthError::Refused);
            }
            tag::PARAMETER_STATUS => {
                in_hot_standby = reports_hot_standby(msg.body()).unwrap_or(in_hot_standby);
            }
            // Nothing past the password has reached the client: it is told
            // the refusal instead of AuthenticationOk.
            tag::READY_FOR_QUERY if in_hot_standby && target.for_writes => {
                return Err(AuthError::InRecovery(in_recovery(member)));
            }
            tag::READY_FOR_QUERY => {
                flush(client, &mut to_client).await?;
                return Ok(Authenticated {
                    to_client: from_backend,
                    to_backend: from_client,
                });
            }
            // NoticeResponse, NegotiateProtocolVersion: the client's
            // business.
            _ => {}
        }
    }
}

/// Adds a backend message to what the client is sent next, without the
/// channel-binding offer; BackendKeyData is left for the caller, which
/// writes the key the client is given.
fn queue_for_client(
    msg: &Message,
    to_client: &mut BytesMut,
    member: &str,
) -> Result<(), AuthError> {
    match without_channel_binding_offer(msg) {
        Ok(Some(rewritten)) => to_client.extend_from_slice(&rewritten),
        Ok(None) if msg.tag() == tag::BACKEND_KEY_DATA => {}
        Ok(None) => to_client.extend_from_slice(&msg.raw),
        Err(e) => return Err(AuthError::Backend(backend_violation(member, &e.message))),
    }
    Ok(())
}

/// Whether a ParameterStatus body reports hot standby on (`Some(true)`)
/// or off; `None` for every other parameter.
fn reports_hot_standby(body: &[u8]) -> Option<bool> {
    match parameter_status(body)? {
        (b"in_hot_standby", value) => Some(value == b"on"),
        _ => None,
    }
}

/// Writes the client's answer to an authentication request of `code` to
/// the server, unless it asks for channel binding the server's TLS
/// connection cannot give (rolegate ends TLS on both sides).
async fn pass_answer<B: AsyncWrite + Unpin>(
    backend: &mut B,
    answer: &Message,
    code: u32,
    backend_tls: bool,
    member: &str,
) -> Result<(), AuthError> {
    if code == auth::SASL && backend_tls && announces_unoffered_channel_binding(answer.body()) {
        return Err(AuthError::Client(channel_binding_unsupported()));
    }
    backend
        .write_all(&answer.raw)
        .await
        .map_err(|e| AuthError::Backend(backend_gone(member, &e.to_string())))
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
        if let Some(msg) = backend_message(buf, member)? {
            return Ok(msg);
        }
        backend_read(backend.read_buf(buf).await, member)?;
    }
}

/// The backend's next whole message in `buf`, if one is there.
fn backend_message(buf: &mut BytesMut, member: &str) -> Result<Option<Message>, AuthError> {
    decode_message(buf, MAX_BACKEND_HANDSHAKE_MESSAGE, "server")
        .map_err(|e| AuthError::Backend(backend_violation(member, &e.message)))
}

/// The outcome of one read from the backend: more bytes, or why not.
fn backend_read(read: std::io::Result<usize>, member: &str) -> Result<(), AuthError> {
    match read {
        Ok(0) => Err(AuthError::Backend(backend_gone(
            member,
            "it closed the connection",
        ))),
        Ok(_) => Ok(()),
        Err(e) => Err(AuthError::Backend(backend_gone(member, &e.to_string()))),
    }
}

/// Reads the client's answer to an authentication request.
async fn read_client<C: AsyncRead + Unpin>(
    client: &mut C,
    buf: &mut BytesMut,
) -> Result<Message, AuthError> {
    loop {
        if let Some(msg) = client_message(buf)? {
            return Ok(msg);
        }
        fill_from_client(client, buf).await?;
    }
}

/// The side that spoke first when either could, with what it said.
enum Spoke {
    Client(Message),
    Backend(Message),
}

/// Waits until either side has sent a whole message and returns it. Reads
/// are cancel-safe, so the side that loses the race keeps what it sent in
/// its buffer.
async fn first_to_speak<C, B>(
    client: &mut C,
    backend: &mut B,
    from_client: &mut BytesMut,
    from_backend: &mut BytesMut,
    member: &str,
) -> Result<Spoke, AuthError>
where
    C: AsyncRead + Unpin,
    B: AsyncRead + Unpin,
{
    loop {
        if let Some(msg) = backend_message(from_backend, member)? {
            return Ok(Spoke::Backend(msg));
        }
        if let Some(msg) = client_message(from_client)? {
            return Ok(Spoke::Client(msg));
        }
        tokio::select! {
            read = backend.read_buf(from_backend) => backend_read(read, member)?,
            read = fill_from_client(client, from_client) => read?,
        }
    }
}

/// The client's next whole message in `buf`, if one is there; only a
/// password-type message is an answer to an authentication request.
fn client_message(buf: &mut BytesMut) -> Result<Option<Message>, AuthError> {
    let Some(msg) =
        decode_message(buf, MAX_CLIENT_AUTH_MESSAGE, "client").map_err(AuthError::Client)?
    else {
        return Ok(None);
    };
    match msg.tag() {
        tag::PASSWORD => Ok(Some(msg)),
        tag::TERMINATE => Err(AuthError::ClientGone),
        other => Err(AuthError::Client(ProtocolError::new(
            SqlState::PROTOCOL_VIOLATION,
            format!(
                "expected a password or SASL response during authentication, got message type {:?}",
                char::from(other)
            ),
        ))),
    }
}

async fn fill_from_client<C: AsyncRead + Unpin>(
    client: &mut C,
    buf: &mut BytesMut,
) -> Result<(), AuthError> {
    match client.read_buf(buf).await {
        Ok(0) => Err(AuthError::ClientGone),
        Ok(_) => Ok(()),
        Err(e) => Err(AuthError::ClientIo(e)),
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

/// The refusal of a write session whose server is in hot standby.
pub(crate) fn in_recovery(member: &str) -> ProtocolError {
    ProtocolError::new(
        SqlState::CANNOT_CONNECT_NOW,
        format!(
            "member {member} is in recovery, not the primary: the leader is changing faster than rolegate's view of it"
        ),
    )
    .with_hint("Reconnect; new write sessions go to the leader once rolegate confirms it.")
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
mod tests;
