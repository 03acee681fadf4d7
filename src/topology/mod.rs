//! Who is who in each cluster: sources of truth, fused into one
//! [`ClusterView`] per cluster and published to readers.
//!
//! `topology` knows nothing of client sessions. It hands out
//! `watch::Receiver<Arc<ClusterView>>`s; the router reads them for new
//! sessions and each session watches its own to learn it must end.

pub mod static_cluster;
pub mod view;

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::watch;

use crate::config::Config;

pub use view::{ClusterView, Member, MemberRole};

/// The published views of every configured cluster.
pub struct Topology {
    views: HashMap<String, watch::Receiver<Arc<ClusterView>>>,
    /// Senders of views that never change; kept so receivers never see a
    /// closed channel.
    _static_senders: Vec<watch::Sender<Arc<ClusterView>>>,
}

impl Topology {
    /// Builds the view sources of every cluster in `config`.
    pub fn start(config: &Config) -> anyhow::Result<Self> {
        let mut views = HashMap::new();
        let mut senders = Vec::new();
        for (name, cluster) in &config.clusters {
            let view = static_cluster::static_view(name, cluster)
                .map_err(|e| anyhow::anyhow!("clusters.{name}: {e}"))?;
            let (tx, rx) = watch::channel(Arc::new(view));
            senders.push(tx);
            views.insert(name.clone(), rx);
        }
        Ok(Self {
            views,
            _static_senders: senders,
        })
    }

    /// A receiver of the named cluster's views.
    pub fn watch(&self, cluster: &str) -> Option<watch::Receiver<Arc<ClusterView>>> {
        self.views.get(cluster).cloned()
    }
}
