//! SCRAM-SHA-256 (RFC 5802, RFC 7677) on both sides of rolegate, without
//! I/O and without a password.
//!
//! - [`ServerExchange`]: a client proves its password against a stored
//!   secret. The proof XOR the client signature is the ClientKey, whose
//!   SHA-256 the secret stores; a match yields the ClientKey.
//! - [`ClientExchange`]: rolegate proves the same password to PostgreSQL
//!   with that ClientKey: the proof is ClientKey XOR HMAC(StoredKey,
//!   AuthMessage), which needs no salted password.
//!
//! Channel binding is not offered (rolegate ends the client's TLS, so the
//! binding could never reach the server): a client that insists (`p=`) is
//! refused, one that supports it but saw no offer (`y`) is accepted, as
//! RFC 5802 says. Usernames in the SCRAM messages are ignored, as
//! PostgreSQL ignores them: the startup packet names the role.

use std::sync::OnceLock;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use ring::rand::{SecureRandom, SystemRandom};
use ring::{digest, hmac};
use subtle::ConstantTimeEq;

use super::secret::ScramSecret;

/// The one mechanism offered.
pub const MECHANISM: &str = "SCRAM-SHA-256";
/// Random bytes in each side's nonce (PostgreSQL uses 18).
const NONCE_BYTES: usize = 18;

/// Why an exchange failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("the client requires channel binding, which rolegate's pooled listeners do not offer")]
    ChannelBinding,
    /// The proof does not match the secret: a wrong password.
    #[error("the password does not match")]
    WrongProof,
    /// The server's salt or iterations differ from the secret's: the
    /// password changed after the secret was read.
    #[error("the server's SCRAM parameters differ from the stored secret's")]
    SecretChanged,
    /// The server's signature is wrong: it does not know the secret.
    #[error("the server's SCRAM signature is wrong")]
    ServerSignature,
}

/// A proof that matched: the ClientKey it yields and the server-final
/// message that proves rolegate knows the secret too.
pub struct Verified {
    pub client_key: [u8; 32],
    pub server_final: String,
}

/// The server side of one exchange, between server-first and client-final.
pub struct ServerExchange {
    gs2_header: String,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

impl ServerExchange {
    /// Reads the client-first message and answers it with the secret's
    /// salt and iterations.
    pub fn start(client_first: &[u8], secret: &ScramSecret) -> Result<Self, ScramError> {
        let text = std::str::from_utf8(client_first)
            .map_err(|_| ScramError::Malformed("client-first is not UTF-8"))?;
        let (gs2_header, bare) = split_gs2_header(text)?;
        let mut fields = bare.split(',');
        let user = fields.next().unwrap_or_default();
        if user.starts_with("m=") {
            return Err(ScramError::Malformed(
                "mandatory extensions are not supported",
            ));
        }
        if !user.starts_with("n=") {
            return Err(ScramError::Malformed(
                "client-first lacks the username field",
            ));
        }
        let client_nonce = fields
            .next()
            .and_then(|f| f.strip_prefix("r="))
            .filter(|n| valid_nonce(n))
            .ok_or(ScramError::Malformed("client-first lacks a valid nonce"))?;
        let nonce = format!("{client_nonce}{}", new_nonce());
        let server_first = format!(
            "r={nonce},s={},i={}",
            BASE64.encode(&secret.salt),
            secret.iterations
        );
        Ok(Self {
            gs2_header: gs2_header.to_owned(),
            client_first_bare: bare.to_owned(),
            server_first,
            nonce,
        })
    }

    /// The server-first message to send.
    pub fn server_first(&self) -> &str {
        &self.server_first
    }

