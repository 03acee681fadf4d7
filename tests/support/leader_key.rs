//! The leader key as etcd itself reports it: the fault and container
//! suites time "no write acknowledged after the key expired" against it.

use std::time::Instant;

use tokio::sync::watch;

/// The first moment the leader key stops naming `leader` (expired,
/// deleted or taken over), as etcd itself reports it; `None` if that did
/// not happen before `stop`.
pub async fn leaves(
    etcd: String,
    leader: String,
    mut stop: watch::Receiver<bool>,
) -> Result<Option<Instant>, String> {
    let mut client = etcd_client::Client::connect([etcd], None)
        .await
        .map_err(|e| e.to_string())?;
    let key = "/service/demo/leader";
    let mut stream = client.watch(key, None).await.map_err(|e| e.to_string())?;
    let current = client.get(key, None).await.map_err(|e| e.to_string())?;
    if current.kvs().first().map(|kv| kv.value()) != Some(leader.as_bytes()) {
        return Err(format!(
            "the leader key does not name {leader} at the start"
        ));
    }
    loop {
        let message = tokio::select! {
            message = stream.message() => message.map_err(|e| e.to_string())?,
            _ = stop.changed() => return Ok(None),
        };
        let Some(response) = message else {
            return Err("the etcd watch ended".to_owned());
        };
        let left = response.events().iter().any(|event| {
            event.event_type() == etcd_client::EventType::Delete
                || event.kv().map(|kv| kv.value()) != Some(leader.as_bytes())
        });
        if left {
            return Ok(Some(Instant::now()));
        }
    }
}
