//! Routing and connecting a new session: the candidates the router
//! offers, each behind its member's login gate, and a wait for a newer view
//! (within the hold time) when every candidate failed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::warn;

use super::Session;
use crate::metrics::MemberMetrics;
use crate::protocol::{ProtocolError, SqlState};
use crate::server::backend;
use crate::server::login_gate::LoginSlot;
use crate::server::stream::BackendStream;
use crate::topology::Member;

/// A backend connection opened for a session, before authentication.
pub(super) struct Connected {
    pub(super) backend: BackendStream,
    pub(super) member: Member,
    pub(super) member_metrics: Arc<MemberMetrics>,
    /// Time spent before the attempt that succeeded.
    pub(super) held: Duration,
    /// The member's login slot, given back when the login ends.
    pub(super) login: LoginSlot,
}

impl Session<'_> {
    /// Routes and connects, trying further candidates for reads and
    /// waiting for a new view (within the hold time) when every candidate
    /// failed. Each attempt first takes one of the member's login slots.
    /// The time held is everything before the attempt that succeeded
    /// (waits for a target or a login slot, failed attempts, waits for a
    /// newer view after them), none of which is the client's delay.
    pub(super) async fn connect(&self) -> Result<Connected, ProtocolError> {
        let limits = self.limits;
        let started = Instant::now();
        let hold_until = started + limits.hold_timeout.get();
        let router = &self.listener.router;
        let cluster = &self.listener.cluster;
        loop {
            let route = router
                .route(hold_until.saturating_duration_since(Instant::now()))
                .await?;
            let mut failure = None;
            for member in route.candidates {
                // The limit in force now, so that sessions accepted before
                // and after a reload share one gate.
                let slots = self.shared.backend_logins();
                let login = match self
                    .shared
                    .logins
                    .enter(cluster, &member.name, slots, self.accepted, hold_until)
                    .await
                {
                    Ok(login) => login,
                    Err(e) => {
                        warn!("{}", e.message);
                        failure = Some(e);
                        continue;
                    }
                };
                let attempt = Instant::now();
                let member_metrics = self.listener.metrics.member(&member.name);
                match backend::connect(
                    &member,
                    cluster,
                    &self.listener.backend_tls,
                    limits,
                    &member_metrics,
                )
                .await
                {
                    Ok(backend) => {
                        return Ok(Connected {
                            backend,
                            member,
                            member_metrics,
                            held: attempt - started,
                            login,
                        })
                    }
                    Err(e) => {
                        warn!("{}", e.message);
                        failure = Some(e);
                    }
                }
            }
            let failure = failure.unwrap_or_else(|| {
                ProtocolError::new(SqlState::INTERNAL_ERROR, "routing produced no candidate")
            });
            if !route.view.dynamic {
                return Err(failure);
            }
            let remaining = hold_until.saturating_duration_since(Instant::now());
            let mut views = router.subscribe();
            let newer =
                tokio::time::timeout(remaining, views.wait_for(|v| !Arc::ptr_eq(v, &route.view)))
                    .await;
            if !matches!(newer, Ok(Ok(_))) {
                return Err(failure);
            }
        }
    }
}
