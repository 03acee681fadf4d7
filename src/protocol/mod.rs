//! The PostgreSQL wire format: bytes to messages and back.
//!
//! Nothing here does I/O or decides policy. Decoders take a buffer, check
//! every length against a named maximum before trusting it, and either
//! return a complete message or ask for more bytes without consuming any.

pub mod encode;
pub mod error;
pub mod frame;
pub mod message;
pub mod notify_pid;
pub mod proxy_header;
pub mod rewrite;
pub mod sasl;
pub mod startup;
pub mod walk;

pub use error::{ProtocolError, SqlState};
