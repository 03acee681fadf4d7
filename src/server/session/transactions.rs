//! A session on a transaction-pooled listener (`pool_mode =
//! "transaction"`): after the login (as in [`super::pooled`]), the client
//! holds no server between transactions. Its next message routes again
//! and borrows a server of the member that fits now, with the client's
//! startup parameters given to it; ReadyForQuery with status idle gives
//! it back (see [`crate::pool::transaction`]).
//!
//! So a switchover does not end an idle client: its next transaction
//! waits for the new leader like a new session would (`hold_timeout`)
//! and runs there, its named statements prepared again on the new
//! server as it uses them. A transaction in flight on a member that
//! stops fitting ends with the session, as a passthrough session does.
//!
//! A client that leaves session state on its server (see
//! [`crate::pool::session_state`]) keeps that server until it leaves;
//! the server is then reset like a session-mode one. Cancels follow the
//! client: a key of rolegate's, pointing at the server of the
//! transaction running now, or nowhere; a server that was sent a cancel
//! is closed after its transaction, so that a late signal cannot reach
//! the next client's query.

use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info};

use super::pooled::{give_back, LentServer, Login, WhileFit};
use super::refusal::{refuse, shutdown_error};
use super::{lost_backend, Session};
use crate::metrics::pool::Closed;
use crate::metrics::{ConnectionOutcome, EndReason};
use crate::pool::relay::RelayEnd;
use crate::pool::settings::PoolSettings;
use crate::pool::transaction::{TransactionEnd, TransactionRelay};
use crate::protocol::ProtocolError;
use crate::server::cancel::{CancelRegistration, MovingTarget};
use crate::topology::Member;

/// What waiting for the next transaction came to.
enum Next {
    Lent(Box<(LentServer, Member)>),
    ClientLeft,
    /// No server: the client was sent why, and the session ends.
    Refused,
    Shutdown,
}

impl Session<'_> {
    /// Serves a logged-in, greeted client one transaction at a time,
    /// starting on the server its login borrowed.
    pub(super) async fn relay_transactions<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &self,
        mut client: S,
        first: (LentServer, Member),
        pipelined: BytesMut,
        cancels: (CancelRegistration, Arc<MovingTarget>),
        login: &Login<'_>,
        settings: &PoolSettings,
    ) -> ConnectionOutcome {
        let started = Instant::now();
        let (registration, moving) = cancels;
        info!("transaction-pooled session open");
        let mut relay = TransactionRelay::new(
            pipelined,
            Arc::clone(&self.shared.statements),
            settings.max_prepared,
        );
        let mut next = Some(first);
        let (reason, fatal) = loop {
            let (mut lent, member) = match next.take() {
                Some(first) => first,
                None => match self
                    .next_server(&mut client, &mut relay, login, settings)
                    .await
                {
                    Next::Lent(lent) => *lent,
                    Next::ClientLeft => break (EndReason::Client, None),
                    Next::Refused => break (EndReason::Backend, None),
                    Next::Shutdown => break (EndReason::Shutdown, Some(shutdown_error())),
                },
            };
            let member_metrics = self.listener.metrics.member(&member.name);
            let counted = self.served(&member, &member_metrics);
            moving.set(self.cancel_target(&lent, &member));
            let pinned_before = relay.pinned().is_some();
            let step = self
                .while_fit(&member, relay.run(&mut client, &mut lent.server))
                .await;
            let cancelled = moving.clear();
            drop(counted);
            if let (false, Some(pin)) = (pinned_before, relay.pinned()) {
                info!(
                    cause = pin.as_str(),
                    "client pinned to its server for the rest of its session"
                );
                lent.pool.metrics.pinned(pin.as_str());
            }
            match step {
                WhileFit::Ended(TransactionEnd::Idle) => {
                    if cancelled {
                        debug!("a cancel was sent to this server: it is closed");
                        lent.pool.metrics.closed(Closed::Cancelled);
                    } else {
                        lent.pool.give_back(lent.server);
                    }
                }
                WhileFit::Ended(TransactionEnd::Ended(end)) => {
                    break self
                        .end_with_server(&relay, end, lent, &member, cancelled, settings)
                        .await;
                }
                WhileFit::Misfit(misfit) => {
                    let error = self.misfit_error(&member, &misfit);
                    lent.pool.metrics.closed(Closed::Demotion);
                    lent.pool.close_idle();
                    break (EndReason::Demotion, Some(error));
                }
                WhileFit::Shutdown => {
                    lent.pool.metrics.closed(Closed::Busy);
                    break (EndReason::Shutdown, Some(shutdown_error()));
                }
            }
        };
        drop(registration);
        let fatal = fatal.filter(|_| relay.client_at_boundary());
        self.close_pooled(
            &mut client,
            fatal,
            reason,
            started,
            "transaction-pooled session",
        )
        .await
    }

    /// Waits for the client's next transaction and borrows a server for
    /// it; a client refused one is sent why.
    async fn next_server<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &self,
        client: &mut S,
        relay: &mut TransactionRelay,
        login: &Login<'_>,
        settings: &PoolSettings,
    ) -> Next {
        let more = tokio::select! {
            more = relay.wait_for_client(client) => more,
            () = self.listener.end_sessions.cancelled() => return Next::Shutdown,
        };
        if !matches!(more, Ok(true)) {
            return Next::ClientLeft;
        }
        let lent = tokio::select! {
            lent = self.lend(login.user, login.database, login.secret, login.proved, settings) => lent,
            () = self.listener.end_sessions.cancelled() => return Next::Shutdown,
        };
        let refusal = match lent {
            Ok((mut lent, member, _)) => {
                match self.give_settings(&mut lent, &member, login.wanted).await {
                    Ok(()) => return Next::Lent(Box::new((lent, member))),
                    Err(refusal) => refusal,
                }
            }
            Err(refusal) => refusal,
        };
        info!("no server for the next transaction: {refusal}");
        let _ = refuse(client, refusal).await;
        Next::Refused
    }

    /// Ends the session after its relay ended with a server lent: the
    /// server goes back if the client left it clean, else it is closed.
    async fn end_with_server(
        &self,
        relay: &TransactionRelay,
        end: RelayEnd,
        lent: LentServer,
        member: &Member,
        cancelled: bool,
        settings: &PoolSettings,
    ) -> (EndReason, Option<ProtocolError>) {
        let cluster = &*self.listener.cluster;
        match end {
            RelayEnd::Terminated | RelayEnd::ClientClosed => {
                if cancelled || !relay.server_is_clean() {
                    debug!("the client left with its server busy: the server is closed");
                    lent.pool.metrics.closed(Closed::Busy);
                } else if relay.pinned().is_some() {
                    give_back(lent, settings).await;
                } else {
                    lent.pool.give_back(lent.server);
                }
                (EndReason::Client, None)
            }
            RelayEnd::ClientError(e) => {
                debug!("client connection failed: {e}; the server is closed");
                lent.pool.metrics.closed(Closed::Busy);
                (EndReason::Client, None)
            }
            RelayEnd::Protocol(e) => {
                lent.pool.metrics.closed(Closed::Busy);
                (EndReason::Client, Some(e))
            }
            RelayEnd::ServerClosed => {
                let error = (!relay.server_sent_error_last())
                    .then(|| lost_backend(member, cluster, "the server closed the connection"));
                (EndReason::Backend, error)
            }
            RelayEnd::ServerError(e) => {
                let error = lost_backend(member, cluster, &e.to_string());
                (EndReason::Backend, Some(error))
            }
        }
    }
}
