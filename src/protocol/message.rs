//! Whole typed messages (`tag`, `length`, body), as exchanged while a
//! session authenticates.
//!
//! Until the first ReadyForQuery rolegate reads every message in both
//! directions: it must see authentication requests to know when the client
//! is expected to answer, BackendKeyData to route cancels, and the end of
//! the handshake. The decoder checks the length against a caller-given
//! maximum before it waits for (or allocates) the body, keeps the raw bytes
//! for forwarding, and is cancel-safe: nothing is consumed until a whole
//! message is buffered.

use bytes::{Bytes, BytesMut};

use super::error::{ProtocolError, SqlState};
use super::frame::HEADER_LEN;

/// Longest client message accepted during authentication. PostgreSQL
/// itself caps password and SASL packets at 65,535 bytes
/// (`PG_MAX_AUTH_TOKEN_LENGTH`); allow headroom for GSS tokens.
pub const MAX_CLIENT_AUTH_MESSAGE: usize = 1 << 17;
/// Longest backend message accepted before ReadyForQuery (notices and
/// errors can carry long texts; anything bigger is not a real handshake).
pub const MAX_BACKEND_HANDSHAKE_MESSAGE: usize = 1 << 20;

/// One complete message with its header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The whole message, type byte and length included.
    pub raw: Bytes,
}

impl Message {
    pub fn tag(&self) -> u8 {
        self.raw[0]
    }

    pub fn body(&self) -> &[u8] {
        &self.raw[HEADER_LEN..]
    }
}

/// Message type bytes rolegate looks at.
pub mod tag {
    pub const AUTHENTICATION: u8 = b'R';
    pub const BACKEND_KEY_DATA: u8 = b'K';
    pub const ERROR_RESPONSE: u8 = b'E';
    pub const PARAMETER_STATUS: u8 = b'S';
    pub const READY_FOR_QUERY: u8 = b'Z';
    pub const PASSWORD: u8 = b'p';
    pub const TERMINATE: u8 = b'X';
}

/// Decodes one message from `buf`, or returns `Ok(None)` when more bytes
/// are needed. `side` names the sender in error messages.
pub fn decode_message(
    buf: &mut BytesMut,
    max_len: usize,
    side: &str,
) -> Result<Option<Message>, ProtocolError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len < 4 || len > max_len {
        return Err(ProtocolError::new(
            SqlState::PROTOCOL_VIOLATION,
            format!(
                "invalid message length {len} from the {side} for message type {:?} (allowed: 4 to {max_len})",
                char::from(buf[0])
            ),
        ));
    }
    if buf.len() < len + 1 {
        return Ok(None);
    }
    Ok(Some(Message {
        raw: buf.split_to(len + 1).freeze(),
    }))
}

/// The request code of an Authentication message body, if it has one.
pub fn auth_request_code(body: &[u8]) -> Option<u32> {
    let code: [u8; 4] = body.get(..4)?.try_into().ok()?;
    Some(u32::from_be_bytes(code))
}

/// The name and value of a ParameterStatus message body, if it has both.
pub fn parameter_status(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let name_end = body.iter().position(|&b| b == 0)?;
    let rest = &body[name_end + 1..];
    let value_end = rest.iter().position(|&b| b == 0)?;
    Some((&body[..name_end], &rest[..value_end]))
}

/// Authentication request codes (the code in every Authentication message).
pub mod auth {
    pub const OK: u32 = 0;
    pub const KERBEROS_V5: u32 = 2;
    pub const CLEARTEXT: u32 = 3;
    pub const MD5: u32 = 5;
    pub const GSS: u32 = 7;
    pub const GSS_CONTINUE: u32 = 8;
    pub const SSPI: u32 = 9;
    pub const SASL: u32 = 10;
    pub const SASL_CONTINUE: u32 = 11;
    pub const SASL_FINAL: u32 = 12;

    /// The method an Authentication request code asks for, in
    /// `pg_hba.conf`'s words, for errors.
    pub fn method_name(code: u32) -> &'static str {
        match code {
            KERBEROS_V5 => "krb5",
            CLEARTEXT => "password",
            MD5 => "md5",
            GSS | GSS_CONTINUE => "gss",
            SSPI => "sspi",
            SASL | SASL_CONTINUE | SASL_FINAL => "scram-sha-256",
            _ => "unknown",
        }
    }

    /// Who speaks after an Authentication request with this code.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Next {
        /// The backend goes on (AuthenticationOk, SASLFinal).
        Backend,
        /// The backend waits for the client's answer.
        Client,
        /// Either: a GSSAPI or SSPI exchange. PostgreSQL sends the last
        /// mutual-authentication token in an AuthenticationGSSContinue
        /// and then AuthenticationOk without reading anything, while a
        /// context that needs more rounds waits for the client's next
        /// token; only the GSS library on each side knows which (see
        /// `pg_GSS_recvauth` in PostgreSQL's `auth.c`).
        Either,
    }

    /// Who speaks after the backend sent this request code.
    pub fn next_speaker(code: u32) -> Next {
        match code {
            OK | SASL_FINAL => Next::Backend,
            GSS_CONTINUE | SSPI => Next::Either,
            _ => Next::Client,
        }
    }
}

/// Builds a message from its type byte and body, for tests.
#[cfg(test)]
pub(crate) fn encode(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_and_keeps_the_rest() {
        let mut buf = BytesMut::from(&b"R\0\0\0\x08\0\0\0\0Z\0\0"[..]);
        let msg = decode_message(&mut buf, 100, "server")
            .expect("valid")
            .expect("complete");
        assert_eq!(msg.tag(), b'R');
        assert_eq!(auth_request_code(msg.body()), Some(auth::OK));
        assert_eq!(&buf[..], b"Z\0\0");
        assert_eq!(decode_message(&mut buf, 100, "server"), Ok(None));
    }

    #[test]
    fn hostile_lengths() {
        for len in [0u32, 3, 101, u32::MAX] {
            let mut buf = BytesMut::from(&[b'p'][..]);
            buf.extend_from_slice(&len.to_be_bytes());
            assert!(decode_message(&mut buf, 100, "client").is_err(), "{len}");
        }
    }

    #[test]
    fn short_auth_body_has_no_code() {
        assert_eq!(auth_request_code(b"\0\0"), None);
    }

    #[test]
    fn parameter_status_needs_both_terminators() {
        assert_eq!(
            parameter_status(b"in_hot_standby\0on\0"),
            Some((&b"in_hot_standby"[..], &b"on"[..]))
        );
        assert_eq!(parameter_status(b"in_hot_standby\0on"), None);
        assert_eq!(parameter_status(b"in_hot_standby"), None);
        assert_eq!(parameter_status(b""), None);
    }
}
