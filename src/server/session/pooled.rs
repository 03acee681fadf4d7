//! A session on a pooled listener (`pool_mode = "session"`): rolegate
//! checks the client's password itself, lends it a logged-in server of
//! the member the router picks, and takes the server back when the client
//! leaves it clean.
//!
//! The steps: the client's login against the listener's secrets (a wrong
//! password or an unknown role: 28P01 after [`WRONG_PASSWORD_DELAY`]);
//! routing as for a passthrough session, each candidate's pool lending an
//! idle server or a place to open one (opened behind the member's login
//! gate and logged in with what the client's login proved); the client's
//! startup parameters set on the server; then the greeting (the server's
//! parameters, a cancel key rolegate issues) and the relay. A write
//! session's server must not be in hot standby, as for passthrough.
//!
//! A server goes back to its pool only after the client said Terminate
//! or closed with nothing in flight, and the reset query ran clean (see
//! [`crate::pool::relay`]). A session whose member stops fitting its
//! listener's role is ended as a passthrough one is, and its server and
//! that pool's idle servers are closed.

use std::borrow::Borrow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout_at;
use tracing::{debug, info, warn};

use super::refusal::{shutdown_error, Refusal};
use super::{lost_backend, refuse, wait_for_misfit, Session};
use crate::auth::client_login::{self, LoginError, Proved};
use crate::auth::secret::Secret;
use crate::auth::server_login::{self, Credentials, ServerLoginError};
use crate::config::{ListenerRole, PoolMode};
use crate::metrics::pool::Closed;
use crate::metrics::{ConnectionOutcome, EndReason};
use crate::pool::own_query::{self, Answered};
use crate::pool::relay::{PooledRelay, RelayEnd};
use crate::pool::settings::PoolSettings;
use crate::pool::{Lent, Pool, PoolKey, Server};
use crate::protocol::encode;
use crate::protocol::startup::StartupMessage;
use crate::protocol::{ProtocolError, SqlState};
use crate::router::{check_fit, Misfit};
use crate::server::authenticate::{in_recovery, AuthError};
use crate::server::cancel::{CancelRegistration, CancelTarget, MovingTarget};
use crate::server::handshake::HandshakeError;
use crate::server::stream::{BackendStream, ClientStream};
use crate::topology::Member;

/// How long a failed password check waits before it answers: guessing
/// passwords through rolegate costs a second a try per connection.
const WRONG_PASSWORD_DELAY: Duration = Duration::from_secs(1);
/// How long the reset query may take before the server is closed instead.
const RESET_TIMEOUT: Duration = Duration::from_secs(5);
/// Startup parameters that are not session settings.
const NOT_SETTINGS: &[&str] = &["user", "database"];

/// How a pooled relay stage ended: by itself, because its member stopped
/// fitting the listener's role, or because rolegate ends its sessions.
pub(super) enum WhileFit<T> {
    Ended(T),
    Misfit(Misfit),
    Shutdown,
}

/// A server lent to the session, with the pool it goes back to.
pub(super) struct LentServer {
    pub(super) server: Server<BackendStream>,
    pub(super) pool: Arc<Pool<BackendStream>>,
}

/// What a pooled client's login established, for the servers it gets
/// later (transaction mode lends one per transaction).
pub(super) struct Login<'a> {
    pub(super) user: &'a str,
    pub(super) database: &'a str,
    pub(super) secret: &'a Secret,
    pub(super) proved: &'a Proved,
    pub(super) wanted: &'a [(String, String)],
}

