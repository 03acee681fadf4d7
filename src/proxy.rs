//! Assembles a running proxy from a [`Config`] and runs it until a signal.
//!
//! Start-up takes over the listening sockets of a rolegate of the same
//! configuration that is still running (see [`crate::handover`]), binds
//! the rest, and fails whole, naming the key, when one cannot be bound.
//! SIGHUP reloads ([`crate::reload`]). Shutdown is two stages: SIGTERM or
//! SIGINT stops accepting and lets sessions finish for up to
//! `shutdown_timeout`; then (or at a second signal) the remaining sessions
//! are ended with FATAL 57P01 at a message boundary. Last, the background
//! tasks are stopped and waited for (bounded), so that each says its
//! farewell: the fleet's lease is revoked before the process exits.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin::{Admin, AdminState};
use crate::config::Config;
use crate::events::EventLog;
use crate::logging::LogHandle;
use crate::metrics;
use crate::running::Running;
use crate::server::loops::Loops;
use crate::server::Shared;
use crate::tls::TlsFiles;

/// How long ended sessions get to write their last error and close.
const FINAL_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long stopped background tasks get to say goodbye: one etcd request
/// (revoking the fleet's lease) and a little more.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(4);

/// Runs the proxy described by `config` (read from `path`, which SIGHUP
/// re-reads) until SIGTERM or SIGINT.
pub async fn run(
    config: Config,
    tls: TlsFiles,
    path: PathBuf,
    log: LogHandle,
) -> anyhow::Result<()> {
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
    let admin = Admin::new(
        metrics_handle,
        Arc::clone(&shared.sessions),
        Arc::clone(&shared.pools),
        events,
        // Filled in by the first apply of the configuration.
        AdminState::default(),
    );
    let mut running = Running::start(
        config,
        tls,
        path,
        Arc::clone(&shared),
        admin,
        log,
        background.clone(),
    )
    .await
    .map_err(|e| anyhow::anyhow!(e))?;
    info!(version = env!("CARGO_PKG_VERSION"), "rolegate is ready");

    let mut hangup = signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
    let mut terminate =
        signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut interrupt =
        signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    let received = loop {
        tokio::select! {
            _ = terminate.recv() => break "SIGTERM",
            _ = interrupt.recv() => break "SIGINT",
            _ = hangup.recv() => running.reload(),
            ended = running.first_failure() => {
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
    running.stop_accepting().await;
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
    // The background tasks' farewells: the fleet's lease revoked, so peers
    // forget this instance now and its id is free, not after the lease's TTL.
    running.farewell(FAREWELL_TIMEOUT).await;
    info!("rolegate stopped");
    Ok(())
}
