//! The hash map for tables that every session touches as it starts and
//! ends: the session counts, the per-member metrics, the login gates and
//! the cancel registry.
//!
//! The standard map hashes with SipHash-1-3, which cost about 3,800
//! instructions per connection in these tables (callgrind, `pgbench -C`),
//! some 5% of rolegate's user-space work on a new connection. foldhash is
//! hashbrown's own default: several times cheaper on short keys, and seeded
//! at random per map, so keys cannot be chosen to collide without knowing
//! the seed. That suffices here: the keys are names from the configuration
//! and the cluster, process ids rolegate drew at random, and client
//! addresses, which a client picks only within the addresses it holds.

use std::collections::HashMap;

/// A `HashMap` hashed with foldhash (see the module doc).
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
