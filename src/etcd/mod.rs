//! etcd, as rolegate uses it: for each Patroni cluster it follows and for
//! the fleet's registry alike.
//!
//! - [`connector`]: one way to connect (endpoints in turn, TLS, password,
//!   keepalive, a leader required on every request, a probe a read-only
//!   user may make).
//! - [`watch`]: a full read of a prefix, then a watch from the next
//!   revision, again after every failure; it interprets no key.
//! - [`trouble`]: why etcd cannot be followed, and which key of the
//!   configuration to fix when etcd refused its credentials or certificate.
//!
//! The topology (what the keys of a Patroni cluster mean) and the fleet
//! (what its members' keys mean) read from here; nothing here reads them.

pub mod connector;
pub mod trouble;
pub mod watch;
