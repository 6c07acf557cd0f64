//! The worker protocol: length-prefixed binary frames on a dedicated socket (fd 3 in the worker).
//!
//! Every frame is a big-endian u32 length and a body; the body's first byte is the message kind.
//! Results and stream chunks carry the value's JSON text as raw bytes after a fixed header, so
//! neither side escapes or re-parses a payload it only passes through. The Python side of this
//! contract is `python/agentry_worker.py`; `docs/protocol.md` describes both.

pub use agentry_core::executor::{EntrypointReport, Payload, ValueType};
use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;

/// Protocol version spoken by this server; the worker announces its own in the hello.
pub const PROTOCOL_VERSION: u32 = 2;
/// Default limit on one frame, both directions.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// RunAgent's value type of a wire code (the order of `CoreSerializer._determine_type`).
fn value_type(code: u8) -> Option<ValueType> {
    Some(match code {
        0 => ValueType::Null,
        1 => ValueType::Boolean,
        2 => ValueType::Integer,
        3 => ValueType::Number,
        4 => ValueType::String,
        5 => ValueType::Array,
        6 => ValueType::Object,
        _ => return None,
    })
}

/// An entrypoint the worker could not import.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ImportFailure {
    pub tag: String,
    pub r#where: String,
    pub r#type: String,
    pub message: String,
    pub traceback: String,
}

/// The worker's first message.
#[derive(Debug, Clone, Deserialize)]
pub struct Hello {
    pub protocol: u32,
    pub pid: i32,
    pub python: String,
    #[serde(default)]
    pub executable: String,
    pub entrypoints: Vec<EntrypointReport>,
    pub errors: Vec<ImportFailure>,
}

/// A Python exception that ended a call.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct PyFailure {
    pub r#type: String,
    pub message: String,
    pub traceback: String,
    #[serde(default)]
    pub cancelled: bool,
    /// False when the agent said a retry cannot help (`NonRetriableError`).
    #[serde(default = "yes")]
    pub retriable: bool,
}

fn yes() -> bool {
    true
}

/// A message from the worker.
#[derive(Debug, Clone)]
pub enum WorkerMessage {
    Hello(Box<Hello>),
    Result {
        id: u32,
        payload: Payload,
    },
    Chunk {
        id: u32,
        payload: Payload,
    },
    End {
        id: u32,
        count: u32,
    },
    Failure {
        id: u32,
        failure: PyFailure,
    },
    /// `ctx.emit(kind, data)` of a durable run; `data` is JSON text.
    Emit {
        id: u32,
        kind: String,
        data: Bytes,
    },
    /// `ctx.log(message, level)` of a durable run.
    Log {
        id: u32,
        level: String,
        message: String,
    },
    /// `ctx.checkpoint(state)` of a durable run; the worker waits for an `A` frame.
    Checkpoint {
        id: u32,
        state: Bytes,
    },
}

