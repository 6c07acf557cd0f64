//! What a web page may not do to a server with authentication off.
//!
//! Without keys, a server bound to loopback answers anyone who can reach 127.0.0.1, and a web
//! page the user visits is such a someone: it can POST `text/plain` or form bodies (no CORS
//! preflight), open a WebSocket to any origin, and, by DNS rebinding, make its own domain
//! resolve to 127.0.0.1 and read the answers. So, while authentication is off on a loopback
//! address, every route but the probes:
//!
//! * answers only a loopback `Host` (`localhost`, `*.localhost`, `127.0.0.0/8`, `[::1]`):
//!   a rebound domain is refused;
//! * refuses a state-changing request (any method but GET, HEAD and OPTIONS) and a WebSocket
//!   handshake whose `Origin` is not this server's own origin or one `--cors-origin` allows
//!   (and one a browser marks `Sec-Fetch-Site: cross-site` without such an origin);
//! * takes a body only as JSON (`application/json`, `application/*+json`, or no type at all),
//!   the one kind a page cannot send cross-site without a preflight. curl's default form type
//!   is accepted from clients that are not browsers (no `Origin`, no `Sec-Fetch-Site`), so that
//!   `curl -d '{…}'` keeps working.
//!
//! RunAgent's SDKs, curl and `agentry run` send none of what is refused. With keys on, none of
//! this applies: a page has no key to send.

use agentry_core::ErrorCode;
use axum::extract::Request;
use axum::http::{HeaderMap, Method, header};

/// Why a request looks like a browser's that must not get through.
pub(crate) struct Refusal {
    pub(crate) code: ErrorCode,
    pub(crate) message: String,
}

/// `None` if the request may go on. `allowed_origins` is `--cors-origin` (`*`: any).
pub(crate) fn check(req: &Request, allowed_origins: &[String]) -> Option<Refusal> {
    let headers = req.headers();
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    if let Some(host) = host
        && !is_loopback_host(host)
    {
        return Some(Refusal {
            code: ErrorCode::PermissionError,
            message: format!(
                "Host `{host}` is not a loopback name: with authentication off this server answers only requests addressed to localhost (a guard against DNS rebinding). Create an API key to serve other names"
            ),
        });
    }
    let upgrade = headers
        .get(header::UPGRADE)
        .and_then(|u| u.to_str().ok())
        .is_some_and(|u| u.eq_ignore_ascii_case("websocket"));
    let changes_state = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if !changes_state && !upgrade {
        return None;
    }
    let origin = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok());
    let origin_ok = origin.is_some_and(|o| {
        allowed_origins
            .iter()
            .any(|a| a == "*" || a.trim_end_matches('/') == o)
            || host.is_some_and(|h| same_origin(o, h))
    });
    let cross_site = headers
        .get("sec-fetch-site")
        .and_then(|s| s.to_str().ok())
        .is_some_and(|s| s != "same-origin" && s != "none");
    if (origin.is_some() || cross_site) && !origin_ok {
        return Some(Refusal {
            code: ErrorCode::PermissionError,
            message: format!(
                "a cross-origin request from {} is refused while authentication is off: allow the origin with --cors-origin, or create an API key",
                origin.unwrap_or("another site")
            ),
        });
    }
    if changes_state
        && !json_body_allowed(headers, origin.is_none() && !has_fetch_metadata(headers))
    {
        return Some(Refusal {
            code: ErrorCode::UnsupportedMediaType,
            message: "the body must be sent as `Content-Type: application/json`".into(),
        });
    }
    None
}

/// The `Host` header names this machine: `localhost`, a `*.localhost` name, or a loopback
/// address, with any port.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        // `[::1]:8450`: an address, then nothing or a port.
        Some(rest) => match rest.split_once(']') {
            Some((addr, "")) => addr,
            Some((addr, port))
                if port
                    .strip_prefix(':')
                    .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit())) =>
            {
                addr
            }
            _ => return false,
        },
        None => host.rsplit_once(':').map_or(host, |(name, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                name
            } else {
                host
            }
        }),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `origin` (`scheme://host[:port]`) is this server's own, as the request addressed it.
