//! The peer listener: where other instances of the fleet pass on the
//! cancel requests that reached them for this instance's sessions.
//!
//! It accepts nothing but a CancelRequest, looks the key up in this
//! instance only (its registry, and during a restart the other process of
//! this instance; never another instance, so no request can loop) and,
//! like PostgreSQL, answers nothing. It carries cancel keys in
//! the clear, as PostgreSQL's own cancel connections usually do: keep it
//! on the network the instances share.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info};

use super::handshake::read_first_packet;
use crate::protocol::startup::{CancelKey, FirstPacket, MAX_CANCEL_REQUEST};
use crate::server::cancel::{self, Via};
use crate::server::Shared;

/// How long a peer may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Peer connections read at once; more are closed at once.
const MAX_CONNECTIONS: usize = 256;
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Accepts forwarded cancel requests until `stop`.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        info!(listen = %addr, "fleet: accepting cancel requests from peers");
    }
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    error!("fleet: accepting a peer connection failed: {e}");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let Ok(place) = Arc::clone(&connections).try_acquire_owned() else {
            debug!(peer = %peer, "fleet: too many peer connections at once; closing this one");
            continue;
        };
        let task_shared = Arc::clone(&shared);
        // Not among the sessions' tasks: a peer's requests must not hold
        // off a shutdown that waits for sessions.
        tokio::spawn(async move {
            let _place = place;
            match tokio::time::timeout(READ_TIMEOUT, read_request(stream)).await {
                // The connection is closed by now, before the request is
                // acted on.
                Ok(Some(key)) => cancel::handle(key, peer, Via::Peer, &task_shared).await,
                Ok(None) => debug!(peer = %peer, "fleet: a peer connection sent no cancel request"),
                Err(_) => debug!(peer = %peer, "fleet: a peer connection sent nothing in time"),
            }
        });
    }
}

/// Reads one CancelRequest (nothing longer than the longest one) and
/// closes the connection.
async fn read_request(stream: TcpStream) -> Option<CancelKey> {
    let mut buf = BytesMut::with_capacity(64);
    let mut limited = stream.take(MAX_CANCEL_REQUEST as u64);
    match read_first_packet(&mut limited, &mut buf).await {
        Ok(FirstPacket::Cancel(key)) => Some(key),
        _ => None,
    }
}
