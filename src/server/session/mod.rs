//! One client session, from its first packet to its end.
//!
//! The steps follow the connection path: read the opening (or forward a
//! cancel), route to a member (holding while the cluster offers none),
//! connect, relay authentication, then relay bytes until the client or the
//! backend ends, the view says the backend no longer fits the listener's
//! role, or rolegate shuts down. Every way a session can fail ends with an
//! ErrorResponse the client can read, unless the client itself is gone.

mod connect;
mod pooled;
mod refusal;
mod secrets;
mod transactions;

use std::borrow::Borrow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::timeout_at;
use tracing::{debug, info, Instrument};

use self::connect::Connected;
pub(super) use self::refusal::send_error;
use self::refusal::{refuse, shutdown_error, Refusal, ERROR_WRITE_TIMEOUT};
use super::authenticate::{relay_authentication, AuthError, LoginTarget};
use super::cancel::{self, CancelRegistration, CancelTarget, Via};
use super::handshake::{read_opening, Failed, HandshakeError, Opened, Opening};
use super::notify_pids::NotifyPids;
use super::proxy_protocol::read_header;
use super::relay::{Relay, RelayEnd};
use super::stream::{BackendStream, ClientStream};
use super::when_woken::WhenWoken;
use super::{ListenerContext, Shared};
use crate::config::{Limits, ListenerRole};
use crate::metrics::{ConnectionOutcome, EndReason, MemberMetrics, SessionGuard};
use crate::protocol::startup::{CancelKey, StartupMessage};
use crate::protocol::{ProtocolError, SqlState};
use crate::router::{check_fit, Misfit};
use crate::topology::{ClusterView, Member};

/// How long an ended session's last bytes may take to reach the client.
const FINAL_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves one accepted client connection to its end.
///
/// A session spends its life relaying, so the task holds the relay stage
/// and little else: an async state machine is as large as the values it
/// keeps across its awaits, and a value stays reserved while its scope
/// lasts, even once moved out. The one-off stages (the PROXY header, the
/// opening, connecting and authenticating) therefore run in one boxed
/// future, [`start`], freed once the session is established; what they
/// cannot finish themselves (acting on a cancel once the connection is
/// closed, answering a timed-out opening on the socket they no longer
/// hold) comes back here as a [`NotStarted`].
pub async fn run(
    mut tcp: TcpStream,
    connection: SocketAddr,
    listener: Arc<ListenerContext>,
    shared: Arc<Shared>,
) {
    let _open = listener.metrics.client_connection();
    let limits = shared.limits();
    let (session, established, span) =
        match Box::pin(start(&mut tcp, connection, &listener, &shared, &limits)).await {
            Ok(started) => started,
            Err(NotStarted::Cancel { key, peer }) => {
                // Like PostgreSQL: act, then close; the client waits for
                // the close before its next command. Boxed: passing a
                // cancel on to a peer is larger than the relay.
                Box::pin(cancel::handle(key, peer, Via::Client, &shared)).await;
                drop(tcp);
                return listener
                    .metrics
                    .connection_outcome(ConnectionOutcome::Cancel);
            }
            Err(NotStarted::TimedOut { encrypting }) => {
                let refusal = Refusal::TimedOut {
                    limit: limits.handshake_timeout,
                    encrypting,
                };
                if let Some(error) = refusal.client_error() {
                    send_error(&mut tcp, &error).await;
                }
                return listener.metrics.connection_outcome(refusal.outcome());
            }
            Err(NotStarted::Ended(outcome) | NotStarted::Served(outcome)) => {
                return listener.metrics.connection_outcome(outcome);
            }
        };
    let outcome = session.relay(established).instrument(span).await;
    listener.metrics.connection_outcome(outcome);
}

