//! Authentication terminated by rolegate, for pooled listeners.
//!
//! A passthrough session relays the login between client and server
//! (`server::authenticate`). A pooled client cannot: the server it will use
//! is already logged in, or is logged in later on its behalf. So rolegate
//! checks the client itself against a stored secret (PostgreSQL's own
//! `pg_authid.rolpassword` value, from an `auth_file` or read from the
//! cluster by `auth_query`) and logs in to
//! servers with what the client's proof yields:
//!
//! - SCRAM-SHA-256: the client's proof XOR the client signature is its
//!   ClientKey, whose hash the secret stores. The ClientKey is enough to
//!   prove the same password to PostgreSQL, so no password is ever held
//!   (PgBouncer 1.14+ does the same).
//! - md5: the stored hash is what the server's challenge is answered with.
//!
//! The parts: [`secret`] (parsing stored secrets), [`userlist`] (the
//! `auth_file`), [`auth_query`] and [`cache`] (secrets read from the
//! cluster as `auth_user`), [`scram`] and [`md5`] (the arithmetic, no I/O),
//! [`client_login`] (the client's side of a pooled login) and
//! [`server_login`] (rolegate logging in to a server).

pub(crate) mod auth_query;
pub(crate) mod cache;
pub(crate) mod client_login;
pub(crate) mod md5;
pub mod scram;
pub mod secret;
pub(crate) mod server_login;
pub mod userlist;
