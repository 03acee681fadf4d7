//! The PROXY protocol header (versions 1 and 2) that load balancers such as
//! HAProxy, AWS NLB and OCI's put before a connection's first byte to say
//! whom the connection is really from.
//!
//! [`parse`] takes the bytes received so far and says whether they hold a
//! whole header, need more, or cannot be one. It decides as early as it
//! can: a first byte that starts neither signature is refused at once, so
//! a client that connected straight to the listener is told without
//! waiting for a timeout. TLVs of version 2 are skipped.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

const V1_PREFIX: &[u8] = b"PROXY ";
/// The longest version 1 header, CRLF included.
pub const V1_MAX: usize = 107;
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V2_FIXED: usize = 16;
/// The largest version 2 address block (with TLVs) rolegate accepts; load
/// balancers send well under 300 bytes.
pub const V2_MAX_BLOCK: usize = 4096;

/// Whom a connection is from, by its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxiedSource {
    /// The balancer speaking for itself (a health check, `LOCAL`) or an
    /// address family without an IP (`UNKNOWN`, `UNSPEC`, `UNIX`): the
    /// connection's own address stands.
    Connection,
    /// The client's address and port.
    Client(SocketAddr),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A prefix of a header: read more.
    Incomplete,
    /// A whole header of `len` bytes.
    Complete { len: usize, source: ProxiedSource },
}

/// Parses the start of a connection. Errors say what is wrong.
pub fn parse(buf: &[u8]) -> Result<Parsed, String> {
    let v1 = &V1_PREFIX[..buf.len().min(V1_PREFIX.len())];
    let v2 = &V2_SIGNATURE[..buf.len().min(V2_SIGNATURE.len())];
    if buf.is_empty() {
        Ok(Parsed::Incomplete)
    } else if buf.starts_with(v2) {
        parse_v2(buf)
    } else if buf.starts_with(v1) {
        parse_v1(buf)
    } else {
        Err("the connection does not start with a PROXY protocol header".to_owned())
    }
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, String> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        if window.len() >= V1_MAX {
            return Err(format!("a PROXY v1 header longer than {V1_MAX} bytes"));
        }
        if let Some(bad) = window
            .iter()
            .find(|b| !(b.is_ascii_graphic() || **b == b' ' || **b == b'\r'))
        {
            return Err(format!("a PROXY v1 header with the byte {bad:#04x} in it"));
        }
        return Ok(Parsed::Incomplete);
    };
    let len = end + 2;
    let line = std::str::from_utf8(&window[..end])
        .map_err(|_| "a PROXY v1 header that is not ASCII".to_owned())?;
    let fields: Vec<&str> = line.split(' ').collect();
    let bad = || format!("a malformed PROXY v1 header {line:?}");
    let source = match fields.as_slice() {
        ["PROXY", "UNKNOWN", ..] => ProxiedSource::Connection,
        ["PROXY", family @ ("TCP4" | "TCP6"), source, destination, source_port, destination_port] =>
        {
            let source: IpAddr = source.parse().map_err(|_| bad())?;
            let destination: IpAddr = destination.parse().map_err(|_| bad())?;
            let family_matches = match *family {
                "TCP4" => source.is_ipv4() && destination.is_ipv4(),
                _ => source.is_ipv6() && destination.is_ipv6(),
            };
            if !family_matches {
                return Err(bad());
            }
            let port = parse_port(source_port).ok_or_else(bad)?;
            parse_port(destination_port).ok_or_else(bad)?;
            ProxiedSource::Client(SocketAddr::new(source, port))
        }
        _ => return Err(bad()),
    };
    Ok(Parsed::Complete { len, source })
}

