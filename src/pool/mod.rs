//! Server connections kept open and lent to pooled clients: one pool per
//! (listener, member, database, role).
//!
//! A pool counts every server it opened, idle or lent, against its
//! `pool_size`; a client that finds none idle and the count at the limit
//! waits for one to come back, up to `query_wait_timeout`. A server comes
//! back only when its session left it clean (see [`relay`]), after the
//! reset query; every other server is closed, never lent again. An idle
//! server is checked before it is lent: one that the member closed
//! meanwhile (a restart, `idle_session_timeout`) or that spoke unasked is
//! closed, and one idle longer than `server_idle_timeout` too.
//!
//! The pool does not route: the router picks the member, the pool lends
//! a connection to it. The session checks the member still fits before
//! it lends (see `server::session::pooled`), and a sweeper per listener
//! (`server::pool_sweeper`) closes idle servers of members that left the
//! listener's role at once, and aged ones every few seconds.

pub(crate) mod own_query;
pub(crate) mod relay;
pub(crate) mod session_state;
pub(crate) mod settings;
pub(crate) mod statements;
pub(crate) mod transaction;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, ReadBuf};

/// What a pool's servers are connected by: rolegate's connections to its
/// members (plain or TLS), named by the caller.
pub trait Stream: AsyncRead + Unpin + Send + 'static {}

impl<S: AsyncRead + Unpin + Send + 'static> Stream for S {}
use tokio::sync::Notify;

use crate::metrics::pool::{Closed, PoolMetrics};
use crate::protocol::startup::CancelKey;
use statements::ServerStatements;

/// Which pool a server belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub listener: SocketAddr,
    pub member: Arc<str>,
    pub database: String,
    pub user: String,
}

/// A logged-in server connection, idle in its pool or lent to a client.
/// Dropping it closes the connection and frees its place in the pool.
pub struct Server<S> {
    pub stream: S,
    /// The key the server issued; clients get rolegate's own.
    pub key: CancelKey,
    /// The parameters the server reported, kept current from every
    /// ParameterStatus it sends.
    pub parameters: Vec<(String, String)>,
    /// The settings rolegate gave it for its client (startup parameters).
    pub settings: Vec<(String, String)>,
    /// The statements of rolegate's it has prepared (transaction mode).
    pub prepared: ServerStatements,
    idle_since: Instant,
    /// Held for its drop, which frees the place.
    _place: Place<S>,
}

impl<S: AsyncRead + Unpin> Server<S> {
    /// Whether an idle server may be lent: idle no longer than
    /// `idle_timeout`, and with nothing to say (see [`quiet`]).
    fn sound(&mut self, idle_timeout: Duration) -> bool {
        self.idle_since.elapsed() <= idle_timeout && quiet(&mut self.stream)
    }
}

impl<S> Server<S> {
    /// The value the server reported for `name`.
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Records a ParameterStatus a server sent.
pub(crate) fn record_parameter(parameters: &mut Vec<(String, String)>, name: &str, value: &str) {
    match parameters.iter_mut().find(|(n, _)| n == name) {
        Some((_, v)) => value.clone_into(v),
        None => parameters.push((name.to_owned(), value.to_owned())),
    }
}

/// One server's place in its pool's count.
struct Place<S>(Arc<Pool<S>>);

impl<S> Drop for Place<S> {
    fn drop(&mut self) {
        let pool = &self.0;
        let mut state = pool.lock();
        state.open -= 1;
        pool.metrics.servers(state.open, state.idle.len());
        drop(state);
        pool.changed.notify_one();
    }
}

struct PoolState<S> {
    /// Most recently returned last.
    idle: Vec<Server<S>>,
    /// Servers open or opening, idle or lent.
    open: usize,
}

pub struct Pool<S> {
    state: Mutex<PoolState<S>>,
    /// A server came back or closed: a waiting client may go on.
    changed: Notify,
    /// Clients waiting for a server now.
    waiting: AtomicUsize,
    pub metrics: PoolMetrics,
}

/// A pool's counts at one moment, for `/cluster`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolCounts {
    pub idle: usize,
    pub lent: usize,
    pub waiting: usize,
}