/// A frame that breaks the protocol. The worker that sent it is killed.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProtocolError {
    #[error("empty frame")]
    Empty,
    #[error("unknown message kind {0:#04x}")]
    UnknownKind(u8),
    #[error("truncated {0} frame")]
    Truncated(&'static str),
    #[error("unknown value type {0}")]
    UnknownValueType(u8),
    #[error("payload is not UTF-8")]
    NotUtf8,
    #[error("malformed {kind} message: {message}")]
    Json { kind: &'static str, message: String },
}

fn read_u32(body: &[u8], at: usize, kind: &'static str) -> Result<u32, ProtocolError> {
    body.get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or(ProtocolError::Truncated(kind))
}

fn payload_at(body: &Bytes, kind: &'static str) -> Result<(u32, Payload), ProtocolError> {
    let id = read_u32(body, 1, kind)?;
    let code = *body.get(5).ok_or(ProtocolError::Truncated(kind))?;
    let ty = value_type(code).ok_or(ProtocolError::UnknownValueType(code))?;
    let json = body.slice(6..);
    if std::str::from_utf8(&json).is_err() {
        return Err(ProtocolError::NotUtf8);
    }
    Ok((id, Payload { ty, json }))
}

/// Decodes one frame body (the length prefix already removed). Never panics on any input.
pub fn decode(body: Bytes) -> Result<WorkerMessage, ProtocolError> {
    let kind = *body.first().ok_or(ProtocolError::Empty)?;
    match kind {
        b'R' => {
            payload_at(&body, "result").map(|(id, payload)| WorkerMessage::Result { id, payload })
        }
        b'D' => {
            payload_at(&body, "chunk").map(|(id, payload)| WorkerMessage::Chunk { id, payload })
        }
        b'E' => Ok(WorkerMessage::End {
            id: read_u32(&body, 1, "end")?,
            count: read_u32(&body, 5, "end")?,
        }),
        b'F' => {
            let id = read_u32(&body, 1, "failure")?;
            let failure = serde_json::from_slice(&body[5..]).map_err(|e| ProtocolError::Json {
                kind: "failure",
                message: e.to_string(),
            })?;
            Ok(WorkerMessage::Failure { id, failure })
        }
        b'V' => {
            let id = read_u32(&body, 1, "emit")?;
            let len = body
                .get(5..7)
                .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
                .ok_or(ProtocolError::Truncated("emit"))?;
            let kind = body
                .get(7..7 + len)
                .ok_or(ProtocolError::Truncated("emit"))?;
            let kind = std::str::from_utf8(kind).map_err(|_| ProtocolError::NotUtf8)?;
            let data = body.slice(7 + len..);
            if std::str::from_utf8(&data).is_err() {
                return Err(ProtocolError::NotUtf8);
            }
            Ok(WorkerMessage::Emit {
                id,
                kind: kind.to_string(),
                data,
            })
        }
        b'L' => {
            let id = read_u32(&body, 1, "log")?;
            let level = match body.get(5).ok_or(ProtocolError::Truncated("log"))? {
                b'd' => "debug",
                b'w' => "warning",
                b'e' => "error",
                _ => "info",
            };
            Ok(WorkerMessage::Log {
                id,
                level: level.to_string(),
                message: String::from_utf8_lossy(&body[6..]).into_owned(),
            })
        }
        b'K' => {
            let id = read_u32(&body, 1, "checkpoint")?;
            let state = body.slice(5..);
            if std::str::from_utf8(&state).is_err() {
                return Err(ProtocolError::NotUtf8);
            }
            Ok(WorkerMessage::Checkpoint { id, state })
        }
        b'H' => serde_json::from_slice(&body[1..])
            .map(|h| WorkerMessage::Hello(Box::new(h)))
            .map_err(|e| ProtocolError::Json {
                kind: "hello",
                message: e.to_string(),
            }),
        other => Err(ProtocolError::UnknownKind(other)),
    }
}

/// Encodes a call frame. `args` and `kwargs` are JSON texts of a list and an object, passed
/// through as they came in (the API layer has already checked their shape). `run` is the JSON
/// text `{"id", "attempt", "state"}` of a durable run's context, if the call is one.
pub fn encode_call(
    id: u32,
    tag: &str,
    args: &str,
    kwargs: &str,
    window: u32,
    run: Option<&str>,
) -> Bytes {
    let tag_json = serde_json::to_string(tag).unwrap_or_else(|_| "\"\"".into());
    let run_len = run.map_or(0, str::len);
    let body_len = 1 + 4 + tag_json.len() + args.len() + kwargs.len() + run_len + 40;
    let mut buf = BytesMut::with_capacity(4 + body_len);
    buf.put_u32(0); // patched below
    buf.put_u8(b'C');
    buf.put_u32(id);
    buf.put_slice(b"{\"e\":");
    buf.put_slice(tag_json.as_bytes());
    buf.put_slice(b",\"a\":");
    buf.put_slice(args.as_bytes());
    buf.put_slice(b",\"k\":");
    buf.put_slice(kwargs.as_bytes());
    buf.put_slice(b",\"w\":");
    buf.put_slice(window.to_string().as_bytes());
    if let Some(run) = run {
        buf.put_slice(b",\"r\":");
        buf.put_slice(run.as_bytes());
    }
    buf.put_u8(b'}');
    let len = (buf.len() - 4) as u32;
    buf[0..4].copy_from_slice(&len.to_be_bytes());
    buf.freeze()
}

/// Encodes a cancel frame.
pub fn encode_cancel(id: u32) -> Bytes {
    let mut buf = BytesMut::with_capacity(9);
    buf.put_u32(5);
    buf.put_u8(b'X');
    buf.put_u32(id);
    buf.freeze()
}

/// Encodes the answer to a checkpoint: whether it was saved.
pub fn encode_ack(id: u32, saved: bool) -> Bytes {
    let mut buf = BytesMut::with_capacity(10);
    buf.put_u32(6);
    buf.put_u8(b'A');
    buf.put_u32(id);
    buf.put_u8(u8::from(saved));
    buf.freeze()
}

/// Encodes the quit frame: the worker exits at once.
pub fn encode_quit() -> Bytes {
    Bytes::from_static(&[0, 0, 0, 5, b'Q', 0, 0, 0, 0])
}

/// Encodes a stream credit grant of `n` chunks.
pub fn encode_credit(id: u32, n: u32) -> Bytes {
    let mut buf = BytesMut::with_capacity(13);
    buf.put_u32(9);
    buf.put_u8(b'W');
    buf.put_u32(id);
    buf.put_u32(n);
    buf.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_result_and_rejects_garbage() {
        let mut b = BytesMut::new();
        b.put_u8(b'R');
        b.put_u32(7);
        b.put_u8(6);
        b.put_slice(b"{\"a\": 1}");
        match decode(b.freeze()).unwrap() {
            WorkerMessage::Result { id, payload } => {
                assert_eq!(id, 7);
                assert_eq!(payload.ty, ValueType::Object);
                assert_eq!(payload.as_str(), "{\"a\": 1}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(decode(Bytes::new()).unwrap_err(), ProtocolError::Empty);
        assert_eq!(
            decode(Bytes::from_static(b"R\0\0")).unwrap_err(),
            ProtocolError::Truncated("result")
        );
        assert_eq!(
            decode(Bytes::from_static(b"R\0\0\0\x01\x09x")).unwrap_err(),
            ProtocolError::UnknownValueType(9)
        );
        assert_eq!(
            decode(Bytes::from_static(b"R\0\0\0\x01\x04\xff")).unwrap_err(),
            ProtocolError::NotUtf8
        );
        assert_eq!(
            decode(Bytes::from_static(b"Z")).unwrap_err(),
            ProtocolError::UnknownKind(b'Z')
        );
        assert!(matches!(
            decode(Bytes::from_static(b"F\0\0\0\x01{")).unwrap_err(),
            ProtocolError::Json { .. }
        ));
    }

    #[test]
    fn decodes_run_context_frames() {
        match decode(Bytes::from_static(b"V\0\0\0\x02\0\x04stepnull")).unwrap() {
            WorkerMessage::Emit { id, kind, data } => {
                assert_eq!((id, kind.as_str(), &data[..]), (2, "step", &b"null"[..]));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            decode(Bytes::from_static(b"V\0\0\0\x02\0\x09st")).unwrap_err(),
            ProtocolError::Truncated("emit")
        );
        match decode(Bytes::from_static(b"K\0\0\0\x01{\"n\": 1}")).unwrap() {
            WorkerMessage::Checkpoint { id, state } => {
                assert_eq!((id, &state[..]), (1, &b"{\"n\": 1}"[..]))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decode(Bytes::from_static(b"Lx")).unwrap_err(),
            ProtocolError::Truncated("log")
        ));
    }

    #[test]
    fn call_frame_is_length_prefixed_json() {
        let f = encode_call(3, "echo", "[]", "{\"m\":1}", 64, None);
        let len = u32::from_be_bytes(f[0..4].try_into().unwrap()) as usize;
        assert_eq!(len, f.len() - 4);
        assert_eq!(f[4], b'C');
        let v: serde_json::Value = serde_json::from_slice(&f[9..]).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"e": "echo", "a": [], "k": {"m": 1}, "w": 64})
        );
        let f = encode_call(
            4,
            "t",
            "[]",
            "{}",
            0,
            Some("{\"id\":\"run_1\",\"attempt\":2,\"state\":null}"),
        );
        let v: serde_json::Value = serde_json::from_slice(&f[9..]).unwrap();
        assert_eq!(v["r"]["attempt"], 2);
    }
}
