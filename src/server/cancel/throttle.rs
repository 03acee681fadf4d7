//! Bounds on cancel requests, so that guessing keys is slow and one
//! source cannot crowd out the others.
//!
//! Each client address may have [`MAX_PER_SOURCE`] cancels in flight. A
//! cancel that found nothing, or was passed to another instance (which
//! cannot say whether it found anything), keeps its place for
//! [`FAILED_HOLD`] after it is done, so a source that guesses keys gets at
//! most `MAX_PER_SOURCE / FAILED_HOLD` guesses a second, whatever its
//! speed. A client's address in the other process of a restart, which
//! looks up the keys this one passes on after they were counted here, is
//! bounded the same way: each guess is then tried against both processes'
//! sessions, as it would be against one process holding them all.
//!
//! A cancel passed on by a fleet peer (or by the other process of a
//! restart) is counted by the forwarder's address, which is many clients'
//! at once. So that guesses of some of them cannot crowd out the others'
//! real cancels, the key is looked up before a place is taken: a hit takes
//! one of [`MAX_PER_PEER_SOURCE`] places among the forwarder's hits, a
//! miss one among its misses, and only misses are held. A forwarded miss
//! beyond the bound closes after about as long as a delivery takes, like
//! any miss, so whether it was dropped says nothing about the key.
//!
//! A cancel beyond a bound is dropped and counted (`rate_limited`).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::source_places::{SourcePlace, SourcePlaces};

/// Cancels in flight (or held after failing) per client address.
pub const MAX_PER_SOURCE: usize = 16;
/// The same for a fleet peer passing on its clients' cancels, for its hits
/// and for its misses each: as many as a peer sends at once (see
/// `crate::fleet`).
pub const MAX_PER_PEER_SOURCE: usize = 64;
/// How long a failed cancel keeps its source's place.
pub const FAILED_HOLD: Duration = Duration::from_secs(1);

/// The places of cancels in flight, by where they came from.
pub struct CancelThrottle {
    clients: Arc<SourcePlaces>,
    forwarded_hits: Arc<SourcePlaces>,
    forwarded_misses: Arc<SourcePlaces>,
}

/// One cancel's place; dropping it gives the place back.
pub struct CancelPlace(SourcePlace);

impl CancelThrottle {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            clients: SourcePlaces::new(),
            forwarded_hits: SourcePlaces::new(),
            forwarded_misses: SourcePlaces::new(),
        })
    }

    /// A place for a client's cancel from `source`.
    pub fn admit_client(&self, source: IpAddr) -> Option<CancelPlace> {
        self.clients.admit(source, MAX_PER_SOURCE).map(CancelPlace)
    }

    /// A place for a cancel passed on by `forwarder`, by whether its key
    /// was found here.
    pub fn admit_forwarded(&self, forwarder: IpAddr, found: bool) -> Option<CancelPlace> {
        let places = if found {
            &self.forwarded_hits
        } else {
            &self.forwarded_misses
        };
        places
            .admit(forwarder, MAX_PER_PEER_SOURCE)
            .map(CancelPlace)
    }
}

impl CancelPlace {
    /// Keeps the place taken for [`FAILED_HOLD`] more, off the caller's
    /// task.
    pub fn hold_after_failure(self) {
        self.0.keep_for(FAILED_HOLD);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forwarders_misses_leave_its_hits_their_places() {
        let throttle = CancelThrottle::new();
        let peer: IpAddr = "10.0.0.9".parse().expect("ip");
        let _misses: Vec<_> = (0..MAX_PER_PEER_SOURCE)
            .map(|_| throttle.admit_forwarded(peer, false).expect("a place"))
            .collect();
        assert!(throttle.admit_forwarded(peer, false).is_none());
        assert!(
            throttle.admit_forwarded(peer, true).is_some(),
            "a hit still has a place"
        );
        assert!(
            throttle.admit_client(peer).is_some(),
            "a client at the forwarder's address is counted apart"
        );
    }
}
