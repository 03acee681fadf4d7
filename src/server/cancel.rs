//! Cancel routing: which backend issued which cancel key.
//!
//! A CancelRequest arrives on a new connection that carries nothing but
//! the key a client got in BackendKeyData. With reads spread over several
//! replicas, rolegate must remember which member issued each key and
//! forward the request there, over a fresh connection, with the backend's
//! own key.
//!
//! The registry separates the key a client holds (`client_key`) from the
//! backend's key. Today they are the same bytes and BackendKeyData passes
//! through unchanged. A fleet of rolegates behind one address needs
//! rolegate-issued keys instead (so any instance can tell which instance
//! owns a session and pass the request on); that change is confined to
//! [`CancelRegistry::register`], which would mint the client key, and to
//! the session, which would rewrite BackendKeyData with it.
//!
//! The registry is touched when a session authenticates, when it ends and
//! when a cancel arrives: never per packet, so a plain mutex is enough.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use super::backend::{open, BackendTlsSettings};
use crate::protocol::startup::CancelKey;

/// Where a cancel for one session must go.
#[derive(Clone)]
pub struct CancelTarget {
    pub member: Arc<str>,
    pub host: Arc<str>,
    pub port: u16,
    /// The key the backend issued, sent in the forwarded CancelRequest.
    pub backend_key: CancelKey,
    /// The TLS settings the session's own connection used.
    pub tls: BackendTlsSettings,
}

#[derive(Default)]
pub struct CancelRegistry {
    entries: Mutex<HashMap<CancelKey, (u64, CancelTarget)>>,
    next_id: AtomicU64,
}

/// Keeps a session's key registered; dropping it unregisters the key.
pub struct CancelRegistration {
    registry: Arc<CancelRegistry>,
    client_key: CancelKey,
    id: u64,
}

impl CancelRegistration {
    /// The key to hand to the client in BackendKeyData.
    pub fn client_key(&self) -> &CancelKey {
        &self.client_key
    }
}

impl Drop for CancelRegistration {
    fn drop(&mut self) {
        let mut entries = self.registry.lock();
        // Only remove our own entry: a later session may have registered
        // the same key (a backend PID reused on another member).
        if entries.get(&self.client_key).map(|(id, _)| *id) == Some(self.id) {
            entries.remove(&self.client_key);
        }
    }
}

impl CancelRegistry {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<CancelKey, (u64, CancelTarget)>> {
        // A panic while holding this lock cannot leave the map half-updated
        // (every operation is a single insert or remove), so a poisoned
        // lock is still safe to use.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records the key a backend issued and returns the registration that
    /// names the key the client should be given.
    pub fn register(self: &Arc<Self>, target: CancelTarget) -> CancelRegistration {
        let client_key = target.backend_key.clone();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(client_key.clone(), (id, target));
        CancelRegistration {
            registry: Arc::clone(self),
            client_key,
            id,
        }
    }

    pub fn lookup(&self, client_key: &CancelKey) -> Option<CancelTarget> {
        self.lock().get(client_key).map(|(_, t)| t.clone())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Sends the backend's CancelRequest to the member that issued the key,
/// over a connection with the session's TLS settings. PostgreSQL answers a
/// cancel with nothing but closing the connection.
pub async fn forward_cancel(
    target: &CancelTarget,
    connect_timeout: Duration,
) -> Result<(), String> {
    let packet = target.backend_key.encode_cancel_request();
    let mut stream = open(
        &target.host,
        target.port,
        &target.tls,
        connect_timeout,
        None,
    )
    .await
    .map_err(|e| e.message)?;
    let send = async {
        stream.write_all(&packet).await?;
        stream.shutdown().await
    };
    tokio::time::timeout(connect_timeout, send)
        .await
        .map_err(|_| "sending the cancel request timed out".to_owned())?
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn target(member: &str, pid: u32) -> CancelTarget {
        CancelTarget {
            member: member.into(),
            host: "127.0.0.1".into(),
            port: 5432,
            backend_key: CancelKey {
                pid,
                secret: Bytes::from_static(b"abcd"),
            },
            tls: BackendTlsSettings::disabled(),
        }
    }

    #[test]
    fn register_lookup_and_drop() {
        let registry = CancelRegistry::new();
        let reg = registry.register(target("pg2", 7));
        assert_eq!(reg.client_key().pid, 7);
        assert_eq!(
            registry.lookup(reg.client_key()).map(|t| t.member),
            Some("pg2".into())
        );
        let key = reg.client_key().clone();
        drop(reg);
        assert!(registry.lookup(&key).is_none());
        assert!(registry.is_empty());
    }

    #[test]
    fn an_older_registration_does_not_remove_a_newer_one() {
        let registry = CancelRegistry::new();
        let old = registry.register(target("pg2", 7));
        let new = registry.register(target("pg3", 7));
        drop(old);
        assert_eq!(
            registry.lookup(new.client_key()).map(|t| t.member),
            Some("pg3".into())
        );
    }
}
