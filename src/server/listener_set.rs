//! The live set of client listeners: the ones the configuration names,
//! kept running across reloads.
//!
//! A reload is planned first and committed after: planning binds the
//! sockets of new listeners and builds every changed listener's context,
//! and can fail (a port in use) without having changed anything; the
//! commit cannot fail. Listeners are told apart by the address they listen
//! on:
//!
//! - a new address starts accepting;
//! - a listener whose role, cluster, fallback or TLS changed (or whose
//!   cluster's members or backend TLS changed) gets a new context, which
//!   the next session takes; open sessions keep the one they started with;
//! - a removed address stops accepting at once; its open sessions run on
//!   until they end, and are ended with FATAL 57P01 after
//!   `shutdown_timeout`.
//!
//! A listener is one socket per event loop, all bound to its address with
//! `SO_REUSEPORT`: the kernel spreads new connections over them, and each
//! loop accepts on its own socket and runs the sessions it accepted (see
//! [`super::loops`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::handshake::ListenerTls;
use super::proxy_protocol::ProxyPolicy;
use super::socket::{bind_std_listener, claim_std_listener, tune_listener};
use super::{listener, pool_sweeper, BackendTlsSettings, ListenerContext, Shared};
use crate::config::{parse_cidr, parse_socket_addr, Config, ListenerConfig, TlsMode};
use crate::handover::{Inherited, Offered};
use crate::metrics::ListenerMetrics;
use crate::pool::settings::PoolSettings;
use crate::router::Router;
use crate::tls::{ServerTls, TlsFiles};
use crate::topology::ClusterView;

/// What makes a listener's context: when any of it changes, new sessions
/// get a new context.
#[derive(Debug, Clone, PartialEq)]
struct Shape {
    config: ListenerConfig,
    tls: TlsMode,
    tls_offered: bool,
    /// The generation of the cluster's view source (a new one when the
    /// cluster's members or backend TLS changed).
    source: u64,
    /// A pooled listener's settings, its secrets read from `auth_file`
    /// (a changed file changes the listener).
    pool: Option<Arc<PoolSettings>>,
}

/// A listener that is serving: its sockets, what it was built from, and
/// its accept loops.
struct Serving {
    shape: Shape,
    /// One per event loop (or more, when a predecessor handed over more).
    sockets: Sockets,
    contexts: Arc<ArcSwap<ListenerContext>>,
    /// The session-ending tokens of contexts this listener had before its
    /// last changes: their sessions end with the listener too.
    earlier: Vec<CancellationToken>,
    stop: CancellationToken,
    /// The accept loops, one per socket, and the pool sweeper.
    tasks: Vec<JoinHandle<()>>,
}

type Sockets = Vec<Arc<std::net::TcpListener>>;

/// The running listeners, by address.
#[derive(Default)]
pub struct ListenerSet {
    serving: BTreeMap<SocketAddr, Serving>,
}

/// A cluster as a listener sees it: its views and their generation.
pub struct ClusterViews {
    pub views: tokio::sync::watch::Receiver<Arc<ClusterView>>,
    pub source: u64,
}

/// A planned listener: its sockets (new or kept) and, when it changed, its
/// new context.
struct Planned {
    addr: SocketAddr,
    shape: Shape,
    sockets: Sockets,
    context: Option<Arc<ListenerContext>>,
}

/// What a reload will do to the listeners.
pub struct ListenerPlan {
    planned: Vec<Planned>,
}