impl Session<'_> {
    /// Serves a pooled client from its startup packet to its end.
    pub(super) async fn serve_pooled<P>(
        &self,
        mut client: ClientStream<P>,
        startup: StartupMessage,
        mut buffered: BytesMut,
        settings: &PoolSettings,
    ) -> ConnectionOutcome
    where
        P: Borrow<TcpStream> + AsyncRead + AsyncWrite + Unpin + Send,
    {
        let wanted = match startup_settings(&startup) {
            Ok(wanted) => wanted,
            Err(e) => {
                return refuse(&mut client, Refusal::Handshake(HandshakeError::Protocol(e))).await
            }
        };
        let user = startup.user();
        let database = startup.database();
        let looked_up = timeout_at(
            self.handshake_deadline.into(),
            self.secret_of(settings, &user, &database),
        )
        .await;
        let secret = match looked_up {
            Ok(Ok(secret)) => secret,
            Ok(Err(refusal)) => return self.refused(&mut client, refusal).await,
            Err(_) => {
                let refusal = Refusal::TimedOut {
                    limit: self.limits.handshake_timeout,
                    encrypting: false,
                };
                return refuse(&mut client, refusal).await;
            }
        };
        let secret = secret.as_ref();
        let login = timeout_at(
            self.handshake_deadline.into(),
            client_login::log_in(&mut client, &mut buffered, &user, secret),
        )
        .await;
        let (proved, secret) = match login {
            Ok(Ok(passed)) => passed,
            Ok(Err(e)) => {
                if matches!(e, LoginError::WrongPassword(_)) {
                    info!("pooled login refused: {e}");
                    tokio::time::sleep(WRONG_PASSWORD_DELAY).await;
                }
                return refuse(&mut client, Refusal::PooledLogin(e)).await;
            }
            Err(_) => {
                let refusal = Refusal::TimedOut {
                    limit: self.limits.handshake_timeout,
                    encrypting: false,
                };
                return refuse(&mut client, refusal).await;
            }
        };
        let lent = tokio::select! {
            lent = self.lend(&user, &database, secret, &proved, settings) => lent,
            () = self.listener.end_sessions.cancelled() => Err(Refusal::ShuttingDown),
            () = client.closed() => Err(Refusal::ClientLeft),
        };
        let (mut lent, member, held) = match lent {
            Ok(lent) => lent,
            Err(refusal) => return self.refused(&mut client, refusal).await,
        };
        tracing::Span::current().record("member", &*member.name);
        let moving = (settings.mode == PoolMode::Transaction).then(Arc::default);
        match self
            .greet(&mut client, &mut lent, &member, &wanted, moving.clone())
            .await
        {
            Ok(registration) => {
                self.listener
                    .metrics
                    .handshake_duration(self.accepted.elapsed().saturating_sub(held));
                let Some(moving) = moving else {
                    return self
                        .relay_pooled(client, lent, member, buffered, registration, settings)
                        .await;
                };
                let login = Login {
                    user: &user,
                    database: &database,
                    secret,
                    proved: &proved,
                    wanted: &wanted,
                };
                self.relay_transactions(
                    client,
                    (lent, member),
                    buffered,
                    (registration, moving),
                    &login,
                    settings,
                )
                .await
            }
            Err(refusal) => {
                // The server said no to a setting: it is still clean.
                if matches!(refusal, Refusal::SettingRefused(_)) {
                    give_back(lent, settings).await;
                }
                self.refused(&mut client, refusal).await
            }
        }
    }

    /// A server for the session: routed like a passthrough session, each
    /// candidate's pool lending one.
    pub(super) async fn lend(
        &self,
        user: &str,
        database: &str,
        secret: &Secret,
        proved: &Proved,
        settings: &PoolSettings,
    ) -> Result<(LentServer, Member, Duration), Refusal> {
        let for_writes = self.listener.router.role() == ListenerRole::Primary;
        let (lent, member, _, held) = self
            .route(|member, member_metrics, hold_until| async move {
                let pool = self.shared.pools.get(&PoolKey {
                    listener: self.listener.listen,
                    member: member.name.clone(),
                    database: database.to_owned(),
                    user: user.to_owned(),
                });
                let wait_until = Instant::now() + settings.wait_timeout;
                let server = match pool
                    .lend(settings.size, settings.idle_timeout, wait_until)
                    .await
                    .map_err(|full| Refusal::PoolFull {
                        member: member.name.clone(),
                        full,
                    })? {
                    Lent::Idle(server) => server,
                    Lent::Open(opening) => {
                        let (mut stream, login) = self
                            .open_backend(&member, &member_metrics, hold_until)
                            .await?;
                        let deadline = Instant::now() + self.limits.handshake_timeout.get();
                        let logged_in = timeout_at(
                            deadline.into(),
                            server_login::log_in(
                                &mut stream,
                                user,
                                database,
                                &[],
                                &Credentials::Proved { secret, proved },
                            ),
                        )
                        .await
                        .unwrap_or_else(|_| {
                            Err(ServerLoginError::Io(format!(
                                "no answer within {} (handshake_timeout)",
                                self.limits.handshake_timeout
                            )))
                        })
                        .map_err(|e| Refusal::ServerLogin {
                            member: member.name.clone(),
                            error: e,
                        })?;
                        drop(login);
                        opening.logged_in(stream, logged_in.key, logged_in.parameters)
                    }
                };
                if for_writes && server.parameter("in_hot_standby") == Some("on") {
                    pool.close_idle();
                    return Err(Refusal::Authentication(AuthError::InRecovery(in_recovery(
                        &member.name,
                    ))));
                }
                Ok(LentServer { server, pool })
            })
            .await?;
        Ok((lent, member, held))
    }

    /// Sets the client's startup parameters on the server and greets the
    /// client: AuthenticationOk, the server's parameters, a cancel key of
    /// rolegate's own, ReadyForQuery.
    /// `moving` is where a transaction-pooled client's cancels will go.
    async fn greet<C: AsyncWrite + Unpin>(
        &self,
        client: &mut C,
        lent: &mut LentServer,
        member: &Member,
        wanted: &[(String, String)],
        moving: Option<Arc<MovingTarget>>,
    ) -> Result<CancelRegistration, Refusal> {
        self.give_settings(lent, member, wanted).await?;
        // Always a key of rolegate's own: the server's outlives the
        // client's session with it.
        let instance = self.shared.fleet().map_or(0, |fleet| fleet.own_id());
        let registration = match moving {
            Some(moving) => self.shared.cancels.register_moving(moving, instance),
            None => self
                .shared
                .cancels
                .register(self.cancel_target(lent, member), Some(instance)),
        };
        let mut greeting = BytesMut::with_capacity(512);
        greeting.extend_from_slice(&encode::authentication_ok());
        for (name, value) in &lent.server.parameters {
            greeting.extend_from_slice(&encode::parameter_status(name, value));
        }
        greeting.extend_from_slice(&registration.client_key().encode_backend_key_data());
        greeting.extend_from_slice(&encode::ready_for_query_idle());
        client
            .write_all(&greeting)
            .await
            .map_err(|_| Refusal::ClientLeft)?;
        Ok(registration)
    }

    /// Relays until the session ends, then gives the server back or
    /// closes it.
    async fn relay_pooled<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &self,
        mut client: S,
        mut lent: LentServer,
        member: Member,
        pipelined: BytesMut,
        registration: CancelRegistration,
        settings: &PoolSettings,
    ) -> ConnectionOutcome {
        let started = Instant::now();
        info!(
            backend_pid = registration.backend_pid(),
            "pooled session open"
        );
        let member_metrics = self.listener.metrics.member(&member.name);
        let _counted = self.served(&member, &member_metrics);
        let mut relay = PooledRelay::new(pipelined);
        let ended = self
            .while_fit(&member, relay.run(&mut client, &mut lent.server))
            .await;
        drop(registration);
        let cluster = &*self.listener.cluster;
        let (reason, fatal) = match ended {
            WhileFit::Ended(RelayEnd::Terminated | RelayEnd::ClientClosed)
                if relay.server_is_clean() =>
            {
                give_back(lent, settings).await;
                (EndReason::Client, None)
            }
            WhileFit::Ended(RelayEnd::Terminated | RelayEnd::ClientClosed) => {
                debug!("the client left with its server busy: the server is closed");
                lent.pool.metrics.closed(Closed::Busy);
                (EndReason::Client, None)
            }
            WhileFit::Ended(RelayEnd::ClientError(e)) => {
                debug!("client connection failed: {e}; the server is closed");
                lent.pool.metrics.closed(Closed::Busy);
                (EndReason::Client, None)
            }
            WhileFit::Ended(RelayEnd::Protocol(e)) => {
                lent.pool.metrics.closed(Closed::Busy);
                (EndReason::Client, Some(e))
            }
            WhileFit::Ended(RelayEnd::ServerClosed) => {
                let error = (!relay.server_sent_error_last())
                    .then(|| lost_backend(&member, cluster, "the server closed the connection"));
                (EndReason::Backend, error)
            }
            WhileFit::Ended(RelayEnd::ServerError(e)) => {
                let error = lost_backend(&member, cluster, &e.to_string());
                (EndReason::Backend, Some(error))
            }
            WhileFit::Misfit(misfit) => {
                let error = self.misfit_error(&member, &misfit);
                lent.pool.metrics.closed(Closed::Demotion);
                lent.pool.close_idle();
                (EndReason::Demotion, Some(error))
            }
            WhileFit::Shutdown => (EndReason::Shutdown, Some(shutdown_error())),
        };
        let fatal = fatal.filter(|_| relay.client_at_boundary());
        self.close_pooled(&mut client, fatal, reason, started, "pooled session")
            .await
    }

    /// Ends a pooled session: `fatal` (when the client can be sent a
    /// message now), the close, the count and the log line.
    pub(super) async fn close_pooled<S: AsyncWrite + Unpin>(
        &self,
        client: &mut S,
        fatal: Option<ProtocolError>,
        reason: EndReason,
        started: Instant,
        what: &str,
    ) -> ConnectionOutcome {
        if let Some(error) = fatal {
            let _ =
                tokio::time::timeout(Duration::from_secs(1), client.write_all(&error.to_fatal()))
                    .await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), client.shutdown()).await;
        self.listener.metrics.session_ended(reason);
        info!(
            reason = reason.as_str(),
            duration_ms = started.elapsed().as_millis() as u64,
            "{what} ended"
        );
        ConnectionOutcome::Session
    }
}

