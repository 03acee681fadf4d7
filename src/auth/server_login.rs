//! rolegate logging in to a server on a pooled client's behalf: the
//! startup packet names the role and database, and the server's challenge
//! is answered with what the client's login proved (its SCRAM ClientKey,
//! or the stored md5 digest). No password is involved.
//!
//! The login reads the server's messages up to ReadyForQuery and keeps
//! what a pooled session needs from them: the cancel key, the parameters
//! the server reported (which the pool passes on to each client it
//! serves, `in_hot_standby` among them).

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::client_login::Proved;
use super::md5;
use super::scram::{self, ClientExchange};
use super::secret::{ScramSecret, Secret};
use crate::protocol::encode;
use crate::protocol::message::auth;
use crate::protocol::message::{
    auth_request_code, decode_message, parameter_status, tag, Message,
    MAX_BACKEND_HANDSHAKE_MESSAGE,
};
use crate::protocol::startup::CancelKey;

/// A server session that reached ReadyForQuery.
#[derive(Debug)]
pub struct LoggedIn {
    pub key: CancelKey,
    /// The parameters the server reported, in its order.
    pub parameters: Vec<(String, String)>,
}

/// Why a login to a server failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerLoginError {
    /// The server refused with its own ErrorResponse (kept whole, for the
    /// client to read as the server wrote it).
    #[error("the server refused the login")]
    Refused(Bytes),
    /// The server asked for a method the stored secret cannot answer.
    #[error("{0}")]
    Method(String),
    /// The server broke the protocol or the exchange did not verify.
    #[error("{0}")]
    Protocol(String),
    #[error("the connection failed during the login: {0}")]
    Io(String),
}

/// What rolegate answers a server's challenge with.
pub enum Credentials<'a> {
    /// A pooled client's: its stored secret and what its login proved.
    Proved {
        secret: &'a Secret,
        proved: &'a Proved,
    },
    /// `auth_user`'s password.
    Password(&'a str),
}

/// Logs in as `user` to `database` on `server`, with `extra` startup
/// parameters.
pub async fn log_in<S>(
    server: &mut S,
    user: &str,
    database: &str,
    extra: &[(&str, &str)],
    credentials: &Credentials<'_>,
) -> Result<LoggedIn, ServerLoginError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut startup = vec![("user", user), ("database", database)];
    startup.extend_from_slice(extra);
    write(server, &encode::startup(&startup)).await?;
    let mut buf = BytesMut::with_capacity(1024);
    let mut exchange = Exchange::default();
    let mut parameters = Vec::new();
    let mut key = None;
    loop {
        let msg = next_message(server, &mut buf, MAX_BACKEND_HANDSHAKE_MESSAGE)
            .await
            .map_err(ServerLoginError::Io)?;
        match msg.tag() {
            tag::AUTHENTICATION => {
                let code = auth_request_code(msg.body())
                    .ok_or_else(|| protocol("an Authentication message without a code"))?;
                if let Some(answer) = exchange.answer(code, &msg.body()[4..], user, credentials)? {
                    write(server, &answer).await?;
                }
            }
            tag::PARAMETER_STATUS => {
                if let Some((name, value)) = parameter_status(msg.body()) {
                    parameters.push((
                        String::from_utf8_lossy(name).into_owned(),
                        String::from_utf8_lossy(value).into_owned(),
                    ));
                }
            }
            tag::BACKEND_KEY_DATA => {
                key = Some(
                    CancelKey::from_backend_key_data(msg.body())
                        .map_err(|e| ServerLoginError::Protocol(e.message))?,
                );
            }
            tag::ERROR_RESPONSE => return Err(ServerLoginError::Refused(msg.raw)),
            tag::READY_FOR_QUERY => {
                let key = key.ok_or_else(|| protocol("ReadyForQuery without BackendKeyData"))?;
                return Ok(LoggedIn { key, parameters });
            }
            // NoticeResponse, NegotiateProtocolVersion: nothing to act on.
            _ => {}
        }
    }
}

/// Where a SCRAM exchange with the server stands.
#[derive(Default)]
struct Exchange {
    client: Option<ClientExchange>,
    expected_signature: Option<[u8; 32]>,
}

