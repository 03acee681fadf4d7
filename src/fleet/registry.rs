//! Finding the fleet through etcd.
//!
//! Each instance claims the lowest free id under
//! `{prefix}{name}/members/{id}` with a create-only transaction, attached
//! to a lease of `lease_ttl` that it keeps alive; the value names its peer
//! address and the key format. Two instances can never hold one id: the
//! transaction only succeeds while the key does not exist. The members
//! prefix is followed by the same watcher the clusters use
//! ([`crate::etcd::watch`]), which turns it into the peer table.
//!
//! While etcd is unreachable the last peer table and the claimed id stay
//! in force; when etcd answers again and says the lease expired, the
//! instance claims again, its last id first. Until an instance has claimed
//! its first id it issues keys without one (usable only where they were
//! issued). At shutdown the lease is revoked, so peers forget the instance
//! at once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Fleet;
use crate::config::MAX_FLEET_ID;
use crate::etcd::connector::{EtcdConnector, REQUEST_TIMEOUT};
use crate::etcd::watch::{EtcdEvent, EtcdSource, KeyEvent};

/// The cancel key layout peers must share (see [`super::key`]).
pub const KEY_FORMAT: u32 = 1;
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// What an instance writes under its id.
#[derive(Serialize, Deserialize)]
struct Claim {
    address: String,
    key_format: u32,
}

/// Runs until `stop`: claims and keeps an id, and follows the peers.
pub async fn run(fleet: Arc<Fleet>, connector: EtcdConnector, stop: CancellationToken) {
    let prefix = fleet.config.members_prefix();
    let source = EtcdSource::from_connector(connector.clone(), prefix.clone());
    let (events, received) = mpsc::channel(16);
    let watch = tokio::spawn(source.run(events, stop.clone()));
    let follow = tokio::spawn(follow_peers(Arc::clone(&fleet), prefix, received));
    keep_claim(&fleet, &connector, &stop).await;
    let _ = watch.await;
    let _ = follow.await;
}

/// Applies the watcher's snapshots and events to the peer table.
async fn follow_peers(fleet: Arc<Fleet>, prefix: String, mut events: mpsc::Receiver<EtcdEvent>) {
    let mut listed: BTreeMap<u16, Arc<str>> = BTreeMap::new();
    let mut lost = false;
    while let Some(event) = events.recv().await {
        match event {
            EtcdEvent::Snapshot(kvs) => {
                listed = kvs
                    .iter()
                    .filter_map(|(key, value)| parse_claim(&prefix, key, value))
                    .collect();
            }
            EtcdEvent::Events(batch) => {
                for event in batch {
                    match event {
                        KeyEvent::Put { key, value } => {
                            if let Some((id, address)) = parse_claim(&prefix, &key, &value) {
                                listed.insert(id, address);
                            }
                        }
                        KeyEvent::Delete { key } => {
                            if let Some(id) = parse_id(&prefix, &key) {
                                listed.remove(&id);
                            }
                        }
                    }
                }
            }
            // Keep the last table: cancels still reach the peers that were
            // there, which is right far more often than dropping them.
            EtcdEvent::Down(reason) => {
                if !lost {
                    warn!("fleet: etcd lost ({reason}); keeping the last peer table");
                }
                lost = true;
                continue;
            }
        }
        lost = false;
        fleet.set_peers(listed.clone());
        fleet.confirm_peers();
    }
}

fn parse_id(prefix: &str, key: &[u8]) -> Option<u16> {
    let id = std::str::from_utf8(key).ok()?.strip_prefix(prefix)?;
    crate::config::parse_fleet_id(id).ok()
}

/// An instance's id and address, if its claim is one this instance can
/// use (a peer with another key format is ignored, and said so).
fn parse_claim(prefix: &str, key: &[u8], value: &[u8]) -> Option<(u16, Arc<str>)> {
    let id = parse_id(prefix, key)?;
    match serde_json::from_slice::<Claim>(value) {
        Ok(claim) if claim.key_format == KEY_FORMAT => Some((id, claim.address.into())),
        Ok(claim) => {
            warn!(
                peer = id,
                "fleet: instance {id} issues keys of format {} (this one: {KEY_FORMAT}); cancels for it are dropped",
                claim.key_format
            );
            None
        }
        Err(e) => {
            warn!(peer = id, "fleet: unreadable claim for id {id}: {e}");
            None
        }
    }
}

/// A lease this instance holds, and the id claimed under it.
#[derive(Clone, Copy)]
struct Held {
    lease: i64,
    id: u16,
}

