//! Routing and connecting a new session: the candidates the router
//! offers, each behind its member's login gate, and a wait for a newer view
//! (within the hold time) when every candidate failed.
//!
//! A wait for a login slot or a slow connect can outlast the view the
//! route came from: once connected, the member is checked against the
//! view of now, and one that no longer fits (a leader that stepped down
//! meanwhile) is given up for a new route before a byte reaches it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::refusal::Refusal;
use super::Session;
use crate::metrics::MemberMetrics;
use crate::router::{check_fit, NoTarget};
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
    pub(super) async fn connect(&self) -> Result<Connected, Refusal> {
        let routed = self
            .route(|member, member_metrics, hold_until| async move {
                self.open_backend(&member, &member_metrics, hold_until)
                    .await
            })
            .await?;
        let ((backend, login), member, member_metrics, held) = routed;
        Ok(Connected {
            backend,
            member,
            member_metrics,
            held,
            login,
        })
    }

    /// A connection to `member`, opened behind its login gate: the slot
    /// is held until the login that follows ends.
    pub(super) async fn open_backend(
        &self,
        member: &Member,
        member_metrics: &MemberMetrics,
        hold_until: Instant,
    ) -> Result<(BackendStream, LoginSlot), Refusal> {
        let login = self.login_slot(member, hold_until).await?;
        let backend = backend::connect(
            member,
            &self.listener.cluster,
            &self.listener.backend_tls,
            self.limits,
            member_metrics,
        )
        .await?;
        Ok((backend, login))
    }

    /// One of `member`'s login slots, waiting for one up to `hold_until`.
    pub(super) async fn login_slot(
        &self,
        member: &Member,
        hold_until: Instant,
    ) -> Result<LoginSlot, Refusal> {
        let slots = self.shared.backend_logins();
        self.shared
            .logins
            .enter(
                &self.listener.cluster,
                &member.name,
                slots,
                self.accepted,
                hold_until,
            )
            .await
            .map_err(|e| {
                warn!("{}", e.reason());
                Refusal::from(e)
            })
    }

    /// The routing loop of [`Session::connect`], with `attempt` doing what
    /// is done with a candidate (connecting, or lending a pooled server).
    /// An attempt that succeeds is checked against the view of now: a
    /// member that no longer fits is given up and routed again. Returns
    /// what the attempt made, the member, its metrics and the time held.
    pub(super) async fn route<T, A, F>(
        &self,
        mut attempt: A,
    ) -> Result<(T, Member, Arc<MemberMetrics>, Duration), Refusal>
    where
        A: FnMut(Member, Arc<MemberMetrics>, Instant) -> F,
        F: std::future::Future<Output = Result<T, Refusal>>,
    {
        let started = Instant::now();
        let hold_until = started + self.limits.hold_timeout.get();
        let router = &self.listener.router;
        let cluster = &self.listener.cluster;
        loop {
            let route = router
                .route(hold_until.saturating_duration_since(Instant::now()))
                .await?;
            let mut failure = None;
            let mut moved_on = false;
            for member in route.candidates {
                let tried = Instant::now();
                let member_metrics = self.listener.metrics.member(&member.name);
                match attempt(member.clone(), Arc::clone(&member_metrics), hold_until).await {
                    Ok(made) => {
                        let now = router.view();
                        if !Arc::ptr_eq(&now, &route.view) {
                            if let Err(misfit) = check_fit(router.role(), &now, &member.name) {
                                info!(
                                    member = %member.name,
                                    "routing again: {} while this session waited",
                                    misfit.reason(cluster)
                                );
                                moved_on = true;
                                continue;
                            }
                        }
                        return Ok((made, member, member_metrics, tried - started));
                    }
                    Err(refusal) => {
                        if !matches!(refusal, Refusal::LoginQueue(_)) {
                            warn!("{refusal}");
                        }
                        failure = Some(refusal);
                    }
                }
            }
            let failure = failure.unwrap_or_else(|| {
                NoTarget::new(router.role(), &route.view, started.elapsed()).into()
            });
            if moved_on {
                continue;
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Limits, ListenerRole, ReplicaFallback, TlsMode};
    use crate::events::EventLog;
    use crate::metrics::ListenerMetrics;
    use crate::router::Router;
    use crate::server::handshake::ListenerTls;
    use crate::server::loops::Loops;
    use crate::server::{BackendTlsSettings, ListenerContext, Shared};
    use crate::topology::view::test_support::member;
    use crate::topology::{ClusterView, MemberRole};
    use tokio::net::TcpListener;
    use tokio::sync::watch;
    use tokio_util::sync::CancellationToken;

    /// Two members listening on loopback, `leader` the leader.
    fn view(ports: [u16; 2], leader: &str) -> Arc<ClusterView> {
        let role = |name| {
            if name == leader {
                MemberRole::Primary
            } else {
                MemberRole::Replica
            }
        };
        Arc::new(ClusterView::new(
            "demo".into(),
            vec![
                member("pg1", ports[0], role("pg1")),
                member("pg2", ports[1], role("pg2")),
            ],
            Some(leader),
            true,
        ))
    }

    #[tokio::test]
    async fn a_leader_that_stepped_down_during_the_login_wait_is_given_up() {
        let members = [
            TcpListener::bind("127.0.0.1:0").await.expect("bind"),
            TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        ];
        let ports = members
            .each_ref()
            .map(|l| l.local_addr().expect("address").port());
        let (views, receiver) = watch::channel(view(ports, "pg1"));
        let stop = CancellationToken::new();
        let limits = Limits {
            backend_logins: 1,
            ..Limits::default()
        };
        let shared = Shared::new(
            limits.clone(),
            Loops::start(1, &stop).expect("loops"),
            EventLog::new(),
        );
        let listen: std::net::SocketAddr = "127.0.0.1:1".parse().expect("address");
        let listener = ListenerContext {
            tls: ListenerTls {
                mode: TlsMode::Disable,
                server: None,
            },
            backend_tls: BackendTlsSettings::disabled(),
            listen,
            metrics: ListenerMetrics::new(listen.to_string(), "demo".into(), ListenerRole::Primary),
            proxy: None,
            pool: None,
            cluster: "demo".into(),
            router: Arc::new(Router::new(
                ListenerRole::Primary,
                ReplicaFallback::Hold,
                receiver,
            )),
            end_sessions: CancellationToken::new(),
        };
        let now = Instant::now();
        let session = Session {
            listener: &listener,
            client: listen,
            shared: &shared,
            limits: &limits,
            accepted: now,
            handshake_deadline: now + Duration::from_secs(10),
        };
        // Another login holds pg1's only slot while the session waits for
        // it, and the leader moves to pg2 meanwhile.
        let held = shared
            .logins
            .enter(
                &listener.cluster,
                &"pg1".into(),
                1,
                now,
                now + Duration::from_secs(10),
            )
            .await
            .expect("the slot");
        let connecting = session.connect();
        tokio::pin!(connecting);
        assert!(
            tokio::time::timeout(Duration::from_millis(100), &mut connecting)
                .await
                .is_err(),
            "the session waits for the slot"
        );
        views.send_replace(view(ports, "pg2"));
        drop(held);
        let connected = connecting.await.expect("connected");
        assert_eq!(&*connected.member.name, "pg2");
        stop.cancel();
    }
}
