//! The client's side of a pooled login: rolegate asks for the password by
//! the stored secret's method, checks the answer, and keeps what the
//! answer yields for logging in to servers (see [`super::server_login`]).
//!
//! A role without a secret is asked exactly as a known one (SCRAM against
//! a decoy, see [`super::scram::decoy`]) and fails the same way, so the
//! answer does not tell which roles exist. Reads are bounded by the
//! caller's handshake deadline; messages by PostgreSQL's own limit for
//! authentication messages.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::md5;
use super::scram::{self, ScramError, ServerExchange};
use super::secret::Secret;
use crate::protocol::encode;
use crate::protocol::message::{decode_message, tag, Message, MAX_CLIENT_AUTH_MESSAGE};
use crate::protocol::{ProtocolError, SqlState};

/// What a client's login proved, for logging in to servers as it.
#[derive(Clone)]
pub enum Proved {
    Scram { client_key: [u8; 32] },
    Md5,
}

/// Shows the method only: a ClientKey logs in as its role.
impl std::fmt::Debug for Proved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Scram { .. } => f.write_str("Scram { .. }"),
            Self::Md5 => f.write_str("Md5"),
        }
    }
}

/// Why a client's login failed.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// A wrong password, or a role rolegate has no secret for.
    #[error("password authentication failed for user \"{0}\"")]
    WrongPassword(String),
    /// The client broke the protocol, or asked for what is not offered.
    #[error("{0}")]
    Protocol(ProtocolError),
    #[error("the client left during authentication")]
    Gone,
}

impl LoginError {
    /// What the client is told, if anything.
    pub fn to_error(&self) -> Option<ProtocolError> {
        match self {
            Self::WrongPassword(_) => Some(ProtocolError::new(
                SqlState::INVALID_PASSWORD,
                self.to_string(),
            )),
            Self::Protocol(e) => Some(e.clone()),
            Self::Gone => None,
        }
    }
}

/// Runs the login of `role` with `secret` (`None`: unknown to rolegate).
/// `buffered` holds what the client sent past its startup packet.
/// Returns what the login proved, with the secret it was checked against.
pub async fn log_in<'s, C>(
    client: &mut C,
    buffered: &mut BytesMut,
    role: &str,
    secret: Option<&'s Secret>,
) -> Result<(Proved, &'s Secret), LoginError>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let Some(known) = secret else {
        // Fails whatever the client answers: see the module's words.
        scram_login(client, buffered, role, &scram::decoy(role), false).await?;
        return Err(LoginError::WrongPassword(role.to_owned()));
    };
    let proved = match known {
        Secret::Md5(stored) => {
            let salt = random_salt();
            write(client, &encode::authentication_md5(salt)).await?;
            let answer = read_password(client, buffered).await?;
            let answer = answer.body().strip_suffix(b"\0").unwrap_or(answer.body());
            if !md5::verify(stored, salt, answer) {
                return Err(LoginError::WrongPassword(role.to_owned()));
            }
            Proved::Md5
        }
        Secret::Scram(secret) => scram_login(client, buffered, role, secret, true).await?,
    };
    Ok((proved, known))
}

async fn scram_login<C>(
    client: &mut C,
    buffered: &mut BytesMut,
    role: &str,
    secret: &crate::auth::secret::ScramSecret,
    known: bool,
) -> Result<Proved, LoginError>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    write(client, &encode::authentication_sasl(scram::MECHANISM)).await?;
    let first = read_password(client, buffered).await?;
    let client_first = initial_response(first.body())?;
    let exchange = ServerExchange::start(client_first, secret).map_err(scram_refusal)?;
    write(
        client,
        &encode::authentication_sasl_continue(exchange.server_first().as_bytes()),
    )
    .await?;
    let last = read_password(client, buffered).await?;
    match exchange.finish(last.body(), secret) {
        Ok(verified) if known => {
            write(
                client,
                &encode::authentication_sasl_final(verified.server_final.as_bytes()),
            )
            .await?;
            Ok(Proved::Scram {
                client_key: verified.client_key,
            })
        }
        Ok(_) | Err(ScramError::WrongProof) => Err(LoginError::WrongPassword(role.to_owned())),
        Err(e) => Err(scram_refusal(e)),
    }
}

/// The client-first message of a SASLInitialResponse body: the mechanism
/// must be the one offered, and the length must match.
fn initial_response(body: &[u8]) -> Result<&[u8], LoginError> {
    let violation = |what: &str| {
        LoginError::Protocol(ProtocolError::new(
            SqlState::PROTOCOL_VIOLATION,
            format!("malformed SASLInitialResponse: {what}"),
        ))
    };
    let nul = body
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| violation("no mechanism name"))?;
    if &body[..nul] != scram::MECHANISM.as_bytes() {
        return Err(LoginError::Protocol(ProtocolError::new(
            SqlState::FEATURE_NOT_SUPPORTED,
            format!(
                "SASL mechanism {:?} is not offered; rolegate's pooled listeners offer SCRAM-SHA-256 only",
                String::from_utf8_lossy(&body[..nul])
            ),
        )));
    }
    let rest = &body[nul + 1..];
    let len: [u8; 4] = rest
        .get(..4)
        .and_then(|l| l.try_into().ok())
        .ok_or_else(|| violation("no data length"))?;
    let data = &rest[4..];
    if i32::from_be_bytes(len) as i64 != data.len() as i64 {
        return Err(violation("the data length does not match"));
    }
    Ok(data)
}

fn scram_refusal(e: ScramError) -> LoginError {
    let sqlstate = match e {
        ScramError::ChannelBinding => SqlState::FEATURE_NOT_SUPPORTED,
        _ => SqlState::PROTOCOL_VIOLATION,
    };
    LoginError::Protocol(ProtocolError::new(sqlstate, e.to_string()))
}

