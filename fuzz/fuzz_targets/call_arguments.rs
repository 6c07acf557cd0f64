//! A call's arguments checked against an entrypoint's schema, both arbitrary JSON: the
//! validator and its coercions run on every request before Python, on input from anyone.
//! Input: the schema, a NUL byte, then the call body `{"args": [...], "input": {...}}`.
#![no_main]

use agentry_core::schema::{Parameters, conform_call};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(2, |b| *b == 0);
    let (Some(schema), Some(call)) = (parts.next(), parts.next()) else {
        return;
    };
    let (Ok(schema), Ok(call)) = (
        serde_json::from_slice::<Value>(schema),
        serde_json::from_slice::<Value>(call),
    ) else {
        return;
    };
    let order: Vec<String> = schema
        .get("properties")
        .and_then(Value::as_object)
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default();
    let mut args: Vec<Value> = call.get("args").and_then(Value::as_array).cloned().unwrap_or_default();
    let mut kwargs: Map<String, Value> =
        call.get("input").and_then(Value::as_object).cloned().unwrap_or_default();
    let params = Parameters { schema: &schema, order: &order, var_args: false };
    if conform_call(&mut args, &mut kwargs, params) == Ok(true) {
        // What was coerced must now pass as it is, and the second pass changes nothing.
        assert_eq!(conform_call(&mut args, &mut kwargs, params), Ok(false));
    }
});
