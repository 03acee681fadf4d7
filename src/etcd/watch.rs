//! The etcd v3 source: a full read of the cluster's prefix, then a watch
//! from the next revision, forever.
//!
//! The watcher owns no interpretation of keys: it passes snapshots and
//! events to the follower, which applies them to its `DcsState`. Any
//! failure (connection lost, watch cancelled, history compacted past the
//! watch's start) leads to a fresh full read and a new watch from *its*
//! revision, so no event is lost across reconnects: the snapshot replaces
//! whatever happened in between. Reconnects back off from 100 ms to 2 s
//! across all configured endpoints. The connection itself (TLS, password,
//! keepalive, leader required) is [`crate::etcd::connector`]'s, shared with
//! the fleet registry.

use std::time::Duration;

use etcd_client::{EventType, GetOptions, WatchOptions};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::EtcdAccess;
use crate::etcd::connector::{EtcdConnector, REQUEST_TIMEOUT};
use crate::etcd::trouble::{EtcdTrouble, Origin};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
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
    /// etcd cannot be reached, refused the configuration, or the watch
    /// broke; a resync follows.
    Down(EtcdTrouble),
}

#[derive(Clone)]
pub struct EtcdSource {
    connector: EtcdConnector,
    prefix: String,
}

impl EtcdSource {
    /// Follows `prefix` with the settings `access` of `origin`.
    pub fn new(access: &EtcdAccess, prefix: String, origin: Origin) -> Result<Self, String> {
        let connector = EtcdConnector::new(access, &prefix, origin)?;
        Ok(Self::from_connector(connector, prefix))
    }

    /// Follows `prefix` through an existing connector.
    pub fn from_connector(connector: EtcdConnector, prefix: String) -> Self {
        Self { connector, prefix }
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
    ) -> EtcdTrouble {
        let mut client = match self.connector.connect().await {
            Ok(client) => client,
            Err(e) => return e,
        };
        EtcdTrouble::Lost(self.follow(&mut client, events, backoff).await)
    }

    /// Reads the prefix through `client`, then follows the watch. Returns
    /// why it ended.
    async fn follow(
        &self,
        client: &mut etcd_client::Client,
        events: &mpsc::Sender<EtcdEvent>,
        backoff: &mut Duration,
    ) -> String {
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