fn same_origin(origin: &str, host: &str) -> bool {
    origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .is_some_and(|rest| rest.eq_ignore_ascii_case(host))
}

fn has_fetch_metadata(headers: &HeaderMap) -> bool {
    headers.contains_key("sec-fetch-site") || headers.contains_key("sec-fetch-mode")
}

/// JSON, no type, or (from a client that is not a browser) curl's default form type.
fn json_body_allowed(headers: &HeaderMap, not_a_browser: bool) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return true;
    };
    let Ok(value) = value.to_str() else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
        || (not_a_browser && essence == "application/x-www-form-urlencoded")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, headers: &[(&str, &str)]) -> Request {
        let mut b = axum::http::Request::builder()
            .method(method)
            .uri("/v1/runs");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(axum::body::Body::empty()).expect("request")
    }

    fn refused(method: &str, headers: &[(&str, &str)]) -> Option<ErrorCode> {
        check(&request(method, headers), &["https://app.example".into()]).map(|r| r.code)
    }

    #[test]
    fn loopback_hosts_pass_and_others_are_refused() {
        for host in [
            "localhost",
            "localhost:8450",
            "LOCALHOST.:1",
            "app.localhost:3000",
            "127.0.0.1:8450",
            "127.1.2.3",
            "[::1]:8450",
        ] {
            assert_eq!(refused("GET", &[("host", host)]), None, "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:8450",
            "localhost.evil.example",
            "10.0.0.1:8450",
            "[::2]:8450",
            "[::1]evil.example",
            "[::1]:80x",
            "127.0.0.1.nip.io",
        ] {
            assert_eq!(
                refused("GET", &[("host", host)]),
                Some(ErrorCode::PermissionError),
                "{host}"
            );
        }
    }

    #[test]
    fn foreign_origins_and_simple_bodies_are_refused_from_browsers_only() {
        let host = ("host", "127.0.0.1:8450");
        let json = ("content-type", "application/json");
        // Non-browser clients: curl's default type, JSON, or nothing.
        assert_eq!(refused("POST", &[host]), None);
        assert_eq!(refused("POST", &[host, json]), None);
        let form = ("content-type", "application/x-www-form-urlencoded");
        assert_eq!(refused("POST", &[host, form]), None);
        // The server's own origin and an allowed one.
        assert_eq!(
            refused("POST", &[host, json, ("origin", "http://127.0.0.1:8450")]),
            None
        );
        assert_eq!(
            refused("POST", &[host, json, ("origin", "https://app.example")]),
            None
        );
        // Another origin, `null`, or a cross-site fetch without an origin.
        for origin in ["https://evil.example", "null", "http://localhost:3000"] {
            assert_eq!(
                refused("POST", &[host, json, ("origin", origin)]),
                Some(ErrorCode::PermissionError),
                "{origin}"
            );
        }
        assert_eq!(
            refused("DELETE", &[host, ("sec-fetch-site", "cross-site")]),
            Some(ErrorCode::PermissionError)
        );
        // A cross-origin WebSocket handshake.
        let ws = [
            host,
            ("upgrade", "websocket"),
            ("origin", "https://evil.example"),
        ];
        assert_eq!(refused("GET", &ws), Some(ErrorCode::PermissionError));
        // Bodies a page can send without a preflight.
        for ty in [
            "text/plain",
            "multipart/form-data; boundary=x",
            "text/plain;charset=UTF-8",
        ] {
            assert_eq!(
                refused("POST", &[host, ("content-type", ty)]),
                Some(ErrorCode::UnsupportedMediaType),
                "{ty}"
            );
        }
        let browser_form = [host, form, ("sec-fetch-site", "same-origin")];
        assert_eq!(
            refused("POST", &browser_form),
            Some(ErrorCode::UnsupportedMediaType)
        );
        // Reads are not state changes.
        assert_eq!(
            refused("GET", &[host, ("origin", "https://evil.example")]),
            None
        );
    }
}
