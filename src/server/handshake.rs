//! The client's opening: encryption negotiation, then a StartupMessage or a
//! CancelRequest.
//!
//! As PostgreSQL does ("SSL Session Encryption", protocol docs 55.2.10):
//! an SSLRequest is answered `S` and followed by a TLS handshake when the
//! listener offers TLS, `N` otherwise; a GSSENCRequest is always answered
//! `N`. Bytes the client sent after its SSLRequest, before it could have
//! read the answer, are refused (they would be plaintext smuggled in front
//! of the TLS session: CVE-2021-23214). A first byte of 0x16 starts a TLS
//! handshake at once (PostgreSQL 17's direct TLS), which must negotiate the
//! ALPN protocol `postgresql`. Inside TLS only a StartupMessage or a
//! CancelRequest may follow. A listener in `require` mode refuses
//! plaintext StartupMessages with 28000. Timeouts are the caller's.

use std::sync::Arc;

use bytes::BytesMut;
use pgwire::messages::response::SslResponse;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;

use super::stream::{ClientStream, MaybeTls, Prefixed};
use crate::config::TlsMode;
use crate::protocol::startup::{
    decode_first_packet, CancelKey, FirstPacket, StartupMessage, MAX_STARTUP_PACKET,
};
use crate::protocol::{ProtocolError, SqlState};
use crate::tls::{ServerTls, ALPN_POSTGRESQL};

/// What a listener offers clients.
#[derive(Clone)]
pub struct ListenerTls {
    pub mode: TlsMode,
    /// Present unless `mode` is `disable`.
    pub server: Option<Arc<ServerTls>>,
}

impl ListenerTls {
    #[cfg(test)]
    pub fn disabled() -> Self {
        Self {
            mode: TlsMode::Disable,
            server: None,
        }
    }

    fn acceptor(&self) -> Option<TlsAcceptor> {
        match self.mode {
            TlsMode::Disable => None,
            TlsMode::Allow | TlsMode::Require => {
                self.server.as_ref().map(|s| TlsAcceptor::from(s.config()))
            }
        }
    }
}

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

/// A completed opening and the stream it arrived on.
pub struct Opened<P> {
    pub stream: ClientStream<P>,
    pub opening: Opening,
}

