//! Reading the PROXY protocol header on listeners behind a load balancer
//! (`proxy_protocol = true`), so that logs, `/cluster`, metrics and the
//! cancel limits see the real client instead of the balancer.
//!
//! Only the `trusted_proxies` may send the header: a connection from any
//! other address, or one that does not start with a valid header, gets a
//! FATAL ErrorResponse and is closed. The header is never passed on to
//! PostgreSQL, which therefore still sees rolegate as the client.

use std::net::SocketAddr;

use bytes::BytesMut;
use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::protocol::proxy_header::{parse, Parsed, ProxiedSource, V2_MAX_BLOCK};
use crate::protocol::{ProtocolError, SqlState};

/// A listener's rule for PROXY protocol headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyPolicy {
    pub trusted: Vec<IpNet>,
}

/// The longest header read: version 2 with the largest address block.
const MAX_HEADER: usize = 16 + V2_MAX_BLOCK;

impl ProxyPolicy {
    pub fn trusts(&self, address: SocketAddr) -> bool {
        let ip = address.ip().to_canonical();
        self.trusted.iter().any(|net| net.contains(&ip))
    }
}

/// Reads the header from a connection accepted from `connection`. Returns
/// the client's address and the bytes read past the header (the start of
/// the client's own opening).
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
    connection: SocketAddr,
    policy: &ProxyPolicy,
) -> Result<(SocketAddr, BytesMut), ProtocolError> {
    if !policy.trusts(connection) {
        return Err(ProtocolError::new(
            SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
            format!(
                "this listener only takes connections through its load balancer, and {} is not one of its trusted_proxies",
                connection.ip()
            ),
        )
        .with_hint("Connect through the load balancer's address."));
    }
    let mut buf = BytesMut::with_capacity(256);
    loop {
        match parse(&buf) {
            Ok(Parsed::Complete { len, source }) => {
                let rest = buf.split_off(len);
                let client = match source {
                    ProxiedSource::Client(client) => client,
                    ProxiedSource::Connection => connection,
                };
                return Ok((client, rest));
            }
            Ok(Parsed::Incomplete) => {}
            Err(reason) => return Err(bad_header(&reason)),
        }
        let room = MAX_HEADER.saturating_sub(buf.len()).max(1);
        let mut limited = (&mut *stream).take(room as u64);
        match limited.read_buf(&mut buf).await {
            Ok(0) => return Err(bad_header("the connection closed before the header ended")),
            Ok(_) => {}
            Err(e) => return Err(bad_header(&e.to_string())),
        }
    }
}

fn bad_header(reason: &str) -> ProtocolError {
    ProtocolError::new(
        SqlState::PROTOCOL_VIOLATION,
        format!("this listener expects a PROXY protocol header from its load balancer: {reason}"),
    )
    .with_hint("Connect through the load balancer, which adds the header; a client cannot connect to this listener directly.")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn policy() -> ProxyPolicy {
        ProxyPolicy {
            trusted: vec!["127.0.0.0/8".parse().expect("cidr")],
        }
    }

    #[tokio::test]
    async fn the_header_names_the_client_and_the_rest_is_kept() {
        let (mut balancer, mut server) = tokio::io::duplex(256);
        balancer
            .write_all(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 6432\r\n\0\0\0\x08")
            .await
            .expect("write");
        let (client, rest) = read_header(
            &mut server,
            "127.0.0.1:5000".parse().expect("addr"),
            &policy(),
        )
        .await
        .expect("header");
        assert_eq!(client, "192.0.2.7:40000".parse().expect("addr"));
        assert_eq!(&rest[..], b"\0\0\0\x08");
    }

    #[tokio::test]
    async fn untrusted_and_garbage_are_refused() {
        let (_balancer, mut server) = tokio::io::duplex(256);
        let refused = read_header(
            &mut server,
            "10.1.1.1:5000".parse().expect("addr"),
            &policy(),
        )
        .await;
        assert_eq!(
            refused.expect_err("untrusted").sqlstate,
            SqlState::INVALID_AUTHORIZATION_SPECIFICATION
        );
        let (mut client, mut server) = tokio::io::duplex(256);
        client
            .write_all(b"\0\0\0\x08\x04\xd2\x16\x2f")
            .await
            .expect("write");
        let refused = read_header(
            &mut server,
            "127.0.0.1:5000".parse().expect("addr"),
            &policy(),
        )
        .await;
        assert_eq!(
            refused.expect_err("garbage").sqlstate,
            SqlState::PROTOCOL_VIOLATION
        );
    }

    #[test]
    fn ipv4_mapped_sources_match_ipv4_networks() {
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:1".parse().expect("addr");
        assert!(policy().trusts(mapped));
    }
}
