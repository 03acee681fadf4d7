//! The first packet a client sends: SSLRequest, GSSENCRequest,
//! CancelRequest or StartupMessage, none of which has a type byte.
//!
//! Implements "Message Formats" and "Start-up" of the PostgreSQL frontend/
//! backend protocol (chapter 55 of the PostgreSQL 18 docs), for protocol
//! 3: 3.0, 3.2, and any later minor a client asks for, which the server
//! negotiates down (NegotiateProtocolVersion). A direct-TLS ClientHello (first byte 0x16,
//! PostgreSQL 17's `sslnegotiation=direct`) is recognised before any length
//! is read.
//!
//! A Terminate message (`X`, length 4) is also recognised as a first
//! packet: clients that close at once (node-postgres's `connect(); end()`)
//! send it before any startup packet. PostgreSQL reads its bytes as an
//! impossible length and closes without a word; a client that said
//! goodbye expects nothing back, so neither does rolegate answer it.
//!
//! The decoder is strict: the length must lie in `[8, MAX_STARTUP_PACKET]`
//! before a byte of body is awaited, the body must end exactly where the
//! length says, and the raw bytes are kept so the StartupMessage can be
//! forwarded to the backend unchanged. It is incremental and cancel-safe:
//! [`decode_first_packet`] consumes nothing until a whole packet is
//! buffered, so it can be called again after every read.

use bytes::{Buf, Bytes, BytesMut};

use super::error::{ProtocolError, SqlState};

/// PostgreSQL's own limit for the first packet (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_PACKET: usize = 10_000;
/// The smallest valid first packet: length and code.
const MIN_PACKET: usize = 8;
/// The first byte of a TLS handshake record.
pub const TLS_HANDSHAKE_BYTE: u8 = 0x16;

const CANCEL_REQUEST_CODE: u32 = (1234 << 16) | 5678;
const SSL_REQUEST_CODE: u32 = (1234 << 16) | 5679;
const GSSENC_REQUEST_CODE: u32 = (1234 << 16) | 5680;
/// A whole Terminate message: type byte and its length, 4.
const TERMINATE: [u8; 5] = [b'X', 0, 0, 0, 4];

/// Protocol 3.2 allows cancel keys of up to 256 bytes; 3.0 used exactly 4.
pub const MAX_CANCEL_KEY: usize = 256;
/// The largest CancelRequest: length, code, process id, longest secret.
pub const MAX_CANCEL_REQUEST: usize = 12 + MAX_CANCEL_KEY;
const MIN_CANCEL_KEY: usize = 4;

/// What the first packet asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstPacket {
    SslRequest,
    GssEncRequest,
    /// A TLS ClientHello arrived instead of a Postgres packet; nothing was
    /// consumed, so the bytes are still in the buffer for the TLS layer.
    DirectTls,
    Cancel(CancelKey),
    Startup(StartupMessage),
    /// A Terminate message where a startup packet belongs: the client
    /// closes before it began.
    Terminate,
}

/// A backend process's identity for cancellation: its PID and secret key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CancelKey {
    pub pid: u32,
    /// 4 bytes under protocol 3.0, up to [`MAX_CANCEL_KEY`] under 3.2.
    pub secret: Bytes,
}

impl CancelKey {
    /// Encodes this key as a CancelRequest packet.
    pub fn encode_cancel_request(&self) -> Bytes {
        let len = 12 + self.secret.len();
        let mut out = BytesMut::with_capacity(len);
        out.extend_from_slice(&(len as u32).to_be_bytes());
        out.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
        out.extend_from_slice(&self.pid.to_be_bytes());
        out.extend_from_slice(&self.secret);
        out.freeze()
    }

