//! Which backend issued which cancel key, and which key the client holds.
//!
//! A CancelRequest arrives on a new connection that carries nothing but
//! the key a client got in BackendKeyData. With reads spread over several
//! replicas, rolegate must remember which member issued each key and
//! forward the request there, over a fresh connection, with the backend's
//! own key.
//!
//! Outside a fleet the client holds the backend's key: BackendKeyData
//! passes through unchanged. In a fleet rolegate issues its own key
//! ([`crate::fleet::key`]), so that any instance can tell which instance
//! owns the session; the member's real key never leaves rolegate. Entries
//! are found by process id and the secret compared in constant time, so a
//! guess learns nothing from how long a lookup took.
//!
//! The registry is touched when a session authenticates, when it ends and
//! when a cancel arrives: never per packet, so a plain mutex is enough.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use subtle::ConstantTimeEq;
use tracing::warn;

use crate::fast_map::FastMap;
use crate::fleet::key;
use crate::protocol::startup::CancelKey;
use crate::server::backend::BackendTlsSettings;

/// Fresh process ids tried before one already in use is shared (the
/// secrets still tell the sessions apart).
const ISSUE_TRIES: usize = 8;

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

/// Where a transaction-pooled client's cancels go: the server running
/// its transaction now, or nowhere between transactions.
#[derive(Default)]
pub struct MovingTarget(Mutex<Moving>);

#[derive(Default)]
struct Moving {
    now: Option<CancelTarget>,
    /// A cancel was sent to `now` since it was set.
    cancelled: bool,
}

impl MovingTarget {
    fn lock(&self) -> MutexGuard<'_, Moving> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The client's transaction runs on `target` from now.
    pub fn set(&self, target: CancelTarget) {
        *self.lock() = Moving {
            now: Some(target),
            cancelled: false,
        };
    }

    /// The transaction is over: cancels go nowhere until the next one.
    /// True when a cancel was sent to its server meanwhile: the signal
    /// may still be on its way, so that server must not run another
    /// client's query (the caller closes it).
    pub fn clear(&self) -> bool {
        let mut moving = self.lock();
        moving.now = None;
        std::mem::take(&mut moving.cancelled)
    }

    fn take_for_cancel(&self) -> Option<CancelTarget> {
        let mut moving = self.lock();
        let target = moving.now.clone()?;
        moving.cancelled = true;
        Some(target)
    }
}

enum Target {
    Fixed(CancelTarget),
    Moving(Arc<MovingTarget>),
}

struct Entry {
    registration: u64,
    secret: Bytes,
    target: Target,
}

type Entries = FastMap<u32, Vec<Entry>>;

#[derive(Default)]
pub struct CancelRegistry {
    /// Sessions by the process id their client holds.
    entries: Mutex<Entries>,
    next_registration: AtomicU64,
}

/// Keeps a session's key registered; dropping it unregisters the key.
pub struct CancelRegistration {
    registry: Arc<CancelRegistry>,
    client_key: CancelKey,
    backend_pid: u32,
    registration: u64,
}

impl CancelRegistration {
    /// The key to hand to the client in BackendKeyData.
    pub fn client_key(&self) -> &CancelKey {
        &self.client_key
    }

    /// The server's own process id for the session.
    pub fn backend_pid(&self) -> u32 {
        self.backend_pid
    }

    /// The backend's process id and the one the client was given, when
    /// they differ (a fleet issued the key): NotificationResponses from
    /// the session's own backend are rewritten with it.
    pub fn pid_swap(&self) -> Option<(u32, u32)> {
        (self.backend_pid != self.client_key.pid).then_some((self.backend_pid, self.client_key.pid))
    }
}

impl Drop for CancelRegistration {
    fn drop(&mut self) {
        let mut entries = self.registry.lock();
        if let Some(list) = entries.get_mut(&self.client_key.pid) {
            list.retain(|e| e.registration != self.registration);
            if list.is_empty() {
                entries.remove(&self.client_key.pid);
            }
        }
    }
}

impl CancelRegistry {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, Entries> {
        // A panic while holding this lock cannot leave the map half-updated
        // (every operation is a single insert or remove), so a poisoned
        // lock is still safe to use.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records the key a backend issued and returns the registration that
    /// names the key the client should be given: the backend's own, or in
    /// a fleet (`instance` is this instance's id, 0 while it has none) a
    /// key rolegate issues.
    pub fn register(
        self: &Arc<Self>,
        target: CancelTarget,
        instance: Option<u16>,
    ) -> CancelRegistration {
        let backend_key = target.backend_key.clone();
        self.insert(Target::Fixed(target), &backend_key, instance)
    }

    /// Registers a transaction-pooled client: a key of rolegate's own
    /// (for fleet instance `instance`, 0 outside a fleet), its cancels
    /// sent wherever `target` says at the time.
    pub fn register_moving(
        self: &Arc<Self>,
        target: Arc<MovingTarget>,
        instance: u16,
    ) -> CancelRegistration {
        // No server's key stands behind it: a fresh key of the usual size.
        let placeholder = CancelKey {
            pid: 0,
            secret: Bytes::from_static(&[0; 4]),
        };
        self.insert(Target::Moving(target), &placeholder, Some(instance))
    }