impl Exchange {
    /// The answer to an Authentication request, if it needs one.
    fn answer(
        &mut self,
        code: u32,
        data: &[u8],
        user: &str,
        credentials: &Credentials<'_>,
    ) -> Result<Option<Bytes>, ServerLoginError> {
        let scram = match credentials {
            Credentials::Proved {
                secret: Secret::Scram(_),
                proved: Proved::Scram { .. },
            }
            | Credentials::Password(_) => true,
            Credentials::Proved { .. } => false,
        };
        match code {
            auth::OK => Ok(None),
            auth::SASL if scram => {
                if !data
                    .split(|&b| b == 0)
                    .any(|m| m == scram::MECHANISM.as_bytes())
                {
                    return Err(ServerLoginError::Method(
                        "the server does not offer SCRAM-SHA-256".into(),
                    ));
                }
                let client = ClientExchange::new();
                let first = client.client_first();
                self.client = Some(client);
                Ok(Some(encode::sasl_initial_response(
                    scram::MECHANISM,
                    first.as_bytes(),
                )))
            }
            auth::SASL_CONTINUE if scram => {
                let client = self
                    .client
                    .as_ref()
                    .ok_or_else(|| protocol("SASLContinue before SASL"))?;
                let (secret, client_key) = match credentials {
                    Credentials::Proved {
                        secret: Secret::Scram(secret),
                        proved: Proved::Scram { client_key },
                    } => (secret.clone(), *client_key),
                    _ => keys_for_challenge(client, data, credentials)?,
                };
                let (client_final, signature) = client
                    .client_final(data, &secret, &client_key)
                    .map_err(|e| ServerLoginError::Protocol(e.to_string()))?;
                self.expected_signature = Some(signature);
                Ok(Some(encode::sasl_response(client_final.as_bytes())))
            }
            auth::SASL_FINAL if scram => {
                let expected = self
                    .expected_signature
                    .as_ref()
                    .ok_or_else(|| protocol("SASLFinal before SASLContinue"))?;
                scram::check_server_final(data, expected)
                    .map_err(|e| ServerLoginError::Protocol(e.to_string()))?;
                Ok(None)
            }
            auth::MD5 => {
                let salt: [u8; 4] = data
                    .try_into()
                    .map_err(|_| protocol("an MD5 request without a 4-byte salt"))?;
                let stored = match credentials {
                    Credentials::Proved {
                        secret: Secret::Md5(stored),
                        proved: Proved::Md5,
                    } => *stored,
                    Credentials::Password(password) => md5::stored(password, user),
                    Credentials::Proved { secret, .. } => {
                        return Err(method_mismatch(code, secret))
                    }
                };
                Ok(Some(encode::password(&md5::answer(&stored, salt))))
            }
            auth::CLEARTEXT => match credentials {
                Credentials::Password(password) => Ok(Some(encode::password(password))),
                Credentials::Proved { secret, .. } => Err(method_mismatch(code, secret)),
            },
            code => match credentials {
                Credentials::Proved { secret, .. } => Err(method_mismatch(code, secret)),
                Credentials::Password(_) => Err(ServerLoginError::Method(format!(
                    "the server asks for authentication method {}, which rolegate does not speak",
                    auth::method_name(code)
                ))),
            },
        }
    }
}

/// The keys a password gives for the server's salt and iterations.
fn keys_for_challenge(
    client: &ClientExchange,
    server_first: &[u8],
    credentials: &Credentials<'_>,
) -> Result<(ScramSecret, [u8; 32]), ServerLoginError> {
    let Credentials::Password(password) = credentials else {
        return Err(protocol("a SCRAM challenge without SCRAM credentials"));
    };
    let first = client
        .server_first(server_first)
        .map_err(|e| ServerLoginError::Protocol(e.to_string()))?;
    if first.iterations > scram::MAX_ITERATIONS {
        return Err(ServerLoginError::Protocol(format!(
            "the server asks for {} SCRAM iterations, more than rolegate computes ({})",
            first.iterations,
            scram::MAX_ITERATIONS
        )));
    }
    Ok(scram::keys_from_password(
        password,
        &first.salt,
        first.iterations,
    ))
}

fn method_mismatch(code: u32, secret: &Secret) -> ServerLoginError {
    ServerLoginError::Method(format!(
        "the server asks for authentication method {} but the stored secret is {}; \
         pooled logins need the server to ask for the stored secret's method",
        auth::method_name(code),
        secret.method()
    ))
}

/// A server's next whole message, read into `buf` as needed, for
/// rolegate's own exchanges with it (logins, `auth_query`, resets); the
/// error says what went wrong, in words.
pub(crate) async fn next_message<S: AsyncRead + Unpin>(
    server: &mut S,
    buf: &mut BytesMut,
    max_len: usize,
) -> Result<Message, String> {
    loop {
        if let Some(msg) = decode_message(buf, max_len, "server").map_err(|e| e.message)? {
            return Ok(msg);
        }
        match server.read_buf(buf).await {
            Ok(0) => return Err("the server closed the connection".into()),
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn protocol(what: &str) -> ServerLoginError {
    ServerLoginError::Protocol(what.to_owned())
}

async fn write<S: AsyncWrite + Unpin>(
    server: &mut S,
    bytes: &[u8],
) -> Result<(), ServerLoginError> {
    server
        .write_all(bytes)
        .await
        .map_err(|e| ServerLoginError::Io(e.to_string()))
}
