//! Connecting to etcd: one connector for the clusters' followers
//! ([`crate::topology::etcd`]) and the fleet registry ([`crate::fleet`]).
//!
//! Every request requires the etcd member to have a raft leader: a member
//! cut off from its quorum otherwise keeps a watch open, answers pings and
//! sends nothing, so stale keys would look current. With the requirement,
//! reads fail at once and etcd cancels a watch after about three election
//! timeouts ("etcdserver: no leader"), which rolegate treats as etcd lost.
//!
//! Each connection talks to one member, the next one in turn. A client of
//! several endpoints spreads its requests over all of them, so while one
//! member is down (a rolling restart, a crash) the requests that land on it
//! keep failing: a follower whose member restarted was measured retrying
//! that same member for 5 s, past the reconnect grace, while two members
//! answered. In turn, the reconnect after a failure goes to another member.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use crate::config::EtcdAccess;

/// Bound on connecting and on one request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// HTTP/2 pings detect a dead etcd (or a partition) on an idle watch,
/// within interval + timeout. etcd refuses pings closer together than its
/// `--grpc-keepalive-min-time` (default 5 s): a client that pings more
/// often gets its connection closed ("too many pings") now and then, and
/// with it the watch. 6 s stays clear of that default.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(6);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);

/// Endpoints and connection options, checked once (the TLS files are read
/// when the configuration is applied, so a bad path fails the reload).
#[derive(Clone)]
pub struct EtcdConnector {
    endpoints: Vec<String>,
    options: ConnectOptions,
    /// The turn of the next connection (shared by the connector's clones).
    turn: Arc<AtomicUsize>,
}

impl EtcdConnector {
    /// Reads the TLS files `access` names. Errors name the file's key
    /// without its table (`etcd_ca …`); the caller adds the table.
    pub fn new(access: &EtcdAccess) -> Result<Self, String> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        if let (Some(user), Some(password)) = (&access.user, &access.password) {
            options = options.with_user(user.clone(), password.clone());
        }
        if access.ca.is_some() || access.cert.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &access.ca {
                let pem =
                    std::fs::read(ca).map_err(|e| format!("etcd_ca {}: {e}", ca.display()))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            if let (Some(cert), Some(key)) = (&access.cert, &access.key) {
                let cert = std::fs::read(cert)
                    .map_err(|e| format!("etcd_cert {}: {e}", cert.display()))?;
                let key =
                    std::fs::read(key).map_err(|e| format!("etcd_key {}: {e}", key.display()))?;
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            options = options.with_tls(tls);
        }
        Ok(Self {
            endpoints: access.endpoints.clone(),
            options,
            turn: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Connects to the member whose turn it is, within [`REQUEST_TIMEOUT`].
    pub async fn connect(&self) -> Result<Client, String> {
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let Some(endpoint) = self.endpoints.get(turn % self.endpoints.len().max(1)) else {
            return Err("cannot connect to etcd: no endpoints".to_owned());
        };
        let connect = Client::connect([endpoint], Some(self.options.clone()));
        match tokio::time::timeout(REQUEST_TIMEOUT, connect).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(e)) => Err(format!("cannot connect to etcd at {endpoint}: {e}")),
            Err(_) => Err(format!("cannot connect to etcd at {endpoint}: timed out")),
        }
    }
}