    fn insert(
        self: &Arc<Self>,
        target: Target,
        backend_key: &CancelKey,
        instance: Option<u16>,
    ) -> CancelRegistration {
        let registration = self.next_registration.fetch_add(1, Ordering::Relaxed);
        let backend_pid = backend_key.pid;
        // Drawn before the lock: the random bytes are a syscall, and every
        // session's registration and every cancel take this lock.
        let drawn = instance.map(|id| (id, key::issue(id, backend_key.secret.len())));
        let mut entries = self.lock();
        let client_key = match drawn {
            None => backend_key.clone(),
            Some((id, drawn)) => issue_unused(&entries, id, drawn, backend_key),
        };
        // Nearly every process id has one session: a Vec's first push
        // would reserve four entries (over 500 bytes per idle session).
        entries
            .entry(client_key.pid)
            .or_insert_with(|| Vec::with_capacity(1))
            .push(Entry {
                registration,
                secret: client_key.secret.clone(),
                target,
            });
        drop(entries);
        CancelRegistration {
            registry: Arc::clone(self),
            client_key,
            backend_pid,
            registration,
        }
    }

    /// Where a cancel with this client key goes, if the key is
    /// registered here and (for a pooled client) a transaction runs.
    pub fn lookup(&self, client_key: &CancelKey) -> Option<CancelTarget> {
        let entries = self.lock();
        let mut found = None;
        // Every candidate is compared, so the time taken does not say
        // which one (if any) matched.
        for entry in entries.get(&client_key.pid)? {
            let same = entry.secret.len() == client_key.secret.len()
                && bool::from(entry.secret.as_ref().ct_eq(client_key.secret.as_ref()));
            if same && found.is_none() {
                found = Some(&entry.target);
            }
        }
        match found? {
            Target::Fixed(target) => Some(target.clone()),
            Target::Moving(moving) => moving.take_for_cancel(),
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `drawn`, or while its process id is taken, another fresh key for
/// instance `id` (a clash is rare: 2^20 ids per instance).
fn issue_unused(
    entries: &Entries,
    id: u16,
    drawn: Result<CancelKey, getrandom::Error>,
    backend_key: &CancelKey,
) -> CancelKey {
    let mut candidate = drawn;
    for _ in 0..ISSUE_TRIES {
        match candidate {
            Ok(key) if !entries.contains_key(&key.pid) => return key,
            Ok(_) => candidate = key::issue(id, backend_key.secret.len()),
            Err(e) => {
                warn!("no randomness for a cancel key ({e}); passing the server's key through");
                return backend_key.clone();
            }
        }
    }
    // Every try clashed: share a process id (the secrets tell the
    // sessions apart).
    candidate.unwrap_or_else(|_| backend_key.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let reg = registry.register(target("pg2", 7), None);
        assert_eq!(reg.client_key().pid, 7);
        assert!(reg.pid_swap().is_none());
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
    fn the_same_backend_key_on_two_members_is_two_sessions() {
        let registry = CancelRegistry::new();
        let old = registry.register(target("pg2", 7), None);
        let new = registry.register(target("pg3", 7), None);
        assert_eq!(registry.len(), 2);
        drop(old);
        assert_eq!(
            registry.lookup(new.client_key()).map(|t| t.member),
            Some("pg3".into())
        );
    }

    #[test]
    fn a_fleet_issues_its_own_keys() {
        let registry = CancelRegistry::new();
        let reg = registry.register(target("pg2", 7), Some(5));
        let issued = reg.client_key().clone();
        assert_eq!(key::instance_of(issued.pid), 5);
        assert_ne!(issued.secret, Bytes::from_static(b"abcd"));
        assert_eq!(issued.secret.len(), 4);
        assert_eq!(reg.pid_swap(), Some((7, issued.pid)));
        // The backend's own key is not a client key any more.
        assert!(registry.lookup(&target("pg2", 7).backend_key).is_none());
        let found = registry.lookup(&issued).expect("issued key");
        assert_eq!(found.backend_key.pid, 7);
        // A wrong secret of the right length, or of another length, misses.
        let mut wrong = issued.clone();
        wrong.secret = Bytes::from_static(b"zzzz");
        assert!(registry.lookup(&wrong).is_none());
        wrong.secret = Bytes::from_static(b"abcdabcd");
        assert!(registry.lookup(&wrong).is_none());
    }

    #[test]
    fn a_moving_target_is_cancelled_only_while_a_transaction_runs() {
        let registry = CancelRegistry::new();
        let moving = Arc::new(MovingTarget::default());
        let reg = registry.register_moving(Arc::clone(&moving), 3);
        let key = reg.client_key().clone();
        assert_eq!(key::instance_of(key.pid), 3);
        assert!(registry.lookup(&key).is_none(), "between transactions");
        assert!(!moving.clear());
        moving.set(target("pg2", 7));
        assert_eq!(registry.lookup(&key).map(|t| t.member), Some("pg2".into()));
        assert!(moving.clear(), "a cancel went to that server");
        assert!(registry.lookup(&key).is_none());
        moving.set(target("pg3", 8));
        assert!(!moving.clear(), "no cancel this time");
    }
}
