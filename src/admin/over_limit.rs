//! A connection over the admin endpoint's bounds (see [`super::places`]):
//! its request head is read for at most [`READ_TIMEOUT`], a probe
//! (`/healthz`, `/readyz`) is answered as it always is, anything else gets
//! `503` with the bound it is over, and the connection is closed.
//!
//! The head is read before answering so that the close cannot reset the
//! connection under the answer (a socket closed with unread bytes sends a
//! reset, and the client may lose what was written).

use std::time::Duration;

use hyper::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::places::Refusal;
use super::Admin;

/// How long the request head may take.
const READ_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest head read; a probe's is far shorter.
const MAX_HEAD_BYTES: usize = 2048;

/// Answers one request on `stream` and closes it.
pub async fn answer(admin: &Admin, mut stream: TcpStream, refusal: Refusal) {
    let Ok(Some(head)) = tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await else {
        return;
    };
    let state = admin.state.load_full();
    let (status, body) = probe_path(&head)
        .and_then(|path| state.probe(path))
        .unwrap_or((StatusCode::SERVICE_UNAVAILABLE, refusal.message()));
    let retry = if status == StatusCode::SERVICE_UNAVAILABLE {
        "Retry-After: 1\r\n"
    } else {
        ""
    };
    let shown = if head.starts_with(b"HEAD ") {
        ""
    } else {
        &body
    };
    let answer = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n{retry}\r\n{shown}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    let _ = tokio::time::timeout(READ_TIMEOUT, async {
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

/// Reads up to the end of the request head; `None` when the client
/// closed first or the head is longer than [`MAX_HEAD_BYTES`].
async fn read_head(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 || head.len() + n > MAX_HEAD_BYTES {
            return None;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    Some(head)
}

/// The path of a `GET` or `HEAD` request for a probe, from its head.
fn probe_path(head: &[u8]) -> Option<&str> {
    let line = head.split(|&b| b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split(' ');
    let method = words.next()?;
    let target = words.next()?;
    let path = target.split('?').next()?;
    (matches!(method, "GET" | "HEAD") && matches!(path, "/healthz" | "/readyz")).then_some(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_probes_are_recognised() {
        assert_eq!(
            probe_path(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some("/healthz")
        );
        assert_eq!(
            probe_path(b"HEAD /readyz?verbose HTTP/1.1\r\n\r\n"),
            Some("/readyz")
        );
        assert_eq!(probe_path(b"GET /metrics HTTP/1.1\r\n\r\n"), None);
        assert_eq!(probe_path(b"POST /healthz HTTP/1.1\r\n\r\n"), None);
        assert_eq!(probe_path(b"GET /healthz/x HTTP/1.1\r\n\r\n"), None);
        assert_eq!(probe_path(b"\xff\xfe\r\n\r\n"), None);
    }
}
