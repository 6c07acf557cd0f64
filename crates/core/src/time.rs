//! Timestamps in the formats RunAgent's clients see: Python's `datetime.isoformat()`.

use chrono::{DateTime, Local, NaiveDateTime, Timelike};

/// `datetime.now().isoformat()`: local time, no zone, microseconds unless they are zero.
pub fn python_now_isoformat() -> String {
    python_isoformat(Local::now().naive_local())
}

/// Python's `isoformat()` of a naive datetime.
pub fn python_isoformat(t: NaiveDateTime) -> String {
    if t.nanosecond() / 1000 == 0 {
        t.format("%Y-%m-%dT%H:%M:%S").to_string()
    } else {
        t.format("%Y-%m-%dT%H:%M:%S%.6f").to_string()
    }
}

/// SQLAlchemy's DateTime text in SQLite: `YYYY-MM-DD HH:MM:SS.ffffff`.
pub fn sqlite_datetime(t: DateTime<Local>) -> String {
    t.naive_local().format("%Y-%m-%d %H:%M:%S%.6f").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_zero_microseconds_like_python() {
        let t = NaiveDateTime::parse_from_str("2025-06-25 13:42:03", "%Y-%m-%d %H:%M:%S").unwrap();
        assert_eq!(python_isoformat(t), "2025-06-25T13:42:03");
        let t = t.with_nanosecond(752_027_000).unwrap();
        assert_eq!(python_isoformat(t), "2025-06-25T13:42:03.752027");
    }
}

/// Unix milliseconds as RFC 3339 (UTC, milliseconds), as the API shows times.
pub fn rfc3339_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
