//! Who is who in each cluster: sources of truth, fused into one
//! [`ClusterView`] per cluster and published to readers.
//!
//! A static cluster's view is built once from the config. A Patroni
//! cluster is followed by a task ([`follower`]) that reads etcd
//! ([`crate::etcd::watch`], [`dcs`]) and Patroni's REST checks ([`rest`]) and combines
//! them with the rules in [`fuse`]. Either way, readers get a
//! `watch::Receiver<Arc<ClusterView>>`: the router reads it for new
//! sessions and each session watches it to learn it must end. `topology`
//! knows nothing of client sessions.
//!
//! The set of clusters follows the configuration across reloads: a new
//! cluster starts its source; a cluster whose members come from elsewhere
//! now (static addresses, etcd, scope, REST URLs, backend TLS) gets a new
//! source beside the old one; a removed or replaced source retires, and
//! stops once the last reader of its views (a listener's router, an open
//! session) is gone, so sessions routed by it are still watched to their
//! end.

pub mod dcs;
pub mod follower;
pub mod fuse;
pub mod patroni_data;
pub mod report;
pub mod rest;
pub mod static_cluster;
pub mod view;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::{ClusterConfig, Config};
use crate::etcd::trouble::Origin;
use crate::events::EventLog;
use crate::metrics::ClusterMetrics;
use crate::supervisor::{Supervisor, Task};

pub use report::ClusterReport;
pub use view::{ClusterView, Handover, Member, MemberRole};

/// The view source of one cluster.
struct Source {
    config: ClusterConfig,
    /// Increases with every source started: listeners compare it to know
    /// their cluster's source was replaced.
    generation: u64,
    views: watch::Receiver<Arc<ClusterView>>,
    reports: watch::Receiver<Arc<ClusterReport>>,
    kind: SourceKind,
}

enum SourceKind {
    /// The view never changes; the senders are kept so readers never see a
    /// closed channel.
    Static {
        views: watch::Sender<Arc<ClusterView>>,
        _reports: watch::Sender<Arc<ClusterReport>>,
    },
    /// A follower; it retires when told to and its views are unread.
    Patroni {
        settings: watch::Sender<follower::FollowerSettings>,
        retire: CancellationToken,
    },
}

type Run = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// The published views of every configured cluster.
pub struct Topology {
    sources: BTreeMap<String, Source>,
    next_generation: u64,
    shutdown: CancellationToken,
    events: Arc<EventLog>,
    /// The config file, named when etcd refuses a cluster's credentials.
    config_path: PathBuf,
}

/// What a reload will do to the clusters: sources to start (their tasks
/// not yet running), sources to retire, settings to hand on.
pub struct TopologyPlan {
    start: Vec<(String, Source, Option<Run>)>,
    retire: Vec<String>,
    settings: Vec<(String, follower::FollowerSettings)>,
}

impl TopologyPlan {
    /// The views and generation of `cluster` once the plan is committed.
    pub fn planned(&self, cluster: &str) -> Option<(watch::Receiver<Arc<ClusterView>>, u64)> {
        self.start
            .iter()
            .find(|(name, _, _)| name == cluster)
            .map(|(_, source, _)| (source.views.clone(), source.generation))
    }
}

impl Topology {
    /// A topology without clusters; [`Topology::plan`] and
    /// [`Topology::commit`] bring in those of a configuration.
    /// `config_path` is the file the clusters' settings are read from.
    pub fn new(shutdown: &CancellationToken, events: &Arc<EventLog>, config_path: &Path) -> Self {
        Self {
            sources: BTreeMap::new(),
            next_generation: 0,
            shutdown: shutdown.clone(),
            events: Arc::clone(events),
            config_path: config_path.to_owned(),
        }
    }

    /// Plans the clusters of `config`. Errors name the key; nothing runs
    /// until [`Topology::commit`].
    pub fn plan(&mut self, config: &Config) -> Result<TopologyPlan, String> {
        let mut plan = TopologyPlan {
            start: Vec::new(),
            retire: Vec::new(),
            settings: Vec::new(),
        };
        for (name, cluster) in &config.clusters {
            match self.sources.get(name) {
                Some(current) if source_change(&current.config, cluster).is_none() => {
                    plan.settings.push((
                        name.clone(),
                        follower::FollowerSettings::from_config(cluster),
                    ));
                }
                current => {
                    if current.is_some() {
                        plan.retire.push(name.clone());
                    }
                    let (source, run) = self.prepare(name, cluster)?;
                    plan.start.push((name.clone(), source, run));
                }
            }
        }
        plan.retire.extend(
            self.sources
                .keys()
                .filter(|name| !config.clusters.contains_key(*name))
                .cloned(),
        );
        Ok(plan)
    }

