//! Checks a call's arguments against the JSON Schema the worker derived from an entrypoint's
//! signature, so that input that cannot bind is refused before it reaches Python (422 naming
//! each field), and applies the few coercions that are safe (`docs/api.md`, "Validation and
//! coercion"): a numeric string or an integral float for an `int`, a numeric string for a
//! `float`, the usual spellings of true and false for a `bool`; lists and dicts are checked item
//! by item. It knows the subset the shim emits: `type`, `properties`, `required`,
//! `additionalProperties`, `items`, `anyOf` and `enum`; anything else is accepted.

use serde_json::{Map, Number, Value};

/// Why a value was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViolationKind {
    /// A required parameter is absent.
    Missing,
    /// The value has the wrong type and no safe coercion applies.
    Type,
    /// The value is not one of the allowed literals.
    Enum,
    /// The entrypoint has no such parameter.
    Unknown,
    /// More positional arguments than the entrypoint takes, or one given twice.
    Arity,
}

impl ViolationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Type => "type",
            Self::Enum => "enum",
            Self::Unknown => "unknown",
            Self::Arity => "arity",
        }
    }
}

/// One reason the input does not match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaViolation {
    pub kind: ViolationKind,
    /// Where, as `input.field[2].sub` or `args[0]`.
    pub path: String,
    /// What was expected there (`string`, `integer`, `one of ...`, `no such parameter`, ...).
    pub expected: String,
    pub message: String,
}

/// An entrypoint's parameters, as the worker reported them.
#[derive(Debug, Clone, Copy)]
pub struct Parameters<'a> {
    /// The JSON Schema of the keyword arguments.
    pub schema: &'a Value,
    /// Every named parameter in declaration order: where positional arguments land.
    pub order: &'a [String],
    /// Whether the function takes `*args`.
    pub var_args: bool,
}

/// Checks a call's positional and keyword arguments, coercing in place where that is safe.
/// Returns whether anything was coerced (the caller re-encodes only then), or every violation.
pub fn conform_call(
    args: &mut [Value],
    kwargs: &mut Map<String, Value>,
    params: Parameters<'_>,
) -> Result<bool, Vec<SchemaViolation>> {
    let mut out = Vec::new();
    let mut changed = false;
    let props = params.schema.get("properties").and_then(Value::as_object);
    for (i, arg) in args.iter_mut().enumerate() {
        let place = Place::Index(&Place::Root("args"), i);
        let path = || place.to_string();
        match params.order.get(i) {
            Some(name) if kwargs.contains_key(name) => out.push(SchemaViolation {
                kind: ViolationKind::Arity,
                message: format!("{place}: `{name}` is given both positionally and by keyword"),
                path: path(),
                expected: "one value per parameter".into(),
            }),
            Some(name) => {
                if let Some(schema) = props.and_then(|p| p.get(name)) {
                    changed |= walk(arg, schema, place, &mut out, true);
                }
            }
            None if params.var_args => {}
            None => out.push(SchemaViolation {
                kind: ViolationKind::Arity,
                message: format!(
                    "{place}: the entrypoint takes at most {} positional arguments",
                    params.order.len()
                ),
                path: path(),
                expected: "no more positional arguments".into(),
            }),
        }
    }
    let given_positionally = &params.order[..args.len().min(params.order.len())];
    changed |= walk_object(
        kwargs,
        params.schema,
        Place::Root("input"),
        &mut out,
        true,
        given_positionally,
    );
    if out.is_empty() {
        Ok(changed)
    } else {
        Err(out)
    }
}

/// Checks one value against a schema, coercing in place where that is safe.
pub fn conform(
    value: &mut Value,
    schema: &Value,
    root: &str,
) -> Result<bool, Vec<SchemaViolation>> {
    let mut out = Vec::new();
    let changed = walk(value, schema, Place::Root(root), &mut out, true);
    if out.is_empty() {
        Ok(changed)
    } else {
        Err(out)
    }
}

