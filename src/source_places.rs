//! Places per source address, so that one source cannot crowd out the
//! others: the cancel throttle's and the admin endpoint's.
//!
//! An IPv6 source is counted by its /64: one host is usually given a whole
//! /64, and keying on the full address would give it 2^64 budgets. An
//! IPv4-mapped IPv6 address counts as the IPv4 address it maps.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// How many places each source holds now.
#[derive(Default)]
pub struct SourcePlaces {
    taken: Mutex<HashMap<IpAddr, usize>>,
}

/// One taken place; dropping it gives the place back.
pub struct SourcePlace {
    places: Arc<SourcePlaces>,
    source: IpAddr,
}

impl SourcePlaces {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, usize>> {
        // Single inserts and removals: a poisoned map is still whole.
        self.taken
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A place for `source`, unless it holds `limit` already.
    pub fn admit(self: &Arc<Self>, source: IpAddr, limit: usize) -> Option<SourcePlace> {
        let source = budget_of(source);
        let mut taken = self.lock();
        let count = taken.entry(source).or_insert(0);
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(SourcePlace {
            places: Arc::clone(self),
            source,
        })
    }

    /// Sources holding a place.
    #[cfg(test)]
    fn sources(&self) -> usize {
        self.lock().len()
    }
}

/// The address whose places `source` takes: an IPv4 address (mapped or
/// not) as it is, an IPv6 address as its /64.
fn budget_of(source: IpAddr) -> IpAddr {
    match source {
        IpAddr::V4(_) => source,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & (u128::MAX << 64))),
        },
    }
}

impl SourcePlace {
    /// Keeps the place taken for `hold` more, off the caller's task.
    pub fn keep_for(self, hold: Duration) {
        tokio::spawn(async move {
            tokio::time::sleep(hold).await;
            drop(self);
        });
    }
}

impl Drop for SourcePlace {
    fn drop(&mut self) {
        let mut taken = self.places.lock();
        if let Some(count) = taken.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                taken.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 4;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    #[tokio::test]
    async fn a_source_gets_a_bounded_number_of_places() {
        let places = SourcePlaces::new();
        let (a, b) = (ip("10.0.0.1"), ip("10.0.0.2"));
        let held: Vec<_> = (0..LIMIT)
            .map(|_| places.admit(a, LIMIT).expect("a place"))
            .collect();
        assert!(places.admit(a, LIMIT).is_none());
        assert!(
            places.admit(b, LIMIT).is_some(),
            "another source is not affected"
        );
        let hold = Duration::from_millis(200);
        for place in held {
            place.keep_for(hold);
        }
        tokio::task::yield_now().await;
        assert!(places.admit(a, LIMIT).is_none(), "kept places stay taken");
        tokio::time::sleep(hold + Duration::from_millis(20)).await;
        assert!(places.admit(a, LIMIT).is_some());
        assert_eq!(places.sources(), 0, "every place was given back");
    }

    #[test]
    fn an_ipv6_64_shares_one_budget() {
        let places = SourcePlaces::new();
        let _held: Vec<_> = (0..LIMIT)
            .map(|i| {
                let host = ip(&format!("2001:db8:1:2::{:x}", i + 1));
                places.admit(host, LIMIT).expect("a place")
            })
            .collect();
        assert!(
            places.admit(ip("2001:db8:1:2:ffff::1"), LIMIT).is_none(),
            "another address of the same /64 has no place left"
        );
        assert!(
            places.admit(ip("2001:db8:1:3::1"), LIMIT).is_some(),
            "the next /64 is not affected"
        );
        assert_eq!(budget_of(ip("::ffff:10.0.0.1")), ip("10.0.0.1"));
    }
}
