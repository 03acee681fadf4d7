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
