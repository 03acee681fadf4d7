//! rustls configurations: the server side clients connect to, and the
//! client side rolegate uses towards backends.
//!
//! The server configuration lives in an `ArcSwap`: a SIGHUP reloads the
//! certificate and key, and new handshakes use the new pair while sessions
//! already established keep theirs. A pair that does not load is refused
//! with a log line and the old one stays in use.
//!
//! Backend verification follows libpq's `sslmode`: `prefer` and `require`
//! encrypt without verifying (as libpq does), `verify-ca` checks the chain
//! against `backend_ca`, `verify-full` also checks that the certificate
//! names the member's host or IP. The ring provider is used explicitly, so
//! these configurations do not depend on a process-wide default.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::config::{
    BackendTls, ClusterConfig, Config, ConfigError, KeyedError, TlsConfig, TlsVersion,
};

/// The ALPN protocol name PostgreSQL 17 uses for direct TLS.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_certs(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>, KeyedError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| KeyedError::new(key, format!("cannot read {}: {e}", path.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| KeyedError::new(key, format!("{} is not valid PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(KeyedError::new(
            key,
            format!("{} holds no certificate", path.display()),
        ));
    }
    Ok(certs)
}

fn load_key(path: &Path, key: &str) -> Result<PrivateKeyDer<'static>, KeyedError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        KeyedError::new(
            key,
            format!("cannot read a private key from {}: {e}", path.display()),
        )
    })
}

fn load_roots(path: &Path, key: &str) -> Result<RootCertStore, KeyedError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path, key)? {
        roots.add(cert).map_err(|e| {
            KeyedError::new(
                key,
                format!("{} holds an unusable CA certificate: {e}", path.display()),
            )
        })?;
    }
    Ok(roots)
}

/// Every TLS file a configuration names, loaded and checked once per start,
/// reload or `check-config`: the server side of `[tls]` and each cluster's
/// backend side.
pub struct TlsFiles {
    /// `None` without `[tls] cert` and `key`.
    pub server: Option<ServerConfig>,
    /// By cluster; `None` for `backend_tls = "disable"`.
    backends: BTreeMap<String, Option<Arc<ClientConfig>>>,
}

impl TlsFiles {
    /// Loads what `config` names; an error names the key and `file`.
    pub fn load(config: &Config, file: &Path) -> Result<Self, ConfigError> {
        Self::load_keyed(config).map_err(|e| e.in_file(file))
    }

    fn load_keyed(config: &Config) -> Result<Self, KeyedError> {
        let server = match (&config.tls.cert, &config.tls.key) {
            (None, None) => None,
            _ => Some(server_config(&config.tls)?),
        };
        let backends = config
            .clusters
            .iter()
            .map(|(name, cluster)| Ok((name.clone(), backend_config(cluster, name)?)))
            .collect::<Result<_, KeyedError>>()?;
        Ok(Self { server, backends })
    }

    /// The client configuration towards `cluster`'s members.
    pub fn backend(&self, cluster: &str) -> Option<Arc<ClientConfig>> {
        self.backends.get(cluster).cloned().flatten()
    }
}

/// Builds the server configuration from `[tls]`. Errors name the key.
fn server_config(tls: &TlsConfig) -> Result<ServerConfig, KeyedError> {
    let (Some(cert), Some(key)) = (&tls.cert, &tls.key) else {
        return Err(KeyedError::new(
            "tls.cert",
            "`cert` and `key` are required for TLS",
        ));
    };
    let certs = load_certs(cert, "tls.cert")?;
    let key = load_key(key, "tls.key")?;
    let versions: &[&rustls::SupportedProtocolVersion] = match tls.min_version {
        TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V1_3 => &[&rustls::version::TLS13],
    };
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| KeyedError::new("tls.min_version", e.to_string()))?;
    let builder = match &tls.client_ca {
        Some(ca) => {
            let roots = load_roots(ca, "tls.client_ca")?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| KeyedError::new("tls.client_ca", e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        KeyedError::new(
            "tls.key",
            format!("the key does not fit the certificate: {e}"),
        )
    })?;
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(config)
}

/// The server configuration in force, replaceable while sessions run.
pub struct ServerTls {
    current: ArcSwap<ServerConfig>,
}

impl ServerTls {
    pub fn new(config: ServerConfig) -> Self {
        Self {
            current: ArcSwap::from_pointee(config),
        }
    }

