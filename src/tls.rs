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

use crate::config::{BackendTls, TlsConfig, TlsVersion};

/// The ALPN protocol name PostgreSQL 17 uses for direct TLS.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_certs(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{key}: cannot read {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{key}: {} is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{key}: {} holds no certificate", path.display()));
    }
    Ok(certs)
}

fn load_key(path: &Path, key: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        format!(
            "{key}: cannot read a private key from {}: {e}",
            path.display()
        )
    })
}

fn load_roots(path: &Path, key: &str) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path, key)? {
        roots.add(cert).map_err(|e| {
            format!(
                "{key}: {} holds an unusable CA certificate: {e}",
                path.display()
            )
        })?;
    }
    Ok(roots)
}

/// Builds the server configuration from `[tls]`. Errors name the key.
pub fn server_config(tls: &TlsConfig) -> Result<ServerConfig, String> {
    let (Some(cert), Some(key)) = (&tls.cert, &tls.key) else {
        return Err("tls.cert: `cert` and `key` are required for TLS".to_owned());
    };
    let certs = load_certs(cert, "tls.cert")?;
    let key = load_key(key, "tls.key")?;
    let versions: &[&rustls::SupportedProtocolVersion] = match tls.min_version {
        TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V1_3 => &[&rustls::version::TLS13],
    };
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| format!("tls.min_version: {e}"))?;
    let builder = match &tls.client_ca {
        Some(ca) => {
            let roots = load_roots(ca, "tls.client_ca")?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| format!("tls.client_ca: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("tls.key: the key does not fit the certificate: {e}"))?;
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

    /// Uses `config` (built by [`server_config`], which reads the
    /// certificate, key and CA files afresh) for new handshakes.
    pub fn set(&self, config: ServerConfig) {
        self.current.store(Arc::new(config));
    }
}

/// Builds the client configuration rolegate uses towards a cluster's
/// members. `None` for `backend_tls = "disable"`.
pub fn backend_config(
    mode: BackendTls,
    ca: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
    cluster: &str,
) -> Result<Option<Arc<ClientConfig>>, String> {
    let field = |name: &str| format!("clusters.{cluster}.{name}");
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        BackendTls::Disable => return Ok(None),
        BackendTls::Prefer | BackendTls::Require => Arc::new(EncryptOnly(provider())),
        BackendTls::VerifyCa | BackendTls::VerifyFull => {
            let ca = ca.ok_or_else(|| {
                format!(
                    "{}: verify-ca and verify-full need `backend_ca`",
                    field("backend_tls")
                )
            })?;
            let roots = load_roots(ca, &field("backend_ca"))?;
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| format!("{}: {e}", field("backend_ca")))?;
            if mode == BackendTls::VerifyCa {
                Arc::new(ChainOnly(webpki))
            } else {
                webpki
            }
        }
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("{}: {e}", field("backend_tls")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match (cert, key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(
                load_certs(cert, &field("backend_cert"))?,
                load_key(key, &field("backend_key"))?,
            )
            .map_err(|e| format!("{}: {e}", field("backend_key")))?,
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
