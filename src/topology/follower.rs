//! Following one Patroni cluster: the task that owns its sources and
//! publishes its [`ClusterView`].
//!
//! It receives etcd snapshots and events from the watcher, runs REST checks
//! of every member each `health_interval`, and after any etcd event that
//! touches the leader key or a member's role or state, checks the affected
//! members at once and then every [`BURST_INTERVAL`] until their REST answers
//! agree with etcd twice in a row (or [`BURST_LIMIT`] passes). While the
//! cluster has no confirmed leader every member is checked every
//! [`LEADERLESS_INTERVAL`], so a REST-only cluster also follows a failover
//! quickly. After each input the fuser rebuilds the view, and a view that
//! differs from the last one is published whole.
//!
//! Without etcd, members are discovered from Patroni's `GET /cluster` on the
//! configured REST URLs, refreshed every interval.
//!
//! The task's parts: its [`FollowerSettings`] (replaced whole by a reload),
//! the link to etcd ([`etcd_link`], a state machine whose transitions
//! return the events to record), the REST checks ([`probing`]: what to
//! check when, and the checks under way), and the publication of what it
//! saw ([`publish`]). The follower itself applies DCS changes and names
//! the members to check.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::{mpsc, watch};
use tokio::task::{JoinError, JoinHandle};
use tokio::time::{Duration, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use url::Url;

use super::dcs::{cluster_prefix, DcsChange, DcsState};
use super::fuse::{EtcdStatus, RestState};
use super::patroni_data::ClusterListing;
use super::report::{self, ClusterReport, Sources};
use super::rest::RestProber;
use super::view::ClusterView;
use crate::config::{ClusterConfig, EtcdLossPolicy, LeaderPolicy};
use crate::etcd::trouble::Origin;
use crate::etcd::watch::{EtcdEvent, EtcdSource, KeyEvent};
use crate::events::{EventKind, EventLog};
use crate::metrics::ClusterMetrics;

mod etcd_link;
mod probing;
mod publish;

use etcd_link::EtcdLink;
use probing::RestChecks;

/// Interval of the quick checks that follow an etcd event.
pub const BURST_INTERVAL: Duration = Duration::from_millis(50);
/// Longest a burst of quick checks lasts (a promotion takes a few seconds).
pub const BURST_LIMIT: Duration = Duration::from_secs(15);
/// Interval of every member's checks while no leader is confirmed.
pub const LEADERLESS_INTERVAL: Duration = Duration::from_millis(250);
/// Agreeing answers that end a burst.
const BURST_AGREEMENT: u32 = 2;
/// How long a lost etcd connection may take to come back before etcd
/// counts as lost and `on_etcd_loss` applies. An etcd member restart, a
/// rolling upgrade or a reset stream reconnects well within it (to the
/// same member or another endpoint) well within it, and so does the slow
/// election that follows a restart of etcd's raft leader on a loaded
/// machine; meanwhile routing goes on from the state last read, as it
/// would between two watch events.
pub const ETCD_RECONNECT_GRACE: Duration = Duration::from_secs(5);
/// Pause before the etcd watch task is started again after it failed.
const SOURCE_RESTART_DELAY: Duration = Duration::from_secs(1);

/// The settings of a follower that a configuration reload may change.
#[derive(Debug, Clone, PartialEq)]
pub struct FollowerSettings {
    pub policy: LeaderPolicy,
    pub on_etcd_loss: EtcdLossPolicy,
    pub max_replica_lag: Option<u64>,
    pub health_interval: Duration,
    pub health_timeout: Duration,
}

impl FollowerSettings {
    pub fn from_config(config: &ClusterConfig) -> Self {
        Self {
            policy: config.effective_leader_policy(),
            on_etcd_loss: config.on_etcd_loss,
            max_replica_lag: config.max_replica_lag.map(|l| l.bytes()),
            health_interval: config.health_interval.get(),
            health_timeout: config.health_timeout.get(),
        }
    }
}

/// What [`start`] hands back: the receivers of views and reports, the
/// sender of new settings, and the future that follows the cluster until
/// shutdown.
pub struct Following<F> {
    pub views: watch::Receiver<Arc<ClusterView>>,
    pub reports: watch::Receiver<Arc<ClusterReport>>,
    pub settings: watch::Sender<FollowerSettings>,
    pub run: F,
}

/// Starts the task that follows etcd, after a delay, sending what it sees
/// to the channel; called again when the task failed.
type SourceStarter = Box<dyn Fn(Duration, mpsc::Sender<EtcdEvent>) -> JoinHandle<()> + Send + Sync>;

/// Prepares to follow the Patroni cluster `name` until `shutdown`, or
/// until `retire` and no reader of its views is left, recording what
/// happens to it in `events`.
pub fn start(
    name: &str,
    config: &ClusterConfig,
    origin: Origin,
    shutdown: CancellationToken,
    retire: CancellationToken,
    events: Arc<EventLog>,
) -> Result<Following<impl Future<Output = ()> + Send + 'static>, String> {
    let scope = config.scope.clone().unwrap_or_else(|| name.to_owned());
    let prefix = cluster_prefix(&config.namespace, &scope);
    let etcd = if config.etcd.is_empty() {
        None
    } else {
        let source = EtcdSource::new(&config.etcd_access(), prefix, origin)?;
        let stop = shutdown.clone();
        let starter: SourceStarter = Box::new(move |delay, events| {
            let (source, stop) = (source.clone(), stop.clone());
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                source.run(events, stop).await;
            })
        });
        Some(starter)
    };
    follow(name, config, shutdown, retire, etcd, events)
}

