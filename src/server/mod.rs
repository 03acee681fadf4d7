//! The client-facing side: accept, handshake, session, relay, cancel.
//!
//! Modules follow the connection path: [`listener`] accepts, [`handshake`]
//! reads the opening, [`session`] routes and connects through
//! [`backend`], [`authenticate`] relays the login, [`relay`] pumps bytes,
//! and [`cancel`] routes cancel requests to the backend that issued a key.

pub mod authenticate;
pub mod backend;
pub mod cancel;
pub mod handshake;
pub mod listener;
pub mod relay;
pub mod session;
pub mod stream;

pub use backend::BackendTlsSettings;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Limits;
use crate::metrics::{RelayedBytes, SessionCounts};
use crate::router::Router;

use self::cancel::CancelRegistry;

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
    pub limits: Limits,
    pub cancels: Arc<CancelRegistry>,
    pub shutdown: Shutdown,
    /// Every session and refusal task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// One permit per open client connection (`max_client_connections`).
    pub client_slots: Arc<Semaphore>,
    /// Relaying sessions by cluster, member and role.
    pub sessions: Arc<SessionCounts>,
    pub relayed: RelayedBytes,
}

impl Shared {
    pub fn new(limits: Limits) -> Self {
        let slots = limits.max_client_connections;
        Self {
            limits,
            cancels: CancelRegistry::new(),
            shutdown: Shutdown::default(),
            tasks: TaskTracker::new(),
            client_slots: Arc::new(Semaphore::new(slots)),
            sessions: SessionCounts::new(),
            relayed: RelayedBytes::new(),
        }
    }
}

/// What a listener's sessions need to know about it.
pub struct ListenerContext {
    pub tls: handshake::ListenerTls,
    /// TLS towards the members of this listener's cluster.
    pub backend_tls: BackendTlsSettings,
    pub listen: SocketAddr,
    /// `listen` as a metric label, formatted once.
    pub label: String,
    pub cluster: Arc<str>,
    pub router: Router,
}
