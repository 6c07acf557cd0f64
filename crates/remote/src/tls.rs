//! TLS for every call Agentry makes to another server: callbacks, remote executors and n8n
//! webhooks, over HTTPS and (for remote streams) secure WebSockets; and the CLI's calls.
//!
//! One `rustls` configuration, built at start-up: the ring provider (the one sqlx uses, so
//! no second crypto library is linked); the system's trust store as `rustls-native-certs` reads
//! it (the distribution's bundle, or `SSL_CERT_FILE` / `SSL_CERT_DIR`), plus the roots of
//! `outbound.ca_file`; webpki's verification (chain, name, validity; no revocation check). The
//! configuration is handed to each client explicitly, so no process-wide default provider is
//! needed and none is assumed. A machine with no trust store at all (a scratch container)
//! still starts: its `https://` calls fail, saying why.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

/// The TLS client configuration of outbound calls. Cheap to clone.
#[derive(Clone)]
pub struct OutboundTls {
    config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for OutboundTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboundTls").finish_non_exhaustive()
    }
}

impl OutboundTls {
    /// The system's trust store, plus every certificate of the PEM file `extra_roots` (an
    /// error names the file and the certificate that cannot be a root).
    pub fn load(extra_roots: Option<&Path>) -> Result<Self, String> {
        Self::with_system_roots(extra_roots, rustls_native_certs::load_native_certs())
    }

    fn with_system_roots(
        extra_roots: Option<&Path>,
        system: rustls_native_certs::CertificateResult,
    ) -> Result<Self, String> {
        let mut roots = RootCertStore::empty();
        if let Some(path) = extra_roots {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    format!(
                        "outbound.ca_file {}: cannot read PEM certificates: {e}",
                        path.display()
                    )
                })?;
            if certs.is_empty() {
                return Err(format!(
                    "outbound.ca_file {}: holds no PEM certificate",
                    path.display()
                ));
            }
            for (i, cert) in certs.into_iter().enumerate() {
                roots.add(cert).map_err(|e| {
                    format!(
                        "outbound.ca_file {}: certificate {} is not a usable root: {e}",
                        path.display(),
                        i + 1
                    )
                })?;
            }
        }
        for e in &system.errors {
            tracing::warn!("the system's trust store: {e}");
        }
        let (_, ignored) = roots.add_parsable_certificates(system.certs);
        if ignored > 0 {
            tracing::warn!("the system's trust store: {ignored} certificates could not be used");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("cannot set up TLS: {e}"))?;
        let mut config = if roots.is_empty() {
            tracing::warn!(
                "no trusted root certificate (the system has no trust store and outbound.ca_file is unset): https:// calls will fail"
            );
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoTrustedRoots(provider)))
                .with_no_client_auth()
        } else {
            builder.with_root_certificates(roots).with_no_client_auth()
        };
        // HTTP/1.1 only: the clients are built without HTTP/2.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            config: Arc::new(config),
        })
    }

    /// `builder` with this configuration for `https://`.
    pub fn apply(&self, builder: reqwest::ClientBuilder) -> reqwest::ClientBuilder {
        builder.tls_backend_preconfigured(rustls::ClientConfig::clone(&self.config))
    }

    /// An HTTP client builder for calls to servers the operator or a run named: this TLS, no
    /// proxy from the environment, no redirects.
    pub fn client_builder(&self) -> reqwest::ClientBuilder {
        self.apply(reqwest::Client::builder())
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("agentry/", env!("CARGO_PKG_VERSION")))
    }

    /// The connector of `wss://` streams (no ALPN: a WebSocket upgrade is HTTP/1.1's). Always
    /// pass it: tungstenite's own default would ignore `outbound.ca_file`.
    pub(crate) fn ws_connector(&self) -> tokio_tungstenite::Connector {
        let mut config = rustls::ClientConfig::clone(&self.config);
        config.alpn_protocols.clear();
        tokio_tungstenite::Connector::Rustls(Arc::new(config))
    }
}

/// Whether a failed request failed in its TLS handshake (a certificate that does not verify):
/// trying it again would fail the same way.
pub(crate) fn is_tls_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(mut e) = next {
        // I/O errors wrap one another (the connector's around the TLS stream's) and hide what
        // they wrap from `source()`: unwrap them by hand.
        while let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            e = inner;
        }
        if e.is::<rustls::Error>() {
            return true;
        }
        next = e.source();
    }
    false
}

/// The verifier of a machine that trusts no root: every certificate is refused, saying why.
#[derive(Debug)]
struct NoTrustedRoots(Arc<CryptoProvider>);

impl ServerCertVerifier for NoTrustedRoots {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Err(rustls::Error::General(
            "no trusted root certificate: install the system's CA certificates or set outbound.ca_file".into(),
        ))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_that_is_missing_or_holds_no_usable_certificate_stops_the_start() {
        let dir = tempfile::tempdir().expect("dir");
        let missing = dir.path().join("missing.pem");
        let err = OutboundTls::load(Some(&missing)).expect_err("missing file");
        assert!(err.contains("outbound.ca_file"), "{err}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let err = OutboundTls::load(Some(&empty)).expect_err("no certificate");
        assert!(err.contains("holds no PEM certificate"), "{err}");
        let garbled = dir.path().join("garbled.pem");
        std::fs::write(
            &garbled,
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        assert!(OutboundTls::load(Some(&garbled)).is_err());
        // Valid PEM, valid base64, not a certificate.
        let not_der = dir.path().join("not-der.pem");
        std::fs::write(
            &not_der,
            "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        let err = OutboundTls::load(Some(&not_der)).expect_err("not a certificate");
        assert!(err.contains("certificate 1 is not a usable root"), "{err}");
    }

    #[test]
    fn clients_build_with_this_configuration() {
        let tls = OutboundTls::load(None).expect("the system's store alone");
        // A rustls version reqwest does not share would fail here (an unknown TLS backend).
        tls.client_builder().build().expect("client");
    }

    #[test]
    fn a_machine_without_a_trust_store_still_starts_and_refuses_every_certificate() {
        let tls = OutboundTls::with_system_roots(None, Default::default()).expect("loads");
        tls.client_builder().build().expect("client");
        let verifier = NoTrustedRoots(Arc::new(rustls::crypto::ring::default_provider()));
        let refused = verifier
            .verify_server_cert(
                &CertificateDer::from(vec![0u8; 4]),
                &[],
                &ServerName::try_from("example.com").expect("name"),
                &[],
                UnixTime::now(),
            )
            .expect_err("refused");
        assert!(refused.to_string().contains("no trusted root"), "{refused}");
    }
}
