//! Connections that carry one cancel request and nothing else: the
//! fleet's peer listener and the relay between the two processes of a
//! restart. Each is read in a task of its own, bounded in time and in
//! number, and closed once its request has been acted on (the sender
//! waits for that close, as a client waits for its own); like
//! PostgreSQL, nothing is answered. The tasks are not among the
//! sessions': a request must not hold off a shutdown that waits for
//! sessions.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::Semaphore;
use tracing::debug;

use super::{handle, Via};
use crate::protocol::startup::{CancelKey, FirstPacket, MAX_CANCEL_REQUEST};
use crate::server::handshake::read_first_packet;
use crate::server::Shared;

/// How long a connection may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// Reads cancel connections of one kind (`via`), at most `limit` at once.
pub struct Intake {
    via: Via,
    places: Arc<Semaphore>,
    shared: Arc<Shared>,
}

impl Intake {
    pub fn new(via: Via, limit: usize, shared: Arc<Shared>) -> Self {
        Self {
            via,
            places: Arc::new(Semaphore::new(limit)),
            shared,
        }
    }

    /// Runs `request`, which reads one connection (`from`, when known) and
    /// yields the cancel with the connection, acts on the cancel, then
    /// closes the connection. With `limit` connections being read already,
    /// the connection is closed at once.
    pub fn take<F, C>(&self, from: Option<SocketAddr>, request: F)
    where
        F: Future<Output = Option<(CancelKey, SocketAddr, C)>> + Send + 'static,
        C: Send + 'static,
    {
        let via = self.via.as_str();
        let Ok(place) = Arc::clone(&self.places).try_acquire_owned() else {
            debug!(via, from = ?from, "too many cancel connections at once; closing this one");
            return;
        };
        let shared = Arc::clone(&self.shared);
        let kind = self.via;
        tokio::spawn(async move {
            let _place = place;
            match tokio::time::timeout(READ_TIMEOUT, request).await {
                Ok(Some((key, source, connection))) => {
                    handle(key, source, kind, &shared).await;
                    drop(connection);
                }
                Ok(None) => debug!(via, from = ?from, "a cancel connection sent no cancel request"),
                Err(_) => debug!(via, from = ?from, "a cancel connection sent nothing in time"),
            }
        });
    }
}

/// Reads one CancelRequest, nothing longer than the longest; `None` for
/// anything else.
pub async fn read_request<R: AsyncRead + Unpin>(reader: R) -> Option<CancelKey> {
    let mut buf = BytesMut::with_capacity(64);
    let mut limited = reader.take(MAX_CANCEL_REQUEST as u64);
    match read_first_packet(&mut limited, &mut buf).await {
        Ok(FirstPacket::Cancel(key)) => Some(key),
        _ => None,
    }
}