impl Session<'_> {
    /// Runs `relay` while `member` fits the listener's role and sessions
    /// are not being ended. The view is checked first: what the client
    /// pipelined must not reach a member that no longer fits.
    pub(super) async fn while_fit<T>(
        &self,
        member: &Member,
        relay: impl std::future::Future<Output = T>,
    ) -> WhileFit<T> {
        let role = self.listener.router.role();
        if let Err(misfit) = check_fit(role, &self.listener.router.view(), &member.name) {
            return WhileFit::Misfit(misfit);
        }
        tokio::select! {
            end = relay => WhileFit::Ended(end),
            misfit = wait_for_misfit(self.listener.router.subscribe(), role, &member.name) => {
                WhileFit::Misfit(misfit)
            }
            () = self.listener.end_sessions.cancelled() => WhileFit::Shutdown,
        }
    }

    /// Gives the server the client's startup parameters (and takes back
    /// what an earlier client had).
    pub(super) async fn give_settings(
        &self,
        lent: &mut LentServer,
        member: &Member,
        wanted: &[(String, String)],
    ) -> Result<(), Refusal> {
        let Some(sql) = own_query::set_statements(&lent.server, wanted) else {
            return Ok(());
        };
        match own_query::run(&mut lent.server, &sql).await {
            Ok(Answered::Done) => {
                lent.server.settings = wanted.to_vec();
                Ok(())
            }
            Ok(Answered::Failed(error)) => Err(Refusal::SettingRefused(error)),
            Err(e) => Err(Refusal::Authentication(AuthError::Backend(lost_backend(
                member,
                &self.listener.cluster,
                &e.0,
            )))),
        }
    }

    /// Where a cancel for a query on `lent` goes.
    pub(super) fn cancel_target(&self, lent: &LentServer, member: &Member) -> CancelTarget {
        CancelTarget {
            member: member.name.clone(),
            host: member.host.clone(),
            port: member.port,
            backend_key: lent.server.key.clone(),
            tls: self.listener.backend_tls.clone(),
        }
    }
}

