//! Why a connection was not served: one type for every way a session ends
//! before it relays.
//!
//! Each stage keeps its own typed failure (the router's [`NoTarget`], the
//! login gate's [`QueueTimeout`], the backend's [`ConnectFailed`], the
//! handshake's and authentication's errors); a [`Refusal`] holds one of
//! them and knows the rest from it: the connection outcome counted in
//! `rolegate_client_connections_total`, the FATAL the client is told (if
//! any can be), and whether a hold ran out, for the event log. Nothing is
//! rendered to a message and parsed back.

use std::sync::Arc;

use bytes::Bytes;

use crate::auth::client_login::LoginError;
use crate::auth::server_login::ServerLoginError;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::config::Duration;
use crate::metrics::ConnectionOutcome;
use crate::pool::PoolFull;
use crate::protocol::{ProtocolError, SqlState};
use crate::router::NoTarget;
use crate::server::authenticate::AuthError;
use crate::server::backend::ConnectFailed;
use crate::server::handshake::HandshakeError;
use crate::server::login_gate::QueueTimeout;

/// Why a connection did not become a relayed session.
#[derive(Debug)]
pub enum Refusal {
    /// The PROXY protocol header was missing, broken or untrusted.
    ProxyHeader(ProtocolError),
    /// The opening failed: a protocol error, TLS, or a client that left.
    Handshake(HandshakeError),
    /// The handshake (opening and login) did not finish within
    /// `handshake_timeout`; `encrypting` when TLS was being negotiated, so
    /// no plaintext error can be sent.
    TimedOut { limit: Duration, encrypting: bool },
    /// No member has the listener's role (after a hold, if the cluster
    /// can change).
    NoTarget(NoTarget),
    /// The member's login slots stayed taken until the hold time ran out.
    LoginQueue(QueueTimeout),
    /// The member could not be reached.
    Unreachable(ConnectFailed),
    /// rolegate is shutting down.
    ShuttingDown,
    /// The client left before a backend was connected.
    ClientLeft,
    /// Authentication did not complete.
    Authentication(AuthError),
    /// A pooled listener's own login of the client failed.
    PooledLogin(LoginError),
    /// A pooled listener's pool for the member stayed full.
    PoolFull { member: Arc<str>, full: PoolFull },
    /// rolegate could not log in to the member for a pooled client.
    ServerLogin {
        member: Arc<str>,
        error: ServerLoginError,
    },
    /// The server refused one of the client's startup parameters (its
    /// ErrorResponse, passed on).
    SettingRefused(Bytes),
    /// `auth_query` answered on no member and no answer was kept.
    AuthQuery {
        /// The listener's dotted key.
        listener: String,
        user: String,
        failure: String,
    },
}

impl Refusal {
    /// How the connection is counted.
    pub fn outcome(&self) -> ConnectionOutcome {
        match self {
            Self::ProxyHeader(_) => ConnectionOutcome::ProxyHeader,
            Self::Handshake(HandshakeError::Protocol(_) | HandshakeError::Unanswerable(_)) => {
                ConnectionOutcome::ProtocolError
            }
            Self::Handshake(HandshakeError::Tls(_)) => ConnectionOutcome::TlsError,
            Self::Handshake(
                HandshakeError::Closed | HandshakeError::Terminated | HandshakeError::Io(_),
            )
            | Self::ClientLeft => ConnectionOutcome::ClientGone,
            Self::TimedOut { .. } => ConnectionOutcome::HandshakeTimeout,
            Self::NoTarget(_) | Self::LoginQueue(_) => ConnectionOutcome::NoTarget,
            Self::Unreachable(_) => ConnectionOutcome::BackendUnreachable,
            Self::ShuttingDown => ConnectionOutcome::Shutdown,
            Self::PooledLogin(LoginError::WrongPassword(_)) => ConnectionOutcome::AuthRefused,
            Self::PooledLogin(LoginError::Protocol(_)) => ConnectionOutcome::ProtocolError,
            Self::PooledLogin(LoginError::Gone) => ConnectionOutcome::ClientGone,
            Self::PoolFull { .. } => ConnectionOutcome::RefusedLimit,
            Self::ServerLogin {
                error: ServerLoginError::Refused(_),
                ..
            }
            | Self::SettingRefused(_) => ConnectionOutcome::AuthRefused,
            Self::ServerLogin { .. } | Self::AuthQuery { .. } => ConnectionOutcome::BackendError,
            Self::Authentication(e) => match e {
                AuthError::Client(_) => ConnectionOutcome::ProtocolError,
                AuthError::Backend(_) => ConnectionOutcome::BackendError,
                AuthError::Refused => ConnectionOutcome::AuthRefused,
                // The member turned out not to have the listener's role.
                AuthError::InRecovery(_) => ConnectionOutcome::NoTarget,
                AuthError::ClientGone | AuthError::ClientIo(_) => ConnectionOutcome::ClientGone,
            },
        }
    }

