//! Stored secrets as PostgreSQL keeps them in `pg_authid.rolpassword`:
//! `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (base64
//! fields) or `md5<32 hex digits>`. A plaintext password is refused: the
//! pooler never needs one, and storing one is what it exists to avoid.
//!
//! Neither type prints its keys: `Debug` shows the kind and the
//! iterations only, so a secret cannot reach a log by accident.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;

/// A stored secret of one role.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    Scram(ScramSecret),
    /// The 32 lowercase hex digits after `md5`: md5(password || user).
    Md5([u8; 32]),
}

/// A SCRAM-SHA-256 verifier.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramSecret {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

/// Why a stored secret cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("a plaintext password; store the SCRAM-SHA-256 or md5 secret (pg_authid.rolpassword) instead")]
    Plaintext,
    #[error("a malformed {kind} secret: {what}")]
    Malformed {
        kind: &'static str,
        what: &'static str,
    },
}

impl Secret {
    /// Parses a `rolpassword` value.
    pub fn parse(text: &str) -> Result<Self, SecretError> {
        if let Some(rest) = text.strip_prefix("SCRAM-SHA-256$") {
            return parse_scram(rest).map(Self::Scram);
        }
        if let Some(hex) = text.strip_prefix("md5") {
            let digits: [u8; 32] = hex.as_bytes().try_into().map_err(|_| md5_error())?;
            if !digits
                .iter()
                .all(|d| d.is_ascii_digit() || (b'a'..=b'f').contains(d))
            {
                return Err(md5_error());
            }
            return Ok(Self::Md5(digits));
        }
        Err(SecretError::Plaintext)
    }

    /// The method a client is asked to log in with.
    pub fn method(&self) -> &'static str {
        match self {
            Self::Scram(_) => "scram-sha-256",
            Self::Md5(_) => "md5",
        }
    }
}

fn md5_error() -> SecretError {
    SecretError::Malformed {
        kind: "md5",
        what: "expected 32 lowercase hex digits after \"md5\"",
    }
}

fn parse_scram(rest: &str) -> Result<ScramSecret, SecretError> {
    let bad = |what| SecretError::Malformed {
        kind: "SCRAM-SHA-256",
        what,
    };
    let (params, keys) = rest
        .split_once('$')
        .ok_or(bad("expected <iterations>:<salt>$<StoredKey>:<ServerKey>"))?;
    let (iterations, salt) = params
        .split_once(':')
        .ok_or(bad("expected <iterations>:<salt>"))?;
    let (stored, server) = keys
        .split_once(':')
        .ok_or(bad("expected <StoredKey>:<ServerKey>"))?;
    let iterations: u32 = iterations
        .parse()
        .ok()
        .filter(|&i| i > 0)
        .ok_or(bad("the iteration count is not a positive number"))?;
    let salt = BASE64
        .decode(salt)
        .ok()
        .filter(|s| !s.is_empty())
        .ok_or(bad("the salt is not base64"))?;
    let key = |text: &str| -> Result<[u8; 32], SecretError> {
        BASE64
            .decode(text)
            .ok()
            .and_then(|k| k.try_into().ok())
            .ok_or(bad("a key is not 32 bytes of base64"))
    };
    Ok(ScramSecret {
        iterations,
        salt,
        stored_key: key(stored)?,
        server_key: key(server)?,
    })
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Scram(s) => s.fmt(f),
            Self::Md5(_) => f.write_str("Md5(..)"),
        }
    }
}

impl std::fmt::Debug for ScramSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramSecret")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A secret in PostgreSQL's format with these parts.
    fn scram_text(iterations: u32, salt: &[u8], stored: [u8; 32], server: [u8; 32]) -> String {
        format!(
            "SCRAM-SHA-256${iterations}:{}${}:{}",
            BASE64.encode(salt),
            BASE64.encode(stored),
            BASE64.encode(server)
        )
    }

    #[test]
    fn parses_what_postgresql_stores() {
        let text = scram_text(4096, b"sixteen byte slt", [1; 32], [2; 32]);
        let Secret::Scram(s) = Secret::parse(&text).expect("parses") else {
            panic!("not SCRAM");
        };
        assert_eq!(s.iterations, 4096);
        assert_eq!(s.salt, b"sixteen byte slt");
        assert_eq!((s.stored_key, s.server_key), ([1; 32], [2; 32]));
        let md5 = Secret::parse("md5bc8b3cbf7ab5a5b0b1bc2e1b0c4b5f2f").expect("md5");
        assert_eq!(md5.method(), "md5");
    }

    #[test]
    fn refuses_plaintext_and_broken_secrets() {
        assert_eq!(Secret::parse("app"), Err(SecretError::Plaintext));
        assert_eq!(Secret::parse(""), Err(SecretError::Plaintext));
        for broken in [
            "md5abc",
            "md5BC8B3CBF7AB5A5B0B1BC2E1B0C4B5F2F",
            "SCRAM-SHA-256$",
            "SCRAM-SHA-256$4096:c2FsdA==",
            "SCRAM-SHA-256$0:c2FsdA==$AAAA:AAAA",
            "SCRAM-SHA-256$4096:!!!$AAAA:AAAA",
            "SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA",
        ] {
            assert!(
                matches!(Secret::parse(broken), Err(SecretError::Malformed { .. })),
                "{broken}"
            );
        }
    }

    #[test]
    fn debug_shows_no_key() {
        let secret = Secret::parse(&scram_text(4096, b"salt", [7; 32], [9; 32])).expect("parses");
        let shown = format!("{secret:?}");
        assert_eq!(shown, "ScramSecret { iterations: 4096, .. }");
    }
}