/// Claims an id and keeps it alive until `stop`; reconnects as needed.
///
/// While etcd cannot be reached the id stays in force, so that cancels
/// keep working through an etcd outage (nobody can claim an id then). If
/// only this instance lost sight of etcd, its lease may expire and another
/// instance take the id: until this one is back, cancels for either's
/// sessions that reach the other are dropped (never sent to a wrong
/// session: the secrets differ). Once etcd answers and says the lease
/// expired, the instance claims again, the last id first; sessions holding
/// keys with an older id are still found here, as every instance looks a
/// key up locally before it routes by id.
async fn keep_claim(fleet: &Fleet, connector: &EtcdConnector, stop: &CancellationToken) {
    let ttl = fleet.config.lease_ttl.get();
    let mut held: Option<Held> = None;
    let mut last_id: Option<u16> = None;
    let mut retry = RETRY_MIN;
    loop {
        let session = async {
            let mut client = connector.connect().await.map_err(|e| e.to_string())?;
            let claimed = match held {
                Some(old) if lease_alive(&mut client, old.lease).await? => old,
                _ => {
                    let claimed = claim(fleet, &mut client, ttl, last_id).await?;
                    info!(id = claimed.id, "fleet: claimed instance id {}", claimed.id);
                    claimed
                }
            };
            fleet.set_own(claimed.id);
            held = Some(claimed);
            last_id = Some(claimed.id);
            retry = RETRY_MIN;
            let expired = keep_alive(&mut client, claimed.lease, ttl, fleet).await;
            if expired.is_ok() {
                held = None;
                fleet.set_own(0);
            }
            expired.map_err(|e| format!("keeping instance id {}: {e}", claimed.id))
        };
        let stopped = tokio::select! {
            outcome = session => {
                if let Err(reason) = outcome {
                    warn!("fleet: {reason}");
                }
                tokio::select! {
                    () = tokio::time::sleep(retry) => false,
                    () = stop.cancelled() => true,
                }
            }
            () = stop.cancelled() => true,
        };
        if stopped {
            // Also while etcd was away: the lease may still be alive there.
            if let Some(held) = held {
                revoke(connector, held.lease).await;
            }
            return;
        }
        retry = (retry * 2).min(RETRY_MAX);
    }
}

/// Whether `lease` still has time to live; an error when etcd did not say.
async fn lease_alive(client: &mut Client, lease: i64) -> Result<bool, String> {
    let answer = within("checking the lease", client.lease_time_to_live(lease, None)).await?;
    Ok(answer.ttl() > 0)
}

/// Grants a lease and claims the preferred id, or else the lowest free one.
async fn claim(
    fleet: &Fleet,
    client: &mut Client,
    ttl: Duration,
    preferred: Option<u16>,
) -> Result<Held, String> {
    let prefix = fleet.config.members_prefix();
    let grant = client.lease_grant(ttl.as_secs().max(2) as i64, None);
    let lease = within("granting a lease", grant).await?.id();
    let value = serde_json::to_vec(&Claim {
        address: fleet.config.advertise(),
        key_format: KEY_FORMAT,
    })
    .map_err(|e| e.to_string())?;
    let listing = client.get(
        prefix.as_str(),
        Some(GetOptions::new().with_prefix().with_keys_only()),
    );
    let taken: Vec<u16> = within("reading the fleet's ids", listing)
        .await?
        .kvs()
        .iter()
        .filter_map(|kv| parse_id(&prefix, kv.key()))
        .collect();
    let free = preferred
        .into_iter()
        .chain(1..=MAX_FLEET_ID)
        .filter(|id| !taken.contains(id));
    // Each try either wins its id or finds it taken a moment ago by
    // another instance; a few tries settle any race.
    for id in free.take(16) {
        let key = format!("{prefix}{id}");
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.as_str(),
                value.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        if within("claiming an id", client.txn(txn)).await?.succeeded() {
            return Ok(Held { lease, id });
        }
    }
    Err(format!("no free instance id under {prefix}"))
}

/// Renews `lease` every third of `ttl`. Returns `Ok` when etcd says the
/// lease has expired, an error when etcd cannot be reached.
async fn keep_alive(
    client: &mut Client,
    lease: i64,
    ttl: Duration,
    fleet: &Fleet,
) -> Result<(), String> {
    let (mut keeper, mut answers) =
        within("keeping the lease alive", client.lease_keep_alive(lease)).await?;
    loop {
        within("renewing the lease", keeper.keep_alive()).await?;
        match within("renewing the lease", answers.message()).await? {
            Some(answer) if answer.ttl() > 0 => fleet.confirm_peers(),
            Some(_) => {
                warn!("fleet: the lease of this instance's id expired; claiming again");
                return Ok(());
            }
            None => return Err("the lease keep-alive stream ended".to_owned()),
        }
        tokio::time::sleep(ttl / 3).await;
    }
}

/// Gives up the lease, and with it the claim, within [`REQUEST_TIMEOUT`]
/// (the process waits for this at shutdown: see [`crate::proxy`]).
async fn revoke(connector: &EtcdConnector, lease: i64) {
    let revoked = async {
        let mut client = connector.connect().await.map_err(|e| e.to_string())?;
        within("revoking the lease", client.lease_revoke(lease)).await
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, revoked).await {
        Ok(Ok(_)) => info!("fleet: released this instance's id"),
        _ => warn!("fleet: could not release this instance's id; it expires with its lease"),
    }
}

/// Awaits one etcd request within [`REQUEST_TIMEOUT`].
async fn within<T>(
    what: &str,
    request: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: timed out")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_read_back() {
        let prefix = "/rolegate/default/members/";
        let value = br#"{"address":"10.0.0.5:6440","key_format":1}"#;
        assert_eq!(
            parse_claim(prefix, b"/rolegate/default/members/7", value),
            Some((7, "10.0.0.5:6440".into()))
        );
        assert_eq!(
            parse_claim(prefix, b"/rolegate/default/members/0", value),
            None
        );
        assert_eq!(
            parse_claim(prefix, b"/rolegate/other/members/7", value),
            None
        );
        let future = br#"{"address":"10.0.0.5:6440","key_format":2}"#;
        assert_eq!(
            parse_claim(prefix, b"/rolegate/default/members/7", future),
            None
        );
        assert_eq!(
            parse_claim(prefix, b"/rolegate/default/members/7", b"{"),
            None
        );
    }
}
