//! A minimal hand-made frontend, for what libpq cannot do: malformed
//! packets, protocol 3.2 startups, reading rolegate's raw answers.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

pub fn startup_packet(major: u16, minor: u16, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&((u32::from(major) << 16) | u32::from(minor)).to_be_bytes());
    for (name, value) in params {
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend(body);
    packet
}

pub fn connect(port: u16) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    stream
}

/// As [`connect`], from the loopback address `source` (any of 127.0.0.0/8).
pub fn connect_from(source: [u8; 4], port: u16) -> TcpStream {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket
        .bind(&std::net::SocketAddr::from((source, 0)).into())
        .expect("bind the source address");
    socket
        .connect(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into())
        .expect("connect");
    let stream = TcpStream::from(socket);
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    stream
}

/// A backend message: type byte and body.
#[derive(Debug)]
pub struct Msg {
    pub tag: u8,
    pub body: Vec<u8>,
}

impl Msg {
    /// A field of an ErrorResponse/NoticeResponse, e.g. `b'C'` for SQLSTATE.
    pub fn field(&self, code: u8) -> Option<String> {
        let mut rest = &self.body[..];
        while let Some((&c, tail)) = rest.split_first() {
            if c == 0 {
                break;
            }
            let end = tail.iter().position(|&b| b == 0)?;
            if c == code {
                return Some(String::from_utf8_lossy(&tail[..end]).into_owned());
            }
            rest = &tail[end + 1..];
        }
        None
    }
}

/// Reads one message, or `None` at EOF or on a read error/timeout.
pub fn read_msg(stream: &mut TcpStream) -> Option<Msg> {
    let mut header = [0u8; 5];
    stream.read_exact(&mut header).ok()?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let mut body = vec![0u8; len.checked_sub(4)?];
    stream.read_exact(&mut body).ok()?;
    Some(Msg {
        tag: header[0],
        body,
    })
}

/// Sends `bytes` and returns the SQLSTATE of the ErrorResponse that
/// follows, or `None` if the connection closed without one.
pub fn send_and_read_error(port: u16, bytes: &[u8]) -> Option<String> {
    let mut stream = connect(port);
    let _ = stream.write_all(bytes);
    loop {
        let msg = read_msg(&mut stream)?;
        if msg.tag == b'E' {
            return msg.field(b'C');
        }
    }
}