fn random_salt() -> [u8; 4] {
    use ring::rand::SecureRandom;
    let mut salt = [0; 4];
    // A failed fill leaves a fixed salt: weaker against replay of a
    // captured answer, never a login that should fail passing.
    let _ = ring::rand::SystemRandom::new().fill(&mut salt);
    salt
}

async fn write<C: AsyncWrite + Unpin>(client: &mut C, bytes: &[u8]) -> Result<(), LoginError> {
    client.write_all(bytes).await.map_err(|_| LoginError::Gone)
}

/// The client's next message, which must be a password-type message.
async fn read_password<C: AsyncRead + Unpin>(
    client: &mut C,
    buffered: &mut BytesMut,
) -> Result<Message, LoginError> {
    loop {
        if let Some(msg) = decode_message(buffered, MAX_CLIENT_AUTH_MESSAGE, "client")
            .map_err(LoginError::Protocol)?
        {
            return match msg.tag() {
                tag::PASSWORD => Ok(msg),
                tag::TERMINATE => Err(LoginError::Gone),
                other => Err(LoginError::Protocol(ProtocolError::new(
                    SqlState::PROTOCOL_VIOLATION,
                    format!(
                        "expected a password or SASL response during authentication, got message type {:?}",
                        char::from(other)
                    ),
                ))),
            };
        }
        match client.read_buf(buffered).await {
            Ok(0) | Err(_) => return Err(LoginError::Gone),
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::scram::secret_for;
    use tokio::io::duplex;

    /// Logs in with tokio-postgres (an independent SCRAM and md5 client)
    /// over an in-memory pipe; rolegate's side ends with AuthenticationOk
    /// and ReadyForQuery when the login passes.
    async fn driver_login(
        secret: Option<Secret>,
        user: &str,
        password: &str,
    ) -> (
        Result<Proved, LoginError>,
        Result<(), tokio_postgres::Error>,
    ) {
        let (client_side, mut server_side) = duplex(1 << 16);
        let config = format!("user={user} password={password} dbname=app");
        let config: tokio_postgres::Config = config.parse().expect("config");
        let driver = tokio::spawn(async move {
            config
                .connect_raw(client_side, tokio_postgres::NoTls)
                .await
                .map(drop)
        });
        let mut buffered = BytesMut::new();
        // The startup packet: length-prefixed, skipped whole.
        let mut len = [0u8; 4];
        server_side.read_exact(&mut len).await.expect("length");
        let mut startup = vec![0; u32::from_be_bytes(len) as usize - 4];
        server_side.read_exact(&mut startup).await.expect("startup");
        let proved = log_in(&mut server_side, &mut buffered, user, secret.as_ref())
            .await
            .map(|(proved, _)| proved);
        if proved.is_ok() {
            let mut end = encode::authentication_ok().to_vec();
            end.extend_from_slice(&encode::ready_for_query_idle());
            server_side.write_all(&end).await.expect("write");
        } else if let Some(error) = proved.as_ref().err().and_then(LoginError::to_error) {
            server_side
                .write_all(&error.to_fatal())
                .await
                .expect("write");
        }
        drop(server_side);
        (proved, driver.await.expect("driver"))
    }

    #[tokio::test]
    async fn scram_yields_the_client_key_and_the_driver_accepts_the_server() {
        let (secret, client_key) = secret_for("app", b"0123456789abcdef", 4096);
        let (proved, driver) = driver_login(Some(Secret::Scram(secret)), "app", "app").await;
        assert!(matches!(proved, Ok(Proved::Scram { client_key: k }) if k == client_key));
        driver.expect("the driver logged in");
    }

    #[tokio::test]
    async fn wrong_and_unknown_give_the_same_28p01() {
        let (secret, _) = secret_for("app", b"0123456789abcdef", 4096);
        let (wrong, driver) = driver_login(Some(Secret::Scram(secret)), "app", "nope").await;
        assert!(
            matches!(wrong, Err(LoginError::WrongPassword(_))),
            "{wrong:?}"
        );
        let wrong_code = driver.err().and_then(|e| e.code().cloned());
        let (unknown, driver) = driver_login(None, "ghost", "app").await;
        assert!(
            matches!(unknown, Err(LoginError::WrongPassword(_))),
            "{unknown:?}"
        );
        let unknown_code = driver.err().and_then(|e| e.code().cloned());
        assert_eq!(
            wrong_code,
            Some(tokio_postgres::error::SqlState::INVALID_PASSWORD)
        );
        assert_eq!(unknown_code, wrong_code);
    }

    #[tokio::test]
    async fn md5_checks_the_answer() {
        let stored = md5::stored("md5pw", "md5user");
        let (proved, driver) = driver_login(Some(Secret::Md5(stored)), "md5user", "md5pw").await;
        assert!(matches!(proved, Ok(Proved::Md5)));
        driver.expect("logged in");
        let (proved, _) = driver_login(Some(Secret::Md5(stored)), "md5user", "wrong").await;
        assert!(matches!(proved, Err(LoginError::WrongPassword(_))));
    }

    #[test]
    fn initial_responses_are_checked() {
        assert_eq!(
            initial_response(b"SCRAM-SHA-256\0\0\0\0\x03abc").ok(),
            Some(&b"abc"[..])
        );
        for bad in [
            &b"SCRAM-SHA-256"[..],
            b"SCRAM-SHA-256\0\0\0",
            b"SCRAM-SHA-256\0\0\0\0\x04abc",
            b"SCRAM-SHA-256\0\xff\xff\xff\xffabc",
            b"SCRAM-SHA-256-PLUS\0\0\0\0\x03abc",
        ] {
            assert!(initial_response(bad).is_err(), "{bad:?}");
        }
    }
}
