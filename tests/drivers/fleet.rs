//! The drivers through a fleet: three rolegates that find each other
//! through the lab's etcd, behind round-robin balancers of the test's own
//! (one for rw, one for ro). A client's cancel connection is the next
//! connection after its session's, so the balancer sends it to another
//! instance, which must pass it on; the metrics of the three instances
//! show that each cancel travelled from one instance to another and on to
//! the member.

use super::*;

use support::balancer::{Balancer, Header};

pub(crate) struct FleetEnv {
    pub instances: Vec<Rolegate>,
    pub rw: Balancer,
    pub ro: Balancer,
}

impl FleetEnv {
    pub(crate) fn start(lab: &Lab, root: &Path) -> Self {
        let name = format!("drivers-{}", std::process::id());
        let mut instances = Vec::new();
        let mut rw_targets = Vec::new();
        let mut ro_targets = Vec::new();
        for i in 0..3 {
            let (rw, ro, peer) = (free_port(), free_port(), free_port());
            let config = lab.rolegate_config(
                rw,
                ro,
                &lab.etcd_line(),
                &format!(
                    "[limits]\nhold_timeout = \"30s\"\n\n[fleet]\nlisten = \"127.0.0.1:{peer}\"\nname = \"{name}\"\n{}\nlease_ttl = \"3s\"\n",
                    lab.etcd_line()
                ),
            );
            instances.push(Rolegate::start(root, &format!("fleet{i}"), &config));
            rw_targets.push(SocketAddr::from(([127, 0, 0, 1], rw)));
            ro_targets.push(SocketAddr::from(([127, 0, 0, 1], ro)));
        }
        let fleet = Self {
            instances,
            rw: Balancer::start(rw_targets, Header::None),
            ro: Balancer::start(ro_targets, Header::None),
        };
        fleet.wait_for_peers();
        fleet
    }

    /// Waits until every instance holds an id and knows the two others.
    fn wait_for_peers(&self) {
        wait_until(Duration::from_secs(30), "the fleet to find itself", || {
            self.instances
                .iter()
                .all(|r| {
                    let Some((200, body)) = r.admin_get("/cluster") else {
                        return false;
                    };
                    let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                    json["fleet"]["id"].is_u64()
                        && json["fleet"]["peers"]
                            .as_array()
                            .is_some_and(|p| p.len() == 2)
                })
                .then_some(())
        });
    }

    fn ports(&self) -> Ports {
        Ports {
            rw: self.rw.port,
            ro: self.ro.port,
            how: "through a fleet of three behind a round-robin balancer".to_owned(),
        }
    }

    /// The sum over the instances of a cancel outcome.
    fn cancels(&self, via: &str, outcome: &str) -> f64 {
        self.instances
            .iter()
            .map(|r| {
                r.metric(
                    "rolegate_cancel_requests_total",
                    &format!("via=\"{via}\",outcome=\"{outcome}\""),
                )
            })
            .sum()
    }
}

/// One client's scenario through the fleet. For `cancel`, each cancel
/// must have been passed from the instance it reached to the session's.
pub(crate) fn fleet_trial(env: &Env, client: Client, scenario: &str) -> Result<(), Failed> {
    let fleet = &env.fleet;
    let passed_before = fleet.cancels("client", "to_peer");
    let delivered_before = fleet.cancels("peer", "forwarded");
    let mut checks = run_scenario(env, client, scenario, &fleet.ports());
    if scenario == "cancel" {
        let cancels = checks.len() as f64;
        let tally = || {
            (
                fleet.cancels("client", "to_peer") - passed_before,
                fleet.cancels("peer", "forwarded") - delivered_before,
            )
        };
        let settled =
            support::holds_within(Duration::from_secs(5), || tally() == (cancels, cancels));
        let (passed, delivered) = tally();
        checks.push(Check {
            ok: cancels > 0.0 && settled,
            listener: "-".to_owned(),
            scenario: "cancel_via_another_instance".to_owned(),
            detail: format!(
                "{cancels} cancels: {passed} passed to another instance (to_peer), {delivered} delivered from a peer to the member"
            ),
        });
    }
    for c in &checks {
        println!("    fleet {}: {}", client.name(), c.line());
    }
    let failed: Vec<String> = checks.iter().filter(|c| !c.ok).map(Check::line).collect();
    if failed.is_empty() && !checks.is_empty() {
        return Ok(());
    }
    let logs: Vec<String> = fleet
        .instances
        .iter()
        .map(|r| {
            let log = r.log();
            let lines: Vec<&str> = log.lines().collect();
            lines[lines.len().saturating_sub(15)..].join("\n")
        })
        .collect();
    Err(format!(
        "{} {scenario} through the fleet:\n  {}\nlogs of the instances (tails):\n{}",
        client.name(),
        failed.join("\n  "),
        logs.join("\n---\n")
    )
    .into())
}
