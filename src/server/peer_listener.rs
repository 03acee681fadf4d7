//! The peer listener: where other instances of the fleet pass on the
//! cancel requests that reached them for this instance's sessions.
//!
//! It accepts nothing but a CancelRequest, looks the key up in this
//! instance only (its registry, and during a restart the other process of
//! this instance; never another instance, so no request can loop) and,
//! like PostgreSQL, answers nothing but closing the connection once the
//! request has been acted on: the forwarding instance waits for that
//! close before it closes its client's. It carries cancel keys in
//! the clear, as PostgreSQL's own cancel connections usually do: keep it
//! on the network the instances share.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::server::cancel::intake::{read_request, Intake};
use crate::server::cancel::Via;
use crate::server::Shared;

/// Peer connections read at once; more are closed at once.
const MAX_CONNECTIONS: usize = 256;
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Accepts forwarded cancel requests until `stop`.
pub async fn serve(listener: Arc<TcpListener>, shared: Arc<Shared>, stop: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        info!(listen = %addr, "fleet: accepting cancel requests from peers");
    }
    let intake = Intake::new(Via::Peer, MAX_CONNECTIONS, shared);
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
        intake.take(Some(peer), async move {
            let mut stream = stream;
            let key = read_request(&mut stream).await?;
            Some((key, peer, stream))
        });
    }
}
