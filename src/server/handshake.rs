//! The client's opening: encryption negotiation, then a StartupMessage or a
//! CancelRequest.
//!
//! A client may first ask for TLS (SSLRequest) or GSS encryption
//! (GSSENCRequest), each at most once, and is answered with a single byte.
//! Without TLS configured both are refused with `N`, after which PostgreSQL
//! clients either continue in plaintext or give up, as their `sslmode`
//! says. A direct-TLS ClientHello cannot be served without TLS and is
//! closed. Timeouts are the caller's: this code only reads and answers.

use bytes::BytesMut;
use pgwire::messages::response::SslResponse;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::protocol::startup::{
    decode_first_packet, CancelKey, FirstPacket, StartupMessage, MAX_STARTUP_PACKET,
};
use crate::protocol::{ProtocolError, SqlState};

/// What the client opened its connection for.
#[derive(Debug)]
pub enum Opening {
    Startup {
        startup: StartupMessage,
        /// Bytes the client sent after its StartupMessage.
        buffered: BytesMut,
    },
    Cancel(CancelKey),
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The client broke the protocol; it is told why before the close.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The client asked for something rolegate closes without an answer.
    #[error("{0}")]
    Unanswerable(&'static str),
    #[error("client closed the connection during the handshake")]
    Closed,
    #[error("client connection failed during the handshake: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads the client's opening packets, answering encryption requests.
pub async fn read_opening<S>(stream: &mut S) -> Result<Opening, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(512);
    let mut ssl_answered = false;
    let mut gss_answered = false;
    loop {
        match read_first_packet(stream, &mut buf).await? {
            FirstPacket::SslRequest => {
                if ssl_answered {
                    return Err(ProtocolError::new(
                        SqlState::PROTOCOL_VIOLATION,
                        "SSLRequest sent twice in one connection",
                    )
                    .into());
                }
                ssl_answered = true;
                stream.write_all(&[SslResponse::BYTE_REFUSE]).await?;
            }
            FirstPacket::GssEncRequest => {
                if gss_answered || ssl_answered {
                    return Err(ProtocolError::new(
                        SqlState::PROTOCOL_VIOLATION,
                        "GSSENCRequest sent after encryption was already negotiated",
                    )
                    .into());
                }
                gss_answered = true;
                stream.write_all(&[SslResponse::BYTE_REFUSE]).await?;
            }
            FirstPacket::DirectTls => {
                return Err(HandshakeError::Unanswerable(
                    "client started a direct TLS handshake but TLS is not configured",
                ))
            }
            FirstPacket::Cancel(key) => return Ok(Opening::Cancel(key)),
            FirstPacket::Startup(startup) => {
                return Ok(Opening::Startup {
                    startup,
                    buffered: buf,
                })
            }
        }
    }
}

/// Reads until `buf` holds a whole first packet. Never buffers more than
/// one maximal packet.
async fn read_first_packet<S>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<FirstPacket, HandshakeError>
where
    S: AsyncRead + Unpin,
{
    loop {
        if let Some(packet) = decode_first_packet(buf)? {
            return Ok(packet);
        }
        let room = MAX_STARTUP_PACKET.saturating_sub(buf.len()).max(1);
        buf.reserve(room.min(4096));
        let mut limited = (&mut *stream).take(room as u64);
        if limited.read_buf(buf).await? == 0 {
            return Err(HandshakeError::Closed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    fn startup_bytes() -> Vec<u8> {
        let body = b"user\0app\0\0";
        let mut out = ((8 + body.len()) as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&(3u32 << 16).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    const GSS_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];

    async fn run(input: Vec<u8>) -> (Result<Opening, HandshakeError>, Vec<u8>) {
        let (mut client, mut server) = duplex(64 * 1024);
        client.write_all(&input).await.expect("write");
        client.shutdown().await.expect("shutdown");
        let result = read_opening(&mut server).await;
        drop(server);
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.expect("read");
        (result, answer)
    }

    #[tokio::test]
    async fn ssl_refused_then_startup() {
        let mut input = SSL_REQUEST.to_vec();
        input.extend(startup_bytes());
        let (result, answer) = run(input).await;
        assert!(matches!(result, Ok(Opening::Startup { .. })));
        assert_eq!(answer, b"N");
    }

    #[tokio::test]
    async fn gss_then_ssl_then_startup() {
        let mut input = GSS_REQUEST.to_vec();
        input.extend(SSL_REQUEST);
        input.extend(startup_bytes());
        let (result, answer) = run(input).await;
        assert!(matches!(result, Ok(Opening::Startup { .. })));
        assert_eq!(answer, b"NN");
    }

    #[tokio::test]
    async fn two_ssl_requests_are_a_violation() {
        let mut input = SSL_REQUEST.to_vec();
        input.extend(SSL_REQUEST);
        let (result, _) = run(input).await;
        assert!(matches!(result, Err(HandshakeError::Protocol(_))));
    }

    #[tokio::test]
    async fn truncated_packet_is_a_close() {
        let mut input = startup_bytes();
        input.truncate(6);
        let (result, _) = run(input).await;
        assert!(matches!(result, Err(HandshakeError::Closed)));
    }

    #[tokio::test]
    async fn oversized_packet_is_refused_without_reading_it() {
        let mut input = 20_000u32.to_be_bytes().to_vec();
        input.extend(vec![0u8; 64]);
        let (result, _) = run(input).await;
        match result {
            Err(HandshakeError::Protocol(e)) => {
                assert_eq!(e.sqlstate, SqlState::PROTOCOL_VIOLATION)
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn direct_tls_without_tls_configured() {
        let (result, answer) = run(vec![0x16, 3, 1, 0, 5]).await;
        assert!(matches!(result, Err(HandshakeError::Unanswerable(_))));
        assert!(answer.is_empty());
    }
}
