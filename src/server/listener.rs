//! Accept loops: one per socket of each listener of the live set
//! ([`super::listener_set`]), each on the event loop ([`super::loops`])
//! that runs the sessions it accepts.
//!
//! The loop reads the listener's context anew for each connection, so a
//! reload that changes the listener (its role, cluster or TLS) applies to
//! the next session while those already open keep what they started with.
//!
//! Each accepted connection takes a slot of `max_client_connections`
//! before its session starts. Without a slot, the client is still
//! answered properly: rolegate reads its opening (refusing TLS and GSS as
//! usual) and replies FATAL 53300, so the client sees "too many
//! connections" where it expects the server's answer. A CancelRequest is
//! still forwarded: cancelling is what a client needs most when the proxy
//! is full. Those refusals have their own small budget; beyond it the
//! error is written at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info};

use bytes::BytesMut;

use super::cancel::{self, Via};
use super::handshake::{read_opening, Opened, Opening};
use super::proxy_protocol::read_header;
use super::session::{self, send_error};
use super::{ListenerContext, Shared};
use crate::metrics::ConnectionOutcome;
use crate::protocol::{ProtocolError, SqlState};

/// Refusals (over the connection limit) handled concurrently.
const MAX_CONCURRENT_REFUSALS: usize = 256;
/// How long a refused client may take to send its opening.
const REFUSAL_READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause after an accept error (e.g. out of file descriptors).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Accepts connections on `socket` until `stop` (shutdown, or the
/// listener's removal), running their sessions on the loop this runs on.
/// The socket stays the listener set's; a duplicate of it is registered
/// with this loop.
pub async fn serve(
    socket: Arc<std::net::TcpListener>,
    contexts: Arc<ArcSwap<ListenerContext>>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    // The kernel goes on queueing connections on this socket, so a failure
    // here (out of file descriptors) is retried, not given up on.
    let listener = loop {
        match socket.try_clone().and_then(TcpListener::from_std) {
            Ok(listener) => break listener,
            Err(e) => {
                error!(listener = %contexts.load().listen, "cannot accept on a listening socket: {e}")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => {}
            () = stop.cancelled() => return,
        }
    };
    let refusals = Arc::new(Semaphore::new(MAX_CONCURRENT_REFUSALS));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        let context = contexts.load_full();
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                error!(listener = %context.listen, "accept failed: {e}");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        match shared.take_slot() {
            Some(slot) => {
                let task_shared = Arc::clone(&shared);
                shared.tasks.spawn(async move {
                    session::run(stream, peer, context, task_shared).await;
                    drop(slot);
                });
            }
            None => {
                debug!(client = %peer, listener = %context.listen, "refusing: max_client_connections reached");
                context
                    .metrics
                    .connection_outcome(ConnectionOutcome::RefusedLimit);
                let limit = shared.limits().max_client_connections;
                match Arc::clone(&refusals).try_acquire_owned() {
                    Ok(permit) => {
                        let task_shared = Arc::clone(&shared);
                        shared.tasks.spawn(async move {
                            refuse(stream, peer, limit, &context, &task_shared).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        shared.tasks.spawn(async move {
                            let mut stream = stream;
                            send_error(&mut stream, &too_many(limit)).await;
                        });
                    }
                }
            }
        }
    }
    info!(listener = %contexts.load().listen, "stopped accepting connections");
}

async fn refuse(
    mut stream: TcpStream,
    connection: SocketAddr,
    limit: usize,
    context: &ListenerContext,
    shared: &Shared,
) {
    let read = async {
        let (peer, read_ahead) = match &context.proxy {
            Some(policy) => match read_header(&mut stream, connection, policy).await {
                Ok(read) => read,
                Err(e) => {
                    send_error(&mut stream, &e).await;
                    return None;
                }
            },
            None => (connection, BytesMut::new()),
        };
        let mut encrypting = false;
        match read_opening(&mut stream, &context.tls, &mut encrypting, read_ahead).await {
            Ok(Opened {
                stream: mut client,
                opening: Opening::Startup { .. },
            }) => {
                send_error(&mut client, &too_many(limit)).await;
                None
            }
            Ok(Opened {
                opening: Opening::Cancel(key),
                ..
            }) => Some((key, peer)),
            Err(_) => None,
        }
    };
    if let Ok(Some((key, peer))) = tokio::time::timeout(REFUSAL_READ_TIMEOUT, read).await {
        cancel::handle(key, peer, Via::Client, shared).await;
        drop(stream);
    }
}

fn too_many(limit: usize) -> ProtocolError {
    ProtocolError::new(
        SqlState::TOO_MANY_CONNECTIONS,
        format!("sorry, too many clients already: rolegate serves at most {limit} connections (max_client_connections)"),
    )
    .with_hint("Retry later, or raise limits.max_client_connections.")
}