    /// Checks the client-final message's binding, nonce and proof.
    pub fn finish(self, client_final: &[u8], secret: &ScramSecret) -> Result<Verified, ScramError> {
        let text = std::str::from_utf8(client_final)
            .map_err(|_| ScramError::Malformed("client-final is not UTF-8"))?;
        let (without_proof, proof) = text
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("client-final lacks the proof"))?;
        let mut fields = without_proof.split(',');
        let binding =
            fields
                .next()
                .and_then(|f| f.strip_prefix("c="))
                .ok_or(ScramError::Malformed(
                    "client-final lacks the channel binding",
                ))?;
        if BASE64.decode(binding).ok().as_deref() != Some(self.gs2_header.as_bytes()) {
            return Err(ScramError::Malformed(
                "the channel binding differs from client-first's header",
            ));
        }
        if fields.next().and_then(|f| f.strip_prefix("r=")) != Some(&self.nonce) {
            return Err(ScramError::Malformed(
                "client-final's nonce is not the exchange's",
            ));
        }
        let proof: [u8; 32] = BASE64
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(ScramError::Malformed("the proof is not 32 bytes of base64"))?;
        let auth_message = format!(
            "{},{},{without_proof}",
            self.client_first_bare, self.server_first
        );
        let signature = hmac_sha256(&secret.stored_key, auth_message.as_bytes());
        let client_key = xor(&proof, &signature);
        if !bool::from(sha256(&client_key).ct_eq(&secret.stored_key)) {
            return Err(ScramError::WrongProof);
        }
        let server_signature = hmac_sha256(&secret.server_key, auth_message.as_bytes());
        Ok(Verified {
            client_key,
            server_final: format!("v={}", BASE64.encode(server_signature)),
        })
    }
}

/// The GS2 header (with its trailing comma) and the bare message after it.
fn split_gs2_header(text: &str) -> Result<(&str, &str), ScramError> {
    match text.as_bytes().first() {
        Some(b'n' | b'y') => {}
        Some(b'p') => return Err(ScramError::ChannelBinding),
        _ => return Err(ScramError::Malformed("client-first has no GS2 header")),
    }
    let first = text
        .find(',')
        .ok_or(ScramError::Malformed("client-first has no GS2 header"))?;
    if first != 1 {
        return Err(ScramError::Malformed(
            "the GS2 channel-binding flag is malformed",
        ));
    }
    let second = text[2..]
        .find(',')
        .map(|i| i + 2)
        .ok_or(ScramError::Malformed("client-first has no GS2 header"))?;
    let authzid = &text[2..second];
    if !authzid.is_empty() && !authzid.starts_with("a=") {
        return Err(ScramError::Malformed("the GS2 authzid is malformed"));
    }
    Ok(text.split_at(second + 1))
}

/// A nonce is printable ASCII without commas.
fn valid_nonce(nonce: &str) -> bool {
    !nonce.is_empty()
        && nonce
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
}

/// rolegate's side of an exchange with a server, holding the ClientKey of
/// the client it logs in for.
pub(crate) struct ClientExchange {
    nonce: String,
}

impl ClientExchange {
    pub fn new() -> Self {
        Self { nonce: new_nonce() }
    }

    /// The client-first message: no channel binding, no username (the
    /// startup packet names the role), as libpq sends.
    pub fn client_first(&self) -> String {
        format!("n,,n=,r={}", self.nonce)
    }

    /// Answers the server-first message: the client-final message and the
    /// server signature the server-final must carry.
    pub fn client_final(
        &self,
        server_first: &[u8],
        secret: &ScramSecret,
        client_key: &[u8; 32],
    ) -> Result<(String, [u8; 32]), ScramError> {
        let ServerFirst {
            text,
            nonce,
            salt,
            iterations,
        } = self.server_first(server_first)?;
        if salt != secret.salt || iterations != secret.iterations {
            return Err(ScramError::SecretChanged);
        }
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("n=,r={},{text},{without_proof}", self.nonce);
        let signature = hmac_sha256(&secret.stored_key, auth_message.as_bytes());
        let proof = xor(client_key, &signature);
        let server_signature = hmac_sha256(&secret.server_key, auth_message.as_bytes());
        Ok((
            format!("{without_proof},p={}", BASE64.encode(proof)),
            server_signature,
        ))
    }
}

/// A server-first message, read.
pub(crate) struct ServerFirst<'a> {
    text: &'a str,
    nonce: &'a str,
    pub salt: Vec<u8>,
    pub iterations: u32,
}

