//! The follower's own behaviour, with the etcd source replaced: what it
//! does when the task that follows etcd fails.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::config::Config;

fn cluster_config() -> ClusterConfig {
    let text = r#"
[clusters.demo]
etcd = ["http://127.0.0.1:9"]

[[listeners]]
listen = "127.0.0.1:0"
cluster = "demo"
role = "primary"
"#;
    let config = Config::parse(text, Path::new("test.toml")).expect("config");
    config.clusters["demo"].clone()
}

/// The etcd watch task panics (a bug): the follower says so at once
/// (etcd is lost, `on_etcd_loss` applies, the report shows it) and starts
/// the task again, which follows etcd as before.
#[tokio::test]
async fn a_failed_etcd_watch_task_is_loud_and_restarted() {
    let starts = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&starts);
    let starter: SourceStarter = Box::new(move |delay, events| {
        let attempt = counter.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = events.send(EtcdEvent::Snapshot(Vec::new())).await;
            if attempt == 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                panic!("a bug in the etcd watcher");
            }
            std::future::pending::<()>().await;
        })
    });
    // As main does; another test may have installed it already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let shutdown = CancellationToken::new();
    let following = follow(
        "demo",
        &cluster_config(),
        shutdown.clone(),
        CancellationToken::new(),
        Some(starter),
        crate::events::EventLog::new(),
    )
    .expect("follow");
    let mut reports = following.reports.clone();
    let follower = tokio::spawn(following.run);
    let mut seen: Vec<&'static str> = Vec::new();
    let watched = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let etcd = reports.borrow_and_update().sources.etcd;
            if seen.last() != Some(&etcd) {
                seen.push(etcd);
            }
            if seen.ends_with(&["up", "down", "up"]) {
                return;
            }
            if reports.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    shutdown.cancel();
    let _ = follower.await;
    assert!(watched.is_ok(), "etcd went {seen:?}");
    assert!(seen.ends_with(&["up", "down", "up"]), "etcd went {seen:?}");
    assert_eq!(starts.load(Ordering::SeqCst), 2, "started again once");
}
