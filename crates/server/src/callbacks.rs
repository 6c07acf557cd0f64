//! Callbacks leave through here. The signing secret is configured (`callbacks.secret`, or
//! `callbacks.secret_file`), else made once and kept in the state directory. The HTTP client
//! connects only to public addresses unless private callbacks are allowed: names are resolved
//! by a resolver that drops private addresses, so the address connected to is one that was
//! checked (no second lookup an attacker's DNS could answer differently), address literals are
//! checked before sending, redirects are not followed and no proxy is used.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use agentry_core::Config;
use agentry_core::callbacks::{CallbackTransport, Sent, check_url, is_private, literal_ip};
use agentry_engine::CallbackSettings;
use anyhow::Context;
use base64::Engine as _;

/// The file a made-up secret is kept in, in the state directory.
const SECRET_FILE: &str = "callback-secret";

/// The deliverer's settings: the configuration and the secret's key.
pub fn settings(config: &Config, state_dir: &Path) -> anyhow::Result<CallbackSettings> {
    let secret = match (&config.callbacks.secret, &config.callbacks.secret_file) {
        (Some(s), _) => s.clone(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read callbacks.secret_file {}", path.display()))?
            .trim_end()
            .to_string(),
        (None, None) => {
            if config.store.database_url.is_some() {
                tracing::warn!(
                    "callbacks are signed with a secret made for this node alone; give every node of the cluster the same `callbacks.secret` (AGENTRY_CALLBACK_SECRET) so receivers can verify them all"
                );
            }
            kept_secret(&state_dir.join(SECRET_FILE))?
        }
    };
    let key = agentry_core::webhooks::standard_key(&secret)
        .map_err(|e| anyhow::anyhow!("configuration error: callbacks.secret: {e}"))?;
    if key.is_empty() {
        anyhow::bail!("configuration error: callbacks.secret: must not be empty");
    }
    Ok(CallbackSettings {
        config: config.callbacks.clone(),
        key,
    })
}

/// The secret kept at `path`, made (32 random bytes, `whsec_` + base64) at the first start.
fn kept_secret(path: &Path) -> anyhow::Result<String> {
    if let Ok(text) = std::fs::read_to_string(path) {
        return Ok(text.trim_end().to_string());
    }
    let bytes: [u8; 32] = rand::random();
    let secret = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    );
    write_private(path, &secret)
        .with_context(|| format!("cannot keep the callback secret in {}", path.display()))?;
    Ok(secret)
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

/// A resolver that keeps only public addresses.
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = found
                .iter()
                .copied()
                .filter(|a| !is_private(a.ip()))
                .collect();
            // The addresses are not named: the error is shown to whoever made the run, who
            // must not learn the internal network's layout from it.
            if public.is_empty() {
                return Err(format!(
                    "refused: `{host}` resolves only to private addresses; callbacks to them need --allow-private-callbacks"
                )
                .into());
            }
            Ok(Box::new(public.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Sends callbacks over HTTP.
pub struct HttpTransport {
    client: reqwest::Client,
    allow_private: bool,
}

impl HttpTransport {
    pub fn new(allow_private: bool, tls: &agentry_remote::OutboundTls) -> anyhow::Result<Self> {
        let mut builder = tls
            .client_builder()
            .pool_idle_timeout(Duration::from_secs(30));
        if !allow_private {
            builder = builder.dns_resolver(Arc::new(PublicOnly));
        }
        Ok(Self {
            client: builder
                .build()
                .context("cannot build the callback client")?,
            allow_private,
        })
    }
}

#[async_trait::async_trait]
impl CallbackTransport for HttpTransport {
    async fn post(
        &self,
        url: &str,
        headers: &[(&str, String)],
        body: String,
        timeout: Duration,
    ) -> Sent {
        let parsed = match check_url(url) {
            Ok(u) => u,
            Err(e) => return Sent::Refused(e.0),
        };
        if !self.allow_private
            && let Some(ip) = literal_ip(&parsed).filter(|ip| is_private(*ip))
        {
            return Sent::Refused(format!(
                "refused: {ip} is a private address; callbacks to it need --allow-private-callbacks"
            ));
        }
        let mut request = self.client.post(parsed).timeout(timeout).body(body);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        match request.send().await {
            // The answer's body is never read: only its status counts, and a receiver cannot
            // make us hold what it sends.
            Ok(resp) => Sent::Answered(resp.status().as_u16()),
            Err(e) => {
                // The innermost cause: where the resolver's refusal is.
                let why = agentry_remote::root_cause(&e);
                if why.starts_with("refused:") {
                    Sent::Refused(why)
                } else {
                    Sent::Failed(why)
                }
            }
        }
    }
}
