//! Cancel requests: from a client (on any listener) or from a fleet peer.
//!
//! Like PostgreSQL, rolegate answers a CancelRequest with nothing but the
//! close of its connection, and closes only once the request has been
//! acted on ([`delivery`]: the close is the client's receipt, after which
//! it sends its next command). The caller holds the connection while
//! [`handle`] runs and closes it after. Then:
//!
//! - a key this instance registered goes to the member that issued the
//!   backend key ([`registry`]), with that key;
//! - in a fleet, a key naming another instance goes once to that
//!   instance's peer listener;
//! - any other key (one of this instance, or of an instance it does not
//!   know yet) goes to the other process of a restart in progress, if
//!   there is one ([`siblings`]);
//! - anything else is dropped, after about as long as a delivery takes.
//!
//! A request passed on by a peer or a sibling is only looked up here, so
//! none can loop.
//!
//! Every outcome is counted in `rolegate_cancel_requests_total` by `via`
//! and `outcome`; [`throttle`] bounds them per source (a client's address,
//! or the peer's, whose hits and misses are bounded apart).

mod delivery;
pub mod intake;
mod registry;
pub mod siblings;
mod throttle;

pub use delivery::{deliver, DeliveryTime};
pub use registry::{CancelRegistration, CancelRegistry, CancelTarget, MovingTarget};
pub use siblings::Siblings;
pub use throttle::CancelThrottle;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::backend::open;
use super::Shared;
use crate::config::parse_host_port;
use crate::fleet::{KeyOwner, Peer};
use crate::metrics;
use crate::protocol::startup::CancelKey;

/// Where a cancel request came from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Via {
    /// A client, on a client listener: may be passed to a peer.
    Client,
    /// Another instance of the fleet: looked up here only.
    Peer,
    /// The other process of a restart: looked up here only.
    Sibling,
}

impl Via {
    fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Peer => "peer",
            Self::Sibling => "sibling",
        }
    }
}

/// How long a cancel passed to another instance or process may take, there
/// included: a connect and a delivery, each within `timeout`, and a miss's
/// hold.
pub fn relay_bound(timeout: Duration) -> Duration {
    2 * timeout + delivery::MAX_MISS_HOLD
}

