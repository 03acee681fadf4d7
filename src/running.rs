//! The parts of a running rolegate that follow its configuration: the
//! clusters' view sources, the client listeners, the admin endpoint, TLS
//! towards clients, logging, and (once, at start) the fleet.
//!
//! Start-up and every reload go the same two steps: plan everything that
//! can fail (building TLS configurations, starting view sources, binding
//! new sockets, checking the log filter), then commit, which cannot fail.
//! A reload whose plan fails has changed nothing; the sockets it bound are
//! closed again.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::admin::{self, Admin, AdminState, ListenerEntry};
use crate::config::{parse_socket_addr, Config, FleetConfig};
use crate::etcd::connector::EtcdConnector;
use crate::etcd::trouble::Origin;
use crate::fleet::{self, Fleet};
use crate::handover::{self, Inherited, Offered};
use crate::logging::LogHandle;
use crate::server::cancel::siblings;
use crate::server::listener_set::{ClusterViews, ListenerSet};
use crate::server::peer_listener;
use crate::server::socket::claim_listener;
use crate::server::Shared;
use crate::supervisor::{Supervisor, Task};
use crate::tls::{ServerTls, TlsFiles};
use crate::topology::Topology;

/// The admin endpoint's socket and the task serving it.
struct AdminEndpoint {
    listen: String,
    socket: Arc<TcpListener>,
    stop: CancellationToken,
}

/// Everything a configuration made, kept current by reloads.
pub struct Running {
    /// The configuration in force.
    pub config: Config,
    pub path: PathBuf,
    pub shared: Arc<Shared>,
    topology: Topology,
    listeners: ListenerSet,
    admin: Arc<Admin>,
    admin_endpoint: Option<AdminEndpoint>,
    /// The fleet's peer listener, offered to a successor with the others.
    peer_socket: Option<Arc<TcpListener>>,
    server_tls: Option<Arc<ServerTls>>,
    log: LogHandle,
    /// The listening sockets a successor may take over.
    offered: Arc<Offered>,
    handover_stop: CancellationToken,
    background: CancellationToken,
    /// Every long-lived task.
    supervisor: Supervisor,
}

impl Running {
    /// Starts what `config` describes, taking over the sockets a running
    /// predecessor hands over. Errors name the key.
    pub async fn start(
        config: Config,
        tls: TlsFiles,
        path: PathBuf,
        shared: Arc<Shared>,
        admin: Arc<Admin>,
        log: LogHandle,
        background: CancellationToken,
    ) -> Result<Self, String> {
        let name = handover::name_for(&path);
        shared.siblings.set_name(&name);
        let relay = siblings::bind(&shared.siblings);
        let asked = name.clone();
        let mut inherited = tokio::task::spawn_blocking(move || handover::ask(&asked))
            .await
            .unwrap_or_default();
        if let Some(pid) = inherited.predecessor {
            shared.siblings.add(pid);
        }
        let mut running = Self {
            topology: Topology::new(&background, &shared.events, &path),
            config: config.clone(),
            path,
            shared,
            listeners: ListenerSet::default(),
            admin,
            admin_endpoint: None,
            peer_socket: None,
            server_tls: None,
            log,
            offered: Arc::new(Offered::default()),
            handover_stop: CancellationToken::new(),
            background,
            supervisor: Supervisor::default(),
        };
        if let Some(fleet) = &config.fleet {
            running.join_fleet(fleet, &mut inherited)?;
        }
        running.apply(&config, tls, &mut inherited)?;
        let shared = Arc::clone(&running.shared);
        let stop = running.handover_stop.clone();
        let handover = handover::serve(
            name,
            Arc::clone(&running.offered),
            stop.clone(),
            move |pid| shared.siblings.add(pid),
        );
        running.supervise("handover", "the handover server", stop, handover);
        if let Some(relay) = relay {
            let stop = running.background.child_token();
            let serve = siblings::serve(relay, Arc::clone(&running.shared), stop.clone());
            running.supervise("sibling_relay", "the restart's cancel relay", stop, serve);
        }
        let stop = running.background.child_token();
        let upkeep = admin::upkeep(running.admin.metrics.clone(), stop.clone());
        running.supervise("metrics_upkeep", "the metrics upkeep", stop, upkeep);
        Ok(running)
    }

