//! Opening a connection to a cluster member.
//!
//! Connects with `connect_timeout` and turns failures into the 08001 error
//! a client sees, naming the member and its address so an operator can act
//! on it. TLS to backends will wrap the stream here.

use std::io::ErrorKind;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use crate::metrics;
use crate::protocol::{ProtocolError, SqlState};
use crate::topology::Member;

/// Connects to `member`'s PostgreSQL port.
pub async fn connect(
    member: &Member,
    cluster: &str,
    timeout: Duration,
) -> Result<TcpStream, ProtocolError> {
    let started = Instant::now();
    let attempt = TcpStream::connect((&*member.host, member.port));
    let (failure, reason) = match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(stream)) => {
            metrics::backend_connect(cluster, &member.name, started.elapsed(), None);
            // Queries and results are small writes: do not let Nagle's
            // algorithm hold them back.
            let _ = stream.set_nodelay(true);
            return Ok(stream);
        }
        Ok(Err(e)) => {
            let reason = if e.kind() == ErrorKind::ConnectionRefused {
                "refused"
            } else {
                "other"
            };
            (e.to_string(), reason)
        }
        Err(_) => (
            format!(
                "no answer within {}ms (connect_timeout)",
                timeout.as_millis()
            ),
            "timeout",
        ),
    };
    metrics::backend_connect(cluster, &member.name, started.elapsed(), Some(reason));
    Err(ProtocolError::new(
        SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
        format!(
            "rolegate could not connect to member {member} of cluster \"{cluster}\": {failure}"
        ),
    )
    .with_hint("Check that the member's PostgreSQL is running and reachable from rolegate."))
}
