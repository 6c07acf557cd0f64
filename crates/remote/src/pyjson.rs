//! JSON as Python's `json.dumps` writes it (`", "` and `": "` separators, non-ASCII kept,
//! floats as `repr`), for results that come from somewhere other than a Python worker (an n8n
//! webhook's answer): RunAgent's clients compare payload texts byte for byte.

use std::io;

use serde::Serialize;

struct Python;

impl serde_json::ser::Formatter for Python {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }

    fn write_f64<W: ?Sized + io::Write>(&mut self, w: &mut W, value: f64) -> io::Result<()> {
        w.write_all(python_float(value).as_bytes())
    }
}

/// Python's `repr` of a finite float: the shortest text that reads back, in exponent form
/// below 1e-4 and from 1e16 on, the exponent signed and at least two digits.
fn python_float(v: f64) -> String {
    let sci = format!("{v:e}"); // the shortest round-trip digits: "1.5e-7"
    let (mantissa, e) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = e.parse().unwrap_or(0);
    if v != 0.0 && !(-4..16).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exp.abs());
    }
    let text = format!("{v}");
    if text.contains('.') {
        text
    } else {
        format!("{text}.0")
    }
}

/// `value` as `json.dumps(value, ensure_ascii=False)` writes it.
pub(crate) fn dumps(value: &serde_json::Value) -> String {
    let mut out = Vec::with_capacity(128);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, Python);
    // Writing a Value into a Vec cannot fail.
    let _ = value.serialize(&mut ser);
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn writes_what_python_writes() {
        let v = json!({"a": [1, 2.5, "é", null, true], "b": {"c": 1e16, "d": 0.00001, "e": 3.0}});
        assert_eq!(
            dumps(&v),
            r#"{"a": [1, 2.5, "é", null, true], "b": {"c": 1e+16, "d": 1e-05, "e": 3.0}}"#
        );
        assert_eq!(python_float(0.0001), "0.0001");
        assert_eq!(python_float(123456789012345.6), "123456789012345.6");
        assert_eq!(python_float(-2.5e-7), "-2.5e-07");
        assert_eq!(python_float(9999999999999998.0), "9999999999999998.0");
        assert_eq!(python_float(9.999999999999999e-05), "9.999999999999999e-05");
    }
}
