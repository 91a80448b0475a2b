//! TLS settings shared by fedhive's server, device SDK, operator CLI and load harness.
//!
//! Everything speaks TLS 1.2 or 1.3 only, over rustls with the aws-lc-rs provider (the one reqwest
//! already builds), with ALPN `http/1.1` (the server speaks HTTP/1 only). A client may trust a CA of
//! its own instead of the public roots (a private deployment, a test CA) and may pin the server's
//! public key ([`SpkiPin`]), so that a certificate from any other key is refused even when a trusted
//! CA signed it. The cloud worker and operators may present a client certificate
//! ([`ClientTls::identity`]).

#[cfg(feature = "dev-ca")]
pub mod dev_ca;

use std::{fmt, str::FromStr, sync::Arc};

use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::CryptoProvider,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject};
use sha2::{Digest, Sha256};

pub use rustls;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what}: no PEM certificate in it")]
    NoCertificate { what: String },
    #[error("{what}: not a PEM certificate chain or private key: {source}")]
    Pem {
        what: String,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{what}: {source}")]
    Rustls { what: String, source: rustls::Error },
    #[error(
        "{0:?} is not a pin: expected `sha256:` and 64 hex digits (the SHA-256 of the certificate's SubjectPublicKeyInfo)"
    )]
    BadPin(String),
    #[error("certificate is not valid DER X.509: {0}")]
    BadCertificate(webpki::Error),
}

/// The protocol versions every fedhive endpoint accepts.
pub static PROTOCOL_VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// The ALPN protocols every fedhive endpoint offers.
pub fn alpn_protocols() -> Vec<Vec<u8>> {
    vec![b"http/1.1".to_vec()]
}

/// The crypto provider of every config made here: aws-lc-rs, named explicitly because the build
/// also has ring (under sqlx), and rustls refuses to guess between two.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Every certificate in a PEM file's contents, in order (a chain: leaf first).
pub fn certificates_from_pem(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            what: what.to_string(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what: what.to_string(),
        });
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file's contents.
pub fn private_key_from_pem(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|source| TlsError::Pem {
        what: what.to_string(),
        source,
    })
}

/// A root store holding every certificate of a PEM file (a private CA).
pub fn root_store_from_pem(pem: &[u8], what: &str) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates_from_pem(pem, what)? {
        roots.add(cert).map_err(|source| TlsError::Rustls {
            what: what.to_string(),
            source,
        })?;
    }
    Ok(roots)
}

/// A pin on a server's public key: the SHA-256 of its certificate's DER SubjectPublicKeyInfo,
/// written `sha256:<64 hex digits>`. Pinning the key rather than the certificate lets the server
/// renew its certificate with the same key without breaking devices in the field.
///
/// From a certificate file: `openssl x509 -in cert.pem -pubkey -noout | openssl pkey -pubin
/// -outform der | sha256sum`, or [`SpkiPin::of_certificate`].
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpkiPin(pub [u8; 32]);

impl SpkiPin {
    /// The pin of a DER certificate's public key.
    pub fn of_certificate(cert: &CertificateDer<'_>) -> Result<SpkiPin, TlsError> {
        let cert = webpki::EndEntityCert::try_from(cert).map_err(TlsError::BadCertificate)?;
        Ok(SpkiPin(
            Sha256::digest(cert.subject_public_key_info().as_ref()).into(),
        ))
    }
}

impl FromStr for SpkiPin {
    type Err = TlsError;

    fn from_str(s: &str) -> Result<Self, TlsError> {
        let hex_digits = s.strip_prefix("sha256:").unwrap_or(s);
        let mut pin = [0u8; 32];
        hex::decode_to_slice(hex_digits, &mut pin).map_err(|_| TlsError::BadPin(s.to_string()))?;
        Ok(SpkiPin(pin))
    }
}

impl fmt::Display for SpkiPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for SpkiPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A client certificate and its key, both PEM.
#[derive(Clone)]
pub struct Identity {
    pub cert_chain_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key is a secret: never in logs.
        f.debug_struct("Identity").finish_non_exhaustive()
    }
}

/// How a client checks the server (and proves itself to it). The default trusts the public roots
/// and nothing else, like a browser.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// Trust only the CA certificates in this PEM instead of the public roots.
    pub ca_pem: Option<Vec<u8>>,
    /// Accept only a server whose key is one of these (after the usual chain and name checks); any
    /// one matching is enough, so a deployment can list its next key before it rotates.
    pub pins: Vec<SpkiPin>,
    /// Present this certificate when the server asks for one.
    pub identity: Option<Identity>,
}

impl ClientTls {
    /// True when nothing differs from the default, so a client need not build its own config.
    pub fn is_default(&self) -> bool {
        self.ca_pem.is_none() && self.pins.is_empty() && self.identity.is_none()
    }