/// [`start`] with the etcd source given: the real watcher, or in tests one
/// that fails on purpose.
fn follow(
    name: &str,
    config: &ClusterConfig,
    shutdown: CancellationToken,
    retire: CancellationToken,
    etcd: Option<SourceStarter>,
    events: Arc<EventLog>,
) -> Result<Following<impl Future<Output = ()> + Send + 'static>, String> {
    let cluster: Arc<str> = name.into();
    let scope = config.scope.clone().unwrap_or_else(|| name.to_owned());
    let prefix = cluster_prefix(&config.namespace, &scope);
    let lag = config.max_replica_lag.map(|l| l.bytes());
    let prober = RestProber::new(config.health_timeout.get(), lag)?;
    let rest_urls = config
        .patroni
        .iter()
        .filter_map(|u| Url::parse(u).ok())
        .collect();
    let initial = ClusterView::new(Arc::clone(&cluster), Vec::new(), None, true)
        .with_no_leader_reason(if etcd.is_some() {
            "etcd has not been read yet"
        } else {
            "no member passes Patroni's /primary check yet"
        });
    let (views, receiver) = watch::channel(Arc::new(initial));
    let (reports, report_receiver) = watch::channel(Arc::new(ClusterReport {
        cluster: name.to_owned(),
        mode: "patroni",
        leader_policy: None,
        on_etcd_loss: None,
        rule: String::new(),
        leader: None,
        no_leader_reason: None,
        switchover: None,
        sync: None,
        sources: Sources {
            etcd: "connecting",
            etcd_down_since: None,
            patroni_rest: true,
        },
        members: Vec::new(),
        view_changed_at: report::now_rfc3339(),
    }));
    let follower = Follower {
        metrics: ClusterMetrics::new(name),
        events,
        reports,
        view_changed_at: report::now_rfc3339(),
        member_changed_at: HashMap::new(),
        cluster,
        settings: FollowerSettings::from_config(config),
        checks: RestChecks::new(prober, rest_urls),
        views,
        directory: DcsState::default(),
        prefix,
        link: EtcdLink::new(etcd.is_some()),
        rest: HashMap::new(),
        leader_since: None,
        last_leader: None,
    };
    info!(
        cluster = name,
        prefix = %follower.prefix,
        policy = follower.settings.policy.as_str(),
        on_etcd_loss = follower.settings.on_etcd_loss.as_str(),
        "following the Patroni cluster"
    );
    let (settings, settings_rx) = watch::channel(FollowerSettings::from_config(config));
    Ok(Following {
        views: receiver,
        reports: report_receiver,
        settings,
        run: follower.run(etcd, settings_rx, shutdown, retire),
    })
}

/// The task's state: its settings, its link to etcd, the DCS state read
/// from it, the REST checks and their answers, and what it published.
struct Follower {
    metrics: ClusterMetrics,
    events: Arc<EventLog>,
    reports: watch::Sender<Arc<ClusterReport>>,
    view_changed_at: String,
    member_changed_at: HashMap<String, String>,
    cluster: Arc<str>,
    settings: FollowerSettings,
    checks: RestChecks,
    views: watch::Sender<Arc<ClusterView>>,
    prefix: String,
    directory: DcsState,
    link: EtcdLink,
    rest: HashMap<String, RestState>,
    leader_since: Option<Instant>,
    last_leader: Option<String>,
}

