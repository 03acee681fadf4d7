//! Drawing `/cluster` and `/events` answers as plain-text tables. Pure:
//! JSON in, text out, so it is tested without a running rolegate.
//!
//! Names, hosts and reasons come from etcd and Patroni as anyone who can
//! write there set them, and go to a terminal: every control character in
//! them (escape sequences, carriage returns, newlines) is shown as its
//! escape, never sent as it is.

use std::fmt::Write as _;

use serde_json::Value;

/// The last events shown under the tables.
const EVENTS_SHOWN: usize = 10;

/// The drawn picture and what the exit status depends on.
#[derive(Debug)]
pub struct Picture {
    pub text: String,
    pub every_cluster_has_a_primary: bool,
}

/// The fleet: this instance's id and its peers.
fn draw_fleet(text: &mut String, fleet: &Value) {
    let own = match fleet["id"].as_u64() {
        Some(id) => id.to_string(),
        None => "no id yet".to_owned(),
    };
    text.push_str(&format!(
        "Fleet {}: this instance {own}, peers {}\n",
        s(&fleet["name"]),
        if fleet["discovery"] == "etcd" {
            "found through etcd"
        } else {
            "listed"
        }
    ));
    let rows: Vec<Vec<String>> = fleet["peers"]
        .as_array()
        .map(|peers| {
            peers
                .iter()
                .map(|p| {
                    let seen = p["last_seen"].as_str().unwrap_or("never").to_owned();
                    vec![s(&p["id"]), s(&p["address"]), seen]
                })
                .collect()
        })
        .unwrap_or_default();
    if !rows.is_empty() {
        table(text, &["Peer", "Address", "Last seen"], &rows);
    }
}

/// Draws the clusters (only `only` when given), the listeners and the last
/// events. An answer without the expected shape is an error, not a guess.
pub fn render(cluster: &Value, events: &Value, only: Option<&str>) -> Result<Picture, String> {
    let (cluster, events) = (&defanged(cluster), &defanged(events));
    let clusters = cluster["clusters"]
        .as_array()
        .ok_or("/cluster answered without a \"clusters\" list")?;
    let shown: Vec<&Value> = clusters
        .iter()
        .filter(|c| only.is_none_or(|name| c["cluster"] == name))
        .collect();
    if let (Some(name), true) = (only, shown.is_empty()) {
        return Err(format!("no cluster named {name:?} on this rolegate"));
    }
    let mut text = String::new();
    let mut every_cluster_has_a_primary = true;
    for c in &shown {
        every_cluster_has_a_primary &= c["leader"].is_string();
        draw_cluster(&mut text, c);
    }
    let listeners: Vec<&Value> = cluster["listeners"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter(|l| only.is_none_or(|name| l["cluster"] == name))
                .collect()
        })
        .unwrap_or_default();
    if !listeners.is_empty() {
        text.push_str("Listeners\n");
        let rows: Vec<Vec<String>> = listeners
            .iter()
            .map(|l| {
                let targets: Vec<&str> = l["targets"]
                    .as_array()
                    .map(|t| t.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                vec![
                    s(&l["listen"]),
                    s(&l["cluster"]),
                    s(&l["role"]),
                    if targets.is_empty() {
                        "(none: held)".to_owned()
                    } else {
                        targets.join(", ")
                    },
                    s(&l["held"]),
                ]
            })
            .collect();
        table(
            &mut text,
            &["Listen", "Cluster", "Role", "New sessions go to", "Held"],
            &rows,
        );
    }
    if cluster["fleet"].is_object() {
        draw_fleet(&mut text, &cluster["fleet"]);
    }
    let events = events["events"]
        .as_array()
        .ok_or("/events answered without an \"events\" list")?;
    if !events.is_empty() {
        text.push_str("\nLast events\n");
        for e in events.iter().take(EVENTS_SHOWN) {
            let at = s(&e["at"]).replace('T', " ").replace('Z', "");
            let cluster = e["cluster"].as_str().unwrap_or("(process)");
            let _ = writeln!(text, "  {at}  {cluster}  {}", s(&e["summary"]));
        }
    }
    Ok(Picture {
        text,
        every_cluster_has_a_primary,
    })
}