/// The one-off stages of [`run`]: the PROXY header if the listener wants
/// one, the opening, then routing, connecting and authenticating. Returns
/// the established session with its tracing span.
async fn start<'a>(
    tcp: &'a mut TcpStream,
    connection: SocketAddr,
    listener: &'a ListenerContext,
    shared: &'a Shared,
    limits: &'a Limits,
) -> Result<(Session<'a>, EstablishedClient<'a>, tracing::Span), NotStarted> {
    let accepted = Instant::now();
    let handshake_deadline = accepted + limits.handshake_timeout.get();
    let (peer, read_ahead) = match &listener.proxy {
        None => (connection, BytesMut::new()),
        Some(policy) => {
            let header = timeout_at(
                handshake_deadline.into(),
                read_header(tcp, connection, policy),
            )
            .await;
            match header {
                Ok(Ok(read)) => read,
                Ok(Err(e)) => {
                    let refusal = Refusal::ProxyHeader(e);
                    info!(connection = %connection, listener = %listener.listen, "refused: {refusal}");
                    return Err(NotStarted::Ended(refuse(tcp, refusal).await));
                }
                Err(_) => {
                    debug!(connection = %connection, listener = %listener.listen, "no PROXY header in time");
                    return Err(NotStarted::TimedOut { encrypting: false });
                }
            }
        }
    };
    let (client, startup, buffered) =
        open(tcp, peer, read_ahead, listener, handshake_deadline).await?;
    let span = tracing::info_span!(
        "session",
        listener = %listener.listen,
        client = %peer,
        tls = client.is_tls(),
        user = %startup.user(),
        database = %startup.database(),
        member = tracing::field::Empty,
    );
    let session = Session {
        listener,
        client: peer,
        shared,
        limits,
        accepted,
        handshake_deadline,
    };
    if let Some(settings) = &listener.pool {
        let outcome = session
            .serve_pooled(client, startup, buffered, settings)
            .instrument(span)
            .await;
        return Err(NotStarted::Served(outcome));
    }
    let established = session
        .establish(client, startup, buffered)
        .instrument(span.clone())
        .await
        .map_err(NotStarted::Ended)?;
    Ok((session, Box::new(established), span))
}

/// An established session on an accepted client connection.
type EstablishedClient<'a> = Box<Established<ClientStream<&'a mut TcpStream>>>;

/// Why a connection did not get as far as an established session.
enum NotStarted {
    /// No complete opening within `handshake_timeout`; `encrypting` when a
    /// TLS handshake was under way (no plaintext error can be sent then).
    TimedOut { encrypting: bool },
    /// Answered, if at all, where it ended.
    Ended(ConnectionOutcome),
    /// A pooled session, served to its end in the one-off stage (its
    /// relay shares the boxed future: a pooled client's state is small
    /// next to the server it saves).
    Served(ConnectionOutcome),
    /// A cancel request from `peer`, acted on before the connection is
    /// closed.
    Cancel { key: CancelKey, peer: SocketAddr },
}

/// Reads the client's opening within `handshake_deadline` (starting with
/// `read_ahead`, bytes that followed a PROXY header) and answers the
/// protocol errors that end there. Returns the client stream and its
/// StartupMessage, or the cancel request.
async fn open<'t>(
    tcp: &'t mut TcpStream,
    peer: SocketAddr,
    read_ahead: BytesMut,
    listener: &ListenerContext,
    handshake_deadline: Instant,
) -> Result<(ClientStream<&'t mut TcpStream>, StartupMessage, BytesMut), NotStarted> {
    let mut encrypting = false;
    let opening = timeout_at(
        handshake_deadline.into(),
        read_opening(tcp, &listener.tls, &mut encrypting, read_ahead),
    )
    .await;
    let Opened {
        stream: client,
        opening,
    } = match opening {
        Ok(Ok(opened)) => {
            if opened.stream.is_tls() {
                listener.metrics.tls_handshake(true);
            }
            opened
        }
        Ok(Err(Failed { stream, error })) => {
            if matches!(error, HandshakeError::Tls(_)) {
                listener.metrics.tls_handshake(false);
            }
            let refusal = Refusal::Handshake(error);
            debug!(client = %peer, listener = %listener.listen, "{refusal}");
            return Err(NotStarted::Ended(match stream {
                Some(mut stream) => refuse(&mut stream, refusal).await,
                None => refusal.outcome(),
            }));
        }
        Err(_) => {
            debug!(client = %peer, listener = %listener.listen, "handshake timed out");
            return Err(NotStarted::TimedOut { encrypting });
        }
    };
    match opening {
        Opening::Cancel(key) => Err(NotStarted::Cancel { key, peer }),
        Opening::Startup { startup, buffered } => Ok((client, startup, buffered)),
    }
}