impl ListenerSet {
    /// Plans the listeners of `config`. `views` gives each cluster's view
    /// source as it will be after the reload; `inherited` holds sockets a
    /// predecessor handed over. Errors name the key.
    pub fn plan(
        &self,
        config: &Config,
        views: &dyn Fn(&str) -> Option<ClusterViews>,
        server_tls: Option<&Arc<ServerTls>>,
        tls_files: &TlsFiles,
        shared: &Shared,
        inherited: &mut Inherited,
    ) -> Result<ListenerPlan, String> {
        let mut planned: Vec<Planned> = Vec::new();
        for (i, listener_config) in config.listeners.iter().enumerate() {
            let key = format!("listeners[{i}]");
            let addr = parse_socket_addr(&listener_config.listen)
                .map_err(|e| format!("{key}.listen: {e}"))?;
            if planned.iter().any(|p| p.addr == addr) {
                return Err(format!("{key}.listen: {addr} is named twice"));
            }
            let cluster_views = views(&listener_config.cluster)
                .ok_or_else(|| format!("{key}.cluster: unknown cluster"))?;
            let tls_mode = config.listener_tls(i);
            let shape = Shape {
                config: listener_config.clone(),
                tls: tls_mode,
                tls_offered: server_tls.is_some(),
                source: cluster_views.source,
                pool: PoolSettings::load(listener_config, &key)?.map(Arc::new),
            };
            let serving = self.serving.get(&addr);
            let sockets = match serving {
                Some(serving) => serving.sockets.clone(),
                None => open_sockets(addr, shared.loops.count(), inherited)
                    .map_err(|e| format!("{key}.listen: cannot listen on {addr}: {e}"))?,
            };
            let context = if serving.is_some_and(|r| r.shape == shape) {
                None
            } else {
                let cluster = config
                    .cluster(&listener_config.cluster)
                    .ok_or_else(|| format!("{key}.cluster: unknown cluster"))?;
                let backend_tls = BackendTlsSettings {
                    mode: cluster.backend_tls,
                    config: tls_files.backend(&listener_config.cluster),
                };
                let listen = sockets
                    .first()
                    .and_then(|socket| socket.local_addr().ok())
                    .unwrap_or(addr);
                Some(Arc::new(ListenerContext {
                    tls: ListenerTls {
                        mode: tls_mode,
                        server: (tls_mode != TlsMode::Disable)
                            .then(|| server_tls.cloned())
                            .flatten(),
                    },
                    backend_tls,
                    listen,
                    metrics: ListenerMetrics::new(
                        listen.to_string(),
                        listener_config.cluster.as_str().into(),
                        listener_config.role,
                    ),
                    proxy: proxy_policy(listener_config, &key)?,
                    pool: shape.pool.clone(),
                    cluster: listener_config.cluster.as_str().into(),
                    router: Arc::new(Router::new(
                        listener_config.role,
                        listener_config.replica_fallback,
                        cluster_views.views,
                    )),
                    end_sessions: shared.shutdown.end_sessions.child_token(),
                }))
            };
            planned.push(Planned {
                addr,
                shape,
                sockets,
                context,
            });
        }
        Ok(ListenerPlan { planned })
    }

    /// Carries out a plan: starts, changes and removes listeners, and sets
    /// the socket options of the limits in force (`shared`'s) on every
    /// listening socket, for its connections to inherit.
    pub fn commit(&mut self, plan: ListenerPlan, shared: &Arc<Shared>) {
        let keepalive = shared.limits().keepalive();
        for socket in plan.planned.iter().flat_map(|p| &p.sockets) {
            if let Err(e) = tune_listener(socket, keepalive) {
                warn!("cannot set TCP_NODELAY and keepalive on a listening socket: {e}");
            }
        }
        let wanted: Vec<SocketAddr> = plan.planned.iter().map(|p| p.addr).collect();
        let removed: Vec<SocketAddr> = self
            .serving
            .keys()
            .filter(|addr| !wanted.contains(addr))
            .copied()
            .collect();
        for addr in removed {
            if let Some(serving) = self.serving.remove(&addr) {
                retire(serving, shared);
            }
        }
        for Planned {
            addr,
            shape,
            sockets,
            context,
        } in plan.planned
        {
            match (self.serving.get_mut(&addr), context) {
                (Some(serving), Some(context)) => {
                    info!(
                        listen = %context.listen,
                        cluster = %context.cluster,
                        role = %shape.config.role,
                        "listener changed: new sessions follow the new settings"
                    );
                    let earlier = serving.contexts.swap(context);
                    serving.earlier.push(earlier.end_sessions.clone());
                    serving.shape = shape;
                }
                (Some(_), None) => {}
                (None, Some(context)) => {
                    info!(
                        listen = %context.listen,
                        cluster = %context.cluster,
                        role = %shape.config.role,
                        "listening"
                    );
                    let contexts = Arc::new(ArcSwap::new(context));
                    let stop = shared.shutdown.stop_accepting.child_token();
                    let mut tasks: Vec<JoinHandle<()>> = sockets
                        .iter()
                        .enumerate()
                        .map(|(i, socket)| {
                            shared.loops.spawn_on(
                                i,
                                listener::serve(
                                    Arc::clone(socket),
                                    Arc::clone(&contexts),
                                    Arc::clone(shared),
                                    stop.clone(),
                                ),
                            )
                        })
                        .collect();
                    tasks.push(shared.loops.spawn_on(
                        0,
                        pool_sweeper::run(Arc::clone(&contexts), Arc::clone(shared), stop.clone()),
                    ));
                    self.serving.insert(
                        addr,
                        Serving {
                            shape,
                            sockets,
                            contexts,
                            earlier: Vec::new(),
                            stop,
                            tasks,
                        },
                    );
                }
                // A listener not running always gets a context.
                (None, None) => {}
            }
        }
    }