/// A failed opening; `stream` is where the error may still be told.
pub struct Failed<P> {
    pub stream: Option<ClientStream<P>>,
    pub error: HandshakeError,
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The client broke the protocol or a rule; it is told why.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The client asked for something rolegate closes without an answer.
    #[error("{0}")]
    Unanswerable(&'static str),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("client closed the connection during the handshake")]
    Closed,
    /// A Terminate where the startup packet belongs: closed without an
    /// answer, as PostgreSQL does.
    #[error("client said goodbye (Terminate) before its startup packet")]
    Terminated,
    #[error("client connection failed during the handshake: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads the client's opening, negotiating TLS as `tls` allows.
/// `encrypting` turns true once the TLS handshake begins, so a caller that
/// gives up (a timeout) knows not to write plaintext into it. `read_ahead`
/// holds the client's first bytes when a PROXY header was read before.
pub async fn read_opening<P>(
    mut plain: P,
    tls: &ListenerTls,
    encrypting: &mut bool,
    read_ahead: BytesMut,
) -> Result<Opened<P>, Failed<P>>
where
    P: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = read_ahead;
    buf.reserve(256);
    let mut ssl_answered = false;
    let mut gss_answered = false;
    let fail =
        |stream: Option<ClientStream<P>>, error: HandshakeError| Err(Failed { stream, error });
    loop {
        let packet = match read_first_packet(&mut plain, &mut buf).await {
            Ok(packet) => packet,
            Err(error) => return fail(Some(MaybeTls::Plain(plain)), error),
        };
        match packet {
            FirstPacket::SslRequest => {
                if ssl_answered {
                    let error = violation("SSLRequest sent twice in one connection");
                    return fail(Some(MaybeTls::Plain(plain)), error);
                }
                ssl_answered = true;
                let Some(acceptor) = tls.acceptor() else {
                    if let Err(e) = plain.write_all(&[SslResponse::BYTE_REFUSE]).await {
                        return fail(None, e.into());
                    }
                    continue;
                };
                if !buf.is_empty() {
                    let error = violation(
                        "received unencrypted data after SSL request; this could be a client bug or a man-in-the-middle attack",
                    );
                    return fail(Some(MaybeTls::Plain(plain)), error);
                }
                if let Err(e) = plain.write_all(&[SslResponse::BYTE_ACCEPT]).await {
                    return fail(None, e.into());
                }
                *encrypting = true;
                return encrypted(acceptor, Prefixed::new(buf, plain), false).await;
            }
            FirstPacket::GssEncRequest => {
                if gss_answered || ssl_answered {
                    let error =
                        violation("GSSENCRequest sent after encryption was already negotiated");
                    return fail(Some(MaybeTls::Plain(plain)), error);
                }
                gss_answered = true;
                if let Err(e) = plain.write_all(&[SslResponse::BYTE_REFUSE]).await {
                    return fail(None, e.into());
                }
            }
            FirstPacket::DirectTls => {
                let Some(acceptor) = tls.acceptor() else {
                    return fail(
                        None,
                        HandshakeError::Unanswerable(
                            "client started a direct TLS handshake but this listener does not offer TLS",
                        ),
                    );
                };
                if ssl_answered || gss_answered {
                    return fail(
                        None,
                        HandshakeError::Unanswerable("TLS handshake after encryption was refused"),
                    );
                }
                // The ClientHello's first bytes are in `buf`: replay them.
                *encrypting = true;
                return encrypted(acceptor, Prefixed::new(buf, plain), true).await;
            }
            FirstPacket::Cancel(key) => {
                return Ok(Opened {
                    stream: MaybeTls::Plain(plain),
                    opening: Opening::Cancel(key),
                })
            }
            FirstPacket::Terminate => return fail(None, HandshakeError::Terminated),
            FirstPacket::Startup(startup) => return unencrypted_startup(plain, tls, startup, buf),
        }
    }
}

/// A StartupMessage on a connection left unencrypted: refused where the
/// listener requires TLS.
fn unencrypted_startup<P>(
    plain: P,
    tls: &ListenerTls,
    startup: StartupMessage,
    buffered: BytesMut,
) -> Result<Opened<P>, Failed<P>> {
    let stream = MaybeTls::Plain(plain);
    if tls.mode == TlsMode::Require {
        let error = ProtocolError::new(
            SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
            "this listener requires TLS, but the connection is not encrypted",
        )
        .with_hint("Connect with sslmode=require (or verify-ca / verify-full).");
        return Err(Failed {
            stream: Some(stream),
            error: error.into(),
        });
    }
    Ok(Opened {
        stream,
        opening: Opening::Startup { startup, buffered },
    })
}

/// Completes a TLS handshake and reads the opening inside the tunnel.
async fn encrypted<P>(
    acceptor: TlsAcceptor,
    io: Prefixed<P>,
    direct: bool,
) -> Result<Opened<P>, Failed<P>>
where
    P: AsyncRead + AsyncWrite + Unpin,
{
    let mut stream = match acceptor.accept(io).await {
        Ok(stream) => stream,
        Err(e) => {
            return Err(Failed {
                stream: None,
                error: HandshakeError::Tls(e),
            })
        }
    };
    if direct && stream.get_ref().1.alpn_protocol() != Some(ALPN_POSTGRESQL) {
        return Err(Failed {
            stream: None,
            error: HandshakeError::Unanswerable(
                "direct TLS without the ALPN protocol \"postgresql\"",
            ),
        });
    }
    let mut buf = BytesMut::with_capacity(512);
    let packet = read_first_packet(&mut stream, &mut buf).await;
    let stream = MaybeTls::Tls(Box::new(stream));
    let opening = match packet {
        Ok(FirstPacket::Startup(startup)) => Opening::Startup {
            startup,
            buffered: buf,
        },
        Ok(FirstPacket::Cancel(key)) => Opening::Cancel(key),
        Ok(FirstPacket::Terminate) => {
            return Err(Failed {
                stream: Some(stream),
                error: HandshakeError::Terminated,
            })
        }
        Ok(_) => {
            return Err(Failed {
                stream: Some(stream),
                error: violation(
                    "only a StartupMessage or CancelRequest may follow the TLS handshake",
                ),
            })
        }
        Err(error) => {
            return Err(Failed {
                stream: Some(stream),
                error,
            })
        }
    };
    Ok(Opened { stream, opening })
}

fn violation(message: &str) -> HandshakeError {
    ProtocolError::new(SqlState::PROTOCOL_VIOLATION, message).into()
}

/// Reads until `buf` holds a whole first packet. Never buffers more than
/// one maximal packet.
pub(super) async fn read_first_packet<S>(
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
    use tokio::io::{duplex, DuplexStream};

    fn startup_bytes() -> Vec<u8> {
        let body = b"user\0app\0\0";
        let mut out = ((8 + body.len()) as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&(3u32 << 16).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    const GSS_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];

    async fn run(input: Vec<u8>, tls: ListenerTls) -> (Result<Opening, HandshakeError>, Vec<u8>) {
        let (mut client, server) = duplex(64 * 1024);
        client.write_all(&input).await.expect("write");
        client.shutdown().await.expect("shutdown");
        let result = read_opening::<DuplexStream>(server, &tls, &mut false, BytesMut::new()).await;
        let result = match result {
            Ok(opened) => Ok(opened.opening),
            Err(failed) => Err(failed.error),
        };
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.expect("read");
        (result, answer)
    }

    fn required_without_server() -> ListenerTls {
        ListenerTls {
            mode: TlsMode::Require,
            server: None,
        }
    }

    #[tokio::test]
    async fn ssl_refused_then_startup() {
        let mut input = SSL_REQUEST.to_vec();
        input.extend(startup_bytes());
        let (result, answer) = run(input, ListenerTls::disabled()).await;
        assert!(matches!(result, Ok(Opening::Startup { .. })));
        assert_eq!(answer, b"N");
    }

    #[tokio::test]
    async fn gss_then_ssl_then_startup() {
        let mut input = GSS_REQUEST.to_vec();
        input.extend(SSL_REQUEST);
        input.extend(startup_bytes());
        let (result, answer) = run(input, ListenerTls::disabled()).await;
        assert!(matches!(result, Ok(Opening::Startup { .. })));
        assert_eq!(answer, b"NN");
    }

    #[tokio::test]
    async fn two_ssl_requests_are_a_violation() {
        let mut input = SSL_REQUEST.to_vec();
        input.extend(SSL_REQUEST);
        let (result, _) = run(input, ListenerTls::disabled()).await;
        assert!(matches!(result, Err(HandshakeError::Protocol(_))));
    }

    #[tokio::test]
    async fn plaintext_startup_on_a_tls_only_listener_is_28000() {
        let (result, _) = run(startup_bytes(), required_without_server()).await;
        match result {
            Err(HandshakeError::Protocol(e)) => {
                assert_eq!(e.sqlstate, SqlState::INVALID_AUTHORIZATION_SPECIFICATION)
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn truncated_packet_is_a_close() {
        let mut input = startup_bytes();
        input.truncate(6);
        let (result, _) = run(input, ListenerTls::disabled()).await;
        assert!(matches!(result, Err(HandshakeError::Closed)));
    }

    #[tokio::test]
    async fn oversized_packet_is_refused_without_reading_it() {
        let mut input = 20_000u32.to_be_bytes().to_vec();
        input.extend(vec![0u8; 64]);
        let (result, _) = run(input, ListenerTls::disabled()).await;
        match result {
            Err(HandshakeError::Protocol(e)) => {
                assert_eq!(e.sqlstate, SqlState::PROTOCOL_VIOLATION)
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn direct_tls_without_tls_configured() {
        let (result, answer) = run(vec![0x16, 3, 1, 0, 5], ListenerTls::disabled()).await;
        assert!(matches!(result, Err(HandshakeError::Unanswerable(_))));
        assert!(answer.is_empty());
    }
}
