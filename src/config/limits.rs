//! `[limits]`: what one client may cost, and how long rolegate waits for
//! what; read by every session at accept, replaced whole by a reload.

use serde::Deserialize;

use super::Duration;

/// `[limits]`: bounds on what clients may cost.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default = "default_max_client_connections")]
    pub max_client_connections: usize,
    /// From accept to the first ReadyForQuery, authentication included.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout: Duration,
    /// How long a new session waits for a target to exist.
    #[serde(default = "default_hold_timeout")]
    pub hold_timeout: Duration,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Duration,
    /// Logins (backend connect to first ReadyForQuery) in flight to one
    /// member at once; the rest queue. 0: no bound.
    #[serde(default = "default_backend_logins")]
    pub backend_logins: usize,
    /// How long a SIGTERM lets sessions finish before ending them.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout: Duration,
    /// Silence on a client or backend connection before TCP keepalive
    /// probes start; `"0s"` turns keepalive off.
    #[serde(default = "default_tcp_keepalive")]
    pub tcp_keepalive: Duration,
}

impl Limits {
    /// The keepalive idle time, `None` when keepalive is off.
    pub fn keepalive(&self) -> Option<std::time::Duration> {
        let idle = self.tcp_keepalive.get();
        (!idle.is_zero()).then_some(idle)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_client_connections: default_max_client_connections(),
            handshake_timeout: default_handshake_timeout(),
            hold_timeout: default_hold_timeout(),
            connect_timeout: default_connect_timeout(),
            backend_logins: default_backend_logins(),
            shutdown_timeout: default_shutdown_timeout(),
            tcp_keepalive: default_tcp_keepalive(),
        }
    }
}

fn default_max_client_connections() -> usize {
    10_000
}
fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_hold_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(3)
}
fn default_backend_logins() -> usize {
    16
}
fn default_tcp_keepalive() -> Duration {
    Duration::from_secs(60)
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(30)
}