    /// `builder` with these settings; unchanged for the default, which reqwest already has (its own
    /// config then keeps the platform's roots).
    #[cfg(feature = "reqwest")]
    pub fn configure(&self, builder: reqwest::ClientBuilder) -> Result<reqwest::ClientBuilder, TlsError> {
        if self.is_default() {
            return Ok(builder);
        }
        Ok(builder.tls_backend_preconfigured(self.rustls_config()?))
    }

    /// The rustls config these settings describe.
    pub fn rustls_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let provider = provider();
        let roots = match &self.ca_pem {
            Some(pem) => root_store_from_pem(pem, "CA certificate")?,
            None => rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            },
        };
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| TlsError::Rustls {
                what: "CA certificate".into(),
                source: rustls::Error::General(e.to_string()),
            })?;
        let verifier: Arc<dyn ServerCertVerifier> = if self.pins.is_empty() {
            webpki
        } else {
            Arc::new(PinnedVerifier {
                inner: webpki,
                pins: self.pins.clone(),
            })
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(PROTOCOL_VERSIONS)
            .map_err(|source| TlsError::Rustls {
                what: "protocol versions".into(),
                source,
            })?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match &self.identity {
            None => builder.with_no_client_auth(),
            Some(identity) => builder
                .with_client_auth_cert(
                    certificates_from_pem(&identity.cert_chain_pem, "client certificate")?,
                    private_key_from_pem(&identity.key_pem, "client key")?,
                )
                .map_err(|source| TlsError::Rustls {
                    what: "client certificate and key".into(),
                    source,
                })?,
        };
        config.alpn_protocols = alpn_protocols();
        Ok(config)
    }
}

/// The TLS flags of fedhive's command-line clients, read into a [`ClientTls`].
#[cfg(feature = "cli")]
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientTlsArgs {
    /// Trust only the CA certificates in this PEM file (instead of the public roots) for an https
    /// server.
    #[arg(long, env = "FEDHIVE_CA_CERT", global = true)]
    pub ca_cert: Option<std::path::PathBuf>,
    /// Accept only a server whose public key has this pin, `sha256:<hex>` (repeat for several).
    #[arg(long = "pin", env = "FEDHIVE_PIN", value_delimiter = ',', global = true)]
    pub pins: Vec<SpkiPin>,
    /// Present this PEM client certificate (servers started with --tls-client-ca ask operators and
    /// the cloud worker for one).
    #[arg(long, env = "FEDHIVE_CLIENT_CERT", requires = "client_key", global = true)]
    pub client_cert: Option<std::path::PathBuf>,
    /// The PEM private key of --client-cert.
    #[arg(long, env = "FEDHIVE_CLIENT_KEY", requires = "client_cert", global = true)]
    pub client_key: Option<std::path::PathBuf>,
}

#[cfg(feature = "cli")]
impl ClientTlsArgs {
    /// Reads the files the flags name.
    pub fn load(&self) -> std::io::Result<ClientTls> {
        let read = |path: &std::path::Path| {
            std::fs::read(path)
                .map_err(|e| std::io::Error::new(e.kind(), format!("reading {}: {e}", path.display())))
        };
        Ok(ClientTls {
            ca_pem: self.ca_cert.as_deref().map(read).transpose()?,
            pins: self.pins.clone(),
            identity: match (&self.client_cert, &self.client_key) {
                (Some(cert), Some(key)) => Some(Identity {
                    cert_chain_pem: read(cert)?,
                    key_pem: read(key)?,
                }),
                _ => None,
            },
        })
    }
}

/// The usual WebPKI checks (chain to a trusted root, name, validity), then the key pin.
#[derive(Debug)]
struct PinnedVerifier {
    inner: Arc<WebPkiServerVerifier>,
    pins: Vec<SpkiPin>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified =
            self.inner
                .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        let pin = SpkiPin::of_certificate(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))?;
        if self.pins.contains(&pin) {
            Ok(verified)
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_reads_back_as_written() {
        let text = format!("sha256:{}", "ab".repeat(32));
        let pin: SpkiPin = text.parse().unwrap();
        assert_eq!(pin.to_string(), text);
        assert_eq!("ab".repeat(32).parse::<SpkiPin>().unwrap(), pin);
    }

    #[test]
    fn a_malformed_pin_is_refused_with_its_text() {
        for bad in [
            "sha256:abc",
            "",
            &"zz".repeat(32),
            &format!("sha1:{}", "ab".repeat(32)),
        ] {
            let err = bad.parse::<SpkiPin>().unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn a_file_without_certificates_is_refused_by_name() {
        let err = certificates_from_pem(b"not a certificate", "CA file").unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
        assert!(err.to_string().contains("CA file"));
    }

    #[test]
    fn the_default_config_offers_http1() {
        let config = ClientTls::default().rustls_config().unwrap();
        assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);
    }
}
