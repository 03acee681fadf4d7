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
use tokio::time::{Duration, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use url::Url;

use super::dcs::{cluster_prefix, DcsChange, DcsState};
use super::etcd::{EtcdEvent, EtcdSource, KeyEvent};
use super::fuse::{EtcdStatus, RestCheck, RestState};
use super::patroni_data::ClusterListing;
use super::report::{self, ClusterReport, Sources};
use super::rest::RestProber;
use super::view::ClusterView;
use crate::config::{ClusterConfig, EtcdLossPolicy, LeaderPolicy};
use crate::metrics::ClusterMetrics;

mod probing;
mod publish;

/// Interval of the quick checks that follow an etcd event.
pub const BURST_INTERVAL: Duration = Duration::from_millis(50);
/// Longest a burst of quick checks lasts (a promotion takes a few seconds).
pub const BURST_LIMIT: Duration = Duration::from_secs(15);
/// Interval of every member's checks while no leader is confirmed.
pub const LEADERLESS_INTERVAL: Duration = Duration::from_millis(250);
/// Agreeing answers that end a burst.
const BURST_AGREEMENT: u32 = 2;

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

/// Prepares to follow the Patroni cluster `name` until `shutdown`.
pub fn start(
    name: &str,
    config: &ClusterConfig,
    shutdown: CancellationToken,
) -> Result<Following<impl Future<Output = ()> + Send + 'static>, String> {
    let cluster: Arc<str> = name.into();
    let scope = config.scope.clone().unwrap_or_else(|| name.to_owned());
    let prefix = cluster_prefix(&config.namespace, &scope);
    let lag = config.max_replica_lag.map(|l| l.bytes());
    let prober = RestProber::new(config.health_timeout.get(), lag)?;
    let etcd = if config.etcd.is_empty() {
        None
    } else {
        Some(EtcdSource::new(config, prefix.clone())?)
    };
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
        run: follower.run(etcd, settings_rx, shutdown),
    })
}

struct Burst {
    until: Instant,
    agreeing: u32,
}

struct Follower {
    metrics: ClusterMetrics,
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
}

type Checked = (String, RestCheck);

impl Follower {
    async fn run(
        mut self,
        etcd: Option<EtcdSource>,
        mut settings: watch::Receiver<FollowerSettings>,
        shutdown: CancellationToken,
    ) {
        let (etcd_tx, mut etcd_rx) = mpsc::channel(64);
        let has_etcd = etcd.is_some();
        if let Some(source) = etcd {
            tokio::spawn(source.run(etcd_tx, shutdown.clone()));
        }
        let (checked_tx, mut checked_rx) = mpsc::channel::<Checked>(64);
        let (listing_tx, mut listing_rx) = mpsc::channel::<ClusterListing>(4);
        let mut regular = tokio::time::interval(self.health_interval);
        regular.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut quick = tokio::time::interval(BURST_INTERVAL);
        quick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let urgent = !self.bursts.is_empty() || self.views.borrow().leader().is_none();
            let scheduled = self.until_scheduled_switchover();
            tokio::select! {
                // The view changes when a scheduled switchover falls due.
                () = tokio::time::sleep(scheduled.unwrap_or_default()), if scheduled.is_some() => {}
                () = shutdown.cancelled() => return,
                Ok(()) = settings.changed() => {
                    let new = settings.borrow_and_update().clone();
                    if new.health_interval != self.health_interval {
                        regular = tokio::time::interval(new.health_interval);
                        regular.set_missed_tick_behavior(MissedTickBehavior::Delay);
                    }
                    self.apply(new);
                }
                Some(event) = etcd_rx.recv(), if has_etcd => self.on_etcd(event, &checked_tx),
                Some((member, check)) = checked_rx.recv() => self.on_check(&member, check),
                Some(listing) = listing_rx.recv() => self.on_listing(listing, &checked_tx),
                _ = regular.tick() => {
                    if !has_etcd {
                        self.fetch_listing(&listing_tx);
                    }
                    let members: Vec<_> = self.directory.members.keys().cloned().collect();
                    for member in members {
                        self.probe(&member, &checked_tx);
                    }
                }
                _ = quick.tick(), if urgent => self.probe_urgent(&checked_tx),
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

    fn on_etcd(&mut self, event: EtcdEvent, checked: &mpsc::Sender<Checked>) {
        let now = Instant::now();
        match event {
            EtcdEvent::Snapshot(kvs) => {
                let fresh = DcsState::from_keys(
                    &self.prefix,
                    kvs.iter().map(|(k, v)| (k.as_slice(), v.as_slice())),
                );
                if let EtcdStatus::Down { since } = self.etcd {
                    info!(
                        cluster = %self.cluster,
                        down_for_ms = since.elapsed().as_millis() as u64,
                        "etcd is reachable again"
                    );
                    self.metrics.etcd_reconnected();
                }
                self.metrics.etcd_up(true);
                if fresh.leader != self.directory.leader {
                    self.leader_since = Some(now);
                }
                self.directory = fresh;
                self.etcd = EtcdStatus::Up;
                self.rest
                    .retain(|m, _| self.directory.members.contains_key(m));
                // Everything may have changed while we were not watching.
                let members: Vec<_> = self.directory.members.keys().cloned().collect();
                for member in members {
                    self.start_burst(&member, now, checked);
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
                            info!(
                                cluster = %self.cluster,
                                from = old.as_deref().unwrap_or("(none)"),
                                to = new.as_deref().unwrap_or("(none)"),
                                "etcd leader key changed"
                            );
                            self.leader_since = Some(now);
                            for member in old.iter().chain(new.iter()) {
                                self.start_burst(member, now, checked);
                            }
                        }
                        DcsChange::MemberRole(member) => {
                            if self.directory.members.contains_key(&member) {
                                self.start_burst(&member, now, checked);
                            } else {
                                self.rest.remove(&member);
                                self.bursts.remove(&member);
                            }
                        }
                        DcsChange::Failover => {
                            // A switchover starts with the leader stepping
                            // down: watch it and its candidate closely.
                            if let Some(intent) = self.directory.failover.clone() {
                                for member in intent.leader.iter().chain(intent.member.iter()) {
                                    self.start_burst(member, now, checked);
                                }
                            }
                        }
                        DcsChange::MemberData(_)
                        | DcsChange::Config
                        | DcsChange::Optime
                        | DcsChange::Other => {}
                    }
                }
            }
            EtcdEvent::Down(reason) => {
                if !matches!(self.etcd, EtcdStatus::Down { .. }) {
                    warn!(
                        cluster = %self.cluster,
                        on_etcd_loss = self.on_etcd_loss.as_str(),
                        "etcd is unreachable: {reason}"
                    );
                    self.etcd = EtcdStatus::Down { since: now };
                    self.metrics.etcd_up(false);
                } else {
                    debug!(cluster = %self.cluster, "etcd still unreachable: {reason}");
                }
            }
        }
    }

    fn on_listing(&mut self, listing: ClusterListing, checked: &mpsc::Sender<Checked>) {
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
            self.start_burst(&member, now, checked);
        }
    }
}