    /// Every listener's current context, for the admin endpoint.
    pub fn contexts(&self) -> Vec<Arc<ListenerContext>> {
        self.serving
            .values()
            .map(|r| r.contexts.load_full())
            .collect()
    }

    /// The listening sockets, for a successor.
    pub fn offered(&self) -> Vec<(String, Arc<dyn AsFd + Send + Sync>)> {
        self.serving
            .iter()
            .flat_map(|(addr, r)| {
                r.sockets.iter().enumerate().map(|(i, socket)| {
                    (
                        Offered::listener_key(*addr, i),
                        Arc::clone(socket) as Arc<dyn AsFd + Send + Sync>,
                    )
                })
            })
            .collect()
    }

    /// Waits until every accept loop has ended (after shutdown began).
    pub async fn stopped(&mut self) {
        for (_, serving) in std::mem::take(&mut self.serving) {
            for task in serving.tasks {
                let _ = task.await;
            }
        }
    }
}

/// The sockets of a new listener on `addr`: every one a predecessor
/// handed over, then new ones bound beside them until each of `loops`
/// event loops has one. With none handed over, the address is claimed
/// first: anything but the predecessor listening there is refused.
fn open_sockets(
    addr: SocketAddr,
    loops: usize,
    inherited: &mut Inherited,
) -> std::io::Result<Sockets> {
    let mut sockets: Sockets = (0..)
        .map_while(|i| inherited.take(&Offered::listener_key(addr, i)))
        .map(Arc::new)
        .collect();
    // The address the first socket got: with port 0, the others must share
    // the port the kernel chose for it.
    let bound = match sockets.first() {
        Some(first) => first.local_addr()?,
        None => {
            let first = claim_std_listener(addr, inherited.predecessor)?;
            let bound = first.local_addr()?;
            sockets.push(Arc::new(first));
            bound
        }
    };
    while sockets.len() < loops {
        sockets.push(Arc::new(bind_std_listener(bound)?));
    }
    Ok(sockets)
}

/// Stops a removed listener: no new connections; its sessions get
/// `shutdown_timeout`, then FATAL 57P01.
fn retire(serving: Serving, shared: &Shared) {
    serving.stop.cancel();
    let context = serving.contexts.load_full();
    let drain = shared.limits().shutdown_timeout;
    info!(
        listen = %context.listen,
        "listener removed: its open sessions may run for up to {drain} (shutdown_timeout)"
    );
    let mut ends = serving.earlier;
    ends.push(context.end_sessions.clone());
    tokio::spawn(async move {
        tokio::select! {
            () = tokio::time::sleep(drain.get()) => ends.iter().for_each(CancellationToken::cancel),
            () = context.end_sessions.cancelled() => {}
        }
    });
}

/// The PROXY protocol rule of a listener, if it has one.
fn proxy_policy(config: &ListenerConfig, key: &str) -> Result<Option<ProxyPolicy>, String> {
    if !config.proxy_protocol {
        return Ok(None);
    }
    let trusted = config
        .trusted_proxies
        .iter()
        .enumerate()
        .map(|(j, cidr)| parse_cidr(cidr).map_err(|e| format!("{key}.trusted_proxies[{j}]: {e}")))
        .collect::<Result<_, _>>()?;
    Ok(Some(ProxyPolicy { trusted }))
}