/// Where a value sits, rendered only when a violation is reported, so that checking valid
/// input allocates nothing.
#[derive(Clone, Copy)]
enum Place<'a> {
    Root(&'a str),
    Key(&'a Place<'a>, &'a str),
    Index(&'a Place<'a>, usize),
}

impl std::fmt::Display for Place<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::Root(name) => f.write_str(name),
            Place::Key(parent, key) => write!(f, "{parent}.{key}"),
            Place::Index(parent, i) => write!(f, "{parent}[{i}]"),
        }
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn has_type(v: &Value, ty: &str) -> bool {
    match ty {
        "number" => v.is_number(),
        // Beyond 64 bits serde reads an integer as a float; JSON Schema and Python still call
        // it an integer, and the worker gets the text as it was written.
        "integer" => {
            type_name(v) == "integer"
                || v.as_f64()
                    .is_some_and(|f| f.fract() == 0.0 && f.abs() >= 1.8e19)
        }
        other => type_name(v) == other,
    }
}

/// The safe coercion of `value` to `ty`, if there is one. Nothing is ever coerced to a string,
/// list or dict, and no coercion loses information: `"1.5"` is not an integer, `2` is not a
/// boolean, `"nan"` is not a number.
fn coerce(value: &Value, ty: &str) -> Option<Value> {
    match (ty, value) {
        ("integer", Value::Number(n)) => {
            let f = n.as_f64()?;
            // Integral floats within the range where f64 holds every integer exactly.
            (f.fract() == 0.0 && f.abs() <= 9_007_199_254_740_992.0).then(|| Value::from(f as i64))
        }
        ("integer", Value::String(s)) => {
            let t = s.trim();
            let digits = t.strip_prefix(['+', '-']).unwrap_or(t);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            t.parse::<i64>().ok().map(Value::from)
        }
        ("number", Value::String(s)) => {
            let t = s.trim();
            // Only decimal notation: Rust also parses "inf" and "NaN", which JSON cannot carry.
            let numeric = !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_digit() || matches!(b, b'+' | b'-' | b'.' | b'e' | b'E'))
                && t.bytes().any(|b| b.is_ascii_digit());
            let f: f64 = if numeric {
                t.parse().ok()?
            } else {
                return None;
            };
            Number::from_f64(f).map(Value::Number)
        }
        ("boolean", Value::String(s)) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Some(Value::Bool(true)),
            "false" | "0" | "no" | "off" => Some(Value::Bool(false)),
            _ => None,
        },
        ("boolean", Value::Number(n)) => match n.as_i64() {
            Some(0) => Some(Value::Bool(false)),
            Some(1) => Some(Value::Bool(true)),
            _ => None,
        },
        _ => None,
    }
}

