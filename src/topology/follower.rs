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

use std::collections::{HashMap, HashSet};
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
use super::etcd::{EtcdEvent, EtcdSource, KeyEvent};
use super::fuse::{EtcdStatus, RestState};
use super::patroni_data::ClusterListing;
use super::report::{self, ClusterReport, Sources};
use super::rest::RestProber;
use super::view::ClusterView;
use crate::config::{ClusterConfig, EtcdLossPolicy, LeaderPolicy};
use crate::etcd_trouble::{EtcdTrouble, Origin};
use crate::events::{EventKind, EventLog};
use crate::metrics::ClusterMetrics;

mod probing;

use probing::Probes;
mod publish;

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
/// same member or another endpoint: 0.1–0.4 s here), unless the restarted
/// member led etcd's raft and the election that follows is slow, which on a
/// loaded machine took over 3 s; meanwhile routing goes on from the state
/// last read, as it would between two watch events.
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
        policy: config.effective_leader_policy(),
        on_etcd_loss: config.on_etcd_loss,
        max_replica_lag: lag,
        health_interval: config.health_interval.get(),
        health_timeout: config.health_timeout.get(),
        prober,
        rest_urls,
        views,
        directory: DcsState::default(),
        prefix,
        etcd: if etcd.is_some() {
            EtcdStatus::Connecting
        } else {
            EtcdStatus::NotConfigured
        },
        rest: HashMap::new(),
        leader_since: None,
        last_leader: None,
        bursts: HashMap::new(),
        in_flight: HashSet::new(),
        last_probe: HashMap::new(),
        etcd_trouble: None,
    };
    info!(
        cluster = name,
        prefix = %follower.prefix,
        policy = follower.policy.as_str(),
        on_etcd_loss = follower.on_etcd_loss.as_str(),
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

struct Burst {
    until: Instant,
    agreeing: u32,
}

struct Follower {
    metrics: ClusterMetrics,
    events: Arc<EventLog>,
    reports: watch::Sender<Arc<ClusterReport>>,
    view_changed_at: String,
    member_changed_at: HashMap<String, String>,
    cluster: Arc<str>,
    policy: LeaderPolicy,
    on_etcd_loss: EtcdLossPolicy,
    max_replica_lag: Option<u64>,
    health_interval: Duration,
    health_timeout: Duration,
    prober: RestProber,
    rest_urls: Vec<Url>,
    views: watch::Sender<Arc<ClusterView>>,
    prefix: String,
    directory: DcsState,
    etcd: EtcdStatus,
    rest: HashMap<String, RestState>,
    leader_since: Option<Instant>,
    last_leader: Option<String>,
    bursts: HashMap<String, Burst>,
    in_flight: HashSet<String>,
    last_probe: HashMap<String, Instant>,
    /// Why etcd was last unreachable, while it is.
    etcd_trouble: Option<EtcdTrouble>,
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
        let mut probes = Probes::default();
        let (listing_tx, mut listing_rx) = mpsc::channel::<ClusterListing>(4);
        let mut regular = tokio::time::interval(self.health_interval);
        regular.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut quick = tokio::time::interval(BURST_INTERVAL);
        quick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let urgent = !self.bursts.is_empty() || self.views.borrow().leader().is_none();
            let scheduled = self.until_scheduled_switchover();
            let grace_ends = self.etcd_grace_ends();
            tokio::select! {
                // The view changes when a scheduled switchover falls due.
                () = tokio::time::sleep(scheduled.unwrap_or_default()), if scheduled.is_some() => {}
                () = tokio::time::sleep_until(grace_ends.unwrap_or_else(Instant::now)), if grace_ends.is_some() => {
                    self.etcd_lost();
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
                    if new.health_interval != self.health_interval {
                        regular = tokio::time::interval(new.health_interval);
                        regular.set_missed_tick_behavior(MissedTickBehavior::Delay);
                    }
                    self.apply(new);
                }
                Some(event) = etcd_rx.recv(), if has_etcd => self.on_etcd(event, &mut probes),
                Some((member, check, failed)) = probes.next() => self.on_check(&member, check, failed),
                Some(listing) = listing_rx.recv() => self.on_listing(listing, &mut probes),
                _ = regular.tick() => {
                    if !has_etcd {
                        self.fetch_listing(&listing_tx);
                    }
                    let members: Vec<_> = self.directory.members.keys().cloned().collect();
                    for member in members {
                        self.probe(&member, &mut probes);
                    }
                }
                _ = quick.tick(), if urgent => self.probe_urgent(&mut probes),
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
        if new.health_timeout != self.health_timeout || new.max_replica_lag != self.max_replica_lag
        {
            match RestProber::new(new.health_timeout, new.max_replica_lag) {
                Ok(prober) => self.prober = prober,
                Err(e) => warn!(cluster = %self.cluster, "keeping the REST checker in use: {e}"),
            }
        }
        info!(
            cluster = %self.cluster,
            policy = new.policy.as_str(),
            on_etcd_loss = new.on_etcd_loss.as_str(),
            "applied reloaded cluster settings"
        );
        self.policy = new.policy;
        self.on_etcd_loss = new.on_etcd_loss;
        self.max_replica_lag = new.max_replica_lag;
        self.health_interval = new.health_interval;
        self.health_timeout = new.health_timeout;
    }

    fn on_etcd(&mut self, event: EtcdEvent, probes: &mut Probes) {
        let now = Instant::now();
        match event {
            EtcdEvent::Snapshot(kvs) => {
                let mut fresh = DcsState::from_keys(
                    &self.prefix,
                    kvs.iter().map(|(k, v)| (k.as_slice(), v.as_slice())),
                );
                match self.etcd {
                    EtcdStatus::Down { since } => {
                        self.events.record(
                            Some(&self.cluster),
                            EventKind::EtcdRegained {
                                down_ms: since.elapsed().as_millis() as u64,
                                within_grace: false,
                            },
                        );
                        self.metrics.etcd_reconnected();
                    }
                    EtcdStatus::Reconnecting { since } => {
                        self.events.record(
                            Some(&self.cluster),
                            EventKind::EtcdRegained {
                                down_ms: since.elapsed().as_millis() as u64,
                                within_grace: true,
                            },
                        );
                        self.metrics.etcd_reconnected();
                    }
                    EtcdStatus::NotConfigured | EtcdStatus::Connecting | EtcdStatus::Up => {}
                }
                self.etcd_trouble = None;
                self.metrics.etcd_up(true);
                if fresh.leader != self.directory.leader {
                    self.leader_since = Some(now);
                }
                fresh.carry_failsafe_members(&self.directory);
                self.directory = fresh;
                self.etcd = EtcdStatus::Up;
                self.rest
                    .retain(|m, _| self.directory.members.contains_key(m));
                // Everything may have changed while we were not watching.
                let members: Vec<_> = self.directory.members.keys().cloned().collect();
                for member in members {
                    self.start_burst(&member, now, probes);
                }
            }
            EtcdEvent::Events(events) => {
                for event in events {
                    let change = match event {
                        KeyEvent::Put { key, value } => {
                            self.directory.apply_put(&self.prefix, &key, &value)
                        }
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
                            self.leader_since = Some(now);
                            for member in old.iter().chain(new.iter()) {
                                self.start_burst(member, now, probes);
                            }
                        }
                        DcsChange::MemberRole(member) => {
                            if self.directory.members.contains_key(&member) {
                                self.start_burst(&member, now, probes);
                            } else {
                                self.rest.remove(&member);
                                self.bursts.remove(&member);
                            }
                        }
                        DcsChange::Failover => {
                            // A switchover starts with the leader stepping
                            // down: watch it and its candidate closely.
                            if let Some(intent) = self.directory.failover.clone() {
                                self.events.record(
                                    Some(&self.cluster),
                                    EventKind::SwitchoverRequested {
                                        key: "failover",
                                        leader: intent.leader.clone(),
                                        candidate: intent.member.clone(),
                                        scheduled_at: intent.scheduled_at.clone(),
                                    },
                                );
                                for member in intent.leader.iter().chain(intent.member.iter()) {
                                    self.start_burst(member, now, probes);
                                }
                            }
                        }
                        DcsChange::MemberData(_)
                        | DcsChange::Sync
                        | DcsChange::Config
                        | DcsChange::Optime
                        | DcsChange::Other => {}
                    }
                }
            }
            EtcdEvent::Down(reason) => {
                match self.etcd {
                    EtcdStatus::Up => {
                        self.events.record(
                            Some(&self.cluster),
                            EventKind::EtcdReconnecting {
                                reason: reason.to_string(),
                                grace_ms: ETCD_RECONNECT_GRACE.as_millis() as u64,
                            },
                        );
                        self.etcd = EtcdStatus::Reconnecting { since: now };
                        self.metrics.etcd_up(false);
                    }
                    EtcdStatus::Connecting => {
                        // Nothing was read yet: there is no state to go on.
                        self.etcd = EtcdStatus::Reconnecting { since: now };
                        self.etcd_trouble = Some(reason);
                        self.etcd_lost();
                        return;
                    }
                    EtcdStatus::Reconnecting { .. } | EtcdStatus::Down { .. } => {
                        debug!(cluster = %self.cluster, "etcd still unreachable: {reason}");
                    }
                    EtcdStatus::NotConfigured => {}
                }
                self.etcd_trouble = Some(reason);
            }
        }
    }

    /// When the grace period of a lost etcd connection ends, if one runs.
    fn etcd_grace_ends(&self) -> Option<Instant> {
        match self.etcd {
            EtcdStatus::Reconnecting { since } => Some(since + ETCD_RECONNECT_GRACE),
            _ => None,
        }
    }

    /// etcd did not come back within the grace period (or cannot be
    /// followed at all): from now on `on_etcd_loss` decides, counting from
    /// the moment the connection was lost.
    fn etcd_lost(&mut self) {
        let EtcdStatus::Reconnecting { since } = self.etcd else {
            return;
        };
        self.events.record(
            Some(&self.cluster),
            EventKind::EtcdLost {
                reason: self
                    .etcd_trouble
                    .as_ref()
                    .map_or_else(|| "no reason given".to_owned(), ToString::to_string),
                on_etcd_loss: self.on_etcd_loss.as_str(),
            },
        );
        self.etcd = EtcdStatus::Down { since };
        self.metrics.etcd_up(false);
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
        let since = match self.etcd {
            EtcdStatus::Reconnecting { since } | EtcdStatus::Down { since } => since,
            _ => Instant::now(),
        };
        self.etcd = EtcdStatus::Reconnecting { since };
        self.etcd_trouble = Some(EtcdTrouble::Lost(format!(
            "the etcd watch task failed: {why}"
        )));
        self.etcd_lost();
    }

    fn on_listing(&mut self, listing: ClusterListing, probes: &mut Probes) {
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
            self.start_burst(&member, now, probes);
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
