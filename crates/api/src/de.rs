//! Decoding request bodies the way the OpenAPI spec describes them: a body is a JSON object
//! (serde would also fill a struct from an array, by position), and an integer field takes
//! what JSON Schema calls an integer, any number without a fractional part, so `54.0` is as
//! good as `54` (clients in languages with one number type send that).

use agentry_core::ErrorCode;
use serde::{Deserialize, Deserializer, de::Error};
use serde_json::json;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;

use crate::error::ApiError;

/// A request body as `T`, refusing anything but a JSON object.
pub fn object_body<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|b| *b != b'{') {
        return Err(ApiError::new(
            ErrorCode::ValidationError,
            "invalid request body: expected a JSON object",
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            ErrorCode::ValidationError,
            format!("invalid request body: {e}"),
        )
        .with_details(json!({"line": e.line(), "column": e.column()}))
    })
}

fn integral<'de, D: Deserializer<'de>, T: TryFrom<i64>>(
    number: serde_json::Number,
) -> Result<T, D::Error> {
    let whole = number.as_i64().or_else(|| {
        number
            .as_f64()
            .filter(|f| f.fract() == 0.0 && f.abs() <= 9_007_199_254_740_992.0)
            .map(|f| f as i64)
    });
    whole
        .and_then(|n| T::try_from(n).ok())
        .ok_or_else(|| D::Error::custom(format!("{number} is not an integer in range")))
}

pub fn opt_int<'de, D: Deserializer<'de>, T: TryFrom<i64>>(d: D) -> Result<Option<T>, D::Error> {
    Option::<serde_json::Number>::deserialize(d)?
        .map(integral::<D, T>)
        .transpose()
}

/// A request body, or the error for one the body limit or the connection cut off.
pub(crate) fn body_or_error(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("the request body is larger than the limit of {limit} bytes"),
            )
        } else {
            ApiError::new(ErrorCode::ValidationError, rejection.body_text())
        }
    })
}

/// A list's `limit` (1 to 500; default 50), the same on every paged route.
pub fn page_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    let limit = limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(crate::error::invalid(
            "limit",
            "integer from 1 to 500",
            "`limit` must be from 1 to 500",
        ));
    }
    Ok(limit)
}

/// A list's `cursor` that is a sequence number (`next_cursor` of the previous page); `None`:
/// the first page.
pub fn seq_cursor(cursor: Option<&str>) -> Result<Option<i64>, ApiError> {
    match cursor {
        None | Some("") => Ok(None),
        Some(c) => c
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| c.parse::<i64>().ok())
            .flatten()
            .map(Some)
            .ok_or_else(|| {
                crate::error::invalid("cursor", "a cursor from next_cursor", "invalid cursor")
            }),
    }
}