/// What a client got from its pool.
pub enum Lent<S> {
    /// An idle server, checked.
    Idle(Server<S>),
    /// A place for a new server: open it and [`Opening::logged_in`] it.
    Open(Opening<S>),
}

/// A place taken in a pool for a server being opened; dropped unused, it
/// frees the place.
pub struct Opening<S>(Place<S>);

impl<S> Opening<S> {
    pub fn logged_in(
        self,
        stream: S,
        key: CancelKey,
        parameters: Vec<(String, String)>,
    ) -> Server<S> {
        self.0 .0.metrics.lent(true);
        Server {
            stream,
            key,
            parameters,
            settings: Vec::new(),
            prepared: ServerStatements::default(),
            idle_since: Instant::now(),
            _place: self.0,
        }
    }
}

/// The pool stayed full until the wait ran out.
#[derive(Debug, Clone, Copy)]
pub struct PoolFull {
    pub size: usize,
    pub waited: Duration,
}

impl<S> Pool<S> {
    fn lock(&self) -> MutexGuard<'_, PoolState<S>> {
        // Every change under the lock is one push, pop or count: a panic
        // elsewhere cannot leave it half-done.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn counts(&self) -> PoolCounts {
        let state = self.lock();
        PoolCounts {
            idle: state.idle.len(),
            lent: state.open.saturating_sub(state.idle.len()),
            waiting: self.waiting.load(Ordering::Relaxed),
        }
    }
}

impl<S: Stream> Pool<S> {
    /// An idle server that is still sound, or a place to open one, or a
    /// wait until `until` for either.
    pub async fn lend(
        self: &Arc<Self>,
        size: usize,
        idle_timeout: Duration,
        until: Instant,
    ) -> Result<Lent<S>, PoolFull> {
        let started = Instant::now();
        let mut waiting = None;
        loop {
            let changed = self.changed.notified();
            let (lent, stale) = self.try_lend(size, idle_timeout);
            let closed_some = !stale.is_empty();
            for _ in &stale {
                self.metrics.closed(Closed::Stale);
            }
            // Closed outside the lock (each drop takes it).
            drop(stale);
            if let Some(lent) = lent {
                return Ok(lent);
            }
            if closed_some {
                continue;
            }
            let now = Instant::now();
            let waiting = waiting.get_or_insert_with(|| Waiting::new(&self.metrics, &self.waiting));
            if now >= until || tokio::time::timeout(until - now, changed).await.is_err() {
                waiting.timed_out();
                return Err(PoolFull {
                    size,
                    waited: started.elapsed(),
                });
            }
        }
    }

    /// An idle server that is still sound, or a place while the pool has
    /// room; with the idle servers found unsound, to be closed.
    fn try_lend(
        self: &Arc<Self>,
        size: usize,
        idle_timeout: Duration,
    ) -> (Option<Lent<S>>, Vec<Server<S>>) {
        let mut state = self.lock();
        let mut stale = Vec::new();
        while let Some(mut server) = state.idle.pop() {
            if !server.sound(idle_timeout) {
                stale.push(server);
                continue;
            }
            self.metrics.servers(state.open, state.idle.len());
            self.metrics.lent(false);
            return (Some(Lent::Idle(server)), stale);
        }
        if state.open < size {
            state.open += 1;
            self.metrics.servers(state.open, state.idle.len());
            return (Some(Lent::Open(Opening(Place(Arc::clone(self))))), stale);
        }
        (None, stale)
    }

    /// Takes a server back, idle from now.
    pub fn give_back(&self, mut server: Server<S>) {
        server.idle_since = Instant::now();
        let mut state = self.lock();
        state.idle.push(server);
        self.metrics.servers(state.open, state.idle.len());
        drop(state);
        self.changed.notify_one();
    }

    /// Closes the idle servers that have aged past `idle_timeout` or
    /// that the member closed meanwhile.
    fn close_stale(&self, idle_timeout: Duration) {
        let stale: Vec<Server<S>> = {
            let mut state = self.lock();
            let (fresh, stale) = std::mem::take(&mut state.idle).into_iter().fold(
                (Vec::new(), Vec::new()),
                |(mut fresh, mut stale), mut server| {
                    if server.sound(idle_timeout) {
                        fresh.push(server);
                    } else {
                        stale.push(server);
                    }
                    (fresh, stale)
                },
            );
            state.idle = fresh;
            self.metrics.servers(state.open, state.idle.len());
            stale
        };
        for _ in &stale {
            self.metrics.closed(Closed::Stale);
        }
    }