    /// Plans and commits `config`: all of it, or (on error) none of it.
    pub fn apply(
        &mut self,
        config: &Config,
        mut tls: TlsFiles,
        inherited: &mut Inherited,
    ) -> Result<(), String> {
        // Plan: everything that can fail (the TLS files were loaded with
        // the configuration).
        let log = self.log.plan(&config.log)?;
        // Listeners built now take the TLS they will have after the commit.
        let (server_tls, tls_update) = match (tls.server.take(), &self.server_tls) {
            (Some(tls), Some(current)) => (Some(Arc::clone(current)), Some(tls)),
            (Some(tls), None) => (Some(Arc::new(ServerTls::new(tls))), None),
            (None, _) => (None, None),
        };
        let topology = self.topology.plan(config)?;
        let views = |cluster: &str| {
            topology
                .planned(cluster)
                .or_else(|| self.topology.watch(cluster))
                .map(|(views, source)| ClusterViews { views, source })
        };
        let listeners = self.listeners.plan(
            config,
            &views,
            server_tls.as_ref(),
            &tls,
            &self.shared,
            inherited,
        )?;
        let admin_socket = match &self.admin_endpoint {
            Some(endpoint) if endpoint.listen == config.admin.listen => None,
            _ => Some(bind_admin(&config.admin.listen, inherited)?),
        };

        // Commit: nothing here fails.
        self.log.commit(log);
        if let (Some(current), Some(update)) = (&self.server_tls, tls_update) {
            current.set(update);
        }
        self.server_tls = server_tls;
        self.shared.set_limits(config.limits.clone());
        self.topology.commit(topology, &mut self.supervisor);
        self.listeners.commit(listeners, &self.shared);
        if let Some((addr, socket)) = admin_socket {
            self.serve_admin(&config.admin.listen, addr, socket);
        }
        self.admin.set(AdminState {
            views: self.topology.views(),
            reports: self.topology.reports(),
            listeners: self
                .listeners
                .contexts()
                .iter()
                .map(|context| ListenerEntry {
                    listen: context.listen,
                    cluster: Arc::clone(&context.cluster),
                    tls: context.tls.mode,
                    router: Arc::clone(&context.router),
                    pooling: context.pool.as_ref().map(|p| (p.mode, p.size)),
                })
                .collect(),
            ready_when: config.admin.ready_when,
            token: config.admin.token.clone(),
            fleet: self.shared.fleet().cloned(),
        });
        self.offer();
        self.config = config.clone();
        Ok(())
    }

    /// Starts serving the admin endpoint on `socket`, stopping the one it
    /// replaces.
    fn serve_admin(&mut self, listen: &str, addr: std::net::SocketAddr, socket: Arc<TcpListener>) {
        if let Some(old) = self.admin_endpoint.take() {
            old.stop.cancel();
        }
        let stop = self.background.child_token();
        let serve = admin::serve(Arc::clone(&socket), Arc::clone(&self.admin), stop.clone());
        self.supervise("admin", "the admin endpoint", stop.clone(), serve);
        info!(listen = %addr, "admin endpoint: / (status page) /metrics /healthz /readyz /cluster /events");
        self.admin_endpoint = Some(AdminEndpoint {
            listen: listen.to_owned(),
            socket,
            stop,
        });
    }

