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

use tokio::sync::{mpsc, watch};
use tokio::time::{Duration, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use url::Url;

use super::dcs::{cluster_prefix, DcsChange, DcsState};
use super::etcd::{EtcdEvent, EtcdSource, KeyEvent};
use super::fuse::{fuse, rule, EtcdStatus, FuseInput, RestCheck, RestState};
use super::patroni_data::ClusterListing;
use super::report::{self, ClusterReport, Sources};
use super::rest::RestProber;
use super::view::ClusterView;
use crate::config::{ClusterConfig, EtcdLossPolicy, LeaderPolicy};
use crate::metrics::ClusterMetrics;

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
            tokio::select! {
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

    fn fetch_listing(&self, listings: &mpsc::Sender<ClusterListing>) {
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

    fn on_check(&mut self, member: &str, check: RestCheck) {
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
    fn rest_agrees_with_etcd(&self, member: &str) -> bool {
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

    fn start_burst(&mut self, member: &str, now: Instant, checked: &mpsc::Sender<Checked>) {
        self.bursts.insert(
            member.to_owned(),
            Burst {
                until: now + BURST_LIMIT,
                agreeing: 0,
            },
        );
        self.probe(member, checked);
    }

    fn probe_urgent(&mut self, checked: &mpsc::Sender<Checked>) {
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
    fn probe(&mut self, member: &str, checked: &mpsc::Sender<Checked>) {
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

    fn publish(&mut self) {
        let view = fuse(&self.fuse_input());
        let current = self.views.borrow().clone();
        if *current == view {
            self.publish_report(&view);
            return;
        }
        let now = report::now_rfc3339();
        self.view_changed_at = now.clone();
        for member in &view.members {
            if current.member(&member.name) != Some(member) {
                self.member_changed_at
                    .insert(member.name.to_string(), now.clone());
                self.metrics
                    .member(&member.name, member.healthy, member.readable);
            }
        }
        for gone in current
            .members
            .iter()
            .filter(|m| view.member(&m.name).is_none())
        {
            self.member_changed_at.remove(&*gone.name);
            self.metrics.member_gone(&gone.name);
        }
        let old_leader = current.leader().map(|m| m.name.clone());
        let new_leader = view.leader().map(|m| m.name.clone());
        if old_leader != new_leader {
            self.metrics
                .leader_gauge(old_leader.as_deref(), new_leader.as_deref());
            if let (Some(new), Some(last)) = (&new_leader, &self.last_leader) {
                if **new != **last {
                    self.metrics.new_leader_confirmed();
                }
            }
            match &new_leader {
                Some(leader) => info!(
                    cluster = %self.cluster,
                    from = old_leader.as_deref().unwrap_or("(none)"),
                    to = %leader,
                    "confirmed leader changed"
                ),
                None => warn!(
                    cluster = %self.cluster,
                    from = old_leader.as_deref().unwrap_or("(none)"),
                    reason = view.no_leader_reason.as_deref().unwrap_or(""),
                    "no confirmed leader"
                ),
            }
        }
        let readable = |v: &ClusterView| {
            v.readable_replicas()
                .map(|m| m.name.to_string())
                .collect::<Vec<_>>()
        };
        let (before, after) = (readable(&current), readable(&view));
        if before != after {
            info!(
                cluster = %self.cluster,
                before = %before.join(","),
                after = %after.join(","),
                "readable replicas changed"
            );
        }
        if let Some(leader) = &new_leader {
            self.last_leader = Some(leader.to_string());
        }
        self.publish_report(&view);
        self.views.send_replace(Arc::new(view));
    }

    fn fuse_input(&self) -> FuseInput<'_> {
        FuseInput {
            cluster: &self.cluster,
            policy: self.policy,
            on_etcd_loss: self.on_etcd_loss,
            max_replica_lag: self.max_replica_lag,
            directory: &self.directory,
            etcd: self.etcd,
            rest: &self.rest,
            leader_since: self.leader_since,
            previous_leader: self.last_leader.as_deref(),
            now: Instant::now(),
        }
    }

    fn publish_report(&self, view: &ClusterView) {
        let (etcd, etcd_down_since) = report::etcd_source(self.etcd);
        let report = ClusterReport {
            cluster: self.cluster.to_string(),
            mode: "patroni",
            leader_policy: Some(self.policy.as_str()),
            on_etcd_loss: (self.etcd != EtcdStatus::NotConfigured)
                .then_some(self.on_etcd_loss.as_str()),
            rule: report::rule_name(rule(&self.fuse_input())),
            leader: view.leader().map(|m| m.name.to_string()),
            no_leader_reason: view.no_leader_reason.clone(),
            switchover: view.handover.as_ref().map(|h| {
                [
                    ("from", Some(h.from.to_string())),
                    ("to", h.to.as_deref().map(str::to_owned)),
                ]
                .into_iter()
                .collect()
            }),
            sources: Sources {
                etcd,
                etcd_down_since,
                patroni_rest: true,
            },
            members: report::member_reports(
                view,
                Some(&self.directory),
                &self.rest,
                &self.member_changed_at,
            ),
            view_changed_at: self.view_changed_at.clone(),
        };
        self.reports.send_replace(Arc::new(report));
    }
}
