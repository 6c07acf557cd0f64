//! TLS for every call Agentry makes to another server: callbacks, remote executors and n8n
//! webhooks, over HTTPS and (for remote streams) secure WebSockets.
//!
//! One `rustls` configuration, built at start-up: the ring provider (the one sqlx uses, so
//! no second crypto library is linked), the system's trust store through
//! `rustls-platform-verifier` (where operators add their own CAs, as for curl), plus the roots
//! of `outbound.ca_file` if set. The configuration is handed to each client explicitly, so no
//! process-wide default provider is needed and none is assumed.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

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
    /// The system's trust store, plus every certificate of the PEM file `extra_roots`.
    pub fn load(extra_roots: Option<&Path>) -> Result<Self, String> {
        let extra: Vec<CertificateDer<'static>> = match extra_roots {
            None => Vec::new(),
            Some(path) => {
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
                certs
            }
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls_platform_verifier::Verifier::new_with_extra_roots(extra, Arc::clone(&provider))
                .map_err(|e| format!("cannot set up certificate verification: {e}"))?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("cannot set up TLS: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        // HTTP/1.1 only: the clients are built without HTTP/2.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            config: Arc::new(config),
        })
    }

    /// An HTTP client builder that uses this configuration for `https://`: no proxy from the
    /// environment (these are calls to servers the operator or a run named), no redirects.
    pub fn client_builder(&self) -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .tls_backend_preconfigured(rustls::ClientConfig::clone(&self.config))
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("agentry/", env!("CARGO_PKG_VERSION")))
    }

    /// The connector of `wss://` streams (no ALPN: a WebSocket upgrade is HTTP/1.1's).
    pub(crate) fn ws_connector(&self) -> tokio_tungstenite::Connector {
        let mut config = rustls::ClientConfig::clone(&self.config);
        config.alpn_protocols.clear();
        tokio_tungstenite::Connector::Rustls(Arc::new(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_that_is_missing_or_holds_no_certificate_stops_the_start() {
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
        assert!(OutboundTls::load(None).is_ok(), "the system's store alone");
    }
}