    /// Encodes this key as a BackendKeyData message.
    pub fn encode_backend_key_data(&self) -> Bytes {
        let len = 8 + self.secret.len();
        let mut out = BytesMut::with_capacity(1 + len);
        out.extend_from_slice(b"K");
        out.extend_from_slice(&(len as u32).to_be_bytes());
        out.extend_from_slice(&self.pid.to_be_bytes());
        out.extend_from_slice(&self.secret);
        out.freeze()
    }

    /// Decodes the body of a BackendKeyData message (after its 5-byte header).
    pub fn from_backend_key_data(body: &[u8]) -> Result<Self, ProtocolError> {
        if body.len() < 4 + MIN_CANCEL_KEY || body.len() > 4 + MAX_CANCEL_KEY {
            return Err(ProtocolError::new(
                SqlState::PROTOCOL_VIOLATION,
                format!("BackendKeyData of {} bytes is malformed", body.len()),
            ));
        }
        let mut body = body;
        let pid = body.get_u32();
        Ok(Self {
            pid,
            secret: Bytes::copy_from_slice(body),
        })
    }
}

/// The protocol version a StartupMessage asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProtocolVersion {
    pub major: u16,
    pub minor: u16,
}

impl std::fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// A validated StartupMessage with its raw bytes kept for forwarding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    pub version: ProtocolVersion,
    /// The whole packet, length included, exactly as the client sent it.
    pub raw: Bytes,
    params: Vec<(Bytes, Bytes)>,
}

impl StartupMessage {
    /// The value of a startup parameter, as the client's bytes.
    pub fn param(&self, name: &str) -> Option<&[u8]> {
        self.params
            .iter()
            .find(|(n, _)| n.as_ref() == name.as_bytes())
            .map(|(_, v)| v.as_ref())
    }