fn draw_cluster(text: &mut String, c: &Value) {
    let leader = match c["leader"].as_str() {
        Some(leader) => format!("{leader} (confirmed by {})", s(&c["rule"])),
        None => format!(
            "NONE: {}",
            c["no_leader_reason"].as_str().unwrap_or("no reason given")
        ),
    };
    let _ = writeln!(
        text,
        "Cluster {}  leader {}  etcd {}",
        s(&c["cluster"]),
        leader,
        s(&c["sources"]["etcd"])
    );
    if let Some(from) = c["switchover"]["from"].as_str() {
        let to = c["switchover"]["to"].as_str().unwrap_or("any replica");
        let _ = writeln!(text, "switchover under way: from {from} to {to}");
    }
    let sessions = c["sessions"].as_array().cloned().unwrap_or_default();
    let rows: Vec<Vec<String>> = c["members"]
        .as_array()
        .map(|members| {
            members
                .iter()
                .map(|m| {
                    let name = s(&m["name"]);
                    let member_sessions: Vec<String> = sessions
                        .iter()
                        .filter(|x| x["member"] == name.as_str())
                        .map(|x| format!("{} {}", s(&x["sessions"]), s(&x["role"])))
                        .collect();
                    let reads = if m["readable"] == true {
                        "yes".to_owned()
                    } else {
                        format!("no: {}", s(&m["not_readable_because"]))
                    };
                    vec![
                        name,
                        format!("{}:{}", s(&m["host"]), s(&m["port"])),
                        s(&m["role"]),
                        s(&m["patroni_state"]),
                        s(&m["timeline"]),
                        s(&m["lag_bytes"]),
                        rest(&m["rest"]),
                        reads,
                        if member_sessions.is_empty() {
                            "0".to_owned()
                        } else {
                            member_sessions.join(", ")
                        },
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        text,
        &[
            "Member", "Address", "Role", "State", "TL", "Lag", "REST", "Reads", "Sessions",
        ],
        &rows,
    );
    text.push('\n');
}

/// The last REST check in a few words.
fn rest(r: &Value) -> String {
    if r.is_null() {
        return "-".to_owned();
    }
    let verdict = if r["reachable"] == false {
        "unreachable"
    } else if r["primary"] == true {
        "primary"
    } else if r["replica"] == true {
        "replica"
    } else {
        "neither"
    };
    match r["latency_ms"].as_f64() {
        Some(ms) => format!("{verdict} {ms:.1} ms"),
        None => verdict.to_owned(),
    }
}

/// A JSON value as a cell: strings bare, null empty.
fn s(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `value` with every control character in its strings (keys included)
/// written as an escape (`\u{1b}`).
fn defanged(value: &Value) -> Value {
    let text = |s: &str| -> String {
        if !s.chars().any(char::is_control) {
            return s.to_owned();
        }
        s.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_unicode().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect()
    };
    match value {
        Value::String(s) => Value::String(text(s)),
        Value::Array(items) => Value::Array(items.iter().map(defanged).collect()),
        Value::Object(fields) => {
            Value::Object(fields.iter().map(|(k, v)| (text(k), defanged(v))).collect())
        }
        other => other.clone(),
    }
}

/// A table with a header, columns as wide as their widest cell.
fn table(text: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |text: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let padded: Vec<String> = cells
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(text, "{}", padded.join(" | ").trim_end());
    };
    line(text, &mut header.iter().copied());
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    let _ = writeln!(text, "{}", rule.join("-+-"));
    for row in rows {
        line(text, &mut row.iter().map(String::as_str));
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn answers(leader: Option<&str>) -> (Value, Value) {
        let cluster = json!({
            "version": "0.1.0",
            "clusters": [{
                "cluster": "demo", "rule": "etcd+patroni", "leader": leader,
                "no_leader_reason": "the leader key is empty",
                "sources": {"etcd": "up"},
                "switchover": null,
                "members": [
                    {"name": "node1", "host": "127.0.0.1", "port": 5432, "role": "primary",
                     "patroni_state": "running", "timeline": 3, "lag_bytes": null,
                     "readable": false, "not_readable_because": "it is the leader",
                     "rest": {"reachable": true, "primary": true, "replica": false, "latency_ms": 1.5}},
                    {"name": "node2", "host": "127.0.0.1", "port": 5433, "role": "replica",
                     "patroni_state": "streaming", "timeline": 3, "lag_bytes": 0,
                     "readable": true, "not_readable_because": null,
                     "rest": {"reachable": false, "primary": null, "replica": null, "latency_ms": 1000.0}}
                ],
                "sessions": [{"member": "node1", "role": "primary", "sessions": 4}]
            }],
            "listeners": [
                {"listen": "127.0.0.1:6432", "cluster": "demo", "role": "primary", "targets": ["node1"], "held": 0},
                {"listen": "127.0.0.1:6433", "cluster": "demo", "role": "replica", "targets": [], "held": 2}
            ]
        });
        let events = json!({"events": [
            {"at": "2026-12-02T10:00:01.250Z", "cluster": "demo", "summary": "node1 confirmed as leader by etcd+patroni"},
            {"at": "2026-12-02T10:00:00.000Z", "cluster": null, "summary": "configuration reloaded from proxy.toml"}
        ], "last_failover": {}});
        (cluster, events)
    }

    #[test]
    fn a_cluster_with_a_leader_is_drawn_in_full() {
        let (cluster, events) = answers(Some("node1"));
        let picture = render(&cluster, &events, None).expect("a picture");
        assert!(picture.every_cluster_has_a_primary);
        let text = &picture.text;
        for wanted in [
            "Cluster demo  leader node1 (confirmed by etcd+patroni)  etcd up",
            "node1  | 127.0.0.1:5432 | primary",
            "primary 1.5 ms",
            "no: it is the leader",
            "4 primary",
            "unreachable 1000.0 ms",
            "(none: held)",
            "2026-12-02 10:00:01.250  demo  node1 confirmed as leader",
            "(process)  configuration reloaded",
        ] {
            assert!(text.contains(wanted), "{wanted:?} missing from:\n{text}");
        }
        let header = text.lines().nth(1).expect("a header");
        let rule = text.lines().nth(2).expect("a rule");
        assert_eq!(header.find('|'), rule.find('+'), "columns line up:\n{text}");
    }

    #[test]
    fn no_leader_means_exit_one_and_an_unknown_cluster_is_an_error() {
        let (cluster, events) = answers(None);
        let picture = render(&cluster, &events, Some("demo")).expect("a picture");
        assert!(!picture.every_cluster_has_a_primary);
        assert!(picture
            .text
            .contains("leader NONE: the leader key is empty"));
        let error = render(&cluster, &events, Some("other")).expect_err("no such cluster");
        assert!(error.contains("\"other\""), "{error}");
        assert!(render(&json!({}), &events, None).is_err());
    }

    #[test]
    fn control_characters_from_the_dcs_are_escaped() {
        let (mut cluster, mut events) = answers(None);
        cluster["clusters"][0]["members"][0]["name"] = json!("pg1\u{1b}[2J\u{1b}]0;owned\u{7}");
        cluster["clusters"][0]["members"][0]["host"] = json!("10.0.0.1\r\nfake row");
        cluster["clusters"][0]["no_leader_reason"] = json!("\u{9b}31m");
        events["events"] = json!([{"at": "2026-01-01T00:00:00Z", "cluster": "main\u{1b}[1A", "summary": "x\u{8}y"}]);
        let picture = render(&cluster, &events, None).expect("renders");
        assert!(
            !picture.text.chars().any(|c| c.is_control() && c != '\n'),
            "{:?}",
            picture.text
        );
        assert!(picture.text.contains("pg1\\u{1b}[2J"), "{}", picture.text);
        assert!(
            picture.text.contains("10.0.0.1\\u{d}\\u{a}fake row"),
            "{}",
            picture.text
        );
    }

    #[test]
    fn a_fleet_is_drawn_with_its_peers() {
        let (mut cluster, events) = answers(Some("node1"));
        cluster["fleet"] = json!({
            "name": "main", "id": 2, "discovery": "etcd",
            "peers": [{"id": 1, "address": "10.0.0.11:6440", "last_seen": "2026-12-02T10:00:00.000Z"},
                      {"id": 3, "address": "10.0.0.13:6440", "last_seen": null}],
        });
        let text = render(&cluster, &events, None).expect("a picture").text;
        for wanted in [
            "Fleet main: this instance 2, peers found through etcd",
            "1    | 10.0.0.11:6440 | 2026-12-02T10:00:00.000Z",
            "3    | 10.0.0.13:6440 | never",
        ] {
            assert!(text.contains(wanted), "{wanted:?} missing from:\n{text}");
        }
    }
}
