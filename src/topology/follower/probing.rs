//! When the follower asks Patroni's REST API: every member each
//! `health_interval`, the members an etcd event touched in a burst of quick
//! checks until their answers agree with etcd, and every member often while
//! no leader is confirmed. At most one check per member runs at a time.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};
use url::Url;

use super::{Burst, Checked, Follower, BURST_AGREEMENT, BURST_LIMIT, LEADERLESS_INTERVAL};
use crate::topology::fuse::{EtcdStatus, RestCheck};
use crate::topology::patroni_data::ClusterListing;

impl Follower {
    pub(super) fn fetch_listing(&self, listings: &mpsc::Sender<ClusterListing>) {
        let prober = self.prober.clone();
        let urls = self.rest_urls.clone();
        let listings = listings.clone();
        let cluster = Arc::clone(&self.cluster);
        tokio::spawn(async move {
            let mut last_error = None;
            for url in &urls {
                match prober.cluster_listing(url).await {
                    Ok(listing) => {
                        let _ = listings.send(listing).await;
                        return;
                    }
                    Err(e) => last_error = Some(e),
                }
            }
            if let Some(e) = last_error {
                warn!(%cluster, "no Patroni REST URL answered /cluster: {e}");
            }
        });
    }

    pub(super) fn on_check(&mut self, member: &str, check: RestCheck) {
        self.in_flight.remove(member);
        if !self.directory.members.contains_key(member) {
            return;
        }
        if let Some(error) = &check.error {
            debug!(cluster = %self.cluster, member, "REST check: {error}");
        }
        let answered = check.primary.is_some() || check.replica.is_some();
        self.metrics.patroni_check(member, check.took, answered);
        self.rest
            .entry(member.to_owned())
            .or_default()
            .record(check);
        let agrees = self.rest_agrees_with_etcd(member);
        if let Some(burst) = self.bursts.get_mut(member) {
            burst.agreeing = if agrees { burst.agreeing + 1 } else { 0 };
            if burst.agreeing >= BURST_AGREEMENT || Instant::now() >= burst.until {
                self.bursts.remove(member);
            }
        }
    }

    /// Whether the member's REST `/primary` answer matches what etcd says
    /// it is. Without etcd there is nothing to agree with.
    pub(super) fn rest_agrees_with_etcd(&self, member: &str) -> bool {
        if self.etcd == EtcdStatus::NotConfigured {
            return true;
        }
        let expect_primary = self.directory.leader.as_deref() == Some(member)
            && self
                .directory
                .members
                .get(member)
                .is_some_and(|r| r.is_primary_role() && r.is_running());
        self.rest.get(member).and_then(|r| r.primary) == Some(expect_primary)
    }

    pub(super) fn start_burst(
        &mut self,
        member: &str,
        now: Instant,
        checked: &mpsc::Sender<Checked>,
    ) {
        self.bursts.insert(
            member.to_owned(),
            Burst {
                until: now + BURST_LIMIT,
                agreeing: 0,
            },
        );
        self.probe(member, checked);
    }

    pub(super) fn probe_urgent(&mut self, checked: &mpsc::Sender<Checked>) {
        let now = Instant::now();
        self.bursts.retain(|_, b| now < b.until);
        let leaderless = self.views.borrow().leader().is_none();
        let members: Vec<_> = self
            .directory
            .members
            .keys()
            .filter(|m| {
                self.bursts.contains_key(*m)
                    || (leaderless
                        && self
                            .last_probe
                            .get(*m)
                            .is_none_or(|t| now.duration_since(*t) >= LEADERLESS_INTERVAL))
            })
            .cloned()
            .collect();
        for member in members {
            self.probe(&member, checked);
        }
    }

    /// Starts a REST check of `member` unless one is already running.
    pub(super) fn probe(&mut self, member: &str, checked: &mpsc::Sender<Checked>) {
        if self.in_flight.contains(member) {
            return;
        }
        let Some(url) = self
            .directory
            .members
            .get(member)
            .and_then(|r| r.api_url.as_deref())
            .and_then(|u| Url::parse(u).ok())
        else {
            return;
        };
        self.in_flight.insert(member.to_owned());
        self.last_probe.insert(member.to_owned(), Instant::now());
        let prober = self.prober.clone();
        let checked = checked.clone();
        let member = member.to_owned();
        tokio::spawn(async move {
            let check = prober.check(&url).await;
            let _ = checked.send((member, check)).await;
        });
    }
}