/// A session whose backend has authenticated the client: everything the
/// relay stage needs, and nothing else.
struct Established<S> {
    client: S,
    backend: BackendStream,
    member: Member,
    /// The member's metric handles, looked up once per session.
    member_metrics: Arc<MemberMetrics>,
    held: Duration,
    /// The session's cancel key, registered until the session ends.
    cancel: Option<CancelRegistration>,
    to_backend: BytesMut,
    to_client: BytesMut,
}

struct Session<'a> {
    listener: &'a ListenerContext,
    /// The client's address (from a PROXY header when there is one).
    client: SocketAddr,
    shared: &'a Shared,
    /// The limits in force when the connection was accepted.
    limits: &'a Limits,
    accepted: Instant,
    handshake_deadline: Instant,
}

impl Session<'_> {
    /// Routes, connects and relays authentication. Returns the established
    /// session, or how the connection ended.
    async fn establish<P>(
        &self,
        mut client: ClientStream<P>,
        startup: StartupMessage,
        buffered: BytesMut,
    ) -> Result<Established<ClientStream<P>>, ConnectionOutcome>
    where
        P: Borrow<TcpStream> + AsyncRead + AsyncWrite + Unpin + Send,
    {
        let shutdown = &self.listener.end_sessions;
        let connected = tokio::select! {
            connected = self.connect() => connected,
            () = shutdown.cancelled() => Err(Refusal::ShuttingDown),
            () = client.closed() => Err(Refusal::ClientLeft),
        };
        let Connected {
            mut backend,
            member,
            member_metrics,
            held,
            mut login,
        } = match connected {
            Ok(connected) => connected,
            Err(refusal) => return Err(self.refused(&mut client, refusal).await),
        };
        tracing::Span::current().record("member", &*member.name);

        // Time spent held waiting for a target is not the client's delay.
        let deadline = self.handshake_deadline + held;
        let mut registration_slot = None;
        let cluster = &*self.listener.cluster;
        let auth = timeout_at(deadline.into(), async {
            backend
                .write_all(&startup.raw)
                .await
                .map_err(|e| AuthError::Backend(lost_backend(&member, cluster, &e.to_string())))?;
            let instance = self.shared.fleet().map(|fleet| fleet.own_id());
            let mut issue_key = |backend_key| {
                let target = CancelTarget {
                    member: member.name.clone(),
                    host: member.host.clone(),
                    port: member.port,
                    backend_key,
                    tls: self.listener.backend_tls.clone(),
                };
                let registration = self.shared.cancels.register(target, instance);
                let client_key = registration.client_key().clone();
                registration_slot = Some(registration);
                client_key
            };
            let target = LoginTarget {
                member: &member.name,
                tls: backend.is_tls(),
                for_writes: self.listener.router.role() == ListenerRole::Primary,
            };
            relay_authentication(
                &mut client,
                &mut backend,
                buffered,
                &target,
                &mut issue_key,
                &mut login,
            )
            .await
        })
        .await;
        drop(login);
        let auth = auth
            .map_err(|_| {
                info!("handshake timed out during authentication");
                Refusal::TimedOut {
                    limit: self.limits.handshake_timeout,
                    encrypting: false,
                }
            })
            .and_then(|done| done.map_err(Refusal::Authentication));
        let auth = match auth {
            Ok(auth) => auth,
            Err(refusal) => {
                debug!("{refusal}");
                return Err(refuse(&mut client, refusal).await);
            }
        };
        self.listener
            .metrics
            .handshake_duration(self.accepted.elapsed().saturating_sub(held));
        Ok(Established {
            client,
            backend,
            member,
            member_metrics,
            held,
            cancel: registration_slot,
            to_backend: auth.to_backend,
            to_client: auth.to_client,
        })
    }

    /// A session that found no member to serve it: logged, a hold that
    /// ran out recorded, and the client told.
    async fn refused<S: AsyncWrite + Unpin>(
        &self,
        client: &mut S,
        refusal: Refusal,
    ) -> ConnectionOutcome {
        info!(
            outcome = refusal.outcome().as_str(),
            "session refused: {refusal}"
        );
        if let Some(reason) = refusal.hold_ran_out() {
            let role = self.listener.router.role().as_str();
            self.shared
                .events
                .hold_timed_out(&self.listener.cluster, role, &reason);
        }
        refuse(client, refusal).await
    }

    /// Relays an established session until it ends, and ends it the way
    /// its end calls for.
    async fn relay<S>(&self, established: Box<Established<S>>) -> ConnectionOutcome
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        // The box moves into the block and is freed there, now, rather
        // than kept (moved out of) until the session ends.
        let Established {
            mut client,
            backend,
            member,
            member_metrics,
            held,
            cancel: cancel_registration,
            to_backend,
            mut to_client,
        } = {
            let boxed = established;
            *boxed
        };
        let pid_swap = cancel_registration
            .as_ref()
            .and_then(CancelRegistration::pid_swap);
        let mut backend = NotifyPids::new(backend, pid_swap, &mut to_client);
        let started = Instant::now();
        let shutdown = &self.listener.end_sessions;
        info!(
            held_ms = held.as_millis() as u64,
            backend_pid = cancel_registration
                .as_ref()
                .map(CancelRegistration::backend_pid),
            "session open"
        );
        let role = self.listener.router.role();
        let _counted = self.served(&member, &member_metrics);
        let mut relay = Relay::new(to_backend, to_client, self.shared.relayed.clone());
        // The end signals are polled only when they fire, not at every
        // packet (see `when_woken`).
        let signals = WhenWoken::new(async {
            tokio::select! {
                misfit = wait_for_misfit(self.listener.router.subscribe(), role, &member.name) => {
                    Ended::Misfit(misfit)
                }
                () = shutdown.cancelled() => Ended::Shutdown,
            }
        });
        // The view may have moved on during authentication: bytes the
        // client pipelined must not reach a member that no longer fits.
        let ended = match check_fit(role, &self.listener.router.view(), &member.name) {
            Err(misfit) => Ended::Misfit(misfit),
            Ok(()) => tokio::select! {
                biased;
                end = relay.run(&mut client, &mut backend) => Ended::Relay(end),
                signal = signals => signal,
            },
        };
        let (reason, fatal) = self.end_of(ended, &relay, &member);
        if let Some(error) = fatal {
            // Boxed: a one-off stage, kept out of every session's state.
            Box::pin(relay.finish_with(&mut client, &mut backend, &error.to_fatal())).await;
        }
        Box::pin(close(&mut client, &mut backend)).await;
        self.listener.metrics.session_ended(reason);
        info!(
            reason = reason.as_str(),
            duration_ms = started.elapsed().as_millis() as u64,
            bytes_from_client = relay.bytes_to_backend,
            bytes_to_client = relay.bytes_to_client,
            "session ended"
        );
        ConnectionOutcome::Session
    }

    /// Why the session ended, and the FATAL rolegate owes the client, if
    /// any (a backend that said why itself needs none).
    fn end_of(
        &self,
        ended: Ended,
        relay: &Relay,
        member: &Member,
    ) -> (EndReason, Option<ProtocolError>) {
        let cluster = &*self.listener.cluster;
        match ended {
            Ended::Relay(RelayEnd::ClientClosed) => (EndReason::Client, None),
            Ended::Relay(RelayEnd::ClientError(e)) => {
                debug!("client connection failed: {e}");
                (EndReason::Client, None)
            }
            Ended::Relay(RelayEnd::BackendClosed | RelayEnd::BackendError(_))
                if relay.client_said_goodbye() =>
            {
                (EndReason::Client, None)
            }
            Ended::Relay(end @ (RelayEnd::BackendClosed | RelayEnd::BackendError(_))) => {
                if let RelayEnd::BackendError(e) = end {
                    debug!("server connection failed: {e}");
                }
                let fatal = (!relay.backend_sent_error_last())
                    .then(|| lost_backend(member, cluster, "the server closed the connection"));
                (EndReason::Backend, fatal)
            }
            Ended::Misfit(misfit) => (
                EndReason::Demotion,
                Some(self.misfit_error(member, &misfit)),
            ),
            Ended::Shutdown => (EndReason::Shutdown, Some(shutdown_error())),
        }
    }
}