    /// The FATAL the client is sent, when it can and should be told: not
    /// to a client that left or said goodbye, not into a TLS handshake,
    /// and not when the server already said why.
    pub fn client_error(&self) -> Option<ProtocolError> {
        match self {
            Self::ProxyHeader(e)
            | Self::Handshake(HandshakeError::Protocol(e))
            | Self::Authentication(
                AuthError::Client(e) | AuthError::Backend(e) | AuthError::InRecovery(e),
            ) => Some(e.clone()),
            Self::TimedOut {
                limit,
                encrypting: false,
            } => Some(handshake_timeout_error(*limit)),
            Self::NoTarget(e) => Some(e.to_error()),
            Self::LoginQueue(e) => Some(e.to_error()),
            Self::Unreachable(e) => Some(e.to_error()),
            Self::ShuttingDown => Some(shutdown_error()),
            Self::PooledLogin(e) => e.to_error(),
            Self::PoolFull { member, full } => Some(pool_full_error(member, full)),
            Self::ServerLogin { member, error } => server_login_error(member, error),
            Self::SettingRefused(_) => None,
            Self::AuthQuery {
                listener,
                user,
                failure,
            } => Some(auth_query_error(listener, user, failure)),
            Self::Handshake(_)
            | Self::TimedOut { .. }
            | Self::ClientLeft
            | Self::Authentication(_) => None,
        }
    }

    /// The server's own ErrorResponse, passed on to the client as it is
    /// when rolegate has nothing to add.
    pub fn server_error(&self) -> Option<&Bytes> {
        match self {
            Self::SettingRefused(error)
            | Self::ServerLogin {
                error: ServerLoginError::Refused(error),
                ..
            } => Some(error),
            _ => None,
        }
    }

    /// When the session was turned away because waiting ran out (no
    /// target, or the login queue), what it waited for: the event log
    /// records it.
    pub fn hold_ran_out(&self) -> Option<String> {
        match self {
            Self::NoTarget(e) => Some(e.reason()),
            Self::LoginQueue(e) => Some(e.reason()),
            _ => None,
        }
    }
}

impl From<NoTarget> for Refusal {
    fn from(e: NoTarget) -> Self {
        Self::NoTarget(e)
    }
}

impl From<QueueTimeout> for Refusal {
    fn from(e: QueueTimeout) -> Self {
        Self::LoginQueue(e)
    }
}

impl From<ConnectFailed> for Refusal {
    fn from(e: ConnectFailed) -> Self {
        Self::Unreachable(e)
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self, self.client_error()) {
            (Self::Handshake(e), _) => write!(f, "handshake failed: {e}"),
            (Self::Authentication(e), _) => write!(f, "authentication ended: {e}"),
            (Self::ClientLeft, _) => f.write_str("the client left before a backend was connected"),
            (Self::SettingRefused(_), _) => {
                f.write_str("the server refused one of the client's startup parameters")
            }
            (Self::ServerLogin { member, .. }, None) => {
                write!(f, "member {member} refused a pooled login")
            }
            (_, Some(e)) => f.write_str(&e.message),
            (_, None) => f.write_str("the handshake timed out during TLS negotiation"),
        }
    }
}

/// The FATAL of a pooled client whose pool stayed full.
fn pool_full_error(member: &str, full: &PoolFull) -> ProtocolError {
    ProtocolError::new(
        SqlState::TOO_MANY_CONNECTIONS,
        format!(
            "no server connection to member {member} came free within {:.1}s: its pool's {} servers (pool_size) were all in use",
            full.waited.as_secs_f64(),
            full.size
        ),
    )
    .with_hint("Retry; if this persists, raise pool_size or query_wait_timeout, or find the sessions that hold servers.")
}