impl Follower {
    async fn run(
        mut self,
        etcd: Option<SourceStarter>,
        mut settings: watch::Receiver<FollowerSettings>,
        shutdown: CancellationToken,
        retire: CancellationToken,
    ) {
        let mut retiring = false;
        let (etcd_tx, mut etcd_rx) = mpsc::channel(64);
        let has_etcd = etcd.is_some();
        let start_source =
            |delay: Duration| etcd.as_ref().map(|start| start(delay, etcd_tx.clone()));
        let mut source_task = start_source(Duration::ZERO);
        let (listing_tx, mut listing_rx) = mpsc::channel::<ClusterListing>(4);
        let mut regular = tokio::time::interval(self.settings.health_interval);
        regular.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut quick = tokio::time::interval(BURST_INTERVAL);
        quick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let leaderless = self.views.borrow().leader().is_none();
            let urgent = self.checks.bursting() || leaderless;
            let scheduled = self.until_scheduled_switchover();
            let grace_ends = self.link.grace_ends();
            tokio::select! {
                // The view changes when a scheduled switchover falls due.
                () = tokio::time::sleep(scheduled.unwrap_or_default()), if scheduled.is_some() => {}
                () = tokio::time::sleep_until(grace_ends.unwrap_or_else(Instant::now)), if grace_ends.is_some() => {
                    let lost = self.link.grace_over(self.settings.on_etcd_loss);
                    self.on_link(lost);
                }
                ended = task_end(&mut source_task) => {
                    if shutdown.is_cancelled() {
                        return;
                    }
                    self.etcd_source_failed(&ended);
                    source_task = start_source(SOURCE_RESTART_DELAY);
                }
                () = shutdown.cancelled() => return,
                () = retire.cancelled(), if !retiring => retiring = true,
                // Retired: the last session routed by this view is gone.
                () = self.views.closed(), if retiring => {
                    info!(cluster = %self.cluster, "the retired view source stopped");
                    return;
                }
                Ok(()) = settings.changed() => {
                    let new = settings.borrow_and_update().clone();
                    if new.health_interval != self.settings.health_interval {
                        regular = tokio::time::interval(new.health_interval);
                        regular.set_missed_tick_behavior(MissedTickBehavior::Delay);
                    }
                    self.apply(new);
                }
                Some(event) = etcd_rx.recv(), if has_etcd => self.on_etcd(event),
                Some((member, check, failed)) = self.checks.next() => self.on_check(&member, check, failed),
                Some(listing) = listing_rx.recv() => self.on_listing(listing),
                _ = regular.tick() => {
                    if !has_etcd {
                        self.checks.fetch_listing(&listing_tx, &self.cluster);
                    }
                    self.checks.probe_all(&self.directory);
                }
                _ = quick.tick(), if urgent => self.checks.probe_urgent(&self.directory, leaderless),
            }
            self.publish();
        }
    }

    /// How long until a switchover scheduled for later falls due.
    fn until_scheduled_switchover(&self) -> Option<Duration> {
        let at = self.directory.failover.as_ref()?.scheduled_for()?.ok()?;
        at.duration_since(SystemTime::now()).ok()
    }

    /// Takes reloaded settings; the next view is fused under them.
    fn apply(&mut self, new: FollowerSettings) {
        if new.health_timeout != self.settings.health_timeout
            || new.max_replica_lag != self.settings.max_replica_lag
        {
            match RestProber::new(new.health_timeout, new.max_replica_lag) {
                Ok(prober) => self.checks.set_prober(prober),
                Err(e) => warn!(cluster = %self.cluster, "keeping the REST checker in use: {e}"),
            }
        }
        info!(
            cluster = %self.cluster,
            policy = new.policy.as_str(),
            on_etcd_loss = new.on_etcd_loss.as_str(),
            "applied reloaded cluster settings"
        );
        self.settings = new;
    }

    /// Records what a transition of the etcd link says, and the metric.
    fn on_link(&mut self, event: Option<EventKind>) {
        if let Some(event) = event {
            self.events.record(Some(&self.cluster), event);
        }
        self.metrics.etcd_up(self.link.status() == EtcdStatus::Up);
    }

    fn on_etcd(&mut self, event: EtcdEvent) {
        let now = Instant::now();
        let check = match event {
            EtcdEvent::Snapshot(kvs) => self.on_snapshot(&kvs, now),
            EtcdEvent::Events(events) => events
                .into_iter()
                .flat_map(|event| self.on_key_event(event))
                .collect(),
            EtcdEvent::Down(reason) => {
                let event = self.link.failed(reason, now, self.settings.on_etcd_loss);
                if event.is_none() {
                    if let Some(reason) = self.link.trouble() {
                        debug!(cluster = %self.cluster, "etcd still unreachable: {reason}");
                    }
                }
                self.on_link(event);
                Vec::new()
            }
        };
        for member in check {
            self.checks.start_burst(&member, now, &self.directory);
        }
    }

    /// A full read of the prefix: replaces the DCS state; every member may
    /// have changed while etcd was not watched, so all are to be checked.
    fn on_snapshot(&mut self, kvs: &[(Vec<u8>, Vec<u8>)], now: Instant) -> Vec<String> {
        let mut fresh = DcsState::from_keys(
            &self.prefix,
            kvs.iter().map(|(k, v)| (k.as_slice(), v.as_slice())),
        );
        let regained = self.link.read();
        if regained.is_some() {
            self.metrics.etcd_reconnected();
        }
        self.on_link(regained);
        if fresh.leader != self.directory.leader {
            self.leader_since = Some(now);
        }
        fresh.carry_failsafe_members(&self.directory);
        self.directory = fresh;
        self.rest
            .retain(|m, _| self.directory.members.contains_key(m));
        self.directory.members.keys().cloned().collect()
    }

    /// Applies one key change; returns the members to check at once.
    fn on_key_event(&mut self, event: KeyEvent) -> Vec<String> {
        let change = match event {
            KeyEvent::Put { key, value } => self.directory.apply_put(&self.prefix, &key, &value),
            KeyEvent::Delete { key } => self.directory.apply_delete(&self.prefix, &key),
        };
        match change {
            DcsChange::Leader { old, new } => {
                self.events.record(
                    Some(&self.cluster),
                    EventKind::LeaderKeyChanged {
                        from: old.clone(),
                        to: new.clone(),
                    },
                );
                self.leader_since = Some(Instant::now());
                old.into_iter().chain(new).collect()
            }
            DcsChange::MemberRole(member) => {
                if self.directory.members.contains_key(&member) {
                    vec![member]
                } else {
                    self.rest.remove(&member);
                    self.checks.forget(&member);
                    Vec::new()
                }
            }
            DcsChange::Failover => {
                // A switchover starts with the leader stepping down: watch
                // it and its candidate closely.
                let Some(intent) = self.directory.failover.clone() else {
                    return Vec::new();
                };
                self.events.record(
                    Some(&self.cluster),
                    EventKind::SwitchoverRequested {
                        key: "failover",
                        leader: intent.leader.clone(),
                        candidate: intent.member.clone(),
                        scheduled_at: intent.scheduled_at.clone(),
                    },
                );
                intent.leader.into_iter().chain(intent.member).collect()
            }
            DcsChange::MemberData(_)
            | DcsChange::Sync
            | DcsChange::Config
            | DcsChange::Optime
            | DcsChange::Other => Vec::new(),
        }
    }

    /// The etcd watch task ended while the follower runs: it never does on
    /// its own, so it failed. etcd is lost at once (nothing follows it any
    /// more), loudly, and the caller starts the task again.
    fn etcd_source_failed(&mut self, ended: &Result<(), JoinError>) {
        let why = match ended {
            Ok(()) => "it returned".to_owned(),
            Err(e) => e.to_string(),
        };
        error!(cluster = %self.cluster, "the etcd watch task ended unexpectedly ({why}); starting it again");
        self.metrics.background_task_failed("etcd_watch");
        let lost = self
            .link
            .task_failed(&why, Instant::now(), self.settings.on_etcd_loss);
        self.on_link(lost);
    }

    fn on_listing(&mut self, listing: ClusterListing) {
        let mut fresh = DcsState::default();
        for member in &listing.members {
            fresh
                .members
                .insert(member.name.clone(), member.to_record());
        }
        let now = Instant::now();
        let new_members: Vec<_> = fresh
            .members
            .keys()
            .filter(|m| !self.directory.members.contains_key(*m))
            .cloned()
            .collect();
        self.directory = fresh;
        self.rest
            .retain(|m, _| self.directory.members.contains_key(m));
        for member in new_members {
            self.checks.start_burst(&member, now, &self.directory);
        }
    }
}

/// Resolves when the task ends; never, when there is none. Cancel-safe.
async fn task_end(task: &mut Option<JoinHandle<()>>) -> Result<(), JoinError> {
    match task {
        Some(handle) => {
            let ended = handle.await;
            *task = None;
            ended
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
