//! `[fleet]`: several rolegates behind one address that pass cancel
//! requests to each other (see [`crate::fleet`]).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::{parse_host_port, parse_socket_addr, Duration, EtcdAccess, KeyedError};

/// The highest instance id: ids take 11 bits of an issued process id.
pub const MAX_FLEET_ID: u16 = 2047;

/// `[fleet]`: this instance's place in a fleet.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// Where peers send the cancel requests they forward (`IP:PORT`).
    pub listen: String,
    /// What peers connect to (`HOST:PORT`); defaults to `listen`.
    /// `${NAME}` is replaced by the environment variable NAME, so that one
    /// file serves every pod (`"${POD_IP}:6440"`).
    #[serde(default)]
    pub advertise: Option<String>,
    /// Several fleets may share one etcd under different names.
    #[serde(default = "default_name")]
    pub name: String,
    /// Where instance ids are claimed.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// etcd v3 endpoints where instances find each other.
    #[serde(default)]
    pub etcd: Vec<String>,
    #[serde(default)]
    pub etcd_user: Option<String>,
    #[serde(default)]
    pub etcd_password: Option<String>,
    #[serde(default)]
    pub etcd_ca: Option<PathBuf>,
    #[serde(default)]
    pub etcd_cert: Option<PathBuf>,
    #[serde(default)]
    pub etcd_key: Option<PathBuf>,
    /// The lease an instance's claim lives under.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl: Duration,
    /// Static fleets (no `etcd`): this instance's id, 1 to 2047.
    #[serde(default)]
    pub id: Option<u16>,
    /// Static fleets: the other instances, `"ID" = "HOST:PORT"`.
    #[serde(default)]
    pub peers: BTreeMap<String, String>,
}

fn default_name() -> String {
    "default".to_owned()
}
fn default_prefix() -> String {
    "/rolegate/".to_owned()
}
fn default_lease_ttl() -> Duration {
    Duration::from_secs(10)
}

impl FleetConfig {
    /// The address peers connect to, environment variables expanded.
    pub fn advertise(&self) -> String {
        match &self.advertise {
            Some(text) => expand_env(text).unwrap_or_else(|_| text.clone()),
            None => self.listen.clone(),
        }
    }

    /// The etcd keys this fleet's instances claim their ids under.
    pub fn members_prefix(&self) -> String {
        format!("{}{}/members/", self.prefix, self.name)
    }

    pub fn etcd_access(&self) -> EtcdAccess {
        etcd_access_of!(self)
    }

    /// The static peer map with parsed ids.
    pub fn static_peers(&self) -> Vec<(u16, String)> {
        self.peers
            .iter()
            .filter_map(|(id, addr)| Some((id.parse().ok()?, addr.clone())))
            .collect()
    }
}

/// Replaces each `${NAME}` in `text` with the environment variable NAME.
fn expand_env(text: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("{text:?} has a '${{' without its '}}'"))?;
        let name = &after[..end];
        let value = std::env::var(name).map_err(|_| {
            format!("{text:?} names the environment variable {name}, which is not set")
        })?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Parses an instance id of 1 to [`MAX_FLEET_ID`].
pub fn parse_fleet_id(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(id @ 1..=MAX_FLEET_ID) => Ok(id),
        _ => Err(format!(
            "{text:?} is not an instance id (1 to {MAX_FLEET_ID})"
        )),
    }
}

/// The rules of `[fleet]`, as the dotted key and a message.
pub(super) fn validate(fleet: &FleetConfig) -> Result<(), KeyedError> {
    let key = |field: &str| format!("fleet.{field}");
    let listen = parse_socket_addr(&fleet.listen).map_err(|m| KeyedError::new(key("listen"), m))?;
    match &fleet.advertise {
        Some(advertise) => {
            let expanded = expand_env(advertise).map_err(|m| KeyedError::new(key("advertise"), m))?;
            parse_host_port(&expanded).map_err(|m| KeyedError::new(key("advertise"), m))?;
        }
        None if listen.ip().is_unspecified() => {
            return Err(KeyedError::new(key("advertise"), format!(
                    "peers cannot connect to {listen} (fleet.listen); set the address they can reach, e.g. advertise = \"${{POD_IP}}:{}\"",
                    listen.port()
                )))
        }
        None => {}
    }
    if fleet.name.is_empty() || fleet.name.contains('/') {
        return Err(KeyedError::new(
            key("name"),
            format!("{:?} must be a non-empty name without '/'", fleet.name),
        ));
    }
    if !fleet.prefix.starts_with('/') || !fleet.prefix.ends_with('/') {
        return Err(KeyedError::new(
            key("prefix"),
            format!("{:?} must start and end with '/'", fleet.prefix),
        ));
    }
    if fleet.lease_ttl.get() < std::time::Duration::from_secs(2) {
        return Err(KeyedError::new(key("lease_ttl"), "must be at least 2s"));
    }
    if fleet.etcd.is_empty() {
        let Some(id) = fleet.id else {
            return Err(KeyedError::new(key("id"), "a fleet needs etcd (fleet.etcd, where instances claim their ids) or a static id (fleet.id with fleet.peers)"));
        };
        parse_fleet_id(&id.to_string()).map_err(|m| KeyedError::new(key("id"), m))?;
        for (peer, addr) in &fleet.peers {
            let peer_key = || key(&format!("peers.{peer}"));
            let peer_id = parse_fleet_id(peer).map_err(|m| KeyedError::new(peer_key(), m))?;
            if peer_id == id {
                return Err(KeyedError::new(
                    peer_key(),
                    format!("{id} is this instance's own id (fleet.id)"),
                ));
            }
            parse_host_port(addr).map_err(|m| KeyedError::new(peer_key(), m))?;
        }
    } else {
        // The etcd access itself is checked with the clusters' (in
        // `validate`).
        if fleet.id.is_some() || !fleet.peers.is_empty() {
            let which = if fleet.id.is_some() { "id" } else { "peers" };
            return Err(KeyedError::new(key(which), "with fleet.etcd, instances claim their ids in etcd; fleet.id and fleet.peers are for fleets without etcd"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertise_takes_environment_variables() {
        std::env::set_var("ROLEGATE_TEST_POD_IP", "10.1.2.3");
        assert_eq!(
            expand_env("${ROLEGATE_TEST_POD_IP}:6440"),
            Ok("10.1.2.3:6440".to_owned())
        );
        assert!(expand_env("${ROLEGATE_TEST_UNSET_NAME}:6440").is_err());
        assert!(expand_env("${ROLEGATE_TEST_POD_IP:6440").is_err());
        assert_eq!(expand_env("plain:1"), Ok("plain:1".to_owned()));
    }
}