impl Session<'_> {
    /// Records a session that starts relaying on `member` (the event
    /// timeline's first session of a new leader, the session counts); the
    /// guard counts it until dropped.
    fn served(&self, member: &Member, member_metrics: &MemberMetrics) -> SessionGuard {
        self.shared
            .events
            .session_served(&self.listener.cluster, &member.name);
        self.shared.sessions.open(
            self.listener.cluster.clone(),
            member.name.clone(),
            self.listener.router.role(),
            self.client.ip(),
            member_metrics.session(),
        )
    }

    /// The FATAL that ends a session whose member no longer fits its
    /// listener's role, logged and recorded on the event timeline.
    fn misfit_error(&self, member: &Member, misfit: &Misfit) -> ProtocolError {
        let cluster = &*self.listener.cluster;
        let error = misfit.to_error(cluster);
        info!("ending session: {}", error.message);
        self.shared.events.session_ended(
            &self.listener.cluster,
            &member.name,
            &misfit.reason(cluster),
        );
        error
    }
}

enum Ended {
    Relay(RelayEnd),
    Misfit(Misfit),
    Shutdown,
}

/// Resolves when a view arrives under which the session's member no longer
/// fits its listener's role. The current view is checked first.
async fn wait_for_misfit(
    mut views: watch::Receiver<Arc<ClusterView>>,
    role: ListenerRole,
    member: &str,
) -> Misfit {
    views.mark_changed();
    loop {
        if views.changed().await.is_err() {
            // The source is gone: no view will ever say otherwise.
            return std::future::pending().await;
        }
        let view = views.borrow_and_update().clone();
        if let Err(misfit) = check_fit(role, &view, member) {
            return misfit;
        }
    }
}

/// Ends both connections of a relayed session, however it ended: what was
/// accepted for the client (rows, the server's own FATAL, rolegate's) is
/// delivered from the TLS buffers, and TLS ends with close_notify, so a
/// client that reads slowly loses nothing and OpenSSL 3 clients see no
/// "unexpected eof". Bounded: a client that stopped reading gets
/// [`FINAL_FLUSH_TIMEOUT`].
async fn close<C, B>(client: &mut C, backend: &mut B)
where
    C: AsyncWrite + Unpin,
    B: AsyncWrite + Unpin,
{
    let _ = tokio::join!(
        tokio::time::timeout(FINAL_FLUSH_TIMEOUT, client.shutdown()),
        tokio::time::timeout(ERROR_WRITE_TIMEOUT, backend.shutdown()),
    );
}

fn lost_backend(member: &Member, cluster: &str, what: &str) -> ProtocolError {
    ProtocolError::new(
        SqlState::CONNECTION_FAILURE,
        format!("lost the connection to member {member} of cluster \"{cluster}\": {what}"),
    )
    .with_hint("Reconnect and retry; a transaction whose COMMIT was not acknowledged may or may not have committed.")
}