    fn prepare(
        &mut self,
        name: &str,
        cluster: &ClusterConfig,
    ) -> Result<(Source, Option<Run>), String> {
        let generation = self.next_generation;
        self.next_generation += 1;
        if cluster.is_static() {
            let view = static_cluster::static_view(name, cluster)
                .map_err(|e| format!("clusters.{name}: {e}"))?;
            let metrics = ClusterMetrics::new(name);
            if let Some(leader) = view.leader() {
                metrics.leader_gauge(None, Some(&leader.name));
            }
            for member in &view.members {
                metrics.member(&member.name, member.healthy, member.readable);
            }
            let report = static_cluster::static_report(&view);
            let (views_tx, views) = watch::channel(Arc::new(view));
            let (reports_tx, reports) = watch::channel(Arc::new(report));
            let source = Source {
                config: cluster.clone(),
                generation,
                views,
                reports,
                kind: SourceKind::Static {
                    views: views_tx,
                    _reports: reports_tx,
                },
            };
            return Ok((source, None));
        }
        let retire = CancellationToken::new();
        let origin = Origin {
            table: format!("clusters.{name}"),
            file: self.config_path.clone(),
        };
        let following = follower::start(
            name,
            cluster,
            origin,
            self.shutdown.child_token(),
            retire.clone(),
            Arc::clone(&self.events),
        )
        .map_err(|e| format!("clusters.{name}: {e}"))?;
        let source = Source {
            config: cluster.clone(),
            generation,
            views: following.views,
            reports: following.reports,
            kind: SourceKind::Patroni {
                settings: following.settings,
                retire,
            },
        };
        Ok((source, Some(Box::pin(following.run))))
    }

    /// Carries out a plan: starts new sources, retires old ones, hands
    /// reloaded settings to the followers that stay.
    pub fn commit(&mut self, plan: TopologyPlan, supervisor: &mut Supervisor) {
        for name in plan.retire {
            if let Some(old) = self.sources.remove(&name) {
                info!(cluster = %name, "retiring the cluster's view source; it stops once no session uses it");
                match old.kind {
                    SourceKind::Static { views, .. } => {
                        tokio::spawn(async move { views.closed().await });
                    }
                    SourceKind::Patroni { retire, .. } => retire.cancel(),
                }
            }
        }
        for (name, source, run) in plan.start {
            if let (Some(run), SourceKind::Patroni { retire, .. }) = (run, &source.kind) {
                let task = Task {
                    kind: "follower",
                    cluster: name.clone(),
                    label: format!("the follower of cluster \"{name}\""),
                    stop: retire.clone(),
                };
                supervisor.spawn(task, run);
            }
            self.sources.insert(name, source);
        }
        for (name, new) in plan.settings {
            if let Some(SourceKind::Patroni { settings, .. }) =
                self.sources.get(&name).map(|s| &s.kind)
            {
                settings.send_if_modified(|current| {
                    let changed = *current != new;
                    *current = new;
                    changed
                });
            }
        }
    }

    /// Receivers of every cluster's reports, by cluster name.
    pub fn reports(&self) -> Vec<(String, watch::Receiver<Arc<ClusterReport>>)> {
        self.sources
            .iter()
            .map(|(n, s)| (n.clone(), s.reports.clone()))
            .collect()
    }

    /// Receivers of every cluster's views, by cluster name.
    pub fn views(&self) -> Vec<(String, watch::Receiver<Arc<ClusterView>>)> {
        self.sources
            .iter()
            .map(|(n, s)| (n.clone(), s.views.clone()))
            .collect()
    }

    /// The named cluster's views and the generation of their source.
    pub fn watch(&self, cluster: &str) -> Option<(watch::Receiver<Arc<ClusterView>>, u64)> {
        self.sources
            .get(cluster)
            .map(|s| (s.views.clone(), s.generation))
    }
}

/// The first changed setting of a cluster that needs a new view source:
/// where its members come from, and how rolegate reaches them.
pub fn source_change(a: &ClusterConfig, b: &ClusterConfig) -> Option<&'static str> {
    macro_rules! fields {
        ($($field:ident),*) => {
            $(if a.$field != b.$field { return Some(stringify!($field)); })*
        };
    }
    fields!(
        primary,
        replicas,
        scope,
        namespace,
        etcd,
        etcd_user,
        etcd_password,
        etcd_ca,
        etcd_cert,
        etcd_key,
        patroni,
        backend_tls,
        backend_ca,
        backend_cert,
        backend_key
    );
    None
}