    /// A parameter as text for logs; invalid UTF-8 is replaced.
    pub fn param_lossy(&self, name: &str) -> Option<String> {
        self.param(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// Every parameter, names and values as the client's bytes.
    pub fn params(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.params.iter().map(|(n, v)| (n.as_ref(), v.as_ref()))
    }

    pub fn user(&self) -> String {
        self.param_lossy("user").unwrap_or_default()
    }

    /// The database name; PostgreSQL defaults it to the user name.
    pub fn database(&self) -> String {
        self.param_lossy("database").unwrap_or_else(|| self.user())
    }
}

/// Decodes the first packet from `buf`.
///
/// Returns `Ok(None)` when more bytes are needed (nothing is consumed), the
/// packet when one is complete (its bytes are consumed, except for
/// [`FirstPacket::DirectTls`]), or an error that should be sent to the
/// client before the connection is closed.
pub fn decode_first_packet(buf: &mut BytesMut) -> Result<Option<FirstPacket>, ProtocolError> {
    if buf.first() == Some(&TLS_HANDSHAKE_BYTE) {
        return Ok(Some(FirstPacket::DirectTls));
    }
    if buf.len() < 4 {
        return Ok(None);
    }
    if buf[..4] == TERMINATE[..4] {
        match buf.get(4) {
            None => return Ok(None),
            Some(&byte) if byte == TERMINATE[4] => {
                buf.advance(TERMINATE.len());
                return Ok(Some(FirstPacket::Terminate));
            }
            Some(_) => {}
        }
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if !(MIN_PACKET..=MAX_STARTUP_PACKET).contains(&len) {
        return Err(ProtocolError::new(
            SqlState::PROTOCOL_VIOLATION,
            format!(
                "invalid length of startup packet: {len} bytes (allowed: {MIN_PACKET} to {MAX_STARTUP_PACKET})"
            ),
        ));
    }
    if buf.len() < len {
        return Ok(None);
    }
    let raw = buf.split_to(len).freeze();
    parse_packet(raw).map(Some)
}

fn parse_packet(raw: Bytes) -> Result<FirstPacket, ProtocolError> {
    let mut body = raw.slice(4..);
    let code = body.get_u32();
    match code {
        SSL_REQUEST_CODE => expect_exact(&raw, 8, "SSLRequest").map(|()| FirstPacket::SslRequest),
        GSSENC_REQUEST_CODE => {
            expect_exact(&raw, 8, "GSSENCRequest").map(|()| FirstPacket::GssEncRequest)
        }
        CANCEL_REQUEST_CODE => parse_cancel(body).map(FirstPacket::Cancel),
        _ => {
            let version = ProtocolVersion {
                major: (code >> 16) as u16,
                minor: (code & 0xffff) as u16,
            };
            // Any 3.x goes to the server as it is: a server that speaks an
            // older minor answers NegotiateProtocolVersion (with the `_pq_`
            // options it does not know), which is relayed, and the session
            // goes on at the server's version; cancel keys are taken as
            // BackendKeyData gives them.
            if version.major != 3 {
                return Err(ProtocolError::new(
                    SqlState::FEATURE_NOT_SUPPORTED,
                    format!(
                        "unsupported frontend protocol {version}: rolegate speaks protocol 3 (3.0, 3.2 and later minors are negotiated with the server)"
                    ),
                ));
            }
            let params = parse_params(body)?;
            if !params.iter().any(|(n, _)| n.as_ref() == b"user") {
                return Err(ProtocolError::new(
                    SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
                    "no PostgreSQL user name specified in startup packet",
                ));
            }
            Ok(FirstPacket::Startup(StartupMessage {
                version,
                raw,
                params,
            }))
        }
    }
}

fn expect_exact(raw: &Bytes, len: usize, what: &str) -> Result<(), ProtocolError> {
    if raw.len() == len {
        Ok(())
    } else {
        Err(ProtocolError::new(
            SqlState::PROTOCOL_VIOLATION,
            format!("{what} must be {len} bytes long, got {}", raw.len()),
        ))
    }
}

fn parse_cancel(mut body: Bytes) -> Result<CancelKey, ProtocolError> {
    if body.len() < 4 + MIN_CANCEL_KEY || body.len() > 4 + MAX_CANCEL_KEY {
        return Err(ProtocolError::new(
            SqlState::PROTOCOL_VIOLATION,
            format!(
                "CancelRequest of {} bytes is malformed (expected 16 to {})",
                body.len() + 8,
                12 + MAX_CANCEL_KEY
            ),
        ));
    }
    let pid = body.get_u32();
    Ok(CancelKey { pid, secret: body })
}

/// Parses `name\0value\0 ... \0`: the list must end with a lone NUL that is
/// the last byte of the packet, and every name must have a value.
fn parse_params(mut body: Bytes) -> Result<Vec<(Bytes, Bytes)>, ProtocolError> {
    let layout = |detail: &str| {
        ProtocolError::new(
            SqlState::PROTOCOL_VIOLATION,
            format!("invalid startup packet layout: {detail}"),
        )
    };
    if body.last() != Some(&0) {
        return Err(layout("expected a NUL terminator as the last byte"));
    }
    let mut params = Vec::new();
    loop {
        let name = take_cstring(&mut body).ok_or_else(|| layout("unterminated name"))?;
        if name.is_empty() {
            break;
        }
        let value =
            take_cstring(&mut body).ok_or_else(|| layout("a parameter name has no value"))?;
        if body.is_empty() {
            return Err(layout("a parameter name has no value"));
        }
        params.push((name, value));
    }
    if !body.is_empty() {
        return Err(layout("bytes after the terminator"));
    }
    Ok(params)
}

fn take_cstring(body: &mut Bytes) -> Option<Bytes> {
    let nul = body.iter().position(|&b| b == 0)?;
    let s = body.split_to(nul);
    body.advance(1);
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: u32, body: &[u8]) -> BytesMut {
        let mut out = BytesMut::new();
        out.extend_from_slice(&((8 + body.len()) as u32).to_be_bytes());
        out.extend_from_slice(&code.to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn startup(minor: u16, body: &[u8]) -> BytesMut {
        packet((3 << 16) | minor as u32, body)
    }

    fn decode(mut buf: BytesMut) -> Result<Option<FirstPacket>, ProtocolError> {
        decode_first_packet(&mut buf)
    }

    fn sqlstate(r: Result<Option<FirstPacket>, ProtocolError>) -> SqlState {
        r.expect_err("should fail").sqlstate
    }

    #[test]
    fn ssl_and_gssenc_requests() {
        assert_eq!(
            decode(packet(SSL_REQUEST_CODE, b"")),
            Ok(Some(FirstPacket::SslRequest))
        );
        assert_eq!(
            decode(packet(GSSENC_REQUEST_CODE, b"")),
            Ok(Some(FirstPacket::GssEncRequest))
        );
        assert_eq!(
            sqlstate(decode(packet(SSL_REQUEST_CODE, b"\0\0\0\0\0\0\0\0"))),
            SqlState::PROTOCOL_VIOLATION
        );
    }

    #[test]
    fn ssl_request_leaves_following_bytes_in_the_buffer() {
        let mut buf = packet(SSL_REQUEST_CODE, b"");
        buf.extend_from_slice(b"extra");
        assert_eq!(
            decode_first_packet(&mut buf),
            Ok(Some(FirstPacket::SslRequest))
        );
        assert_eq!(&buf[..], b"extra");
    }

    #[test]
    fn startup_30_and_32_keep_raw_bytes() {
        for minor in [0, 2, 3, 9999] {
            let buf = startup(minor, b"user\0app\0database\0db\0\0");
            let raw = buf.clone().freeze();
            let Ok(Some(FirstPacket::Startup(msg))) = decode(buf) else {
                panic!("startup 3.{minor} should decode");
            };
            assert_eq!(msg.raw, raw);
            assert_eq!(msg.user(), "app");
            assert_eq!(msg.database(), "db");
            assert_eq!(msg.version.minor, minor);
        }
    }

    #[test]
    fn database_defaults_to_user() {
        let Ok(Some(FirstPacket::Startup(msg))) = decode(startup(0, b"user\0app\0\0")) else {
            panic!("should decode");
        };
        assert_eq!(msg.database(), "app");
    }

    #[test]
    fn incomplete_packets_wait_for_more() {
        let full = startup(0, b"user\0app\0\0");
        for cut in 0..full.len() {
            let mut part = BytesMut::from(&full[..cut]);
            assert_eq!(decode_first_packet(&mut part), Ok(None), "cut at {cut}");
            assert_eq!(part.len(), cut, "nothing consumed at {cut}");
        }
    }

    #[test]
    fn hostile_lengths_are_refused_before_waiting() {
        for len in [0u32, 3, 7, 10_001, 0x7fff_ffff, 0x8000_0000, u32::MAX] {
            let mut buf = BytesMut::from(&len.to_be_bytes()[..]);
            assert_eq!(
                sqlstate(decode_first_packet(&mut buf).map(|_| None)),
                SqlState::PROTOCOL_VIOLATION,
                "length {len}"
            );
        }
    }

    #[test]
    fn unsupported_versions() {
        for (major, minor) in [(2, 0), (4, 0), (0, 0), (1, 2)] {
            let buf = packet((major << 16) | minor, b"user\0app\0\0");
            assert_eq!(
                sqlstate(decode(buf)),
                SqlState::FEATURE_NOT_SUPPORTED,
                "{major}.{minor}"
            );
        }
    }

    #[test]
    fn malformed_parameter_lists() {
        for body in [
            &b"user\0app\0"[..],    // no final terminator byte
            b"user\0app",           // unterminated value
            b"user\0\0",            // name without value
            b"user\0app\0x\0",      // name without value at the end
            b"user\0app\0\0junk\0", // bytes after the terminator
            b"",                    // no terminator at all
        ] {
            assert_eq!(
                sqlstate(decode(startup(0, body))),
                SqlState::PROTOCOL_VIOLATION,
                "{body:?}"
            );
        }
    }

    #[test]
    fn missing_user_is_an_authorization_error() {
        assert_eq!(
            sqlstate(decode(startup(0, b"database\0db\0\0"))),
            SqlState::INVALID_AUTHORIZATION_SPECIFICATION
        );
    }

    #[test]
    fn non_utf8_values_are_kept_raw() {
        let Ok(Some(FirstPacket::Startup(msg))) = decode(startup(0, b"user\0\xff\xfe\0\0")) else {
            panic!("should decode");
        };
        assert_eq!(msg.param("user"), Some(&b"\xff\xfe"[..]));
    }

    #[test]
    fn cancel_requests_of_both_versions() {
        let Ok(Some(FirstPacket::Cancel(key))) =
            decode(packet(CANCEL_REQUEST_CODE, b"\0\0\0\x07abcd"))
        else {
            panic!("3.0 cancel");
        };
        assert_eq!(key.pid, 7);
        assert_eq!(&key.secret[..], b"abcd");
        assert_eq!(
            &key.encode_cancel_request()[..],
            &packet(CANCEL_REQUEST_CODE, b"\0\0\0\x07abcd")[..]
        );

        let long = [9u8; 32];
        let mut body = vec![0, 0, 0, 9];
        body.extend_from_slice(&long);
        let Ok(Some(FirstPacket::Cancel(key))) = decode(packet(CANCEL_REQUEST_CODE, &body)) else {
            panic!("3.2 cancel");
        };
        assert_eq!(key.secret.len(), 32);

        assert_eq!(
            sqlstate(decode(packet(CANCEL_REQUEST_CODE, b"\0\0\0\x07ab"))),
            SqlState::PROTOCOL_VIOLATION
        );
    }

    #[test]
    fn a_terminate_first_is_a_goodbye_and_other_x_bytes_are_garbage() {
        let mut buf = BytesMut::from(&TERMINATE[..4]);
        assert!(
            matches!(decode_first_packet(&mut buf), Ok(None)),
            "waits for the fifth byte"
        );
        buf.extend_from_slice(&TERMINATE[4..]);
        buf.extend_from_slice(b"rest");
        assert!(matches!(
            decode_first_packet(&mut buf),
            Ok(Some(FirstPacket::Terminate))
        ));
        assert_eq!(&buf[..], b"rest");
        // The same four bytes with another length byte after them, and an
        // X with a longer length, are the impossible lengths they look like.
        for garbage in [&b"X\0\0\0\x05"[..], &b"X\0\0\x01\x04"[..]] {
            assert_eq!(
                sqlstate(decode(BytesMut::from(garbage))),
                SqlState::PROTOCOL_VIOLATION
            );
        }
    }

    #[test]
    fn direct_tls_is_detected_without_consuming() {
        let mut buf = BytesMut::from(&[0x16u8, 0x03, 0x01][..]);
        assert_eq!(
            decode_first_packet(&mut buf),
            Ok(Some(FirstPacket::DirectTls))
        );
        assert_eq!(buf.len(), 3);
    }

    #[test]
    fn backend_key_data_lengths() {
        assert!(CancelKey::from_backend_key_data(b"\0\0\0\x01abcd").is_ok());
        let key = CancelKey {
            pid: 77,
            secret: Bytes::from_static(&[9; 32]),
        };
        let encoded = key.encode_backend_key_data();
        assert_eq!(&encoded[..5], b"K\0\0\0\x28");
        assert_eq!(
            CancelKey::from_backend_key_data(&encoded[5..]).ok(),
            Some(key)
        );
        assert!(CancelKey::from_backend_key_data(b"\0\0\0\x01abc").is_err());
        assert!(CancelKey::from_backend_key_data(&[0u8; 4 + 257]).is_err());
    }
}
