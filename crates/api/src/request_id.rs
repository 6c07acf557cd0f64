//! Request ids: the client's `x-request-id` when it is a sane one (1 to 64 of
//! `A-Z a-z 0-9 . _ : -`), else a new UUID, made only when an answer needs one. Every error
//! answer carries its id in the `x-request-id` header, in its body (`request_id`) and in the
//! log line written for it, so that a client's report leads to that line; so do RunAgent's
//! envelopes (which always carry an id), streams (whose later errors name it), and every answer
//! to a request that came with its own id. A successful native answer to a request without one
//! carries none: making one costs more than the rest of the gateway on the hot path.
//!
//! Error bodies are rendered here, where the id is known: a handler's `ApiError` travels to
//! this middleware as a response extension.

use std::fmt;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;

use crate::error::ApiError;

pub const HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// A request's id. `Copy` and allocation-free: it is made for every request.
#[derive(Clone, Copy)]
pub struct RequestId {
    len: u8,
    bytes: [u8; 64],
}

impl RequestId {
    /// A new random id (a UUID).
    pub fn new() -> Self {
        let mut bytes = [0u8; 64];
        let len = uuid::Uuid::new_v4()
            .hyphenated()
            .encode_lower(&mut bytes[..36])
            .len();
        Self {
            len: len as u8,
            bytes,
        }
    }

    /// The client's id, if it is a sane one.
    fn from_client(value: &HeaderValue) -> Option<Self> {
        let raw = value.as_bytes();
        let sane = !raw.is_empty()
            && raw.len() <= 64
            && raw
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
        if !sane {
            return None;
        }
        let mut bytes = [0u8; 64];
        bytes[..raw.len()].copy_from_slice(raw);
        Some(Self {
            len: raw.len() as u8,
            bytes,
        })
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII is ever stored.
        std::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or_default()
    }
}

impl Default for RequestId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({})", self.as_str())
    }
}

/// The id of a request, for a handler that puts it in a body: the client's, else a new one.
/// The handler sends it back as `x-request-id` (`with_header`).
pub fn of(client: Option<axum::Extension<RequestId>>) -> RequestId {
    client.map_or_else(RequestId::new, |axum::Extension(id)| id)
}

/// Sets `x-request-id` on an answer.
pub fn with_header(mut resp: Response, id: RequestId) -> Response {
    if let Ok(value) = HeaderValue::from_str(id.as_str()) {
        resp.headers_mut().insert(HEADER, value);
    }
    resp
}

/// The outermost middleware but CORS: keeps the client's id for the handler, renders a
/// handler's error with the request's id, logs failures, and sends the id back.
pub async fn middleware(mut req: Request, next: Next) -> Response {
    let client = req.headers().get(&HEADER).and_then(RequestId::from_client);
    if let Some(id) = client {
        req.extensions_mut().insert(id);
    }
    let method = req.method().clone();
    let uri = req.uri().clone();
    let mut resp = next.run(req).await;
    let error = resp.extensions_mut().remove::<ApiError>();
    let status = resp.status();
    let failed = status.is_server_error() || status.is_client_error();
    // The id a handler already sent (RunAgent's envelopes), else the client's, else a new one
    // where it is needed.
    let sent = resp.headers().get(&HEADER).and_then(RequestId::from_client);
    let id = match sent.or(client) {
        Some(id) => id,
        None if failed || error.is_some() => RequestId::new(),
        None => return resp,
    };
    if let Some(err) = &error {
        *resp.body_mut() = Body::from(err.body(id.as_str()).to_string());
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    if failed {
        let (code, message) = error
            .as_ref()
            .map_or(("", ""), |e| (e.code.as_str(), e.message.as_str()));
        // The path only: a query string may carry a key.
        if status.is_server_error() {
            tracing::warn!(request_id = %id, method = %method, path = uri.path(), status = status.as_u16(), code, "request failed: {message}");
        } else {
            tracing::info!(request_id = %id, method = %method, path = uri.path(), status = status.as_u16(), code, "request refused: {message}");
        }
    }
    if sent.is_none() {
        resp = with_header(resp, id);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_uuids_or_the_clients_sane_ones() {
        let id = RequestId::new();
        assert_eq!(id.as_str().len(), 36);
        assert!(uuid::Uuid::parse_str(id.as_str()).is_ok());
        let ok = RequestId::from_client(&HeaderValue::from_static("req-42.a_b:c")).unwrap();
        assert_eq!(ok.as_str(), "req-42.a_b:c");
        for bad in ["", "has space", "x\u{7f}", &"a".repeat(65)] {
            if let Ok(v) = HeaderValue::from_str(bad) {
                assert!(RequestId::from_client(&v).is_none(), "{bad:?}");
            }
        }
    }
}
