//! rolegate: a role-aware PostgreSQL wire-protocol proxy for Patroni
//! clusters.
//!
//! # Layout
//!
//! The module tree follows a connection:
//!
//! - [`config`]: `proxy.toml`, its defaults and validation.
//! - [`protocol`]: the wire format, bytes to messages and back; no I/O.
//! - [`auth`]: logins rolegate ends itself on pooled listeners: stored
//!   secrets, SCRAM and md5 on both sides.
//! - [`pool`]: server connections lent to pooled clients, per (listener,
//!   member, database, role), and the relay that knows when one is clean.
//! - [`server`]: accept, handshake, session, backend connect,
//!   authentication relay, byte relay, cancel routing, PROXY protocol.
//! - [`fleet`]: instances behind one address: issued cancel keys, peers
//!   found through etcd (or listed), cancels passed between them.
//! - [`etcd`]: connecting to etcd, watching a prefix, and why etcd cannot
//!   be followed; used by the topology and the fleet alike.
//! - [`router`]: which member a session goes to, and whether it still fits.
//! - [`topology`]: the published [`topology::ClusterView`] of each cluster.
//! - [`events`]: the timeline of what happened to each cluster.
//! - [`admin`]: the HTTP endpoint for `/metrics`, health, readiness,
//!   `/cluster`, `/events` and the status page.
//! - [`status`]: `rolegate status`, the admin endpoint's picture as a table.
//! - [`metrics`]: every exported metric, in one place.
//! - [`proxy`]: assembles the parts and runs them until a signal.
//! - [`running`]: the parts a configuration makes, kept current by reloads.
//! - [`supervisor`]: owns every long-lived task; one that ends unasked
//!   is logged, counted and ends the process.
//! - [`reload`]: SIGHUP re-reads `proxy.toml` and applies what it can.
//! - [`handover`]: a new process takes over the listening sockets of the
//!   one it replaces, so restarts refuse no connection.
//! - [`proc_net`]: which processes hold a socket, for naming another
//!   program on rolegate's addresses.
//! - [`source_places`]: places per client address (IPv6 by its /64),
//!   shared by the cancel throttle and the admin endpoint.
//! - [`tls`]: rustls configurations for clients and backends.
//! - [`logging`]: the `tracing` subscriber.

pub mod admin;
pub mod auth;
pub mod config;
pub(crate) mod etcd;
pub(crate) mod events;
pub(crate) mod fast_map;
pub(crate) mod fleet;
pub(crate) mod handover;
pub mod logging;
pub mod metrics;
pub(crate) mod pool;
pub(crate) mod proc_net;
pub mod protocol;
pub mod proxy;
pub(crate) mod reload;
pub(crate) mod router;
pub(crate) mod running;
pub(crate) mod server;
pub(crate) mod source_places;
pub mod status;
pub(crate) mod supervisor;
pub mod tls;
pub mod topology;