/// Checks `value` against `schema`, pushing each violation. With `coerce`, converts values in
/// place where a safe coercion applies and returns whether it did; without, never mutates.
fn walk(
    value: &mut Value,
    schema: &Value,
    path: Place<'_>,
    out: &mut Vec<SchemaViolation>,
    coerce_ok: bool,
) -> bool {
    let Some(schema_map) = schema.as_object() else {
        return false;
    };
    if let Some(options) = schema_map.get("anyOf").and_then(Value::as_array) {
        // A value that already fits a branch as it is is never coerced into another one.
        let mut probe = Vec::new();
        for option in options {
            probe.clear();
            walk(value, option, path, &mut probe, false);
            if probe.is_empty() {
                return false;
            }
        }
        if coerce_ok {
            for option in options {
                let mut candidate = value.clone();
                probe.clear();
                let changed = walk(&mut candidate, option, path, &mut probe, true);
                if probe.is_empty() {
                    *value = candidate;
                    return changed;
                }
            }
        }
        let names: Vec<&str> = options
            .iter()
            .map(|o| o.get("type").and_then(Value::as_str).unwrap_or("any"))
            .collect();
        let expected = names.join(" or ");
        out.push(SchemaViolation {
            kind: ViolationKind::Type,
            message: format!("{path} is {}, expected {expected}", type_name(value)),
            path: path.to_string(),
            expected,
        });
        return false;
    }
    if let Some(options) = schema_map.get("enum").and_then(Value::as_array)
        && !options.contains(value)
    {
        let listed = serde_json::to_string(options).unwrap_or_default();
        out.push(SchemaViolation {
            kind: ViolationKind::Enum,
            path: path.to_string(),
            expected: format!("one of {listed}"),
            message: format!("{path} must be one of {listed}"),
        });
        return false;
    }
    let mut changed = false;
    if let Some(ty) = schema_map.get("type").and_then(Value::as_str)
        && !has_type(value, ty)
    {
        match coerce_ok.then(|| coerce(value, ty)).flatten() {
            Some(coerced) => {
                *value = coerced;
                changed = true;
            }
            None => {
                out.push(SchemaViolation {
                    kind: ViolationKind::Type,
                    path: path.to_string(),
                    expected: ty.to_string(),
                    message: format!("{path} is {}, expected {ty}", type_name(value)),
                });
                return false;
            }
        }
    }
    match value {
        Value::Object(map) => changed | walk_object(map, schema, path, out, coerce_ok, &[]),
        Value::Array(items) => {
            if let Some(item_schema) = schema_map.get("items") {
                for (i, v) in items.iter_mut().enumerate() {
                    changed |= walk(v, item_schema, Place::Index(&path, i), out, coerce_ok);
                }
            }
            changed
        }
        _ => changed,
    }
}