/// Acts on a cancel request; the caller closes its connection once this
/// returns. `source` is the client's address (from a PROXY header when
/// there is one).
pub async fn handle(key: CancelKey, source: SocketAddr, via: Via, shared: &Shared) {
    let started = Instant::now();
    let count = |outcome| metrics::cancel_outcome(via.as_str(), outcome);
    // A client's place comes first: a dropped cancel costs no lookup. A
    // forwarded one's place depends on whether its key is found here.
    let (permit, target) = match via {
        Via::Client => {
            let permit = shared.cancel_throttle.admit_client(source.ip());
            let target = permit.as_ref().and_then(|_| shared.cancels.lookup(&key));
            (permit, target)
        }
        Via::Peer | Via::Sibling => {
            let target = shared.cancels.lookup(&key);
            let permit = shared
                .cancel_throttle
                .admit_forwarded(source.ip(), target.is_some());
            (permit, target)
        }
    };
    let Some(permit) = permit else {
        count("rate_limited");
        debug!(client = %source, via = via.as_str(), "cancel request dropped: too many from this address");
        if via != Via::Client {
            // Whether a forwarded cancel was dropped depends on its key:
            // it closes about when a miss would have.
            tokio::time::sleep_until((started + shared.cancel_delivery.typical()).into()).await;
        }
        return;
    };
    let timeout = shared.limits().connect_timeout.get();
    if let Some(target) = target {
        match forward_cancel(&target, timeout).await {
            Ok(()) => {
                shared.cancel_delivery.record(started.elapsed());
                count("forwarded");
                info!(client = %source, via = via.as_str(), member = %target.member, pid = key.pid, "forwarded cancel request");
            }
            Err(e) => {
                count("failed");
                warn!(client = %source, member = %target.member, "could not forward cancel request: {e}");
            }
        }
        return;
    }
    let owner = match (via, shared.fleet()) {
        (Via::Client, Some(fleet)) => fleet.owner_of(key.pid),
        _ => KeyOwner::Here,
    };
    match owner {
        KeyOwner::Here | KeyOwner::UnknownPeer(_) => {
            // The other process of a restart may hold the session, or (in a
            // fleet) hold the id this instance does not know yet.
            let passed = match via {
                Via::Sibling => 0,
                Via::Client | Via::Peer => siblings::relay(&key, source, shared, timeout).await,
            };
            if passed > 0 {
                count("to_sibling");
                debug!(client = %source, via = via.as_str(), pid = key.pid, "passed cancel request to the restart's other process");
            } else if let KeyOwner::UnknownPeer(id) = owner {
                count("unknown_peer");
                debug!(client = %source, peer = id, "cancel request for an instance the fleet does not know");
            } else {
                count("unknown_key");
                debug!(client = %source, via = via.as_str(), pid = key.pid, "cancel request for an unknown key");
            }
            if passed == 0 {
                // A miss closes about when a delivery would have.
                tokio::time::sleep_until((started + shared.cancel_delivery.typical()).into()).await;
            }
            permit.hold_after_failure();
        }
        KeyOwner::Peer(peer) => {
            let Some(_in_flight) = peer.admit() else {
                count("rate_limited");
                debug!(
                    peer = peer.id,
                    "cancel request dropped: too many in flight to this peer"
                );
                return;
            };
            match forward_to_peer(&peer, &key, timeout).await {
                Ok(()) => {
                    count("to_peer");
                    info!(client = %source, peer = peer.id, address = %peer.address, pid = key.pid, "passed cancel request to its instance");
                }
                Err(e) => {
                    count("peer_unreachable");
                    warn!(client = %source, peer = peer.id, "could not pass cancel request to its instance: {e}");
                }
            }
            // The peer says nothing of whether the key was one of its own:
            // a guess must cost the same here as a miss.
            permit.hold_after_failure();
        }
    }
}

/// Sends the backend's CancelRequest to the member that issued the key,
/// over a connection with the session's TLS settings, and waits for the
/// server to close it: PostgreSQL answers a cancel with nothing but the
/// close, once it has signalled the backend.
async fn forward_cancel(target: &CancelTarget, connect_timeout: Duration) -> Result<(), String> {
    let packet = target.backend_key.encode_cancel_request();
    let mut stream = open(
        &target.host,
        target.port,
        &target.tls,
        connect_timeout,
        None,
    )
    .await
    .map_err(|e| e.message)?;
    tokio::time::timeout(connect_timeout, deliver(&mut stream, &packet))
        .await
        .map_err(|_| {
            format!("the server did not close the cancel connection within {connect_timeout:?}")
        })?
        .map_err(|e| e.to_string())
}

/// Passes `key` to `peer`'s peer listener as a CancelRequest and waits for
/// the peer to close the connection, which it does once it has acted on
/// the key; within [`relay_bound`] of `timeout`.
async fn forward_to_peer(peer: &Peer, key: &CancelKey, timeout: Duration) -> Result<(), String> {
    let (host, port) = parse_host_port(&peer.address)?;
    let send = async {
        let mut stream = TcpStream::connect((host.as_str(), port)).await?;
        deliver(&mut stream, &key.encode_cancel_request()).await
    };
    let bound = relay_bound(timeout);
    tokio::time::timeout(bound, send)
        .await
        .map_err(|_| format!("no answer from {} within {bound:?}", peer.address))?
        .map_err(|e| format!("{}: {e}", peer.address))?;
    // A forward that reached the peer is a sighting too (the only one a
    // static peer gets).
    peer.seen_now();
    Ok(())
}