    /// The configuration for a new handshake.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current.load_full()
    }

    /// Uses `config` (from [`TlsFiles`], which reads the certificate, key
    /// and CA files afresh) for new handshakes.
    pub fn set(&self, config: ServerConfig) {
        self.current.store(Arc::new(config));
    }
}

/// Builds the client configuration rolegate uses towards a cluster's
/// members. `None` for `backend_tls = "disable"`.
fn backend_config(
    cluster: &ClusterConfig,
    name: &str,
) -> Result<Option<Arc<ClientConfig>>, KeyedError> {
    let field = |field: &str| format!("clusters.{name}.{field}");
    let mode = cluster.backend_tls;
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        BackendTls::Disable => return Ok(None),
        BackendTls::Prefer | BackendTls::Require => Arc::new(EncryptOnly(provider())),
        BackendTls::VerifyCa | BackendTls::VerifyFull => {
            let ca = cluster.backend_ca.as_deref().ok_or_else(|| {
                KeyedError::new(
                    field("backend_tls"),
                    "verify-ca and verify-full need `backend_ca`",
                )
            })?;
            let roots = load_roots(ca, &field("backend_ca"))?;
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| KeyedError::new(field("backend_ca"), e.to_string()))?;
            if mode == BackendTls::VerifyCa {
                Arc::new(ChainOnly(webpki))
            } else {
                webpki
            }
        }
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| KeyedError::new(field("backend_tls"), e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match (&cluster.backend_cert, &cluster.backend_key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(
                load_certs(cert, &field("backend_cert"))?,
                load_key(key, &field("backend_key"))?,
            )
            .map_err(|e| KeyedError::new(field("backend_key"), e.to_string()))?,
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(Some(Arc::new(config)))
}

/// The name rustls checks a backend certificate against.
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_owned())
        .map_err(|e| format!("{host:?} is not a valid TLS server name: {e}"))
}

/// `backend_tls = "require"`/`"prefer"`: encrypt, verify signatures, but
/// trust any certificate, as libpq's `sslmode=require` does.
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `backend_tls = "verify-ca"`: the chain must lead to `backend_ca`; the
/// host name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: &str = r#"
        [clusters.demo]
        primary = "127.0.0.1:5441"
        replicas = ["127.0.0.1:5442"]
        BACKEND

        [[listeners]]
        listen = "127.0.0.1:6432"
        cluster = "demo"
        role = "primary"
    "#;

    fn load(tls: &str, backend: &str) -> Result<TlsFiles, ConfigError> {
        let text = format!("{tls}\n{}", CLUSTER.replace("BACKEND", backend));
        let config = Config::parse(&text, Path::new("proxy.toml")).expect("valid");
        TlsFiles::load(&config, Path::new("proxy.toml"))
    }

    #[test]
    fn a_configuration_without_tls_loads_nothing() {
        let files = load("", "").expect("no TLS files");
        assert!(files.server.is_none());
        assert!(files.backend("demo").is_none());
    }

    #[test]
    fn a_file_that_does_not_load_is_named_by_its_key_and_file() {
        let missing =
            "[tls]\ncert = \"/nonexistent/server.crt\"\nkey = \"/nonexistent/server.key\"\n";
        let err = load(missing, "").err().expect("a missing certificate");
        assert_eq!(err.key, "tls.cert");
        assert!(err.message.contains("/nonexistent/server.crt"), "{err}");
        assert!(
            err.to_string().starts_with("proxy.toml: tls.cert: "),
            "{err}"
        );

        let half = "[tls]\nkey = \"/nonexistent/server.key\"\n";
        assert_eq!(load(half, "").err().expect("no cert").key, "tls.cert");

        let err = load("", "backend_tls = \"verify-full\"")
            .err()
            .expect("no CA");
        assert_eq!(err.key, "clusters.demo.backend_tls");
        let err = load(
            "",
            "backend_tls = \"verify-ca\"\nbackend_ca = \"/nonexistent/ca.crt\"",
        )
        .err()
        .expect("a missing CA");
        assert_eq!(err.key, "clusters.demo.backend_ca");
    }

    #[test]
    fn an_encrypting_backend_gets_a_client_configuration() {
        let files = load("", "backend_tls = \"require\"").expect("no files needed");
        assert!(files.backend("demo").is_some());
        assert!(files.backend("other").is_none());
    }
}
