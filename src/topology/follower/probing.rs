//! When the follower asks Patroni's REST API: every member each
//! `health_interval`, the members an etcd event touched in a burst of quick
//! checks until their answers agree with etcd, and every member often while
//! no leader is confirmed. At most one check per member runs at a time.
//!
//! [`RestChecks`] owns all of it: the checker, the bursts, the checks in
//! flight and when each member was last checked; the follower names the
//! members to check and records the answers ([`Follower::on_check`]).
//!
//! Checks run as tasks in [`Probes`], which the follower polls: a check
//! whose task panics comes back as a failed check, so its member is never
//! left "in flight" (and unchecked) for good.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::{Id, JoinError, JoinSet};
use tokio::time::Instant;
use tracing::{debug, error, warn};
use url::Url;

use super::{Follower, BURST_AGREEMENT, BURST_LIMIT, LEADERLESS_INTERVAL};
use crate::events::EventKind;
use crate::topology::dcs::DcsState;
use crate::topology::fuse::{EtcdStatus, RestCheck};
use crate::topology::patroni_data::ClusterListing;
use crate::topology::rest::RestProber;

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

/// Quick checks of a member after an etcd event touched it.
struct Burst {
    until: Instant,
    agreeing: u32,
}

/// The REST checks of one cluster: what to check when, and the checks
/// under way.
pub(super) struct RestChecks {
    prober: RestProber,
    /// Where members are listed without etcd.
    rest_urls: Vec<Url>,
    bursts: HashMap<String, Burst>,
    in_flight: HashSet<String>,
    last_probe: HashMap<String, Instant>,
    tasks: Probes,
}

impl RestChecks {
    pub(super) fn new(prober: RestProber, rest_urls: Vec<Url>) -> Self {
        Self {
            prober,
            rest_urls,
            bursts: HashMap::new(),
            in_flight: HashSet::new(),
            last_probe: HashMap::new(),
            tasks: Probes::default(),
        }
    }

    /// Checks with `prober` from now on (reloaded timeouts or lag bound).
    pub(super) fn set_prober(&mut self, prober: RestProber) {
        self.prober = prober;
    }

    /// Whether a burst of quick checks runs.
    pub(super) fn bursting(&self) -> bool {
        !self.bursts.is_empty()
    }

    /// The next check to finish (see [`Probes::next`]). Cancel-safe.
    pub(super) async fn next(&mut self) -> Option<(String, RestCheck, bool)> {
        let (member, check, failed) = self.tasks.next().await?;
        self.in_flight.remove(&member);
        Some((member, check, failed))
    }

    /// Counts an answer of `member` that did (or did not) agree with etcd;
    /// its burst ends after enough agreeing answers or at its limit.
    pub(super) fn answered(&mut self, member: &str, agrees: bool) {
        if let Some(burst) = self.bursts.get_mut(member) {
            burst.agreeing = if agrees { burst.agreeing + 1 } else { 0 };
            if burst.agreeing >= BURST_AGREEMENT || Instant::now() >= burst.until {
                self.bursts.remove(member);
            }
        }
    }

    /// Stops the quick checks of a member that left the cluster.
    pub(super) fn forget(&mut self, member: &str) {
        self.bursts.remove(member);
    }

    /// Checks `member` now and then quickly until its answers agree.
    pub(super) fn start_burst(&mut self, member: &str, now: Instant, directory: &DcsState) {
        self.bursts.insert(
            member.to_owned(),
            Burst {
                until: now + BURST_LIMIT,
                agreeing: 0,
            },
        );
        self.probe(member, directory);
    }

    /// The quick checks due: members in a burst, and every member often
    /// while the cluster is `leaderless`.
    pub(super) fn probe_urgent(&mut self, directory: &DcsState, leaderless: bool) {
        let now = Instant::now();
        self.bursts.retain(|_, b| now < b.until);
        let members: Vec<_> = directory
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
            self.probe(&member, directory);
        }
    }

    /// The regular check of every member.
    pub(super) fn probe_all(&mut self, directory: &DcsState) {
        let members: Vec<_> = directory.members.keys().cloned().collect();
        for member in members {
            self.probe(&member, directory);
        }
    }

    /// Starts a REST check of `member` unless one is already running.
    fn probe(&mut self, member: &str, directory: &DcsState) {
        if self.in_flight.contains(member) {
            return;
        }
        let Some(url) = directory
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
        self.tasks
            .spawn(member.to_owned(), async move { prober.check(&url).await });
    }

    /// Asks the configured REST URLs for the member list (a cluster
    /// without etcd), sending it to `listings`.
    pub(super) fn fetch_listing(
        &self,
        listings: &mpsc::Sender<ClusterListing>,
        cluster: &Arc<str>,
    ) {
        let prober = self.prober.clone();
        let urls = self.rest_urls.clone();
        let listings = listings.clone();
        let cluster = Arc::clone(cluster);
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
}

impl Follower {
    pub(super) fn on_check(&mut self, member: &str, check: RestCheck, task_failed: bool) {
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
        self.checks.answered(member, agrees);
    }

    /// Whether the member's REST `/primary` answer matches what etcd says
    /// it is. Without etcd there is nothing to agree with.
    pub(super) fn rest_agrees_with_etcd(&self, member: &str) -> bool {
        if self.link.status() == EtcdStatus::NotConfigured {
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
