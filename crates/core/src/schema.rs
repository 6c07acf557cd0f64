//! Checks input against the JSON Schema the worker derived from an entrypoint's signature, so
//! that a run whose input cannot bind is refused at enqueue (422 naming the field) instead of
//! failing later in Python. It knows the subset the shim emits: `type`, `properties`,
//! `required`, `additionalProperties`, `items`, `anyOf` and `enum`; anything else is accepted.

use serde_json::Value;

/// One reason the input does not match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaViolation {
    /// Where, as `input.field[2].sub`.
    pub path: String,
    /// What was expected there (`string`, `integer`, `one of ...`, `no such parameter`, ...).
    pub expected: String,
    pub message: String,
}

/// Every violation of `schema` by `value`, reporting paths under `root`.
pub fn validate(value: &Value, schema: &Value, root: &str) -> Vec<SchemaViolation> {
    let mut out = Vec::new();
    check(value, schema, root, &mut out);
    out
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
        other => type_name(v) == other,
    }
}

fn check(value: &Value, schema: &Value, path: &str, out: &mut Vec<SchemaViolation>) {
    let Some(schema) = schema.as_object() else {
        return;
    };
    if let Some(options) = schema.get("anyOf").and_then(Value::as_array) {
        let fits = options.iter().any(|o| {
            let mut probe = Vec::new();
            check(value, o, path, &mut probe);
            probe.is_empty()
        });
        if !fits {
            let names: Vec<String> = options
                .iter()
                .map(|o| {
                    o.get("type")
                        .and_then(Value::as_str)
                        .unwrap_or("any")
                        .to_string()
                })
                .collect();
            out.push(SchemaViolation {
                path: path.to_string(),
                expected: names.join(" or "),
                message: format!(
                    "{path} is {}, expected {}",
                    type_name(value),
                    names.join(" or ")
                ),
            });
        }
        return;
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array)
        && !options.contains(value)
    {
        let listed = serde_json::to_string(options).unwrap_or_default();
        out.push(SchemaViolation {
            path: path.to_string(),
            expected: format!("one of {listed}"),
            message: format!("{path} must be one of {listed}"),
        });
        return;
    }
    if let Some(ty) = schema.get("type").and_then(Value::as_str)
        && !has_type(value, ty)
    {
        out.push(SchemaViolation {
            path: path.to_string(),
            expected: ty.to_string(),
            message: format!("{path} is {}, expected {ty}", type_name(value)),
        });
        return;
    }
    match value {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            if let Some(required) = schema.get("required").and_then(Value::as_array) {
                for name in required.iter().filter_map(Value::as_str) {
                    if !map.contains_key(name) {
                        let p = format!("{path}.{name}");
                        let expected = props
                            .and_then(|p| p.get(name))
                            .and_then(|s| s.get("type"))
                            .and_then(Value::as_str)
                            .unwrap_or("a value")
                            .to_string();
                        out.push(SchemaViolation {
                            message: format!("{p} is required"),
                            path: p,
                            expected,
                        });
                    }
                }
            }
            let additional = schema.get("additionalProperties");
            for (name, v) in map {
                let p = format!("{path}.{name}");
                match props.and_then(|p| p.get(name)) {
                    Some(s) => check(v, s, &p, out),
                    None => match additional {
                        Some(Value::Bool(false)) => out.push(SchemaViolation {
                            message: format!("{p}: the entrypoint has no such parameter"),
                            path: p,
                            expected: "no such parameter".into(),
                        }),
                        Some(s @ Value::Object(_)) => check(v, s, &p, out),
                        _ => {}
                    },
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, v) in items.iter().enumerate() {
                    check(v, item_schema, &format!("{path}[{i}]"), out);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_each_failing_field() {
        let schema = json!({"type": "object", "properties": {
            "name": {"type": "string"},
            "n": {"type": "integer", "default": 1},
            "tags": {"type": "array", "items": {"type": "string"}},
            "mode": {"enum": ["a", "b"]},
            "maybe": {"anyOf": [{"type": "number"}, {"type": "null"}]}
        }, "required": ["name"], "additionalProperties": false});
        assert!(
            validate(
                &json!({"name": "x", "n": 2, "maybe": null}),
                &schema,
                "input"
            )
            .is_empty()
        );
        let errs = validate(
            &json!({"n": 1.5, "tags": ["a", 3], "mode": "c", "maybe": "s", "extra": 1}),
            &schema,
            "input",
        );
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
        assert_eq!(errs[1].expected, "integer");
        assert_eq!(errs[0].expected, "string");
    }
}