    /// Closes every idle server (the member left the role its pool
    /// served); lent ones close when their sessions end with them.
    pub fn close_idle(&self) {
        let idle = {
            let mut state = self.lock();
            let idle = std::mem::take(&mut state.idle);
            self.metrics.servers(state.open, 0);
            idle
        };
        for _ in &idle {
            self.metrics.closed(Closed::Demotion);
        }
        drop(idle);
    }
}

/// A client counted as waiting for a full pool while this lives.
struct Waiting<'a>(&'a PoolMetrics, &'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(metrics: &'a PoolMetrics, count: &'a AtomicUsize) -> Self {
        metrics.waiting(1.0);
        count.fetch_add(1, Ordering::Relaxed);
        Self(metrics, count)
    }

    fn timed_out(&self) {
        self.0.wait_timed_out();
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting(-1.0);
        self.1.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether an idle server has nothing to say: a server that closed, or
/// sent anything unasked (its FATAL before closing), is not lent.
fn quiet<S: AsyncRead + Unpin>(stream: &mut S) -> bool {
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    let mut cx = Context::from_waker(Waker::noop());
    matches!(Pin::new(stream).poll_read(&mut cx, &mut buf), Poll::Pending)
}

/// Every pool of the process, found by key at check-out (once per
/// session or transaction, never per packet).
pub struct Pools<S> {
    pools: Mutex<HashMap<PoolKey, Arc<Pool<S>>>>,
}

impl<S> Default for Pools<S> {
    fn default() -> Self {
        Self {
            pools: Mutex::default(),
        }
    }
}

impl<S: Stream> Pools<S> {
    /// The pool of `key`, made on first use.
    pub fn get(&self, key: &PoolKey) -> Arc<Pool<S>> {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(pools.entry(key.clone()).or_insert_with(|| {
            Arc::new(Pool {
                state: Mutex::new(PoolState {
                    idle: Vec::new(),
                    open: 0,
                }),
                changed: Notify::new(),
                waiting: AtomicUsize::new(0),
                metrics: PoolMetrics::new(
                    key.listener.to_string(),
                    key.member.to_string(),
                    key.database.clone(),
                    key.user.clone(),
                ),
            })
        }))
    }
}

impl<S> Pools<S> {
    /// The pools of `listener` and their counts, in key order.
    pub fn of_listener(&self, listener: SocketAddr) -> Vec<(PoolKey, PoolCounts)> {
        let pools: Vec<(PoolKey, Arc<Pool<S>>)> = {
            let pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
            pools
                .iter()
                .filter(|(key, _)| key.listener == listener)
                .map(|(key, pool)| (key.clone(), Arc::clone(pool)))
                .collect()
        };
        let mut counts: Vec<_> = pools
            .into_iter()
            .map(|(key, pool)| (key, pool.counts()))
            .collect();
        counts.sort_by(|a, b| {
            (&a.0.member, &a.0.database, &a.0.user).cmp(&(&b.0.member, &b.0.database, &b.0.user))
        });
        counts
    }
}

impl<S: Stream> Pools<S> {
    /// Closes, in every pool of `listener`, the idle servers of members
    /// `keep` refuses (they left the listener's role) and the ones that
    /// aged past `idle_timeout` or were closed by the member.
    pub fn sweep(&self, listener: SocketAddr, idle_timeout: Duration, keep: impl Fn(&str) -> bool) {
        let pools: Vec<(bool, Arc<Pool<S>>)> = {
            let pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
            pools
                .iter()
                .filter(|(key, _)| key.listener == listener)
                .map(|(key, pool)| (keep(&key.member), Arc::clone(pool)))
                .collect()
        };
        for (kept, pool) in pools {
            if kept {
                pool.close_stale(idle_timeout);
            } else {
                pool.close_idle();
            }
        }
    }
}