/// A decimal port without sign or leading zeros.
fn parse_port(text: &str) -> Option<u16> {
    if text.is_empty()
        || (text.len() > 1 && text.starts_with('0'))
        || !text.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    text.parse().ok()
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, String> {
    if buf.len() < V2_FIXED {
        return Ok(Parsed::Incomplete);
    }
    let version = buf[12] >> 4;
    let command = buf[12] & 0x0f;
    if version != 2 {
        return Err(format!("a PROXY header of version {version}"));
    }
    let block = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if block > V2_MAX_BLOCK {
        return Err(format!(
            "a PROXY v2 header of {block} bytes (at most {V2_MAX_BLOCK})"
        ));
    }
    let len = V2_FIXED + block;
    if buf.len() < len {
        return Ok(Parsed::Incomplete);
    }
    let addresses = &buf[V2_FIXED..len];
    let family = buf[13] >> 4;
    let transport = buf[13] & 0x0f;
    let source = match command {
        0x0 => ProxiedSource::Connection,
        0x1 => match (family, transport) {
            (0x1, 0x1) => {
                let a = addresses
                    .get(..12)
                    .ok_or("a PROXY v2 TCP/IPv4 header too short for its addresses")?;
                let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
                ProxiedSource::Client(SocketAddr::new(ip.into(), u16::from_be_bytes([a[8], a[9]])))
            }
            (0x2, 0x1) => {
                let a = addresses
                    .get(..36)
                    .ok_or("a PROXY v2 TCP/IPv6 header too short for its addresses")?;
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&a[..16]);
                let ip = Ipv6Addr::from(octets);
                ProxiedSource::Client(SocketAddr::new(
                    ip.into(),
                    u16::from_be_bytes([a[32], a[33]]),
                ))
            }
            (0x0, _) | (0x3, _) => ProxiedSource::Connection,
            _ => {
                return Err(format!(
                    "a PROXY v2 header for family {family:#x} and transport {transport:#x}, not TCP"
                ))
            }
        },
        other => {
            return Err(format!(
                "a PROXY v2 header with the unknown command {other:#x}"
            ))
        }
    };
    Ok(Parsed::Complete { len, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, block: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(0x20 | command);
        out.push(family);
        out.extend_from_slice(&(block.len() as u16).to_be_bytes());
        out.extend_from_slice(block);
        out
    }

    fn client(text: &str) -> ProxiedSource {
        ProxiedSource::Client(text.parse().expect("address"))
    }

    #[test]
    fn version_1() {
        let header = b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 6432\r\nrest";
        assert_eq!(
            parse(header),
            Ok(Parsed::Complete {
                len: header.len() - 4,
                source: client("192.0.2.7:51234")
            })
        );
        let header = b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 6432\r\n";
        assert_eq!(
            parse(header),
            Ok(Parsed::Complete {
                len: header.len(),
                source: client("[2001:db8::7]:4000")
            })
        );
        let header = b"PROXY UNKNOWN\r\n";
        assert_eq!(
            parse(header),
            Ok(Parsed::Complete {
                len: header.len(),
                source: ProxiedSource::Connection
            })
        );
        for prefix in 1..20 {
            let header = b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 6432\r\n";
            assert_eq!(parse(&header[..prefix]), Ok(Parsed::Incomplete), "{prefix}");
        }
    }

    #[test]
    fn version_1_refusals() {
        for bad in [
            &b"PROXY TCP4 192.0.2.7 10.0.0.1 51234\r\n"[..],
            b"PROXY TCP4 2001:db8::7 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 065535 1\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 70000 1\r\n",
            b"PROXY UDP4 192.0.2.7 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7\x00",
            b"\x00\x00\x00\x08\x04\xd2\x16\x2f",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(parse(&[b'P'; 200]).is_err());
        let long = [&b"PROXY UNKNOWN "[..], &[b'x'; 120]].concat();
        assert!(parse(&long).is_err());
    }

    #[test]
    fn version_2() {
        let mut ipv4 = vec![192, 0, 2, 7, 10, 0, 0, 1];
        ipv4.extend_from_slice(&51234u16.to_be_bytes());
        ipv4.extend_from_slice(&6432u16.to_be_bytes());
        let header = v2(1, 0x11, &ipv4);
        assert_eq!(
            parse(&header),
            Ok(Parsed::Complete {
                len: 28,
                source: client("192.0.2.7:51234")
            })
        );
        // A TLV after the addresses is skipped.
        let with_tlv = v2(1, 0x11, &[ipv4.clone(), vec![0x04, 0, 1, 0xff]].concat());
        assert_eq!(
            parse(&with_tlv),
            Ok(Parsed::Complete {
                len: 32,
                source: client("192.0.2.7:51234")
            })
        );
        let mut ipv6 = vec![0u8; 36];
        ipv6[..16].copy_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().expect("ip").octets());
        ipv6[32..34].copy_from_slice(&4000u16.to_be_bytes());
        assert_eq!(
            parse(&v2(1, 0x21, &ipv6)),
            Ok(Parsed::Complete {
                len: 52,
                source: client("[2001:db8::7]:4000")
            })
        );
        assert_eq!(
            parse(&v2(0, 0x00, &[])),
            Ok(Parsed::Complete {
                len: 16,
                source: ProxiedSource::Connection
            })
        );
        for prefix in 1..header.len() {
            assert_eq!(parse(&header[..prefix]), Ok(Parsed::Incomplete), "{prefix}");
        }
    }

    #[test]
    fn version_2_refusals() {
        assert!(parse(&v2(1, 0x11, &[1, 2, 3])).is_err(), "short addresses");
        assert!(parse(&v2(1, 0x12, &[0; 12])).is_err(), "UDP");
        assert!(parse(&v2(5, 0x11, &[0; 12])).is_err(), "unknown command");
        let mut wrong_version = v2(1, 0x11, &[0; 12]);
        wrong_version[12] = 0x11;
        assert!(parse(&wrong_version).is_err());
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(parse(&huge).is_err());
    }
}
