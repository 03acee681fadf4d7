//! Why etcd could not be followed, told apart where a person must act on
//! rolegate's configuration: etcd refusing the credentials of `etcd_user`
//! and `etcd_password`, or the client certificate of `etcd_cert`.
//!
//! Without the distinction a wrong password read as "etcd is unreachable"
//! and, once the cluster fell back to Patroni's checks, as "no member
//! passes Patroni's /primary check": nothing pointed at the key to fix. A
//! refusal names the keys with their table and the config file, and the
//! follower shows it wherever it says why there is no primary (`/cluster`,
//! `/readyz`, the status page). No secret is ever part of it.
//!
//! etcd refuses credentials with gRPC InvalidArgument and its canonical
//! message "etcdserver: authentication failed, invalid user ID or password"
//! (`rpctypes.ErrGRPCAuthFailed`), matched here as etcd's own clients match
//! it. A client certificate it does not accept is refused inside the TLS
//! session: under TLS 1.3 the client has already sent its first request
//! when etcd closes the connection, so what arrives is a closed connection
//! (or the alert, when it is read in time), never a gRPC answer.

use std::path::PathBuf;
use std::sync::Arc;

/// Where a connection's settings come from: `clusters.main` (or `fleet`)
/// in the config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub table: String,
    pub file: PathBuf,
}

/// What of the configuration etcd refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Credentials,
    ClientCertificate,
}

/// Why a connection to etcd ended or could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EtcdTrouble {
    /// etcd refused what the configuration gave it: retrying will not help
    /// until the configuration (or etcd's users) change.
    #[error("{}", describe_refusal(*.what, origin, detail))]
    Refused {
        what: Refused,
        origin: Arc<Origin>,
        /// etcd's or the TLS layer's own words.
        detail: String,
    },
    /// Anything else: a member down, cut off, without a leader, a watch
    /// cancelled.
    #[error("{0}")]
    Lost(String),
}

fn describe_refusal(what: Refused, origin: &Origin, detail: &str) -> String {
    let (table, file) = (&origin.table, origin.file.display());
    match what {
        Refused::Credentials => format!(
            "etcd refused the credentials of `{table}.etcd_user` and `{table}.etcd_password` in {file} ({detail})"
        ),
        Refused::ClientCertificate => format!(
            "etcd closed the TLS connection before answering, as it does when it does not accept the client certificate of `{table}.etcd_cert` (with `{table}.etcd_key`) in {file} ({detail})"
        ),
    }
}

/// gRPC's InvalidArgument, and the message etcd sends with it for a wrong
/// user or password.
const AUTH_FAILED: &str = "authentication failed";

/// What etcd refused, if `error` is a refusal of the configuration's
/// credentials or (with `client_certificate` configured) its certificate.
pub fn refusal(error: &etcd_client::Error, client_certificate: bool) -> Option<Refused> {
    let source: &(dyn std::error::Error + 'static) = match error {
        etcd_client::Error::GRpcStatus(status) => {
            if status.code() == tonic::Code::InvalidArgument
                && status.message().contains(AUTH_FAILED)
            {
                return Some(Refused::Credentials);
            }
            status
        }
        etcd_client::Error::TransportError(e) => e,
        _ => return None,
    };
    (client_certificate && closed_inside_tls(source)).then_some(Refused::ClientCertificate)
}

/// Whether the chain of `error` shows a connection that was made and then
/// closed by the server (or a TLS alert it sent), rather than one that was
/// never made (refused, timed out).
fn closed_inside_tls(error: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind;
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof
            ) {
                return true;
            }
        }
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            if matches!(tls, rustls::Error::AlertReceived(_)) {
                return true;
            }
        }
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(|h| h.is_canceled() || h.is_incomplete_message())
        {
            return true;
        }
        next = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin() -> Arc<Origin> {
        Arc::new(Origin {
            table: "clusters.main".to_owned(),
            file: "/etc/rolegate/rolegate.toml".into(),
        })
    }

    #[test]
    fn a_wrong_password_is_a_refusal_of_the_credentials() {
        let status = tonic::Status::invalid_argument(
            "etcdserver: authentication failed, invalid user ID or password",
        );
        let error = etcd_client::Error::GRpcStatus(status);
        assert_eq!(refusal(&error, false), Some(Refused::Credentials));
        let trouble = EtcdTrouble::Refused {
            what: Refused::Credentials,
            origin: origin(),
            detail: "etcdserver: authentication failed".to_owned(),
        };
        let text = trouble.to_string();
        assert!(text.contains("`clusters.main.etcd_password`"), "{text}");
        assert!(text.contains("/etc/rolegate/rolegate.toml"), "{text}");
    }

    #[test]
    fn other_answers_are_no_refusal() {
        for status in [
            tonic::Status::unavailable("etcdserver: no leader"),
            tonic::Status::permission_denied("etcdserver: permission denied"),
            tonic::Status::invalid_argument("etcdserver: key is not provided"),
        ] {
            let error = etcd_client::Error::GRpcStatus(status);
            assert_eq!(refusal(&error, true), None, "{error}");
        }
    }

    #[test]
    fn a_closed_connection_names_the_certificate_only_when_one_is_configured() {
        let closed = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "broken pipe");
        let status = tonic::Status::from_error(Box::new(closed));
        let error = etcd_client::Error::GRpcStatus(status);
        assert_eq!(refusal(&error, true), Some(Refused::ClientCertificate));
        assert_eq!(refusal(&error, false), None);
    }
}
