//! PostgreSQL's md5 method: the client answers a 4-byte salt with
//! `"md5" || hex(md5(hex(md5(password || role)) || salt))`. The stored
//! secret is the inner hex digest, so it answers any challenge itself:
//! rolegate checks a client's answer and answers a server's challenge with
//! the same arithmetic.

use md5::{Digest, Md5};
use subtle::ConstantTimeEq;

/// The answer to `salt` for the stored digest (32 hex digits).
pub fn answer(stored: &[u8; 32], salt: [u8; 4]) -> String {
    let mut hasher = Md5::new();
    hasher.update(stored);
    hasher.update(salt);
    let digest = hasher.finalize();
    let mut out = String::with_capacity(35);
    out.push_str("md5");
    for byte in digest {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

/// Whether a client's answer to `salt` proves the stored digest.
pub fn verify(stored: &[u8; 32], salt: [u8; 4], client_answer: &[u8]) -> bool {
    bool::from(answer(stored, salt).as_bytes().ct_eq(client_answer))
}

/// The digest PostgreSQL stores for `password` of `role`: how
/// `auth_user` answers an md5 challenge with its password.
pub fn stored(password: &str, role: &str) -> [u8; 32] {
    let digest = Md5::digest(format!("{password}{role}"));
    let mut out = [0u8; 32];
    for (i, byte) in digest.iter().enumerate() {
        out[2 * i..2 * i + 2].copy_from_slice(format!("{byte:02x}").as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// libpq's answer for role md5user, password md5pw, salt "salt",
    /// computed from the definition independently of `answer`.
    #[test]
    fn answers_as_libpq_does() {
        let stored = stored("md5pw", "md5user");
        let inner: String = Md5::digest(b"md5pwmd5user")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(&stored[..], inner.as_bytes());
        let mut outer = inner.into_bytes();
        outer.extend_from_slice(b"salt");
        let expected: String = Md5::digest(&outer)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(answer(&stored, *b"salt"), format!("md5{expected}"));
        assert!(verify(
            &stored,
            *b"salt",
            format!("md5{expected}").as_bytes()
        ));
        assert!(!verify(
            &stored,
            *b"tlas",
            format!("md5{expected}").as_bytes()
        ));
        assert!(!verify(&stored, *b"salt", b"md5"));
    }
}
