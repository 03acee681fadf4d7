//! When the follower asks Patroni's REST API: every member each
//! `health_interval`, the members an etcd event touched in a burst of quick
//! checks until their answers agree with etcd, and every member often while
//! no leader is confirmed. At most one check per member runs at a time.
//!
//! Checks run as tasks in [`Probes`], which the follower polls: a check
//! whose task panics comes back as a failed check, so its member is never
//! left "in flight" (and unchecked) for good.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::{Id, JoinError, JoinSet};
use tokio::time::Instant;
use tracing::{debug, error, warn};
use url::Url;

use super::{Burst, Follower, BURST_AGREEMENT, BURST_LIMIT, LEADERLESS_INTERVAL};
use crate::events::EventKind;
use crate::topology::fuse::{EtcdStatus, RestCheck};
use crate::topology::patroni_data::ClusterListing;

/// The REST checks under way, each with the member it checks.
#[derive(Default)]
pub(super) struct Probes {
    tasks: JoinSet<RestCheck>,
    members: HashMap<Id, (String, Instant)>,
}

impl Probes {
    fn spawn(&mut self, member: String, check: impl Future<Output = RestCheck> + Send + 'static) {
        let task = self.tasks.spawn(check);
        self.members.insert(task.id(), (member, Instant::now()));
    }

    /// The next check to finish: its member and its result, or, for a
    /// check whose task failed (the `true`), a check without an answer
    /// that says so. `None` while no check runs. Cancel-safe.
    pub(super) async fn next(&mut self) -> Option<(String, RestCheck, bool)> {
        let joined = self.tasks.join_next_with_id().await?;
        let id = match &joined {
            Ok((id, _)) => *id,
            Err(e) => e.id(),
        };
        let (member, started) = self.members.remove(&id)?;
        Some(match joined {
            Ok((_, check)) => (member, check, false),
            Err(e) => (member, failed_task(started, &e), true),
        })
    }
}

/// A check whose task ended without a result (a panic): no answer, with
/// the reason, loud in the log.
fn failed_task(started: Instant, e: &JoinError) -> RestCheck {
    let reason = format!("the REST check task failed: {e}");
    error!("{reason}");
    RestCheck {
        at: started,
        took: started.elapsed(),
        primary: None,
        replica: None,
        status: None,
        error: Some(reason),
    }
}

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

    pub(super) fn on_check(&mut self, member: &str, check: RestCheck, task_failed: bool) {
        self.in_flight.remove(member);
        if task_failed {
            self.metrics.background_task_failed("rest_check");
        }
        if !self.directory.members.contains_key(member) {
            return;
        }
        if let Some(error) = &check.error {
            debug!(cluster = %self.cluster, member, "REST check: {error}");
        }
        let answered = check.primary.is_some() || check.replica.is_some();
        self.metrics.patroni_check(member, check.took, answered);
        let state = self.rest.entry(member.to_owned()).or_default();
        let before = state.verdict();
        state.record(check);
        let after = state.verdict();
        if before != after && before != "unchecked" {
            let error = state.last_error.clone().filter(|_| after == "unreachable");
            self.events.record(
                Some(&self.cluster),
                EventKind::RestCheckChanged {
                    member: member.to_owned(),
                    from: before.to_owned(),
                    to: after.to_owned(),
                    error,
                },
            );
        }
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

    pub(super) fn start_burst(&mut self, member: &str, now: Instant, probes: &mut Probes) {
        self.bursts.insert(
            member.to_owned(),
            Burst {
                until: now + BURST_LIMIT,
                agreeing: 0,
            },
        );
        self.probe(member, probes);
    }

    pub(super) fn probe_urgent(&mut self, probes: &mut Probes) {
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
            self.probe(&member, probes);
        }
    }

    /// Starts a REST check of `member` unless one is already running.
    pub(super) fn probe(&mut self, member: &str, probes: &mut Probes) {
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
        probes.spawn(member.to_owned(), async move { prober.check(&url).await });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A check whose task panics comes back as a failed check of its
    /// member, so the member is checked again instead of staying "in
    /// flight" for good.
    #[tokio::test]
    async fn a_panicking_check_comes_back_as_a_failed_check() {
        let mut probes = Probes::default();
        probes.spawn("pg2".to_owned(), async { panic!("a bug in a check") });
        let (member, check, task_failed) = probes.next().await.expect("a finished check");
        assert_eq!(member, "pg2");
        assert!(task_failed);
        assert_eq!((check.primary, check.replica), (None, None));
        assert!(
            check.error.as_deref().is_some_and(|e| e.contains("panic")),
            "{:?}",
            check.error
        );
        assert!(probes.next().await.is_none(), "nothing left in flight");
    }
}