impl ClientExchange {
    /// Reads a server-first message: its nonce must extend ours.
    pub(crate) fn server_first<'a>(
        &self,
        message: &'a [u8],
    ) -> Result<ServerFirst<'a>, ScramError> {
        let text = std::str::from_utf8(message)
            .map_err(|_| ScramError::Malformed("server-first is not UTF-8"))?;
        let mut fields = text.split(',');
        let nonce = fields
            .next()
            .and_then(|f| f.strip_prefix("r="))
            .filter(|n| n.len() > self.nonce.len() && n.starts_with(&self.nonce))
            .ok_or(ScramError::Malformed(
                "server-first's nonce does not extend ours",
            ))?;
        let salt = fields
            .next()
            .and_then(|f| f.strip_prefix("s="))
            .and_then(|s| BASE64.decode(s).ok())
            .ok_or(ScramError::Malformed("server-first lacks a salt"))?;
        let iterations: u32 = fields
            .next()
            .and_then(|f| f.strip_prefix("i="))
            .and_then(|i| i.parse().ok())
            .filter(|&i| i > 0)
            .ok_or(ScramError::Malformed("server-first lacks the iterations"))?;
        Ok(ServerFirst {
            text,
            nonce,
            salt,
            iterations,
        })
    }
}

/// The most PBKDF2 iterations rolegate computes for a server's challenge
/// to `auth_user` (PostgreSQL's default is 4096; this is about 2 s of CPU).
pub const MAX_ITERATIONS: u32 = 1 << 20;

/// The secret PostgreSQL stores for `password` with this salt and
/// iteration count, and the ClientKey: how `auth_user` logs in with its
/// password. The password is SASLprep-normalised as PostgreSQL does, and
/// used as it is when it is not valid for SASLprep (PostgreSQL's rule).
pub fn keys_from_password(password: &str, salt: &[u8], iterations: u32) -> (ScramSecret, [u8; 32]) {
    let prepared = stringprep::saslprep(password);
    let normalised = prepared.as_deref().unwrap_or(password);
    let mut salted = [0; 32];
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        std::num::NonZeroU32::new(iterations).unwrap_or(std::num::NonZeroU32::MIN),
        salt,
        normalised.as_bytes(),
        &mut salted,
    );
    let client_key = hmac_sha256(&salted, b"Client Key");
    let secret = ScramSecret {
        iterations,
        salt: salt.to_vec(),
        stored_key: sha256(&client_key),
        server_key: hmac_sha256(&salted, b"Server Key"),
    };
    (secret, client_key)
}

/// Checks the server-final message against the expected signature.
pub fn check_server_final(server_final: &[u8], expected: &[u8; 32]) -> Result<(), ScramError> {
    let signature = std::str::from_utf8(server_final)
        .ok()
        .and_then(|t| t.strip_prefix("v="))
        .and_then(|s| BASE64.decode(s).ok())
        .ok_or(ScramError::Malformed("server-final lacks the signature"))?;
    if bool::from(signature.ct_eq(expected)) {
        Ok(())
    } else {
        Err(ScramError::ServerSignature)
    }
}

/// A secret no password matches, for a role rolegate does not know: the
/// exchange runs as for a known role (a salt stable per name, 4096
/// iterations), so the answer does not tell whether the role exists.
pub fn decoy(role: &str) -> ScramSecret {
    static KEY: OnceLock<[u8; 32]> = OnceLock::new();
    let key = KEY.get_or_init(|| {
        let mut key = [0; 32];
        // The OS generator failing is not recoverable; a zero key still
        // gives a secret no password matches.
        let _ = SystemRandom::new().fill(&mut key);
        key
    });
    let salt = hmac_sha256(key, role.as_bytes());
    ScramSecret {
        iterations: 4096,
        salt: salt[..16].to_vec(),
        stored_key: hmac_sha256(key, b"stored"),
        server_key: hmac_sha256(key, b"server"),
    }
}

fn new_nonce() -> String {
    let mut bytes = [0; NONCE_BYTES];
    // See `decoy`: a failed fill leaves zeros, which only weakens the
    // nonce's uniqueness, never the proof.
    let _ = SystemRandom::new().fill(&mut bytes);
    BASE64.encode(bytes)
}

pub(crate) fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut out = [0; 32];
    out.copy_from_slice(hmac::sign(&key, data).as_ref());
    out
}

pub(crate) fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, data).as_ref());
    out
}

fn xor(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    std::array::from_fn(|i| a[i] ^ b[i])
}

