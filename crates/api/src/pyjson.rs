//! Python's JSON, byte for byte: RunAgent's wire format nests `json.dumps` output (default
//! separators, `ensure_ascii=False`) inside compact JSON, and reports malformed JSON with
//! Python's `json` module messages. Built by hand because these strings are on the hot path.

use std::fmt::Write;

/// Appends `s` as a JSON string literal, escaping exactly what Python's `json.dumps` escapes
/// with `ensure_ascii=False` (and what serde_json escapes): `"`, `\`, and control characters.
pub fn push_json_str(out: &mut String, s: &str) {
    out.reserve(s.len() + 2);
    out.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &str = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0x00..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if escape.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(escape);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// `json.dumps({"type": ty, "payload": payload})`: RunAgent's structured value string.
pub fn structured(ty: &str, payload: &str) -> String {
    let mut s = String::with_capacity(payload.len() + ty.len() + 32);
    s.push_str("{\"type\": \"");
    s.push_str(ty);
    s.push_str("\", \"payload\": ");
    push_json_str(&mut s, payload);
    s.push('}');
    s
}

/// A JSON syntax error described the way Python's `json.JSONDecodeError` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PyJsonError {
    /// `Expecting value`, `Expecting property name enclosed in double quotes`, …
    pub msg: &'static str,
    /// Character (not byte) offset of the error.
    pub pos: usize,
    pub lineno: usize,
    pub colno: usize,
}

impl std::fmt::Display for PyJsonError {
    /// `str(JSONDecodeError)`: `{msg}: line {lineno} column {colno} (char {pos})`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: line {} column {} (char {})",
            self.msg, self.lineno, self.colno, self.pos
        )
    }
}

/// Translates a serde_json syntax error on `text` into Python's message and position.
pub fn python_json_error(text: &str, err: &serde_json::Error) -> PyJsonError {
    let detail = err.to_string();
    let eof = err.is_eof();
    let msg = if detail.starts_with("key must be a string")
        || (eof && detail.contains("parsing an object") && text.trim_end().ends_with(['{', ',']))
    {
        "Expecting property name enclosed in double quotes"
    } else if detail.starts_with("expected `:`")
        || (eof && text.trim_end().ends_with(|c: char| c == '"') && detail.contains("object"))
    {
        "Expecting ':' delimiter"
    } else if detail.starts_with("expected `,` or `}`") || detail.starts_with("expected `,` or `]`")
    {
        "Expecting ',' delimiter"
    } else if detail.starts_with("trailing characters") || detail.starts_with("trailing comma") {
        if detail.starts_with("trailing comma") {
            "Illegal trailing comma before end of object"
        } else {
            "Extra data"
        }
    } else if detail.starts_with("EOF while parsing a string") {
        "Unterminated string starting at"
    } else if detail.starts_with("control character") {
        "Invalid control character at"
    } else if detail.starts_with("invalid escape")
        || detail.starts_with("invalid unicode code point")
    {
        "Invalid \\escape"
    } else {
        "Expecting value"
    };
    // serde_json reports 1-based line and byte column of the offending byte; at end of input it
    // points at the last byte, whereas Python points one past it.
    let byte_offset = if eof {
        text.len()
    } else {
        let line_start: usize = text
            .split_inclusive('\n')
            .take(err.line().saturating_sub(1))
            .map(str::len)
            .sum();
        (line_start + err.column().saturating_sub(1)).min(text.len())
    };
    let byte_offset = (0..=byte_offset)
        .rev()
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(0);
    let before = &text[..byte_offset];
    let pos = before.chars().count();
    let lineno = before.matches('\n').count() + 1;
    let colno = match before.rfind('\n') {
        Some(nl) => before[nl + 1..].chars().count() + 1,
        None => pos + 1,
    };
    PyJsonError {
        msg,
        pos,
        lineno,
        colno,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> PyJsonError {
        let e = serde_json::from_str::<serde_json::Value>(text).unwrap_err();
        python_json_error(text, &e)
    }

    #[test]
    fn escapes_like_python() {
        let mut s = String::new();
        push_json_str(&mut s, "a\"b\\c\nd\u{1}\u{1f}ü🙂\u{7f}");
        assert_eq!(s, "\"a\\\"b\\\\c\\nd\\u0001\\u001fü🙂\u{7f}\"");
        assert_eq!(
            structured("object", "{\"message\": \"hi\"}"),
            "{\"type\": \"object\", \"payload\": \"{\\\"message\\\": \\\"hi\\\"}\"}"
        );
    }

    #[test]
    fn json_errors_read_like_pythons() {
        // The two cases captured from RunAgent's server (tests/compat/golden.json).
        assert_eq!(
            err("{\"entrypoint_tag\": "),
            PyJsonError {
                msg: "Expecting value",
                pos: 19,
                lineno: 1,
                colno: 20
            }
        );
        let e = err("{bad}");
        assert_eq!(
            (e.msg, e.pos),
            ("Expecting property name enclosed in double quotes", 1)
        );
        assert_eq!(
            err("{nope").to_string(),
            "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"
        );
        assert_eq!(err("[1] x").msg, "Extra data");
        assert_eq!(err("{\"a\" 1}").msg, "Expecting ':' delimiter");
    }
}