/// Resets a server and gives it back to its pool; one whose reset does
/// not come back clean in time is closed. What rolegate knew of its
/// settings and statements is gone with the reset.
pub(super) async fn give_back(mut lent: LentServer, settings: &PoolSettings) {
    let reset = tokio::time::timeout(
        RESET_TIMEOUT,
        own_query::run(&mut lent.server, &settings.reset_query),
    )
    .await;
    match reset {
        Ok(Ok(Answered::Done)) => {
            lent.server.settings.clear();
            lent.server.prepared.clear();
            return lent.pool.give_back(lent.server);
        }
        Ok(Ok(Answered::Failed(_))) => warn!(
            "server_reset_query {:?} failed: the server is closed",
            settings.reset_query
        ),
        Ok(Err(e)) => debug!("reset failed, the server is closed: {e}"),
        Err(_) => warn!("server_reset_query took over {RESET_TIMEOUT:?}: the server is closed"),
    }
    lent.pool.metrics.closed(Closed::Reset);
}

/// The client's startup parameters to set on its server; the ones a
/// pooled listener cannot carry are refused.
fn startup_settings(startup: &StartupMessage) -> Result<Vec<(String, String)>, ProtocolError> {
    let mut wanted = Vec::new();
    for (name, value) in startup.params() {
        let name = String::from_utf8_lossy(name).into_owned();
        if NOT_SETTINGS.contains(&name.as_str()) {
            continue;
        }
        if name == "replication" || name == "options" || !own_query::settable_name(&name) {
            return Err(ProtocolError::new(
                SqlState::FEATURE_NOT_SUPPORTED,
                format!("startup parameter {name:?} is not supported on a pooled listener"),
            )
            .with_hint("Set it with SET after connecting, or use a passthrough listener."));
        }
        wanted.push((name, String::from_utf8_lossy(value).into_owned()));
    }
    Ok(wanted)
}
