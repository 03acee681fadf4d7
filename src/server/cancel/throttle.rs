//! Bounds on cancel requests, so that guessing keys is slow and one
//! source cannot crowd out the others.
//!
//! Each client address may have [`MAX_PER_SOURCE`] cancels in flight. A
//! cancel that found nothing, or was passed to another instance (which
//! cannot say whether it found anything), keeps its place for
//! [`FAILED_HOLD`] after it is done, so a source that guesses keys gets at
//! most `MAX_PER_SOURCE / FAILED_HOLD` guesses a second, whatever its
//! speed. A fleet peer passing cancels on may have
//! [`MAX_PER_PEER_SOURCE`] in flight, and its misses are held too. So may
//! a client's address in the other process of a restart, which looks up
//! the keys this one passes on after they were counted here: each guess
//! is then tried against both processes' sessions, as it would be against
//! one process holding them all. A cancel beyond the bound is dropped and
//! counted (`rate_limited`).
//!
//! An IPv6 source is counted by its /64: one host is usually given a whole
//! /64, and keying on the full address would give it 2^64 budgets.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Cancels in flight (or held after failing) per client address.
pub const MAX_PER_SOURCE: usize = 16;
/// The same for a fleet peer passing on its clients' cancels: as many as a
/// peer sends at once (see `crate::fleet`).
pub const MAX_PER_PEER_SOURCE: usize = 64;
/// How long a failed cancel keeps its source's place.
pub const FAILED_HOLD: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct CancelThrottle {
    in_flight: Mutex<HashMap<IpAddr, usize>>,
}

/// One cancel's place; dropping it gives the place back.
pub struct SourcePermit {
    throttle: Arc<CancelThrottle>,
    source: IpAddr,
}

impl CancelThrottle {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, usize>> {
        // Single inserts and removals: a poisoned map is still whole.
        self.in_flight
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A place for one more cancel from `source`, unless it has `limit`.
    pub fn admit(self: &Arc<Self>, source: IpAddr, limit: usize) -> Option<SourcePermit> {
        let source = budget_of(source);
        let mut in_flight = self.lock();
        let count = in_flight.entry(source).or_insert(0);
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(SourcePermit {
            throttle: Arc::clone(self),
            source,
        })
    }

    /// Sources with cancels in flight (for tests and /cluster).
    pub fn sources(&self) -> usize {
        self.lock().len()
    }
}

/// The address whose budget `source` spends: an IPv4 address (mapped or
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

impl SourcePermit {
    /// Keeps the place taken for [`FAILED_HOLD`] more, off the caller's
    /// task.
    pub fn hold_after_failure(self) {
        tokio::spawn(async move {
            tokio::time::sleep(FAILED_HOLD).await;
            drop(self);
        });
    }
}

impl Drop for SourcePermit {
    fn drop(&mut self) {
        let mut in_flight = self.throttle.lock();
        if let Some(count) = in_flight.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                in_flight.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_source_gets_a_bounded_number_of_places() {
        let throttle = CancelThrottle::new();
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let held: Vec<_> = (0..MAX_PER_SOURCE)
            .map(|_| throttle.admit(a, MAX_PER_SOURCE).expect("a place"))
            .collect();
        assert!(throttle.admit(a, MAX_PER_SOURCE).is_none());
        assert!(
            throttle.admit(b, MAX_PER_SOURCE).is_some(),
            "another source is not affected"
        );
        for permit in held {
            permit.hold_after_failure();
        }
        tokio::task::yield_now().await;
        assert!(
            throttle.admit(a, MAX_PER_SOURCE).is_none(),
            "failures keep their places"
        );
        tokio::time::sleep(FAILED_HOLD + Duration::from_millis(10)).await;
        assert!(throttle.admit(a, MAX_PER_SOURCE).is_some());
        assert_eq!(throttle.sources(), 0, "every place was given back");
    }

    #[tokio::test]
    async fn an_ipv6_64_shares_one_budget() {
        let throttle = CancelThrottle::new();
        let ip = |text: &str| -> IpAddr { text.parse().expect("ip") };
        let _held: Vec<_> = (0..MAX_PER_SOURCE)
            .map(|i| {
                let host = ip(&format!("2001:db8:1:2::{:x}", i + 1));
                throttle.admit(host, MAX_PER_SOURCE).expect("a place")
            })
            .collect();
        assert!(
            throttle
                .admit(ip("2001:db8:1:2:ffff::1"), MAX_PER_SOURCE)
                .is_none(),
            "another address of the same /64 has no place left"
        );
        assert!(
            throttle
                .admit(ip("2001:db8:1:3::1"), MAX_PER_SOURCE)
                .is_some(),
            "the next /64 is not affected"
        );
        assert_eq!(budget_of(ip("::ffff:10.0.0.1")), ip("10.0.0.1"));
    }
}
