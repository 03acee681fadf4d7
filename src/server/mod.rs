//! The client-facing side: accept, handshake, session, relay, cancel.
//!
//! [`listener_set`] keeps the listeners the configuration names running,
//! adding, changing and removing them on reload. Modules then follow the
//! connection path: [`listener`] accepts, [`proxy_protocol`] reads a load
//! balancer's PROXY header where a listener expects one, [`handshake`]
//! reads the opening, [`session`] routes and connects through
//! [`backend`] (a member's logins paced by [`login_gate`], a held client
//! that leaves noticed by [`hangup`]),
//! [`authenticate`] relays the login, [`relay`] pumps bytes
//! (through [`notify_pids`] in a fleet), and [`cancel`] routes cancel
//! requests to the backend that issued a key, or to the fleet instance
//! that did, whose [`peer_listener`] takes them.

pub mod address_owner;
pub mod authenticate;
pub mod backend;
pub mod cancel;
pub mod handshake;
pub mod hangup;
pub mod listener;
pub mod listener_set;
pub mod login_gate;
pub mod loops;
pub mod notify_pids;
pub mod peer_listener;
pub mod pool_sweeper;
pub mod proxy_protocol;
pub mod relay;
pub mod session;
pub mod socket;
pub mod stream;
pub mod when_woken;

pub use backend::BackendTlsSettings;

use std::net::SocketAddr;
use std::sync::Arc;

use std::sync::atomic::{AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::cache::SecretCache;
use crate::config::Limits;
use crate::events::EventLog;
use crate::metrics::{ListenerMetrics, RelayedBytes, SessionCounts};
use crate::pool::settings::PoolSettings;
use crate::pool::Pools;
use crate::router::Router;

use self::cancel::{CancelRegistry, CancelThrottle, DeliveryTime, Siblings};
use self::login_gate::LoginGates;
use self::loops::Loops;
use crate::fleet::Fleet;

/// The two stages of a graceful shutdown.
#[derive(Clone, Default)]
pub struct Shutdown {
    /// Listeners stop accepting; sessions continue.
    pub stop_accepting: CancellationToken,
    /// Remaining sessions end with FATAL 57P01.
    pub end_sessions: CancellationToken,
}

/// State shared by every session of the process.
pub struct Shared {
    /// Replaced whole by a reload; each session reads it once, at accept.
    limits: ArcSwap<Limits>,
    pub cancels: Arc<CancelRegistry>,
    /// The other processes of a restart in progress, for the cancels that
    /// reach the wrong one.
    pub siblings: Siblings,
    pub cancel_throttle: Arc<CancelThrottle>,
    /// How long a delivered cancel takes here: a miss takes as long.
    pub cancel_delivery: DeliveryTime,
    /// Set once at start when `[fleet]` is configured.
    fleet: std::sync::OnceLock<Arc<Fleet>>,
    pub shutdown: Shutdown,
    /// Every session and refusal task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// Client connections open now, checked against
    /// `max_client_connections` at accept.
    open_clients: Arc<AtomicUsize>,
    /// Relaying sessions by cluster, member and role.
    pub sessions: Arc<SessionCounts>,
    /// Each member's logins in flight, bounded by `backend_logins`.
    pub logins: LoginGates,
    /// The server connections of pooled listeners.
    pub pools: Arc<Pools<stream::BackendStream>>,
    /// Transaction-pooled clients' named statements, one server-side name
    /// per distinct statement.
    pub statements: Arc<crate::pool::statements::Registry>,
    /// Secrets pooled listeners read with `auth_query`.
    pub secrets: SecretCache,
    pub relayed: RelayedBytes,
    /// The event loops sessions are handed to.
    pub loops: Loops,
    /// Where sessions ended by rolegate, holds that timed out and a new
    /// leader's first session are recorded.
    pub events: Arc<EventLog>,
}

impl Shared {
    pub fn new(limits: Limits, loops: Loops, events: Arc<EventLog>) -> Self {
        Self {
            loops,
            events,
            limits: ArcSwap::from_pointee(limits),
            cancels: CancelRegistry::new(),
            siblings: Siblings::default(),
            cancel_throttle: CancelThrottle::new(),
            cancel_delivery: DeliveryTime::default(),
            fleet: std::sync::OnceLock::new(),
            shutdown: Shutdown::default(),
            tasks: TaskTracker::new(),
            open_clients: Arc::new(AtomicUsize::new(0)),
            sessions: SessionCounts::new(),
            logins: LoginGates::default(),
            pools: Arc::default(),
            statements: Arc::default(),
            secrets: SecretCache::default(),
            relayed: RelayedBytes::new(),
        }
    }
}

impl Shared {
    /// The limits in force now.
    pub fn limits(&self) -> Arc<Limits> {
        self.limits.load_full()
    }

    /// The fleet this instance belongs to, if `[fleet]` is configured.
    pub fn fleet(&self) -> Option<&Arc<Fleet>> {
        self.fleet.get()
    }

    /// Joins a fleet; once per process (`[fleet]` changes need a restart).
    pub fn join_fleet(&self, fleet: Arc<Fleet>) {
        let _ = self.fleet.set(fleet);
    }

    /// `limits.backend_logins` in force now (read per login without
    /// taking a reference to the limits).
    pub fn backend_logins(&self) -> usize {
        self.limits.load().backend_logins
    }

    /// Replaces the limits for connections accepted from now on.
    pub fn set_limits(&self, limits: Limits) {
        self.limits.store(Arc::new(limits));
    }

    /// Takes a client slot, unless `max_client_connections` are open.
    pub fn take_slot(&self) -> Option<ClientSlot> {
        let max = self.limits.load().max_client_connections;
        if self.open_clients.fetch_add(1, Ordering::AcqRel) >= max {
            self.open_clients.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(ClientSlot(Arc::clone(&self.open_clients)))
    }
}

/// One open client connection; dropping it frees the slot.
pub struct ClientSlot(Arc<AtomicUsize>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a listener's sessions need to know about it.
pub struct ListenerContext {
    pub tls: handshake::ListenerTls,
    /// TLS towards the members of this listener's cluster.
    pub backend_tls: BackendTlsSettings,
    pub listen: SocketAddr,
    /// This listener's metrics (labelled with `listen`).
    pub metrics: ListenerMetrics,
    /// Set when connections start with a PROXY protocol header.
    pub proxy: Option<proxy_protocol::ProxyPolicy>,
    pub cluster: Arc<str>,
    /// Shared with the admin endpoint, which shows where a new session
    /// would go.
    pub router: Arc<Router>,
    /// Set on a pooled listener.
    pub pool: Option<Arc<PoolSettings>>,
    /// Cancelled to end this listener's sessions with FATAL 57P01: at
    /// shutdown (a child of [`Shutdown::end_sessions`]), or
    /// `shutdown_timeout` after a reload removed the listener.
    pub end_sessions: CancellationToken,
}
