//! A fleet: several rolegates behind one address (a Kubernetes Service, a
//! TCP load balancer, DNS) that pass cancel requests to each other.
//!
//! A client opens its CancelRequest on a new connection to the same
//! address, so behind a balancer it reaches any instance. With `[fleet]`
//! configured each instance issues its own cancel keys, whose process id
//! names the instance ([`key`]); an instance that receives a key it did
//! not issue passes the request once to the instance named in it, over
//! that instance's peer listener ([`crate::server::peer_listener`]), which
//! only ever looks keys up locally, so a request cannot loop.
//!
//! Instances find each other through etcd, the one the Patroni cluster
//! already runs ([`registry`]): each claims a free id under a lease and
//! watches the others' claims. Fleets without etcd list their peers in the
//! configuration instead.

pub mod key;
pub mod registry;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use serde_json::{json, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::FleetConfig;

/// Cancels forwarded to one peer at a time; more are dropped.
const MAX_IN_FLIGHT_PER_PEER: usize = 64;

/// Another instance of the fleet.
pub struct Peer {
    pub id: u16,
    /// Where its peer listener is (`HOST:PORT`).
    pub address: Arc<str>,
    /// Unix milliseconds when etcd last confirmed it or a forward last
    /// reached it; 0: never.
    last_seen_ms: AtomicU64,
    in_flight: Arc<Semaphore>,
}

impl Peer {
    fn new(id: u16, address: Arc<str>) -> Self {
        Self {
            id,
            address,
            last_seen_ms: AtomicU64::new(0),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_PEER)),
        }
    }

    pub fn last_seen(&self) -> Option<SystemTime> {
        match self.last_seen_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(UNIX_EPOCH + Duration::from_millis(ms)),
        }
    }

    pub(crate) fn seen_now(&self) {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.last_seen_ms.store(ms, Ordering::Relaxed);
    }

    /// A place among the cancels in flight to this peer.
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.in_flight).try_acquire_owned().ok()
    }
}

pub type PeerTable = BTreeMap<u16, Arc<Peer>>;

/// Where a client's cancel request goes, by the instance its key names.
pub enum KeyOwner {
    /// This instance issued it (or no instance id is in it).
    Here,
    Peer(Arc<Peer>),
    /// An id no known instance holds.
    UnknownPeer(u16),
}

/// This instance's place in the fleet, read by every cancel request.
pub struct Fleet {
    pub config: FleetConfig,
    /// The id this instance's new keys carry; 0 while it has none.
    own: AtomicU16,
    peers: ArcSwap<PeerTable>,
}

impl Fleet {
    /// A fleet as `config` describes it. Static fleets get their id and
    /// peers here; etcd fleets from [`registry::run`].
    pub fn new(config: FleetConfig) -> Arc<Self> {
        let fleet = Arc::new(Self {
            own: AtomicU16::new(config.id.unwrap_or(0)),
            peers: ArcSwap::from_pointee(PeerTable::new()),
            config,
        });
        let peers = fleet
            .config
            .static_peers()
            .into_iter()
            .map(|(id, address)| (id, address.into()))
            .collect();
        fleet.set_peers(peers);
        fleet
    }

    pub fn own_id(&self) -> u16 {
        self.own.load(Ordering::Relaxed)
    }

    /// The id the keys issued from now on carry.
    pub fn set_own(&self, id: u16) {
        self.own.store(id, Ordering::Relaxed);
    }

    pub fn peers(&self) -> Arc<PeerTable> {
        self.peers.load_full()
    }

    /// Replaces the peer table with `listed` (id → address), keeping what
    /// is known of peers whose address did not change. The listing may
    /// include this instance's own claim: routing checks the own id first,
    /// and `/cluster` leaves it out.
    pub fn set_peers(&self, listed: BTreeMap<u16, Arc<str>>) {
        let current = self.peers.load();
        let table = listed
            .into_iter()
            .map(|(id, address)| {
                let peer = match current.get(&id) {
                    Some(peer) if peer.address == address => Arc::clone(peer),
                    _ => Arc::new(Peer::new(id, address)),
                };
                (id, peer)
            })
            .collect();
        self.peers.store(Arc::new(table));
    }

    /// Marks every listed peer as confirmed now (etcd answered).
    pub fn confirm_peers(&self) {
        for peer in self.peers.load().values() {
            peer.seen_now();
        }
    }

    /// Which instance issued the key of process id `pid`.
    pub fn owner_of(&self, pid: u32) -> KeyOwner {
        let id = key::instance_of(pid);
        if id == 0 || id == self.own_id() {
            return KeyOwner::Here;
        }
        match self.peers.load().get(&id) {
            Some(peer) => KeyOwner::Peer(Arc::clone(peer)),
            None => KeyOwner::UnknownPeer(id),
        }
    }

    /// The fleet as `/cluster` shows it.
    pub fn to_json(&self) -> Value {
        let own = self.own_id();
        let peers: Vec<_> = self
            .peers()
            .values()
            .filter(|peer| peer.id != own)
            .map(|peer| {
                json!({
                    "id": peer.id,
                    "address": &*peer.address,
                    "last_seen": peer
                        .last_seen()
                        .map(|at| humantime::format_rfc3339_millis(at).to_string()),
                })
            })
            .collect();
        json!({
            "name": self.config.name,
            "id": (own != 0).then_some(own),
            "listen": self.config.listen,
            "advertise": self.config.advertise(),
            "discovery": if self.config.etcd.is_empty() { "static" } else { "etcd" },
            "peers": peers,
        })
    }
}
