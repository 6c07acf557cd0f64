//! One-shot times as people write them: RFC 3339 (`2026-12-24T18:00:00+01:00`), or English as
//! Pulse accepts it ("in 10 minutes", "tomorrow at 9am", "next monday 14:30 Europe/Paris").
//!
//! The English is read by `parse_datetime` (uutils' reading of GNU `date -d`), after three
//! rewrites that GNU's grammar lacks, so that Pulse's phrases mean what they say:
//!
//! * a leading `in ` is dropped (`in 10 minutes` is GNU's `10 minutes`);
//! * a standalone ` at ` is dropped (`tomorrow at 9am` is `tomorrow 9am`);
//! * a last word that names an IANA zone (`Europe/Paris`, `UTC`) is taken out and the rest is
//!   read as wall-clock time in that zone; otherwise in the schedule's zone.
//!
//! "next monday" is the coming Monday (GNU's reading), not the one after it. The instant
//! understood is echoed back by the API, so a caller sees what was meant.

/// How far in the past a one-shot time may be (the time a request takes to arrive): such a
/// time fires at once.
const PAST_SLACK_MS: i64 = 1_000;

/// Why a one-shot time was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WhenError {
    #[error(
        "`{0}` is not a time: give RFC 3339 (`2026-12-24T18:00:00Z`) or English such as `in 10 minutes`, `tomorrow at 9am`, `next monday 14:30 Europe/Paris`"
    )]
    Unreadable(String),
    #[error("`{text}` means {at}, which is in the past")]
    Past { text: String, at: String },
    #[error("`{0}` is not an IANA time zone (e.g. `Europe/Berlin`, `UTC`)")]
    TimeZone(String),
}

/// The instant (Unix ms) `text` names, read at `now_ms` in the IANA zone `zone` (unless the
/// text names its own). Never before `now_ms`: a time up to a second ago is now.
pub fn parse_when(text: &str, now_ms: i64, zone: &str) -> Result<i64, WhenError> {
    let unreadable = || WhenError::Unreadable(text.to_string());
    let at = match chrono::DateTime::parse_from_rfc3339(text.trim()) {
        Ok(t) => t.timestamp_millis(),
        Err(_) => english(text, now_ms, zone)?,
    };
    if at < now_ms - PAST_SLACK_MS {
        let at = chrono::DateTime::from_timestamp_millis(at).ok_or_else(unreadable)?;
        return Err(WhenError::Past {
            text: text.to_string(),
            at: at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        });
    }
    Ok(at.max(now_ms))
}

fn english(text: &str, now_ms: i64, zone: &str) -> Result<i64, WhenError> {
    let unreadable = || WhenError::Unreadable(text.to_string());
    let mut words: Vec<&str> = text.split_whitespace().collect();
    let mut zone_name = zone.to_string();
    if let Some(last) = words.last()
        && (last.contains('/') || last.eq_ignore_ascii_case("utc"))
    {
        jiff::tz::TimeZone::get(last).map_err(|_| WhenError::TimeZone(last.to_string()))?;
        zone_name = last.to_string();
        words.pop();
    }
    if words.first().is_some_and(|w| w.eq_ignore_ascii_case("in")) {
        words.remove(0);
    }
    words.retain(|w| !w.eq_ignore_ascii_case("at"));
    if words.is_empty() {
        return Err(unreadable());
    }
    let tz = jiff::tz::TimeZone::get(&zone_name).map_err(|_| WhenError::TimeZone(zone_name))?;
    let now = jiff::Timestamp::from_millisecond(now_ms)
        .map_err(|_| unreadable())?
        .to_zoned(tz);
    let text = words.join(" ");
    // The parser's arithmetic on extreme numbers may overflow (a panic where overflow is
    // checked): such text is unreadable, not a crash.
    let parsed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        parse_datetime::parse_datetime_at_date(now, text)
    }));
    match parsed {
        Ok(Ok(parse_datetime::ParsedDateTime::InRange(z))) => Ok(z.timestamp().as_millisecond()),
        _ => Err(unreadable()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Wednesday 2 December 2026, 16:40:00 UTC (17:40 in Paris).
    const NOW: i64 = 1_796_229_600_000;

    fn at(text: &str, zone: &str) -> String {
        let ms = parse_when(text, NOW, zone).unwrap_or_else(|e| panic!("{text}: {e}"));
        chrono::DateTime::from_timestamp_millis(ms)
            .expect("in range")
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    }

    #[test]
    fn the_now_of_these_tests_is_a_wednesday_afternoon() {
        assert_eq!(
            chrono::DateTime::from_timestamp_millis(NOW)
                .expect("in range")
                .to_rfc3339(),
            "2026-12-02T16:40:00+00:00"
        );
    }

    #[test]
    fn pulses_phrases_mean_what_they_say() {
        assert_eq!(at("in 10 minutes", "UTC"), "2026-12-02T16:50:00Z");
        assert_eq!(at("in 2 hours", "UTC"), "2026-12-02T18:40:00Z");
        assert_eq!(at("tomorrow at 9am", "UTC"), "2026-12-03T09:00:00Z");
        assert_eq!(at("tomorrow 9am", "UTC"), "2026-12-03T09:00:00Z");
        // The coming Monday, 14:30 in Paris (UTC+1 in December).
        assert_eq!(
            at("next monday 14:30 Europe/Paris", "UTC"),
            "2026-12-07T13:30:00Z"
        );
        assert_eq!(at("next monday at 14:30", "UTC"), "2026-12-07T14:30:00Z");
        assert_eq!(at("friday 5pm", "America/New_York"), "2026-12-04T22:00:00Z");
    }

    #[test]
    fn wall_clock_times_are_read_in_the_schedules_zone_unless_the_text_names_one() {
        assert_eq!(at("tomorrow 9am", "Europe/Berlin"), "2026-12-03T08:00:00Z");
        assert_eq!(
            at("tomorrow 9am UTC", "Europe/Berlin"),
            "2026-12-03T09:00:00Z"
        );
    }

    #[test]
    fn rfc_3339_is_taken_as_it_is() {
        assert_eq!(
            at("2026-12-24T18:00:00+01:00", "UTC"),
            "2026-12-24T17:00:00Z"
        );
        assert_eq!(parse_when("now", NOW, "UTC"), Ok(NOW));
    }

    #[test]
    fn nonsense_the_past_and_unknown_zones_are_refused_with_what_was_wrong() {
        assert!(matches!(
            parse_when("whenever you like", NOW, "UTC"),
            Err(WhenError::Unreadable(_))
        ));
        assert!(matches!(
            parse_when("in", NOW, "UTC"),
            Err(WhenError::Unreadable(_))
        ));
        assert!(matches!(
            parse_when("yesterday 9am", NOW, "UTC"),
            Err(WhenError::Past { .. })
        ));
        assert!(matches!(
            parse_when("2020-01-01T00:00:00Z", NOW, "UTC"),
            Err(WhenError::Past { .. })
        ));
        assert_eq!(
            parse_when("tomorrow 9am Mars/Olympus", NOW, "UTC"),
            Err(WhenError::TimeZone("Mars/Olympus".into()))
        );
    }
}
