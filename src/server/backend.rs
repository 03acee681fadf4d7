//! Opening a connection to a cluster member.
//!
//! Connects within `connect_timeout`, negotiating TLS as the cluster's
//! `backend_tls` says (an SSLRequest, then rustls, as libpq does), and turns
//! failures into a [`ConnectFailed`], which renders as the 08001 error a
//! client sees, naming the member and its address so an operator can act
//! on it. Cancel requests are sent over a
//! connection opened the same way, so they reach members that require TLS.

use std::io::ErrorKind;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::socket;
use super::stream::{BackendStream, MaybeTls};
use crate::config::{BackendTls, Limits};
use crate::metrics::{self, MemberMetrics};
use crate::protocol::{ProtocolError, SqlState};
use crate::tls::server_name;
use crate::topology::Member;

/// An SSLRequest: length 8, code 1234.5679.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// How rolegate speaks TLS to one cluster's members.
#[derive(Clone)]
pub struct BackendTlsSettings {
    pub mode: BackendTls,
    /// `None` for `disable`.
    pub config: Option<Arc<ClientConfig>>,
}

impl BackendTlsSettings {
    #[cfg(test)]
    pub fn disabled() -> Self {
        Self {
            mode: BackendTls::Disable,
            config: None,
        }
    }
}

/// Why a connection could not be opened: a message and a metric label.
pub struct OpenError {
    pub message: String,
    pub reason: &'static str,
}

/// Opens a connection to `host:port`, with TLS as `tls` says, all within
/// `timeout`.
pub async fn open(
    host: &str,
    port: u16,
    tls: &BackendTlsSettings,
    timeout: Duration,
    keepalive: Option<Duration>,
) -> Result<BackendStream, OpenError> {
    let attempt = async {
        let mut tcp = TcpStream::connect((host, port))
            .await
            .map_err(|e| OpenError {
                reason: if e.kind() == ErrorKind::ConnectionRefused {
                    "refused"
                } else {
                    "other"
                },
                message: e.to_string(),
            })?;
        socket::tune(&tcp, keepalive);
        let Some(config) = &tls.config else {
            return Ok(MaybeTls::Plain(tcp));
        };
        let tls_error = |message: String| OpenError {
            message,
            reason: "tls",
        };
        tcp.write_all(&SSL_REQUEST)
            .await
            .map_err(|e| tls_error(format!("sending SSLRequest: {e}")))?;
        let answer = tcp
            .read_u8()
            .await
            .map_err(|e| tls_error(format!("reading the answer to SSLRequest: {e}")))?;
        match answer {
            b'S' => {
                let name = server_name(host).map_err(tls_error)?;
                let stream = TlsConnector::from(Arc::clone(config))
                    .connect(name, tcp)
                    .await
                    .map_err(|e| tls_error(format!("TLS handshake failed: {e}")))?;
                Ok(MaybeTls::Tls(Box::new(stream)))
            }
            b'N' if tls.mode == BackendTls::Prefer => Ok(MaybeTls::Plain(tcp)),
            b'N' => Err(tls_error(
                "the server does not accept TLS, which backend_tls requires".to_owned(),
            )),
            other => Err(tls_error(format!(
                "unexpected answer {:?} to SSLRequest",
                char::from(other)
            ))),
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(OpenError {
            message: format!(
                "no answer within {}ms (connect_timeout)",
                timeout.as_millis()
            ),
            reason: "timeout",
        }),
    }
}

/// Connects to `member`'s PostgreSQL port for a session.
pub async fn connect(
    member: &Member,
    cluster: &str,
    tls: &BackendTlsSettings,
    limits: &Limits,
    member_metrics: &MemberMetrics,
) -> Result<BackendStream, ConnectFailed> {
    let started = Instant::now();
    let result = open(
        &member.host,
        member.port,
        tls,
        limits.connect_timeout.get(),
        limits.keepalive(),
    )
    .await;
    member_metrics.connected(started.elapsed());
    if let Err(e) = &result {
        metrics::backend_connect_failed(cluster, &member.name, e.reason);
    }
    result.map_err(|e| ConnectFailed {
        member: member.to_string(),
        cluster: cluster.into(),
        message: e.message,
    })
}

/// A member that could not be reached for a session.
#[derive(Debug, Clone)]
pub struct ConnectFailed {
    /// The member as the client is told of it: its name and address.
    member: String,
    cluster: Arc<str>,
    message: String,
}

impl ConnectFailed {
    /// The FATAL the client receives (08001).
    pub fn to_error(&self) -> ProtocolError {
        ProtocolError::new(
            SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
            format!(
                "rolegate could not connect to member {} of cluster \"{}\": {}",
                self.member, self.cluster, self.message
            ),
        )
        .with_hint("Check that the member's PostgreSQL is running, reachable from rolegate, and that its TLS settings match backend_tls.")
    }
}
