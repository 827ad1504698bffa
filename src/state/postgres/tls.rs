//! TLS to the state database as libpq's `sslmode` asks for it, with the
//! rustls the other clients of `stack` use: `disable`; `prefer` (TLS when
//! the server offers it) and `require` (TLS or nothing), both without
//! checking the certificate, as libpq does unless a root certificate is
//! given; `verify-ca` (the chain, to `sslrootcert`); `verify-full` (the
//! chain and the host name). `sslrootcert` is a PEM file, or `system` for
//! the system's roots; without it `~/.postgresql/root.crt`, as in libpq.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres_rustls::MakeRustlsConnect;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("sslmode={0} is not supported for the state database: use disable, prefer, require, verify-ca or verify-full")]
    Mode(String),
    #[error("sslmode={mode} checks the server's certificate against a CA: add sslrootcert=FILE (its PEM certificate) or sslrootcert=system to the URL, or put the CA's certificate in {}", default.display())]
    NoRoot {
        mode: &'static str,
        default: PathBuf,
    },
    #[error("cannot read the root certificates in {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("no certificate in {}", path.display())]
    Empty { path: PathBuf },
    #[error("the system has no root certificates that rustls can use")]
    NoSystemRoots,
    #[error("cannot set up TLS to the state database")]
    Config(#[source] rustls::Error),
    #[error("cannot set up the certificate check of the state database")]
    Verifier(#[source] rustls::client::VerifierBuilderError),
}

/// `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl Mode {
    pub fn parse(text: &str) -> Result<Mode, TlsError> {
        Ok(match text {
            "disable" => Mode::Disable,
            "prefer" => Mode::Prefer,
            "require" => Mode::Require,
            "verify-ca" => Mode::VerifyCa,
            "verify-full" => Mode::VerifyFull,
            other => return Err(TlsError::Mode(other.to_string())),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Disable => "disable",
            Mode::Prefer => "prefer",
            Mode::Require => "require",
            Mode::VerifyCa => "verify-ca",
            Mode::VerifyFull => "verify-full",
        }
    }

    /// What tokio-postgres is told: whether TLS is tried, and required.
    pub fn negotiation(self) -> tokio_postgres::config::SslMode {
        match self {
            Mode::Disable => tokio_postgres::config::SslMode::Disable,
            Mode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        }
    }
}

/// Where the CA certificates come from (`sslrootcert`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Roots {
    File(PathBuf),
    System,
}

impl Roots {
    pub fn parse(text: &str) -> Roots {
        match text {
            "system" => Roots::System,
            path => Roots::File(PathBuf::from(path)),
        }
    }
}

/// The TLS of one connection target.
#[derive(Debug, Clone)]
pub struct Tls {
    pub mode: Mode,
    pub roots: Option<Roots>,
}

/// libpq's default root certificate file.
fn default_root() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default()
        .join(".postgresql/root.crt")
}

fn read_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let read = |source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut store = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(read)? {
        let _ = store.add(cert.map_err(read)?);
    }
    if store.is_empty() {
        return Err(TlsError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(store)
}

impl Tls {
    /// The roots to check against; `None` when the mode checks nothing.
    fn root_store(&self) -> Result<Option<RootCertStore>, TlsError> {
        let roots = match (&self.roots, self.mode) {
            (_, Mode::Disable | Mode::Prefer) => return Ok(None),
            (Some(roots), _) => roots.clone(),
            (None, Mode::Require) => return Ok(None),
            (None, mode) => {
                let default = default_root();
                if !default.exists() {
                    return Err(TlsError::NoRoot {
                        mode: mode.name(),
                        default,
                    });
                }
                Roots::File(default)
            }
        };
        match roots {
            Roots::File(path) => read_roots(&path).map(Some),
            Roots::System => {
                let mut store = RootCertStore::empty();
                let (added, _) =
                    store.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
                if added == 0 {
                    return Err(TlsError::NoSystemRoots);
                }
                Ok(Some(store))
            }
        }
    }

    /// The connector for tokio-postgres (not used with `disable`).
    pub fn connector(&self) -> Result<MakeRustlsConnect, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?;
        let verifier: Arc<dyn ServerCertVerifier> = match self.root_store()? {
            None => Arc::new(Unchecked(provider)),
            Some(roots) => {
                let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(TlsError::Verifier)?;
                match self.mode {
                    Mode::VerifyFull => webpki,
                    _ => Arc::new(ChainOnly(webpki)),
                }
            }
        };
        let config = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(MakeRustlsConnect::new(config))
    }
}

/// `prefer` and `require` without a root certificate: the connection is
/// encrypted, the certificate is not checked (libpq's behaviour); the
/// handshake's signatures still are.
#[derive(Debug)]
struct Unchecked(Arc<CryptoProvider>);

impl ServerCertVerifier for Unchecked {
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

/// `verify-ca`: the chain to the roots is checked, the name is not.
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