/// True when the server closes the connection (EOF) within the stream's
/// read timeout, after delivering anything at all.
pub fn closes(stream: &mut TcpStream) -> bool {
    let mut sink = [0u8; 1024];
    loop {
        match stream.read(&mut sink) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

/// A message with a type byte.
pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// What a session's login said, up to its first ReadyForQuery.
#[derive(Debug, Default)]
pub struct Login {
    /// The newest minor version in NegotiateProtocolVersion, if one came.
    pub negotiated_minor: Option<u16>,
    /// `_pq_` options the server did not recognise.
    pub unrecognised: Vec<String>,
    /// BackendKeyData: the process id and the secret.
    pub key: Option<(u32, Vec<u8>)>,
    /// The SQLSTATE of an ErrorResponse that ended the login.
    pub error: Option<String>,
}

/// Logs in on `stream` after the StartupMessage was sent, answering a
/// SCRAM-SHA-256 exchange with `password` (and cleartext, md5-less trust).
pub fn login(stream: &mut TcpStream, password: &str) -> Login {
    login_pausing(stream, password, &mut Vec::new)
}

/// As [`login`], calling `before_last` before the last SCRAM message is
/// sent and sending the bytes it returns right behind that message, in
/// one write: what a client that pipelines its first query does.
pub fn login_pausing(
    stream: &mut TcpStream,
    password: &str,
    before_last: &mut dyn FnMut() -> Vec<u8>,
) -> Login {
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    let mut login = Login::default();
    let mut scram = None;
    while let Some(msg) = read_msg(stream) {
        match msg.tag {
            b'v' if msg.body.len() >= 8 => {
                login.negotiated_minor = Some(u16::from_be_bytes([msg.body[2], msg.body[3]]));
                login.unrecognised = msg.body[8..]
                    .split(|b| *b == 0)
                    .filter(|s| !s.is_empty())
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect();
            }
            b'R' if msg.body.len() >= 4 => {
                let code = u32::from_be_bytes([msg.body[0], msg.body[1], msg.body[2], msg.body[3]]);
                match code {
                    10 => {
                        let client =
                            ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
                        let mut body = b"SCRAM-SHA-256\0".to_vec();
                        body.extend_from_slice(&(client.message().len() as u32).to_be_bytes());
                        body.extend_from_slice(client.message());
                        let _ = stream.write_all(&message(b'p', &body));
                        scram = Some(client);
                    }
                    11 => {
                        if let Some(client) = scram.as_mut() {
                            if client.update(&msg.body[4..]).is_ok() {
                                let mut bytes = message(b'p', client.message());
                                bytes.extend(before_last());
                                let _ = stream.write_all(&bytes);
                            }
                        }
                    }
                    12 => {
                        if let Some(client) = scram.as_mut() {
                            let _ = client.finish(&msg.body[4..]);
                        }
                    }
                    _ => {}
                }
            }
            b'K' if msg.body.len() >= 8 => {
                let pid = u32::from_be_bytes([msg.body[0], msg.body[1], msg.body[2], msg.body[3]]);
                login.key = Some((pid, msg.body[4..].to_vec()));
            }
            b'E' => {
                login.error = msg.field(b'C');
                return login;
            }
            b'Z' => return login,
            _ => {}
        }
    }
    login
}

/// A CancelRequest for the key `(pid, secret)`.
pub fn cancel_request(pid: u32, secret: &[u8]) -> Vec<u8> {
    let mut packet = ((12 + secret.len()) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&80_877_102u32.to_be_bytes());
    packet.extend_from_slice(&pid.to_be_bytes());
    packet.extend_from_slice(secret);
    packet
}

/// Runs a query on a logged-in `session` and returns the SQLSTATE of its
/// error, if it failed; `Err` if no ReadyForQuery came.
pub fn query_error(session: &mut TcpStream, sql: &str) -> Result<Option<String>, String> {
    let mut text = sql.as_bytes().to_vec();
    text.push(0);
    session
        .write_all(&message(b'Q', &text))
        .map_err(|e| format!("send {sql}: {e}"))?;
    query_outcome(session).map_err(|e| format!("{e} to {sql}"))
}

/// Reads a query's answer up to ReadyForQuery and returns the SQLSTATE of
/// its error, if it failed; `Err` if no ReadyForQuery came.
pub fn query_outcome(session: &mut TcpStream) -> Result<Option<String>, String> {
    let mut error = None;
    loop {
        let msg = read_msg(session).ok_or("no answer")?;
        match msg.tag {
            b'E' => error = msg.field(b'C'),
            b'Z' => return Ok(error),
            _ => {}
        }
    }
}

/// A session logged in as `app`, with its cancel key.
pub struct KeyedSession {
    pub stream: TcpStream,
    pub pid: u32,
    pub secret: Vec<u8>,
}

impl KeyedSession {
    pub fn login(port: u16) -> Result<Self, String> {
        let mut stream = connect(port);
        stream
            .write_all(&startup_packet(
                3,
                0,
                &[("user", "app"), ("database", "app")],
            ))
            .map_err(|e| format!("startup: {e}"))?;
        let (pid, secret) = login(&mut stream, "app").key.ok_or("no BackendKeyData")?;
        Ok(Self {
            stream,
            pid,
            secret,
        })
    }
}

/// The cancel receipt a client relies on: cancels the idle `session`
/// through `cancel_port`, each time waiting for the cancel connection to
/// close as libpq's `PQcancel` does, then runs a short sleep on the
/// session at once. Returns how many of the `rounds` sleeps were
/// cancelled: none, when each cancel was delivered before its connection
/// closed (an idle backend ignores it).
pub fn late_cancels(
    session: &mut KeyedSession,
    cancel_port: u16,
    rounds: usize,
) -> Result<usize, String> {
    let mut cancelled = 0;
    for _ in 0..rounds {
        let mut cancel = connect(cancel_port);
        cancel
            .write_all(&cancel_request(session.pid, &session.secret))
            .map_err(|e| format!("cancel: {e}"))?;
        if !closes(&mut cancel) {
            return Err("the cancel connection was not closed".into());
        }
        match query_error(&mut session.stream, "select pg_sleep(0.05)")? {
            Some(state) if state == "57014" => cancelled += 1,
            Some(state) => return Err(format!("the sleep failed with {state}")),
            None => {}
        }
    }
    Ok(cancelled)
}

/// `Ok` when the server closes the connection without sending a byte
/// (within 5 s); otherwise what it did instead.
pub fn closes_silently(stream: &mut TcpStream) -> Result<(), String> {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    match stream.read_to_end(&mut got) {
        Ok(_) if got.is_empty() => Ok(()),
        Ok(_) => Err(format!(
            "sent {} bytes, then closed: {:?}",
            got.len(),
            String::from_utf8_lossy(&got)
        )),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && got.is_empty() => Ok(()),
        Err(e) => Err(format!("not closed ({e}) after {} bytes", got.len())),
    }
}