    /// Joins the fleet `config` describes: takes the peer listener over
    /// from the predecessor (or binds it), and with etcd starts claiming an
    /// id and following the peers. Read once per process (a change of
    /// `[fleet]` needs a restart).
    fn join_fleet(
        &mut self,
        config: &FleetConfig,
        inherited: &mut Inherited,
    ) -> Result<(), String> {
        let addr = parse_socket_addr(&config.listen).map_err(|e| format!("fleet.listen: {e}"))?;
        let socket = match inherited.take(&Offered::peer_key(addr)) {
            Some(socket) => TcpListener::from_std(socket),
            None => claim_listener(addr, inherited.predecessor),
        }
        .map_err(|e| format!("fleet.listen: cannot listen on {addr}: {e}"))?;
        let socket = Arc::new(socket);
        self.peer_socket = Some(Arc::clone(&socket));
        let connector = if config.etcd.is_empty() {
            None
        } else {
            let access = config.etcd_access();
            let origin = Origin {
                table: "fleet".to_owned(),
                file: self.path.clone(),
            };
            let connector = EtcdConnector::new(&access, &config.members_prefix(), origin);
            Some(connector.map_err(|e| format!("fleet.{e}"))?)
        };
        let fleet = Fleet::new(config.clone());
        self.shared.join_fleet(Arc::clone(&fleet));
        let stop = self.background.child_token();
        let serve = peer_listener::serve(socket, Arc::clone(&self.shared), stop.clone());
        self.supervise("peer_listener", "the fleet's peer listener", stop, serve);
        if let Some(connector) = connector {
            let stop = self.background.child_token();
            let registry = fleet::registry::run(fleet, connector, stop.clone());
            self.supervise("fleet_registry", "the fleet registry", stop, registry);
        }
        Ok(())
    }

    /// Keeps what a successor would take over current.
    fn offer(&self) {
        let mut sockets = self.listeners.offered();
        if let Some(endpoint) = &self.admin_endpoint {
            if let Ok(addr) = endpoint.socket.local_addr() {
                sockets.push((
                    Offered::admin_key(addr),
                    Arc::clone(&endpoint.socket) as Arc<dyn AsFd + Send + Sync>,
                ));
            }
        }
        if let Some(socket) = &self.peer_socket {
            if let Ok(addr) = socket.local_addr() {
                sockets.push((
                    Offered::peer_key(addr),
                    Arc::clone(socket) as Arc<dyn AsFd + Send + Sync>,
                ));
            }
        }
        self.offered.set(sockets);
    }

    /// Runs a long-lived task of the process under the supervisor.
    fn supervise(
        &mut self,
        kind: &'static str,
        label: &str,
        stop: CancellationToken,
        work: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let task = Task {
            kind,
            cluster: String::new(),
            label: label.to_owned(),
            stop,
        };
        self.supervisor.spawn(task, work);
    }

    /// Resolves when a long-lived task ends unasked (see [`Supervisor`]).
    pub async fn first_failure(&mut self) -> String {
        self.supervisor.first_failure().await
    }

    /// The last stage of shutdown: asks every long-lived task to stop and
    /// waits up to `limit` for their farewells (the fleet's lease revoked).
    pub async fn farewell(&mut self, limit: Duration) {
        self.supervisor.farewell(limit).await;
    }

    /// The first stage of shutdown: no new connections, and the name a
    /// successor asks for is let go. Returns once every accept loop ended.
    pub async fn stop_accepting(&mut self) {
        self.handover_stop.cancel();
        self.offered.set(Vec::new());
        self.shared.shutdown.stop_accepting.cancel();
        self.listeners.stopped().await;
    }
}

/// The admin endpoint's socket: handed over by a predecessor, or bound.
fn bind_admin(
    listen: &str,
    inherited: &mut Inherited,
) -> Result<(std::net::SocketAddr, Arc<TcpListener>), String> {
    let addr = parse_socket_addr(listen).map_err(|e| format!("admin.listen: {e}"))?;
    let socket = match inherited.take(&Offered::admin_key(addr)) {
        Some(socket) => TcpListener::from_std(socket),
        None => claim_listener(addr, inherited.predecessor),
    }
    .map_err(|e| format!("admin.listen: cannot listen on {addr}: {e}"))?;
    Ok((addr, Arc::new(socket)))
}