/// The FATAL of a pooled client rolegate could not log in to a server
/// for; `None` when the server's own refusal is passed on instead.
fn server_login_error(member: &str, error: &ServerLoginError) -> Option<ProtocolError> {
    match error {
        ServerLoginError::Refused(_) => None,
        ServerLoginError::Method(what) => Some(
            ProtocolError::new(
                SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
                format!("rolegate cannot log in to member {member} for this role: {what}"),
            )
            .with_hint("Give the role the same method in pg_hba.conf as its stored secret (scram-sha-256 for a SCRAM secret)."),
        ),
        ServerLoginError::Protocol(what) | ServerLoginError::Io(what) => Some(
            ProtocolError::new(
                SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
                format!("rolegate could not log in to member {member}: {what}"),
            )
            .with_hint("Reconnect; if this persists, check the member's PostgreSQL log and that the auth_file secret is the role's current one."),
        ),
    }
}

/// The FATAL of a pooled client whose secret could not be read.
fn auth_query_error(listener: &str, user: &str, failure: &str) -> ProtocolError {
    ProtocolError::new(
        SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
        format!("rolegate could not read the role's secret with auth_query as auth_user {user:?}: {failure}"),
    )
    .with_hint(format!("Check {listener}.auth_user, its password (auth_password_file or auth_password_env) and {listener}.auth_query; the member's log says more."))
}

/// The FATAL of a handshake that ran out of time.
fn handshake_timeout_error(limit: Duration) -> ProtocolError {
    ProtocolError::new(
        SqlState::CONNECTION_FAILURE,
        format!(
            "closing the connection: the handshake did not complete within {limit} (handshake_timeout)"
        ),
    )
}

/// The FATAL of a session that rolegate's shutdown turns away or ends.
pub fn shutdown_error() -> ProtocolError {
    ProtocolError::new(
        SqlState::ADMIN_SHUTDOWN,
        "terminating connection because rolegate is shutting down",
    )
    .with_hint("Reconnect; the connection will be served by a running rolegate.")
}

/// How long rolegate tries to deliver its own error to a client.
pub(super) const ERROR_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Tells the client why it is refused, when it can be told (rolegate's
/// FATAL, or the server's own ErrorResponse passed on), and returns how
/// the connection is counted.
pub(super) async fn refuse<S: AsyncWrite + Unpin>(
    client: &mut S,
    refusal: Refusal,
) -> ConnectionOutcome {
    if let Some(error) = refusal.client_error() {
        send_error(client, &error).await;
    } else if let Some(error) = refusal.server_error() {
        send_and_close(client, error).await;
    }
    refusal.outcome()
}

/// Writes `error` as a FATAL ErrorResponse and closes the connection
/// (with close_notify under TLS), giving up after a short time (the client
/// may not be reading).
pub(in crate::server) async fn send_error<S: AsyncWrite + Unpin>(
    client: &mut S,
    error: &ProtocolError,
) {
    send_and_close(client, &error.to_fatal()).await;
}

async fn send_and_close<S: AsyncWrite + Unpin>(client: &mut S, bytes: &[u8]) {
    // Boxed: a rare path, kept out of every session's state machine.
    let _ = Box::pin(tokio::time::timeout(ERROR_WRITE_TIMEOUT, async {
        client.write_all(bytes).await?;
        client.shutdown().await
    }))
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_refusal_knows_its_outcome_and_what_the_client_is_told() {
        let limit = Duration::from_secs(10);
        let cases = [
            (
                Refusal::TimedOut {
                    limit,
                    encrypting: false,
                },
                ConnectionOutcome::HandshakeTimeout,
                Some(SqlState::CONNECTION_FAILURE),
            ),
            (
                Refusal::TimedOut {
                    limit,
                    encrypting: true,
                },
                ConnectionOutcome::HandshakeTimeout,
                None,
            ),
            (
                Refusal::ShuttingDown,
                ConnectionOutcome::Shutdown,
                Some(SqlState::ADMIN_SHUTDOWN),
            ),
            (Refusal::ClientLeft, ConnectionOutcome::ClientGone, None),
            (
                Refusal::Handshake(HandshakeError::Terminated),
                ConnectionOutcome::ClientGone,
                None,
            ),
            (
                Refusal::Authentication(AuthError::Refused),
                ConnectionOutcome::AuthRefused,
                None,
            ),
        ];
        for (refusal, outcome, told) in cases {
            assert_eq!(refusal.outcome(), outcome, "{refusal:?}");
            assert_eq!(
                refusal.client_error().map(|e| e.sqlstate),
                told,
                "{refusal:?}"
            );
            assert!(refusal.hold_ran_out().is_none());
        }
    }
}
