//! What Patroni and etcd hand rolegate: member JSON, REST status bodies,
//! `/cluster` listings, the dynamic config, failover (with `scheduled_at`),
//! sync and failsafe keys, applied to the DCS mirror as etcd puts and
//! deletes. Never panics on any input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rolegate::topology::dcs::DcsState;
use rolegate::topology::patroni_data::{
    ClusterListing, DynamicConfig, FailoverIntent, MemberRecord, RestStatus, SyncKey,
};

const KEYS: [&[u8]; 9] = [
    b"/service/demo/leader",
    b"/service/demo/members/pg1",
    b"/service/demo/config",
    b"/service/demo/status",
    b"/service/demo/failover",
    b"/service/demo/optime/leader",
    b"/service/demo/members/",
    b"/service/demo/sync",
    b"/service/demo/failsafe",
];

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = MemberRecord::parse(data) {
        let _ = (record.postgres_address(), record.tag("noloadbalance"), record.is_streaming());
    }
    let _ = RestStatus::parse(data);
    if let Ok(listing) = ClusterListing::parse(data) {
        for member in &listing.members {
            let _ = member.to_record().postgres_address();
        }
    }
    let _ = DynamicConfig::parse(data).map(|c| c.ttl_secs());
    if let Some(intent) = FailoverIntent::parse(data) {
        let now = std::time::SystemTime::now();
        let _ = (intent.scheduled_for(), intent.is_due_switchover_from("pg1", now));
    }
    if let Some(sync) = SyncKey::parse(data) {
        let _ = sync.standbys_of("pg1");
    }
    let mut state = DcsState::default();
    for key in KEYS {
        let _ = state.apply_put("/service/demo/", key, data);
    }
    let _ = (state.leader_wal_position(), state.is_synchronous("pg1"));
    for key in KEYS {
        let _ = state.apply_delete("/service/demo/", key);
    }
});
