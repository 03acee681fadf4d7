//! Who gets an admin connection served: at most [`MAX_CONNECTIONS`] at
//! once, [`MAX_PER_ADDRESS`] of them from one client address (an IPv6
//! client's /64), so a few clients holding connections open cannot take
//! the endpoint from the others.
//!
//! A connection over either bound is not served but still read, briefly,
//! for a probe (see [`super::over_limit`]): `/healthz` and `/readyz` are
//! answered whatever else holds the endpoint, since a liveness probe that
//! fails gets the process killed. Those reads are bounded too, in all and
//! per address, and each lasts at most a second.

use std::net::IpAddr;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::source_places::{SourcePlace, SourcePlaces};

/// Admin connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Of those, from one client address.
pub const MAX_PER_ADDRESS: usize = 16;
/// Connections over those bounds read at once for a probe.
const MAX_OVER_LIMIT: usize = 1024;
/// Of those, from one client address.
const MAX_OVER_LIMIT_PER_ADDRESS: usize = 16;

/// The places of the admin endpoint's connections.
pub struct AdminPlaces {
    served: Lane,
    over_limit: Lane,
}

/// A bound in all and one per address.
struct Lane {
    total: Arc<Semaphore>,
    per_address: Arc<SourcePlaces>,
    per_address_limit: usize,
}

/// A connection's place; dropping it gives the place back.
pub struct Place {
    _total: OwnedSemaphorePermit,
    _address: SourcePlace,
}

/// What a new connection gets.
pub enum Admission {
    Served(Place),
    /// Over a bound: read for a probe only, and told why otherwise.
    OverLimit(Place, Refusal),
    /// Over every bound: closed unread.
    Closed,
}

/// Which bound a connection is over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Total,
    Address,
}

impl Refusal {
    /// The 503's words.
    pub fn message(self) -> String {
        match self {
            Self::Total => {
                format!("too many admin connections (at most {MAX_CONNECTIONS}); retry shortly\n")
            }
            Self::Address => format!(
                "too many admin connections from your address (at most {MAX_PER_ADDRESS}); close some and retry\n"
            ),
        }
    }
}

impl Lane {
    fn new(total: usize, per_address_limit: usize) -> Self {
        Self {
            total: Arc::new(Semaphore::new(total)),
            per_address: SourcePlaces::new(),
            per_address_limit,
        }
    }

    fn admit(&self, client: IpAddr) -> Result<Place, Refusal> {
        let address = self
            .per_address
            .admit(client, self.per_address_limit)
            .ok_or(Refusal::Address)?;
        let total = Arc::clone(&self.total)
            .try_acquire_owned()
            .map_err(|_| Refusal::Total)?;
        Ok(Place {
            _total: total,
            _address: address,
        })
    }
}

impl AdminPlaces {
    pub fn new() -> Self {
        Self {
            served: Lane::new(MAX_CONNECTIONS, MAX_PER_ADDRESS),
            over_limit: Lane::new(MAX_OVER_LIMIT, MAX_OVER_LIMIT_PER_ADDRESS),
        }
    }

    pub fn admit(&self, client: IpAddr) -> Admission {
        match self.served.admit(client) {
            Ok(place) => Admission::Served(place),
            Err(refusal) => match self.over_limit.admit(client) {
                Ok(place) => Admission::OverLimit(place, refusal),
                Err(_) => Admission::Closed,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn one_address_cannot_take_every_place() {
        let places = AdminPlaces::new();
        let mut held = Vec::new();
        for _ in 0..MAX_PER_ADDRESS {
            match places.admit(ip(1)) {
                Admission::Served(place) => held.push(place),
                _ => panic!("a place within the address's bound"),
            }
        }
        assert!(matches!(
            places.admit(ip(1)),
            Admission::OverLimit(_, Refusal::Address)
        ));
        assert!(matches!(places.admit(ip(2)), Admission::Served(_)));
    }

    #[test]
    fn over_every_bound_is_closed_and_places_come_back() {
        let places = AdminPlaces::new();
        let mut held = Vec::new();
        for n in 0..(MAX_CONNECTIONS / MAX_PER_ADDRESS) as u8 {
            for _ in 0..MAX_PER_ADDRESS {
                held.push(places.admit(ip(n)));
            }
        }
        assert!(held.iter().all(|a| matches!(a, Admission::Served(_))));
        let over: Vec<_> = (0..MAX_OVER_LIMIT_PER_ADDRESS)
            .map(|_| places.admit(ip(200)))
            .collect();
        assert!(over
            .iter()
            .all(|a| matches!(a, Admission::OverLimit(_, Refusal::Total))));
        assert!(matches!(places.admit(ip(200)), Admission::Closed));
        drop(held);
        assert!(matches!(places.admit(ip(200)), Admission::Served(_)));
    }
}
