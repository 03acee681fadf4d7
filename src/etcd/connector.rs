//! Connecting to etcd: one connector for the clusters' followers
//! ([`crate::etcd::watch`]) and the fleet registry ([`crate::fleet`]).
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
//! keep failing, for longer than the reconnect grace, while the other
//! members answer. In turn, the reconnect after a failure goes to another
//! member.
//! A member is used once it has answered a read of the keys the connection
//! is for; one that does not (stopped, cut off, without a leader) is passed
//! over for the next, so a reconnect during a rolling restart does not wait
//! on the member that is down (a fleet's 3 s lease expired while its
//! renewal did).
//!
//! The probe is a read, not `Maintenance.Status`: with authentication on,
//! etcd 3.4.42–3.4.45, 3.5.28–3.5.31 and 3.6.0–3.6.11 answer `Status` only
//! to the root role, and a user who may only read the cluster's prefix
//! (all rolegate needs) would never connect. A count-only read of that
//! prefix needs nothing more than the permission the follower needs anyway,
//! and with the leader required it fails on a member without a quorum as
//! `Status` did.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions};

use crate::config::EtcdAccess;
use crate::etcd::trouble::{refusal, EtcdTrouble, Origin, Refused};

/// Bound on one request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a member has to answer the probe before the next
/// member is tried. A stopped member refuses at once; this bounds the cost
/// of one that is cut off (its packets dropped) or frozen.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
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
    /// The prefix the connections are for, read by the probe.
    prefix: String,
    /// The table and file the settings come from, named in refusals.
    origin: Arc<Origin>,
    /// Whether a client certificate is configured (`etcd_cert`).
    client_certificate: bool,
    /// The turn of the next connection (shared by the connector's clones).
    turn: Arc<AtomicUsize>,
}

impl EtcdConnector {
    /// Connections for the keys under `prefix`, which the probe reads,
    /// with the settings `access` of `origin`. Reads the TLS files `access`
    /// names. Errors name the file's key without its table (`etcd_ca …`);
    /// the caller adds the table.
    pub fn new(access: &EtcdAccess, prefix: &str, origin: Origin) -> Result<Self, String> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true)
            // An idle connection's token expires (`--auth-token-ttl`, 300 s by
            // default): the next request fetches a new one instead of failing.
            .with_auto_token_refresh(true);
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
            prefix: prefix.to_owned(),
            origin: Arc::new(origin),
            client_certificate: access.cert.is_some(),
            turn: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Connects to the member whose turn it is, or, when that one does not
    /// answer within [`PROBE_TIMEOUT`], to the next that does. The error
    /// names every member tried and why it was passed over, or, when a
    /// member refused the configuration's credentials or certificate, that
    /// refusal and the keys to fix.
    pub async fn connect(&self) -> Result<Client, EtcdTrouble> {
        let count = self.endpoints.len();
        if count == 0 {
            return Err(EtcdTrouble::Lost(
                "cannot connect to etcd: no endpoints".to_owned(),
            ));
        }
        let first = self.turn.fetch_add(1, Ordering::Relaxed);
        let mut passed_over = Vec::new();
        let mut refused: Option<(Refused, String)> = None;
        for step in 0..count {
            let endpoint = &self.endpoints[(first + step) % count];
            match self.probe(endpoint).await {
                Ok(client) => {
                    // The next connection starts after the member that answered.
                    self.turn.fetch_add(step, Ordering::Relaxed);
                    return Ok(client);
                }
                Err(e) => {
                    let said = format!("{endpoint}: {e}");
                    if let ProbeError::Etcd(error) = &e {
                        if let Some(what) = refusal(error, self.client_certificate) {
                            refused.get_or_insert((what, said.clone()));
                        }
                    }
                    passed_over.push(said);
                }
            }
        }
        Err(match refused {
            Some((what, detail)) => EtcdTrouble::Refused {
                what,
                origin: Arc::clone(&self.origin),
                detail,
            },
            None => EtcdTrouble::Lost(format!(
                "cannot connect to etcd ({})",
                passed_over.join("; ")
            )),
        })
    }

    /// A client of `endpoint` once the member has answered a count of the
    /// keys under the prefix. The client connects lazily: without the
    /// probe, a request to a stopped member waits for the whole request
    /// timeout instead of failing.
    async fn probe(&self, endpoint: &str) -> Result<Client, ProbeError> {
        let answered = async {
            let mut client = Client::connect([endpoint], Some(self.options.clone())).await?;
            let count = GetOptions::new().with_prefix().with_count_only();
            client.get(self.prefix.as_str(), Some(count)).await?;
            Ok::<_, etcd_client::Error>(client)
        };
        match tokio::time::timeout(PROBE_TIMEOUT, answered).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(e)) => Err(ProbeError::Etcd(e)),
            Err(_) => Err(ProbeError::Silent),
        }
    }
}

/// Why one member was passed over.
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error("{0}")]
    Etcd(etcd_client::Error),
    #[error("no answer within {PROBE_TIMEOUT:?}")]
    Silent,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closed_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address").port()
    }

    #[tokio::test]
    async fn members_that_do_not_answer_are_passed_over_at_once() {
        let endpoints: Vec<String> = (0..3)
            .map(|_| format!("http://127.0.0.1:{}", closed_port()))
            .collect();
        let access = EtcdAccess {
            endpoints: endpoints.clone(),
            ..EtcdAccess::default()
        };
        let origin = Origin {
            table: "clusters.demo".to_owned(),
            file: "rolegate.toml".into(),
        };
        let connector = EtcdConnector::new(&access, "/service/demo/", origin).expect("connector");
        let started = std::time::Instant::now();
        let error = connector.connect().await.err().expect("no member answers");
        assert!(
            started.elapsed() < PROBE_TIMEOUT * 3,
            "took {:?}",
            started.elapsed()
        );
        let error = error.to_string();
        for endpoint in &endpoints {
            assert!(error.contains(endpoint.as_str()), "{error}");
        }
    }
}
