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
pub mod rest;
pub mod static_cluster;
pub mod view;

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

pub use view::{ClusterView, Handover, Member, MemberRole};

/// The published views of every configured cluster.
pub struct Topology {
    views: HashMap<String, watch::Receiver<Arc<ClusterView>>>,
    /// Senders of views that never change; kept so receivers never see a
    /// closed channel.
    _static_senders: Vec<watch::Sender<Arc<ClusterView>>>,
    /// The followers of Patroni clusters; each returns its cluster's name.
    pub tasks: JoinSet<String>,
}

impl Topology {
    /// Starts the view source of every cluster in `config`. Followers run
    /// until `shutdown` is cancelled.
    pub fn start(config: &Config, shutdown: &CancellationToken) -> anyhow::Result<Self> {
        let mut views = HashMap::new();
        let mut senders = Vec::new();
        let mut tasks = JoinSet::new();
        for (name, cluster) in &config.clusters {
            if cluster.is_static() {
                let view = static_cluster::static_view(name, cluster)
                    .map_err(|e| anyhow::anyhow!("clusters.{name}: {e}"))?;
                let (tx, rx) = watch::channel(Arc::new(view));
                senders.push(tx);
                views.insert(name.clone(), rx);
            } else {
                let (rx, follow) = follower::start(name, cluster, shutdown.child_token())
                    .map_err(|e| anyhow::anyhow!("clusters.{name}: {e}"))?;
                views.insert(name.clone(), rx);
                let name = name.clone();
                tasks.spawn(async move {
                    follow.await;
                    name
                });
            }
        }
        Ok(Self {
            views,
            _static_senders: senders,
            tasks,
        })
    }

    /// A receiver of the named cluster's views.
    pub fn watch(&self, cluster: &str) -> Option<watch::Receiver<Arc<ClusterView>>> {
        self.views.get(cluster).cloned()
    }
}