/// The secret PostgreSQL would store for `password`, and the ClientKey:
/// for tests.
#[cfg(test)]
pub(crate) fn secret_for(password: &str, salt: &[u8], iterations: u32) -> (ScramSecret, [u8; 32]) {
    keys_from_password(password, salt, iterations)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// rolegate's client side against its server side: the ClientKey the
    /// server recovers logs in again, and a wrong one does not.
    #[test]
    fn a_recovered_client_key_proves_the_password_again() {
        let (secret, client_key) = secret_for("app", b"0123456789abcdef", 4096);
        let client = ClientExchange::new();
        let server =
            ServerExchange::start(client.client_first().as_bytes(), &secret).expect("start");
        let (client_final, expected) = client
            .client_final(server.server_first().as_bytes(), &secret, &client_key)
            .expect("final");
        let verified = server
            .finish(client_final.as_bytes(), &secret)
            .expect("verified");
        assert_eq!(verified.client_key, client_key);
        check_server_final(verified.server_final.as_bytes(), &expected).expect("signature");

        let client = ClientExchange::new();
        let server =
            ServerExchange::start(client.client_first().as_bytes(), &secret).expect("start");
        let (client_final, _) = client
            .client_final(server.server_first().as_bytes(), &secret, &[0; 32])
            .expect("final");
        assert_eq!(
            server.finish(client_final.as_bytes(), &secret).err(),
            Some(ScramError::WrongProof)
        );
    }

    #[test]
    fn client_first_forms() {
        let (secret, _) = secret_for("x", b"salt", 4096);
        for ok in ["n,,n=,r=abc", "y,,n=app,r=abc", "n,a=app,n=app,r=abc,x=ext"] {
            assert!(
                ServerExchange::start(ok.as_bytes(), &secret).is_ok(),
                "{ok}"
            );
        }
        assert_eq!(
            ServerExchange::start(b"p=tls-server-end-point,,n=,r=abc", &secret).err(),
            Some(ScramError::ChannelBinding)
        );
        for bad in [
            &b""[..],
            b"n",
            b"nn,,n=,r=abc",
            b"n,,r=abc",
            b"n,,n=,r=",
            b"n,,m=x,n=,r=abc",
            b"n,b=x,n=,r=abc",
            b"\xff,,n=,r=abc",
        ] {
            assert!(
                matches!(
                    ServerExchange::start(bad, &secret),
                    Err(ScramError::Malformed(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn client_final_must_match_the_exchange() {
        let (secret, _) = secret_for("x", b"salt", 4096);
        let server = ServerExchange::start(b"n,,n=,r=abc", &secret).expect("start");
        let nonce = server.server_first()[2..]
            .split(',')
            .next()
            .expect("nonce")
            .to_owned();
        let proof = BASE64.encode([0u8; 32]);
        for bad in [
            format!("c=biws,r={nonce}"),
            format!("c=eSws,r={nonce},p={proof}"),
            format!("c=biws,r=abc,p={proof}"),
            format!("c=biws,r={nonce},p=short"),
        ] {
            let server = ServerExchange::start(b"n,,n=,r=abc", &secret).expect("start");
            let nonce_now = server.server_first()[2..]
                .split(',')
                .next()
                .expect("n")
                .to_owned();
            let bad = bad.replace(&nonce, &nonce_now);
            assert!(
                matches!(
                    server.finish(bad.as_bytes(), &secret),
                    Err(ScramError::Malformed(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_server_with_other_parameters_or_signature_is_caught() {
        let (secret, key) = secret_for("x", b"salt", 4096);
        let client = ClientExchange::new();
        let first = format!("r={}more,s={},i=8192", client.nonce, BASE64.encode(b"salt"));
        assert_eq!(
            client.client_final(first.as_bytes(), &secret, &key).err(),
            Some(ScramError::SecretChanged)
        );
        let first = format!("r=other,s={},i=4096", BASE64.encode(b"salt"));
        assert!(matches!(
            client.client_final(first.as_bytes(), &secret, &key),
            Err(ScramError::Malformed(_))
        ));
        assert_eq!(
            check_server_final(
                format!("v={}", BASE64.encode([1u8; 32])).as_bytes(),
                &[2; 32]
            )
            .err(),
            Some(ScramError::ServerSignature)
        );
    }

    #[test]
    fn a_decoy_is_stable_per_role_and_matches_no_password() {
        assert_eq!(decoy("ghost"), decoy("ghost"));
        assert_ne!(decoy("ghost").salt, decoy("other").salt);
    }
}
