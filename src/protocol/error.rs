//! The errors rolegate itself tells clients, and their wire encoding.
//!
//! Every failure a client can see leaves rolegate as an ErrorResponse
//! ("ErrorResponse" in "Message Formats", PostgreSQL docs chapter 55) with a
//! real SQLSTATE from Appendix A, so drivers can react to the class of the
//! error (08: connection exception, 53: insufficient resources, 57: operator
//! intervention) rather than parse text. Encoding uses pgwire's message
//! types; pgwire's decoders are never used on peer bytes.

use bytes::{Bytes, BytesMut};
use pgwire::messages::response::ErrorResponse;
use pgwire::messages::Message;

/// A five-character SQLSTATE code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SqlState(&'static str);

impl SqlState {
    pub const CONNECTION_EXCEPTION: Self = Self("08000");
    pub const SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION: Self = Self("08001");
    pub const CONNECTION_FAILURE: Self = Self("08006");
    pub const PROTOCOL_VIOLATION: Self = Self("08P01");
    pub const FEATURE_NOT_SUPPORTED: Self = Self("0A000");
    pub const INVALID_AUTHORIZATION_SPECIFICATION: Self = Self("28000");
    pub const INVALID_PASSWORD: Self = Self("28P01");
    pub const TOO_MANY_CONNECTIONS: Self = Self("53300");
    pub const ADMIN_SHUTDOWN: Self = Self("57P01");
    pub const CANNOT_CONNECT_NOW: Self = Self("57P03");
    pub const INTERNAL_ERROR: Self = Self("XX000");

    pub fn code(self) -> &'static str {
        self.0
    }
}

impl std::fmt::Display for SqlState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// A client-visible error: a SQLSTATE and a message saying what happened
/// and, where there is something to do, what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{sqlstate}: {message}")]
pub struct ProtocolError {
    pub sqlstate: SqlState,
    pub message: String,
    pub hint: Option<String>,
}

impl ProtocolError {
    pub fn new(sqlstate: SqlState, message: impl Into<String>) -> Self {
        Self {
            sqlstate,
            message: message.into(),
            hint: None,
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Encodes this error as a FATAL ErrorResponse: rolegate only sends
    /// errors that end the connection.
    pub fn to_fatal(&self) -> Bytes {
        let mut fields = vec![
            (b'S', "FATAL".to_owned()),
            (b'V', "FATAL".to_owned()),
            (b'C', self.sqlstate.code().to_owned()),
            (b'M', self.message.clone()),
        ];
        if let Some(hint) = &self.hint {
            fields.push((b'H', hint.clone()));
        }
        let response = ErrorResponse::new(fields);
        let mut out = BytesMut::with_capacity(response.message_length() + 1);
        // Encoding into a BytesMut cannot fail: it only appends bytes.
        if response.encode(&mut out).is_err() {
            out.clear();
        }
        out.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fatal_encoding_has_all_fields() {
        let bytes = ProtocolError::new(SqlState::TOO_MANY_CONNECTIONS, "too many")
            .with_hint("wait")
            .to_fatal();
        assert_eq!(bytes[0], b'E');
        let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        assert_eq!(len + 1, bytes.len());
        let body = &bytes[5..];
        assert_eq!(body, &b"SFATAL\0VFATAL\0C53300\0Mtoo many\0Hwait\0\0"[..]);
    }
}
