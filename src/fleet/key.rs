//! The cancel keys a fleet member issues to its clients.
//!
//! A CancelRequest carries nothing but the key from BackendKeyData, and
//! behind a load balancer it reaches any instance. So the key must say
//! which instance owns the session: its process id is positive (31 bits)
//! and holds the instance id in its top [`ID_BITS`] bits and
//! [`RANDOM_BITS`] random bits below. The secret is fresh from the
//! operating system's CSPRNG: 4 bytes under protocol 3.0 (the only length
//! it allows), 32 under 3.2 (as PostgreSQL 18 issues them). Id 0 is an
//! instance that has no claimed id yet: its keys can only be looked up
//! where they were issued.

use bytes::Bytes;

use crate::protocol::startup::CancelKey;

pub const ID_BITS: u32 = 11;
pub const RANDOM_BITS: u32 = 20;
const RANDOM_MASK: u32 = (1 << RANDOM_BITS) - 1;
/// The secret length of a protocol 3.2 session's issued key.
const SECRET_3_2: usize = 32;

/// The instance id a client key names.
pub fn instance_of(pid: u32) -> u16 {
    ((pid >> RANDOM_BITS) & ((1 << ID_BITS) - 1)) as u16
}

/// A process id for instance `id` from 32 random bits; never 0.
pub fn compose(id: u16, random: u32) -> u32 {
    let pid = (u32::from(id) << RANDOM_BITS) | (random & RANDOM_MASK);
    if pid == 0 {
        1
    } else {
        pid
    }
}

/// The secret length to issue for a session whose backend issued
/// `backend_len` bytes: a 3.0 session has exactly 4, anything longer is
/// 3.2 or later.
pub fn secret_len(backend_len: usize) -> usize {
    if backend_len <= 4 {
        4
    } else {
        SECRET_3_2
    }
}

/// A fresh key for instance `id`, for a session whose backend secret is
/// `backend_len` bytes long. Fails only if the OS has no randomness.
pub fn issue(id: u16, backend_len: usize) -> Result<CancelKey, getrandom::Error> {
    let mut random = [0u8; 4];
    getrandom::fill(&mut random)?;
    let mut secret = vec![0u8; secret_len(backend_len)];
    getrandom::fill(&mut secret)?;
    Ok(CancelKey {
        pid: compose(id, u32::from_be_bytes(random)),
        secret: Bytes::from(secret),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MAX_FLEET_ID;

    #[test]
    fn the_id_survives_and_the_pid_stays_positive() {
        for id in [0, 1, 2, 1000, MAX_FLEET_ID] {
            for random in [0, 1, 0xdead_beef, u32::MAX] {
                let pid = compose(id, random);
                assert_eq!(instance_of(pid), id, "id {id} random {random:#x}");
                assert!(pid > 0 && pid <= i32::MAX as u32, "pid {pid:#x}");
            }
        }
    }

    #[test]
    fn secrets_follow_the_protocol() {
        let old = issue(3, 4).expect("random");
        assert_eq!(old.secret.len(), 4);
        assert_eq!(instance_of(old.pid), 3);
        let new = issue(3, 32).expect("random");
        assert_eq!(new.secret.len(), 32);
        assert_ne!(issue(3, 32).expect("random").secret, new.secret);
    }
}
