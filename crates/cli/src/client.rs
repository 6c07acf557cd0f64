//! `agentry run`: call an entrypoint through the native API of a running server. Results go to
//! stdout as JSON; stream chunks are printed one per line as they arrive.

use std::io::Write;

use anyhow::{Context, bail};
use clap::Args;
use futures_util::StreamExt;

#[derive(Args)]
pub struct RunArgs {
    /// The agent's id or name.
    #[arg(long)]
    agent: String,
    /// The entrypoint tag (a tag ending in `_stream` streams).
    #[arg(long)]
    tag: String,
    /// Keyword arguments as a JSON object.
    #[arg(long, default_value = "{}")]
    input: String,
    /// Call deadline in seconds.
    #[arg(long)]
    timeout_s: Option<f64>,
    /// The server.
    #[arg(long, env = "AGENTRY_URL", default_value = "http://127.0.0.1:8450")]
    url: String,
    /// API key, sent as `Authorization: Bearer`.
    #[arg(long, env = "AGENTRY_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

/// An HTTP client that sends the API key, if one is given, with every request.
pub(crate) fn http_client(api_key: Option<&str>) -> anyhow::Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(key) = api_key {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}"))
            .context("the API key has characters a header cannot carry")?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    // The server's TLS settings without its `outbound.ca_file`: `SSL_CERT_FILE` points the
    // CLI at another trust store.
    let tls = agentry_remote::OutboundTls::load(None).map_err(anyhow::Error::msg)?;
    Ok(tls
        .apply(reqwest::Client::builder())
        .default_headers(headers)
        .build()?)
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let input: serde_json::Value =
        serde_json::from_str(&args.input).context("--input must be JSON")?;
    if !input.is_object() {
        bail!("--input must be a JSON object of keyword arguments");
    }
    let mut body = serde_json::json!({ "input": input });
    if let Some(t) = args.timeout_s {
        body["timeout_s"] = t.into();
    }
    let streaming = args.tag.ends_with("_stream");
    let base = args.url.trim_end_matches('/');
    let url = format!(
        "{base}/v1/agents/{}/entrypoints/{}/{}",
        encode(&args.agent),
        encode(&args.tag),
        if streaming { "stream" } else { "invoke" }
    );
    let client = http_client(args.api_key.as_deref())?;
    let response = client
        .post(&url)
        .json(&body)
        .send()
        .await
        .with_context(|| format!("cannot reach {base}"))?;
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        bail!("{status}: {text}");
    }
    let mut out = std::io::stdout().lock();
    if !streaming {
        let value: serde_json::Value = response
            .json()
            .await
            .context("the server sent invalid JSON")?;
        writeln!(out, "{}", value["output"])?;
        return Ok(());
    }
    // Server-sent events: print each chunk's data line as soon as it arrives.
    let mut bytes = response.bytes_stream();
    let mut buf = Vec::new();
    let mut event = String::new();
    while let Some(piece) = bytes.next().await {
        buf.extend_from_slice(&piece.context("the stream broke")?);
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if let Some(name) = line.strip_prefix("event:") {
                event = name.trim().to_string();
            } else if let Some(data) = line.strip_prefix("data:") {
                let data = data.strip_prefix(' ').unwrap_or(data);
                match event.as_str() {
                    "chunk" => {
                        writeln!(out, "{data}")?;
                        out.flush()?;
                    }
                    "error" => bail!("the stream failed: {data}"),
                    _ => {}
                }
            }
        }
    }
    Ok(())
}

/// Percent-encodes a path segment.
pub(crate) fn encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
