//! The server's own TLS: a certificate chain and key from PEM files, reloaded without a restart
//! (SIGHUP, [`ServerTls::reload`]), and optionally client certificates from an operators' CA.
//!
//! TLS 1.2 and 1.3 only, ALPN `http/1.1` ([`fedhive_tls`]). A reload reads both files again and
//! swaps the certificate for new handshakes; connections already open keep theirs. A reload that
//! fails (a half-written file, a key that does not match) keeps the current certificate and says why.
//!
//! With a client CA, every connection may present a certificate signed by it, and none has to:
//! devices have none. The routes that operators and the cloud worker use then refuse a request that
//! came without one ([`crate::api`] checks [`ClientCertificate`]).

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use fedhive_tls::{
    TlsError,
    rustls::{
        self, ServerConfig,
        server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
        sign::CertifiedKey,
    },
};
use tokio_rustls::TlsAcceptor;

/// Where the server's TLS material is.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsSettings {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key of the leaf.
    pub key: PathBuf,
    /// PEM CA certificates whose client certificates operators and the cloud worker present.
    pub client_ca: Option<PathBuf>,
}

/// Why the TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A verified client certificate, in a request's extensions when its connection presented one.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientCertificate {
    /// SHA-256 of the certificate's DER, for logs.
    pub fingerprint: [u8; 32],
}

impl fmt::Debug for ClientCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientCertificate({})", hex::encode(&self.fingerprint[..8]))
    }
}

/// The acceptor and the certificate it serves, which [`ServerTls::reload`] replaces.
pub struct ServerTls {
    settings: TlsSettings,
    current: Arc<CurrentCertificate>,
    acceptor: TlsAcceptor,
}

