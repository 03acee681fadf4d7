//! The etcd v3 source: a full read of the cluster's prefix, then a watch
//! from the next revision, forever.
//!
//! The watcher owns no interpretation of keys: it passes snapshots and
//! events to the follower, which applies them to its `DcsState`. Any
//! failure (connection lost, watch cancelled, history compacted past the
//! watch's start) leads to a fresh full read and a new watch from *its*
//! revision, so no event is lost across reconnects: the snapshot replaces
//! whatever happened in between. Reconnects back off from 100 ms to 2 s
//! across all configured endpoints. Every request requires the etcd member
//! to have a leader, so a member cut off from its quorum is not mistaken
//! for a quiet cluster.

use std::time::Duration;

use etcd_client::{
    Certificate, Client, ConnectOptions, EventType, GetOptions, Identity, TlsOptions, WatchOptions,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::ClusterConfig;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Bound on connecting and on the full read.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// HTTP/2 pings detect a dead etcd (or a partition) on an idle watch,
/// within interval + timeout. etcd refuses pings closer together than its
/// `--grpc-keepalive-min-time` (default 5 s): a client that pings more
/// often gets its connection closed ("too many pings") now and then, and
/// with it the watch. 6 s stays clear of that default.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(6);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);

/// A key change seen by the watch.
#[derive(Debug)]
pub enum KeyEvent {
    Put { key: Vec<u8>, value: Vec<u8> },
    Delete { key: Vec<u8> },
}

/// What the watcher tells the follower.
#[derive(Debug)]
pub enum EtcdEvent {
    /// A full read of the prefix: replaces all earlier state.
    Snapshot(Vec<(Vec<u8>, Vec<u8>)>),
    /// Events of one watch response, in order.
    Events(Vec<KeyEvent>),
    /// etcd cannot be reached (or the watch broke); a resync follows.
    Down(String),
}

#[derive(Clone)]
pub struct EtcdSource {
    endpoints: Vec<String>,
    options: ConnectOptions,
    prefix: String,
}

impl EtcdSource {
    pub fn new(config: &ClusterConfig, prefix: String) -> Result<Self, String> {
        // Every request and the watch require the member to have a raft
        // leader: a member cut off from its quorum otherwise keeps the
        // watch open, answers pings and sends nothing, so a stale leader
        // key would look current. With the requirement, reads fail at once
        // and etcd cancels the watch after about three election timeouts
        // ("etcdserver: no leader"), which rolegate treats as etcd lost.
        let mut options = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        if let (Some(user), Some(password)) = (&config.etcd_user, &config.etcd_password) {
            options = options.with_user(user.clone(), password.clone());
        }
        if config.etcd_ca.is_some() || config.etcd_cert.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &config.etcd_ca {
                let pem =
                    std::fs::read(ca).map_err(|e| format!("etcd_ca {}: {e}", ca.display()))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            if let (Some(cert), Some(key)) = (&config.etcd_cert, &config.etcd_key) {
                let cert = std::fs::read(cert)
                    .map_err(|e| format!("etcd_cert {}: {e}", cert.display()))?;
                let key =
                    std::fs::read(key).map_err(|e| format!("etcd_key {}: {e}", key.display()))?;
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            options = options.with_tls(tls);
        }
        Ok(Self {
            endpoints: config.etcd.clone(),
            options,
            prefix,
        })
    }

    /// Runs until `shutdown`, sending what it sees to `events`.
    pub async fn run(self, events: mpsc::Sender<EtcdEvent>, shutdown: CancellationToken) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let outcome = tokio::select! {
                outcome = self.sync_and_watch(&events, &mut backoff) => outcome,
                () = shutdown.cancelled() => return,
            };
            if events.send(EtcdEvent::Down(outcome)).await.is_err() {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = shutdown.cancelled() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One connection's life: read everything, then follow the watch.
    /// Returns why it ended.
    async fn sync_and_watch(
        &self,
        events: &mpsc::Sender<EtcdEvent>,
        backoff: &mut Duration,
    ) -> String {
        let connect = Client::connect(&self.endpoints, Some(self.options.clone()));
        let mut client = match tokio::time::timeout(REQUEST_TIMEOUT, connect).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => return format!("cannot connect to etcd: {e}"),
            Err(_) => return "cannot connect to etcd: timed out".to_owned(),
        };
        let get = client.get(self.prefix.as_str(), Some(GetOptions::new().with_prefix()));
        let response = match tokio::time::timeout(REQUEST_TIMEOUT, get).await {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => return format!("cannot read {} from etcd: {e}", self.prefix),
            Err(_) => return format!("reading {} from etcd timed out", self.prefix),
        };
        let revision = response.header().map(|h| h.revision()).unwrap_or_default();
        let snapshot = response
            .kvs()
            .iter()
            .map(|kv| (kv.key().to_vec(), kv.value().to_vec()))
            .collect();
        if events.send(EtcdEvent::Snapshot(snapshot)).await.is_err() {
            return "the follower stopped".to_owned();
        }
        debug!(prefix = %self.prefix, revision, "read the cluster's keys from etcd");

        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1)
            .with_progress_notify();
        let watch = client.watch(self.prefix.as_str(), Some(options));
        let mut stream = match tokio::time::timeout(REQUEST_TIMEOUT, watch).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return format!("cannot watch {}: {e}", self.prefix),
            Err(_) => return format!("watching {} timed out", self.prefix),
        };
        info!(prefix = %self.prefix, revision, "watching etcd");
        *backoff = BACKOFF_MIN;
        loop {
            let response = match stream.message().await {
                Ok(Some(response)) => response,
                Ok(None) => return "the etcd watch stream ended".to_owned(),
                Err(e) => return format!("the etcd watch failed: {e}"),
            };
            if response.canceled() || response.compact_revision() > 0 {
                warn!(
                    compact_revision = response.compact_revision(),
                    reason = response.cancel_reason(),
                    "etcd cancelled the watch; reading the cluster again"
                );
                return "the etcd watch was cancelled".to_owned();
            }
            let batch: Vec<_> = response
                .events()
                .iter()
                .filter_map(|event| {
                    let kv = event.kv()?;
                    Some(match event.event_type() {
                        EventType::Put => KeyEvent::Put {
                            key: kv.key().to_vec(),
                            value: kv.value().to_vec(),
                        },
                        EventType::Delete => KeyEvent::Delete {
                            key: kv.key().to_vec(),
                        },
                    })
                })
                .collect();
            if !batch.is_empty() && events.send(EtcdEvent::Events(batch)).await.is_err() {
                return "the follower stopped".to_owned();
            }
        }
    }
}
