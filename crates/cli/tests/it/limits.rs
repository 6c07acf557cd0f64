//! Connection limits against real sockets: slow or idle clients are cut off, oversized headers
//! are refused, and connections beyond the cap wait. The application runs in this process.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::common::app::app;
use crate::common::*;

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s
}

/// Reads until the server closes the connection; returns what came and how long it took.
fn read_until_closed(s: &mut TcpStream) -> (String, Duration) {
    let t = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), t.elapsed())
}

async fn blocking(client: impl FnOnce() + Send + 'static) {
    tokio::task::spawn_blocking(client)
        .await
        .expect("the client side of the test");
}

const HEALTH: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";

#[tokio::test(flavor = "multi_thread")]
async fn slow_and_idle_clients_are_cut_off() {
    let srv = app(fixture("durable"))
        .args(["--header-read-timeout-s", "1"])
        .start()
        .await;
    let port = srv.port;
    // The client side blocks on std sockets, away from the server's runtime threads.
    blocking(move || {
        // Headers that never finish.
        let mut slow = connect(port);
        slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .expect("write");
        let (_, took) = read_until_closed(&mut slow);
        assert!(
            took >= Duration::from_millis(800) && took < Duration::from_secs(6),
            "{took:?}"
        );
        // An idle keep-alive connection after a complete request.
        let mut idle = connect(port);
        idle.write_all(HEALTH).expect("write");
        let (text, took) = read_until_closed(&mut idle);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(took < Duration::from_secs(6), "{took:?}");
        // The server is fine.
        let mut ok = connect(port);
        ok.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("write");
        assert!(read_until_closed(&mut ok).0.starts_with("HTTP/1.1 200"));
    })
    .await;
    drop(srv);
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_headers_get_431() {
    let srv = app(fixture("durable"))
        .args(["--max-header-bytes", "8192"])
        .start()
        .await;
    let port = srv.port;
    // The client side blocks on std sockets, away from the server's runtime threads.
    blocking(move || {
        let mut s = connect(port);
        let big = format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(20_000)
        );
        let _ = s.write_all(big.as_bytes());
        let (text, _) = read_until_closed(&mut s);
        assert!(text.starts_with("HTTP/1.1 431"), "{text}");
    })
    .await;
    drop(srv);
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_beyond_the_cap_wait_for_a_free_slot() {
    let srv = app(fixture("durable"))
        .args(["--max-connections", "2"])
        .start()
        .await;
    let port = srv.port;
    // The client side blocks on std sockets, away from the server's runtime threads.
    blocking(move || {
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut s = connect(port);
            s.write_all(HEALTH).expect("write");
            let mut buf = [0u8; 512];
            let n = s.read(&mut buf).expect("read");
            assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
            held.push(s);
        }
        let mut third = connect(port);
        third
            .set_read_timeout(Some(Duration::from_millis(700)))
            .expect("timeout");
        third.write_all(HEALTH).expect("write");
        let mut buf = [0u8; 512];
        assert!(
            third.read(&mut buf).is_err(),
            "a third connection is not served while two are open"
        );
        drop(held.pop());
        third
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let n = third.read(&mut buf).expect("served once a slot frees");
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    })
    .await;
    drop(srv);
}
