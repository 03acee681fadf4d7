//! Assembles a running proxy from a [`Config`] and runs it until a signal.
//!
//! Start-up binds every listener before accepting on any, so a port clash
//! fails the whole start with the key that named the port. Shutdown is two
//! stages: SIGTERM or SIGINT stops accepting and lets sessions finish for up
//! to `shutdown_timeout`; then (or at a second signal) the remaining
//! sessions are ended with FATAL 57P01 at a message boundary.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin::{self, Admin};
use crate::config::{parse_socket_addr, Config, TlsMode};
use crate::events::EventLog;
use crate::metrics;
use crate::reload::Reloader;
use crate::router::Router;
use crate::server::handshake::ListenerTls;
use crate::server::loops::Loops;
use crate::server::BackendTlsSettings;
use crate::server::{listener, ListenerContext, Shared};
use crate::tls::{self, ServerTls};
use crate::topology::Topology;

/// How long ended sessions get to write their last error and close.
const FINAL_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the proxy described by `config` (read from `path`, which SIGHUP
/// re-reads) until SIGTERM or SIGINT.
pub async fn run(config: Config, path: PathBuf) -> anyhow::Result<()> {
    let metrics_handle = metrics::install().map_err(|e| anyhow::anyhow!(e))?;
    let background = CancellationToken::new();
    let loops = Loops::start(config.runtime.threads(), &background)
        .context("runtime.worker_threads: cannot start the event loops")?;
    let events = EventLog::new();
    let shared = Arc::new(Shared::new(
        config.limits.clone(),
        loops,
        Arc::clone(&events),
    ));
    let mut topology = Topology::start(&config, &background, &events)?;

    // One server TLS configuration, shared by every listener that offers TLS.
    let server_tls = match (&config.tls.cert, &config.tls.key) {
        (Some(_), Some(_)) => Some(Arc::new(
            ServerTls::new(config.tls.clone()).map_err(|e| anyhow::anyhow!(e))?,
        )),
        _ => None,
    };
    let listeners = bind_listeners(&config, &topology, server_tls.as_ref()).await?;

    let admin_addr = parse_socket_addr(&config.admin.listen)
        .map_err(|e| anyhow::anyhow!("admin.listen: {e}"))?;
    let admin_socket = TcpListener::bind(admin_addr)
        .await
        .with_context(|| format!("admin.listen: cannot listen on {admin_addr}"))?;
    let admin = Arc::new(Admin {
        metrics: metrics_handle,
        views: topology.views(),
        reports: topology.reports(),
        listeners: listeners.iter().map(|(_, c)| Arc::clone(c)).collect(),
        sessions: Arc::clone(&shared.sessions),
        events,
        ready_when: config.admin.ready_when,
        token: config.admin.token.clone(),
    });
    info!(listen = %admin_addr, "admin endpoint: / (status page) /metrics /healthz /readyz /cluster /events");
    let admin_stop = background.clone();
    topology.tasks.spawn(async move {
        admin::serve(admin_socket, admin, admin_stop).await;
        "the admin endpoint".to_owned()
    });

    let accept_tasks: Vec<_> = listeners
        .into_iter()
        .map(|(socket, context)| {
            tokio::spawn(listener::serve(socket, context, Arc::clone(&shared)))
        })
        .collect();
    info!(version = env!("CARGO_PKG_VERSION"), "rolegate is ready");

    let mut reloader = Reloader::new(path, config.clone(), Arc::clone(&shared), server_tls);
    let mut hangup = signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
    let mut terminate =
        signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut interrupt =
        signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    let mut background_tasks = std::mem::take(&mut topology.tasks);
    let received = loop {
        tokio::select! {
            _ = terminate.recv() => break "SIGTERM",
            _ = interrupt.recv() => break "SIGINT",
            _ = hangup.recv() => reloader.reload(&topology),
            ended = first_to_end(&mut background_tasks) => {
                // Background tasks never end on their own: without a follower
                // a cluster's view would silently freeze. Stop loudly instead.
                anyhow::bail!("{ended} unexpectedly; exiting");
            }
        }
    };

    let drain = shared.limits().shutdown_timeout.get();
    info!(
        signal = received,
        sessions = shared.tasks.len(),
        "shutting down: no new connections; waiting up to {} for sessions to finish",
        shared.limits().shutdown_timeout
    );
    shared.shutdown.stop_accepting.cancel();
    for task in accept_tasks {
        let _ = task.await;
    }
    shared.tasks.close();
    let drained = tokio::select! {
        () = shared.tasks.wait() => true,
        () = tokio::time::sleep(drain) => false,
        _ = terminate.recv() => false,
        _ = interrupt.recv() => false,
    };
    if !drained {
        warn!(
            sessions = shared.tasks.len(),
            "ending the remaining sessions with FATAL 57P01"
        );
        shared.shutdown.end_sessions.cancel();
        if tokio::time::timeout(FINAL_CLOSE_TIMEOUT, shared.tasks.wait())
            .await
            .is_err()
        {
            warn!(sessions = shared.tasks.len(), "sessions still open at exit");
        }
    }
    background.cancel();
    info!("rolegate stopped");
    Ok(())
}

/// Binds every listener of `config` (all before any accepts, so a port
/// clash fails the start with the key that named the port) and builds what
/// its sessions need.
async fn bind_listeners(
    config: &Config,
    topology: &Topology,
    server_tls: Option<&Arc<ServerTls>>,
) -> anyhow::Result<Vec<(TcpListener, Arc<ListenerContext>)>> {
    let mut bound = Vec::new();
    for (i, listener_config) in config.listeners.iter().enumerate() {
        let key = format!("listeners[{i}].listen");
        let addr = parse_socket_addr(&listener_config.listen)
            .map_err(|e| anyhow::anyhow!("{key}: {e}"))?;
        let socket = TcpListener::bind(addr)
            .await
            .with_context(|| format!("{key}: cannot listen on {addr}"))?;
        let views = topology
            .watch(&listener_config.cluster)
            .with_context(|| format!("listeners[{i}].cluster: unknown cluster"))?;
        let listen = socket.local_addr().unwrap_or(addr);
        let tls_mode = config.listener_tls(i);
        let cluster = config
            .cluster(&listener_config.cluster)
            .with_context(|| format!("listeners[{i}].cluster: unknown cluster"))?;
        let backend_tls = BackendTlsSettings {
            mode: cluster.backend_tls,
            config: tls::backend_config(
                cluster.backend_tls,
                cluster.backend_ca.as_deref(),
                cluster.backend_cert.as_deref(),
                cluster.backend_key.as_deref(),
                &listener_config.cluster,
            )
            .map_err(|e| anyhow::anyhow!(e))?,
        };
        let context = Arc::new(ListenerContext {
            tls: ListenerTls {
                mode: tls_mode,
                server: (tls_mode != TlsMode::Disable)
                    .then(|| server_tls.cloned())
                    .flatten(),
            },
            backend_tls,
            listen,
            label: listen.to_string(),
            cluster: listener_config.cluster.as_str().into(),
            router: Router::new(
                listener_config.role,
                listener_config.replica_fallback,
                views,
            ),
        });
        info!(
            listen = %context.listen,
            cluster = %context.cluster,
            role = %listener_config.role,
            "listening"
        );
        bound.push((socket, context));
    }
    Ok(bound)
}

/// Resolves when the first background task (cluster follower, admin
/// endpoint) ends; never, if there are none.
/// Cancel-safe: a task that has not ended stays in the set.
async fn first_to_end(tasks: &mut JoinSet<String>) -> String {
    match tasks.join_next().await {
        Some(Ok(task)) => format!("{task} stopped"),
        Some(Err(e)) => format!("a background task failed: {e}"),
        None => std::future::pending().await,
    }
}