impl ServerTls {
    pub fn load(settings: TlsSettings) -> Result<ServerTls, LoadError> {
        let current = Arc::new(CurrentCertificate(RwLock::new(Arc::new(certified_key(
            &settings,
        )?))));
        let provider = fedhive_tls::provider();
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(fedhive_tls::PROTOCOL_VERSIONS)
            .map_err(|source| TlsError::Rustls {
                what: "protocol versions".into(),
                source,
            })?;
        let builder = match &settings.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let what = path.display().to_string();
                let roots = fedhive_tls::root_store_from_pem(&read(path)?, &what)?;
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| TlsError::Rustls {
                        what,
                        source: rustls::Error::General(e.to_string()),
                    })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_cert_resolver(current.clone());
        config.alpn_protocols = fedhive_tls::alpn_protocols();
        Ok(ServerTls {
            settings,
            current,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// Reads the certificate and key again; new handshakes use them. On error the current ones stay.
    pub fn reload(&self) -> Result<(), LoadError> {
        let key = certified_key(&self.settings)?;
        *self.current.0.write().expect("no panics while holding the lock") = Arc::new(key);
        Ok(())
    }

    /// Reloads on every SIGHUP, for as long as the server runs (how `systemctl reload` and
    /// certificate renewal hooks tell a server its certificate changed).
    pub async fn reload_on_sighup(self: Arc<Self>) {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangups = signal(SignalKind::hangup()).expect("installing the SIGHUP handler");
        while hangups.recv().await.is_some() {
            match self.reload() {
                Ok(()) => tracing::info!(cert = %self.settings.cert.display(), "TLS certificate reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "TLS certificate not reloaded; serving the previous one")
                }
            }
        }
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    /// Whether operators and the cloud worker must present a client certificate.
    pub fn verifies_clients(&self) -> bool {
        self.settings.client_ca.is_some()
    }
}

/// The certificate of new handshakes.
#[derive(Debug)]
struct CurrentCertificate(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for CurrentCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().expect("no panics while holding the lock").clone())
    }
}

/// The chain and key of `settings`, checked to belong together.
fn certified_key(settings: &TlsSettings) -> Result<CertifiedKey, LoadError> {
    let chain =
        fedhive_tls::certificates_from_pem(&read(&settings.cert)?, &settings.cert.display().to_string())?;
    let key = fedhive_tls::private_key_from_pem(&read(&settings.key)?, &settings.key.display().to_string())?;
    CertifiedKey::from_der(chain, key, &fedhive_tls::provider()).map_err(|source| {
        LoadError::Tls(TlsError::Rustls {
            what: format!("{} with {}", settings.cert.display(), settings.key.display()),
            source,
        })
    })
}

fn read(path: &Path) -> Result<Vec<u8>, LoadError> {
    std::fs::read(path).map_err(|source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::{Extension, Router, routing::get};
    use fedhive_tls::{
        ClientTls, Identity,
        dev_ca::{DevCa, Issued},
    };
    use prometheus_client::metrics::gauge::Gauge;
    use tokio::net::TcpListener;

    use super::*;
    use crate::http::{ConnectionLimits, serve};

    /// TLS material on disk, as the server reads it.
    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new() -> Files {
            Files {
                dir: tempfile::tempdir().unwrap(),
            }
        }

        fn write(&self, name: &str, contents: &[u8]) -> PathBuf {
            let path = self.dir.path().join(name);
            std::fs::write(&path, contents).unwrap();
            path
        }

        fn settings(&self, issued: &Issued, client_ca: Option<&DevCa>) -> TlsSettings {
            TlsSettings {
                cert: self.write("cert.pem", &issued.cert_pem),
                key: self.write("key.pem", &issued.key_pem),
                client_ca: client_ca.map(|ca| self.write("client-ca.pem", &ca.cert_pem())),
            }
        }
    }

    /// Serves `/whoami` (whether the connection presented a client certificate) over `tls`.
    async fn start(tls: &ServerTls, limits: ConnectionLimits) -> String {
        let app = Router::new().route(
            "/whoami",
            get(|certificate: Option<Extension<ClientCertificate>>| async move {
                if certificate.is_some() {
                    "certified"
                } else {
                    "anonymous"
                }
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(serve(
            listener,
            app,
            Some(tls.acceptor()),
            limits,
            Gauge::default(),
            std::future::pending(),
        ));
        format!("https://localhost:{port}/whoami")
    }

    fn client(tls: ClientTls) -> reqwest::Client {
        reqwest::Client::builder()
            .tls_backend_preconfigured(tls.rustls_config().unwrap())
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    }

    fn trusting(ca: &DevCa) -> ClientTls {
        ClientTls {
            ca_pem: Some(ca.cert_pem()),
            ..ClientTls::default()
        }
    }

    async fn get_text(client: &reqwest::Client, url: &str) -> Result<String, reqwest::Error> {
        client.get(url).send().await?.error_for_status()?.text().await
    }

    #[tokio::test]
    async fn https_is_served_to_clients_that_trust_the_ca_and_no_others() {
        let ca = DevCa::new("fedhive test CA");
        let files = Files::new();
        let tls = ServerTls::load(files.settings(&ca.issue(&["localhost"]), None)).unwrap();
        let url = start(&tls, ConnectionLimits::default()).await;
        assert_eq!(get_text(&client(trusting(&ca)), &url).await.unwrap(), "anonymous");
        // The public roots do not include the test CA; another CA is not the test CA.
        let public = get_text(&client(ClientTls::default()), &url).await.unwrap_err();
        assert!(public.is_connect(), "{public:?}");
        let other = get_text(&client(trusting(&DevCa::new("another CA"))), &url).await;
        assert!(other.is_err());
        // Plain HTTP on the TLS port gets no HTTP answer.
        let plain = reqwest::Client::new()
            .get(url.replace("https://", "http://"))
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        assert!(plain.is_err(), "{plain:?}");
    }

    #[tokio::test]
    async fn a_client_limited_to_tls_12_is_served() {
        let ca = DevCa::new("fedhive test CA");
        let files = Files::new();
        let tls = ServerTls::load(files.settings(&ca.issue(&["localhost"]), None)).unwrap();
        let url = start(&tls, ConnectionLimits::default()).await;
        let roots = fedhive_tls::root_store_from_pem(&ca.cert_pem(), "CA").unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(fedhive_tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = fedhive_tls::alpn_protocols();
        let tls12 = reqwest::Client::builder()
            .tls_backend_preconfigured(config)
            .tls_info(true)
            .build()
            .unwrap();
        let answer = tls12.get(&url).send().await.unwrap();
        assert_eq!(answer.status(), 200);
    }

    #[tokio::test]
    async fn a_pin_on_another_key_is_refused() {
        let ca = DevCa::new("fedhive test CA");
        let files = Files::new();
        let served = ca.issue(&["localhost"]);
        let tls = ServerTls::load(files.settings(&served, None)).unwrap();
        let url = start(&tls, ConnectionLimits::default()).await;
        let pinned = |pin| {
            client(ClientTls {
                pins: vec![pin],
                ..trusting(&ca)
            })
        };
        assert_eq!(get_text(&pinned(served.pin), &url).await.unwrap(), "anonymous");
        // Same CA, same name, another key: the pin refuses it.
        let other_pin = ca.issue(&["localhost"]).pin;
        assert!(get_text(&pinned(other_pin), &url).await.is_err());
    }

    #[tokio::test]
    async fn a_reload_serves_the_new_certificate_to_new_connections_and_a_bad_one_keeps_the_old() {
        let ca = DevCa::new("fedhive test CA");
        let files = Files::new();
        let first = ca.issue(&["localhost"]);
        let tls = ServerTls::load(files.settings(&first, None)).unwrap();
        let url = start(&tls, ConnectionLimits::default()).await;
        let pinned = |pin| {
            client(ClientTls {
                pins: vec![pin],
                ..trusting(&ca)
            })
        };
        assert!(get_text(&pinned(first.pin), &url).await.is_ok());

        let second = ca.issue(&["localhost"]);
        files.settings(&second, None);
        tls.reload().unwrap();
        assert!(get_text(&pinned(second.pin), &url).await.is_ok());
        assert!(get_text(&pinned(first.pin), &url).await.is_err());

        // A key that does not belong to the certificate: refused, the second stays.
        files.write("key.pem", &first.key_pem);
        let err = tls.reload().unwrap_err();
        assert!(err.to_string().contains("key.pem"), "{err}");
        files.write("cert.pem", b"half a file");
        assert!(tls.reload().is_err());
        assert!(get_text(&pinned(second.pin), &url).await.is_ok());
    }

    #[tokio::test]
    async fn client_certificates_from_the_client_ca_are_verified_and_reach_the_handlers() {
        let ca = DevCa::new("fedhive test CA");
        let operators = DevCa::new("operators");
        let files = Files::new();
        let tls = ServerTls::load(files.settings(&ca.issue(&["localhost"]), Some(&operators))).unwrap();
        assert!(tls.verifies_clients());
        let url = start(&tls, ConnectionLimits::default()).await;
        let with_identity = |issuer: &DevCa| {
            let issued = issuer.issue(&["operator.example"]);
            client(ClientTls {
                identity: Some(Identity {
                    cert_chain_pem: issued.cert_pem,
                    key_pem: issued.key_pem,
                }),
                ..trusting(&ca)
            })
        };
        assert_eq!(
            get_text(&with_identity(&operators), &url).await.unwrap(),
            "certified"
        );
        // Devices present none and are served.
        assert_eq!(get_text(&client(trusting(&ca)), &url).await.unwrap(), "anonymous");
        // A certificate from a CA the server does not trust for clients ends the handshake.
        assert!(
            get_text(&with_identity(&DevCa::new("stranger")), &url)
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn a_client_that_never_starts_its_handshake_is_cut_off() {
        use tokio::io::AsyncReadExt;
        let ca = DevCa::new("fedhive test CA");
        let files = Files::new();
        let tls = ServerTls::load(files.settings(&ca.issue(&["localhost"]), None)).unwrap();
        let limits = ConnectionLimits {
            header_read_timeout: Duration::from_millis(300),
            ..ConnectionLimits::default()
        };
        let url = start(&tls, limits).await;
        let port = url.split(':').nth(2).unwrap().split('/').next().unwrap();
        let mut silent = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), silent.read_to_end(&mut answer))
            .await
            .expect("the server closed the silent connection")
            .unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "{:?}",
            started.elapsed()
        );
        assert!(answer.is_empty());
    }
}
