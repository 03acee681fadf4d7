//! Who is who in each cluster: sources of truth, fused into one
//! [`ClusterView`] per cluster and published to readers.
//!
//! A static cluster's view is built once from the config. A Patroni
//! cluster is followed by a task ([`follower`]) that reads etcd
//! ([`etcd`], [`dcs`]) and Patroni's REST checks ([`rest`]) and combines
//! them with the rules in [`fuse`]. Either way, readers get a
//! `watch::Receiver<Arc<ClusterView>>`: the router reads it for new
//! sessions and each session watches it to learn it must end. `topology`
//! knows nothing of client sessions.

pub mod dcs;
pub mod etcd;
pub mod follower;
pub mod fuse;
pub mod patroni_data;
pub mod report;
pub mod rest;
pub mod static_cluster;
pub mod view;

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::events::EventLog;
use crate::metrics::ClusterMetrics;

pub use report::ClusterReport;
pub use view::{ClusterView, Handover, Member, MemberRole};

/// The published views of every configured cluster.
pub struct Topology {
    views: HashMap<String, watch::Receiver<Arc<ClusterView>>>,
    reports: HashMap<String, watch::Receiver<Arc<ClusterReport>>>,
    /// Senders of views and reports that never change; kept so receivers
    /// never see a closed channel.
    _static_views: Vec<watch::Sender<Arc<ClusterView>>>,
    _static_reports: Vec<watch::Sender<Arc<ClusterReport>>>,
    /// Where reloaded settings go, by cluster name (Patroni clusters only).
    settings: HashMap<String, watch::Sender<follower::FollowerSettings>>,
    /// Background tasks (the followers of Patroni clusters); each returns
    /// what it was, for the error when one ends.
    pub tasks: JoinSet<String>,
}

impl Topology {
    /// Starts the view source of every cluster in `config`. Followers run
    /// until `shutdown` is cancelled and record what happens in `events`.
    pub fn start(
        config: &Config,
        shutdown: &CancellationToken,
        events: &Arc<EventLog>,
    ) -> anyhow::Result<Self> {
        let mut views = HashMap::new();
        let mut reports = HashMap::new();
        let mut senders = Vec::new();
        let mut report_senders = Vec::new();
        let mut settings = HashMap::new();
        let mut tasks = JoinSet::new();
        for (name, cluster) in &config.clusters {
            if cluster.is_static() {
                let view = static_cluster::static_view(name, cluster)
                    .map_err(|e| anyhow::anyhow!("clusters.{name}: {e}"))?;
                let metrics = ClusterMetrics::new(name);
                if let Some(leader) = view.leader() {
                    metrics.leader_gauge(None, Some(&leader.name));
                }
                for member in &view.members {
                    metrics.member(&member.name, member.healthy, member.readable);
                }
                let report = static_cluster::static_report(&view);
                let (tx, rx) = watch::channel(Arc::new(view));
                senders.push(tx);
                views.insert(name.clone(), rx);
                let (tx, rx) = watch::channel(Arc::new(report));
                report_senders.push(tx);
                reports.insert(name.clone(), rx);
            } else {
                let following =
                    follower::start(name, cluster, shutdown.child_token(), Arc::clone(events))
                        .map_err(|e| anyhow::anyhow!("clusters.{name}: {e}"))?;
                views.insert(name.clone(), following.views);
                reports.insert(name.clone(), following.reports);
                settings.insert(name.clone(), following.settings);
                let name = name.clone();
                let run = following.run;
                tasks.spawn(async move {
                    run.await;
                    format!("the follower of cluster \"{name}\"")
                });
            }
        }
        Ok(Self {
            views,
            reports,
            settings,
            _static_views: senders,
            _static_reports: report_senders,
            tasks,
        })
    }

    /// Receivers of every cluster's reports, by cluster name.
    pub fn reports(&self) -> Vec<(String, watch::Receiver<Arc<ClusterReport>>)> {
        let mut reports: Vec<_> = self
            .reports
            .iter()
            .map(|(n, r)| (n.clone(), r.clone()))
            .collect();
        reports.sort_by(|a, b| a.0.cmp(&b.0));
        reports
    }

    /// Receivers of every cluster's views, by cluster name.
    pub fn views(&self) -> Vec<(String, watch::Receiver<Arc<ClusterView>>)> {
        let mut views: Vec<_> = self
            .views
            .iter()
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        views.sort_by(|a, b| a.0.cmp(&b.0));
        views
    }

    /// Hands reloaded routing settings to every Patroni cluster's follower.
    pub fn apply(&self, config: &Config) {
        for (name, sender) in &self.settings {
            if let Some(cluster) = config.cluster(name) {
                sender.send_if_modified(|current| {
                    let new = follower::FollowerSettings::from_config(cluster);
                    let changed = *current != new;
                    *current = new;
                    changed
                });
            }
        }
    }

    /// A receiver of the named cluster's views.
    pub fn watch(&self, cluster: &str) -> Option<watch::Receiver<Arc<ClusterView>>> {
        self.views.get(cluster).cloned()
    }
}
