//! Reading a run's event log as the API streams it (SSE).

use serde_json::Value;

use super::{Served, get, json};

/// Parses a finished SSE body into (id, event, data) triples.
pub fn sse(text: &str) -> Vec<(i64, String, Value)> {
    text.split("\n\n")
        .filter_map(|block| {
            let mut id = None;
            let mut event = None;
            let mut data = None;
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().parse().ok();
                } else if let Some(v) = line.strip_prefix("event:") {
                    event = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data = Some(json(v.trim()));
                }
            }
            Some((id?, event?, data?))
        })
        .collect()
}

/// The whole event log of a finished run.
pub async fn events(srv: &impl Served, id: &str) -> Vec<(i64, String, Value)> {
    let (status, text) = get(&srv.url(&format!("/v1/runs/{id}/events?after=0"))).await;
    assert_eq!(status, 200, "{text}");
    sse(&text)
}
