//! TLS on loopback for tests of outbound `https://`: a certificate authority made per test
//! (its root in a PEM file, for `outbound.ca_file`), and a TLS-terminating front that relays
//! each connection to a plain server, as a production proxy would.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tokio_rustls::rustls;

/// A CA that signs server certificates for TLS fronts.
pub struct TestCa {
    /// The CA's root certificate, PEM.
    pub root_file: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
    _dir: tempfile::TempDir,
}

/// A TLS front on loopback.
pub struct Front {
    pub port: u16,
    /// Connections accepted (each one handshake tried).
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
}

impl Front {
    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// The certificate a front presents.
pub enum Presented {
    /// Valid, for `localhost` and `127.0.0.1`.
    Good,
    /// Valid, for another name only.
    OtherName,
    /// For `localhost` and `127.0.0.1`, expired in 2021.
    Expired,
}

impl TestCa {
    pub fn new() -> Self {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "Agentry test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("ca key"))
            .expect("ca");
        let dir = tempfile::tempdir().expect("dir");
        let root_file = dir.path().join("ca.pem");
        std::fs::write(&root_file, ca.pem()).expect("write ca");
        Self {
            root_file,
            ca,
            _dir: dir,
        }
    }

    fn server_config(&self, presented: Presented) -> Arc<rustls::ServerConfig> {
        let names = match presented {
            Presented::OtherName => vec!["other.example".to_string()],
            _ => vec!["localhost".to_string(), "127.0.0.1".to_string()],
        };
        let mut params = CertificateParams::new(names).expect("leaf params");
        if let Presented::Expired = presented {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let leaf_key = KeyPair::generate().expect("leaf key");
        let leaf = params.signed_by(&leaf_key, &self.ca).expect("leaf");
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone(), self.ca.der().clone()], key)
        .expect("server config");
        Arc::new(server)
    }

    /// A front presenting a good certificate.
    pub async fn front(&self, backend: SocketAddr) -> Front {
        self.front_presenting(backend, Presented::Good).await
    }

    /// Serves TLS on a loopback port, relaying each connection to `backend`. Handshakes that
    /// fail (a client that does not trust the certificate) are dropped.
    pub async fn front_presenting(&self, backend: SocketAddr, presented: Presented) -> Front {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let acceptor = tokio_rustls::TlsAcceptor::from(self.server_config(presented));
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&connections);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok(mut plain) = tokio::net::TcpStream::connect(backend).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        Front { port, connections }
    }
}