/// The object part of `walk`; `supplied` names parameters already given positionally, which
/// therefore are not missing.
fn walk_object(
    map: &mut Map<String, Value>,
    schema: &Value,
    path: Place<'_>,
    out: &mut Vec<SchemaViolation>,
    coerce_ok: bool,
    supplied: &[String],
) -> bool {
    let props = schema.get("properties").and_then(Value::as_object);
    if let Some(required) = schema.get("required").and_then(Value::as_array) {
        for name in required.iter().filter_map(Value::as_str) {
            if !map.contains_key(name) && !supplied.iter().any(|s| s == name) {
                let p = Place::Key(&path, name).to_string();
                let expected = props
                    .and_then(|p| p.get(name))
                    .and_then(|s| s.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("a value")
                    .to_string();
                out.push(SchemaViolation {
                    kind: ViolationKind::Missing,
                    message: format!("{p} is required"),
                    path: p,
                    expected,
                });
            }
        }
    }
    let additional = schema.get("additionalProperties");
    let mut changed = false;
    for (name, v) in map.iter_mut() {
        let p = Place::Key(&path, name);
        match props.and_then(|p| p.get(name)) {
            Some(s) => changed |= walk(v, s, p, out, coerce_ok),
            None => match additional {
                Some(Value::Bool(false)) => out.push(SchemaViolation {
                    kind: ViolationKind::Unknown,
                    message: format!("{p}: the entrypoint has no such parameter"),
                    path: p.to_string(),
                    expected: "no such parameter".into(),
                }),
                Some(s @ Value::Object(_)) => changed |= walk(v, s, p, out, coerce_ok),
                _ => {}
            },
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({"type": "object", "properties": {
            "name": {"type": "string"},
            "n": {"type": "integer", "default": 1},
            "ratio": {"type": "number"},
            "flag": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
            "mode": {"enum": ["a", "b"]},
            "maybe": {"anyOf": [{"type": "integer"}, {"type": "null"}]}
        }, "required": ["name"], "additionalProperties": false})
    }

    fn check(input: Value) -> Result<(bool, Value), Vec<SchemaViolation>> {
        let Value::Object(mut map) = input else {
            panic!("object expected")
        };
        let order: Vec<String> = vec!["name".into(), "n".into()];
        let s = schema();
        let params = Parameters {
            schema: &s,
            order: &order,
            var_args: false,
        };
        conform_call(&mut [], &mut map, params).map(|changed| (changed, Value::Object(map)))
    }

    #[test]
    fn names_each_failing_field() {
        let errs =
            check(json!({"n": 1.5, "tags": ["a", 3], "mode": "c", "maybe": "s", "extra": 1}))
                .unwrap_err();
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "input.name",
                "input.n",
                "input.tags[1]",
                "input.mode",
                "input.maybe",
                "input.extra"
            ]
        );
        let kinds: Vec<&str> = errs.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(
            kinds,
            ["missing", "type", "type", "enum", "type", "unknown"]
        );
        assert_eq!(errs[0].expected, "string");
        assert_eq!(errs[1].expected, "integer");
        assert_eq!(errs[4].expected, "integer or null");
    }

    #[test]
    fn valid_input_is_left_alone() {
        let input = json!({"name": "x", "n": 2, "ratio": 3, "flag": false, "maybe": null, "counts": {"a": 1}});
        assert_eq!(check(input.clone()).unwrap(), (false, input));
    }

    #[test]
    fn applies_only_the_safe_coercions() {
        let (changed, out) = check(json!({
            "name": "x", "n": "42", "ratio": "2.5", "flag": "yes", "maybe": "7",
            "counts": {"a": 3.0, "b": "-4"}
        }))
        .unwrap();
        assert!(changed);
        assert_eq!(
            out,
            json!({"name": "x", "n": 42, "ratio": 2.5, "flag": true, "maybe": 7, "counts": {"a": 3, "b": -4}})
        );
        assert_eq!(
            check(json!({"name": "x", "flag": 0})).unwrap().1["flag"],
            json!(false)
        );
        // An integer beyond 64 bits is still an integer.
        assert_eq!(
            check(json!({"name": "x", "n": -36893488147419103232i128 as f64})).map(|r| r.0),
            Ok(false)
        );
        // Lossy or surprising conversions are refused.
        for bad in [
            json!({"name": 5}),
            json!({"name": "x", "n": "1.5"}),
            json!({"name": "x", "n": 2.5}),
            json!({"name": "x", "n": true}),
            json!({"name": "x", "n": ""}),
            json!({"name": "x", "ratio": "nan"}),
            json!({"name": "x", "ratio": "inf"}),
            json!({"name": "x", "flag": 2}),
            json!({"name": "x", "flag": "maybe"}),
            json!({"name": "x", "tags": "a,b"}),
            json!({"name": "x", "counts": "{}"}),
            json!({"name": "x", "n": "99999999999999999999"}),
        ] {
            assert!(check(bad.clone()).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn positional_arguments_fill_parameters_in_order() {
        let s = schema();
        let order: Vec<String> = vec!["name".into(), "n".into()];
        let params = Parameters {
            schema: &s,
            order: &order,
            var_args: false,
        };
        let mut args = vec![json!("x"), json!("3")];
        let mut kwargs = Map::new();
        assert_eq!(conform_call(&mut args, &mut kwargs, params), Ok(true));
        assert_eq!(args[1], json!(3));

        let mut args = vec![json!("x"), json!(1), json!(2)];
        let errs = conform_call(&mut args, &mut kwargs, params).unwrap_err();
        assert_eq!(errs[0].path, "args[2]");
        assert_eq!(errs[0].kind, ViolationKind::Arity);

        let mut args = vec![json!("x")];
        let mut kwargs = json!({"name": "y"})
            .as_object()
            .cloned()
            .unwrap_or_default();
        let errs = conform_call(&mut args, &mut kwargs, params).unwrap_err();
        assert_eq!(errs[0].path, "args[0]");

        let with_var_args = Parameters {
            var_args: true,
            ..params
        };
        let mut args = vec![json!("x"), json!(1), json!(2)];
        assert_eq!(
            conform_call(&mut args, &mut Map::new(), with_var_args),
            Ok(false)
        );
    }
}
