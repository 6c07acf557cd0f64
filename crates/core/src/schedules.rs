//! Schedules: when one fires (this file's timings), what a schedule is and which of its slots
//! fire at a moment (`spec.rs`), and one-shot times written in English (`when.rs`).
//!
//! Two kinds of recurring timing:
//!
//! * **cron**: 5 fields, or 6 with seconds first, read by the `croner` crate, in an IANA time
//!   zone (`chrono-tz`, default UTC). A cron expression names wall-clock times, so the
//!   daylight-saving rules are those of Vixie cron and the Open Cron Pattern Specification:
//!   - a *gap* (spring forward, e.g. 02:00 → 03:00): a fixed time in it (`30 2 * * *`) fires
//!     once, at the first valid time after the gap, the same day; fires of a wildcard or step
//!     field (`*/15 * * * *`) that fall in the gap are skipped;
//!   - an *overlap* (fall back, e.g. 03:00 → 02:00): every wall-clock time fires once, at its
//!     first occurrence: a fixed time (`30 2 * * *`) fires once, and a step pattern
//!     (`*/30 * * * *`) does not repeat the repeated hour's fires, so its next fire after the
//!     first 02:30 is 03:00 (an hour and a half later in absolute time). A schedule that must
//!     keep absolute spacing is an `every` one.
//! * **every**: a fixed interval (`"90s"`, `"15m"`, `"2h"`, `"1d"`) in absolute time from an
//!   anchor (the schedule's start): daylight saving does not move it.
//!
//! Times are Unix milliseconds; every answer is strictly after the time asked about, so a
//! slot is never computed twice.

mod spec;
mod when;

pub use spec::*;
pub use when::{WhenError, parse_when};

use std::str::FromStr;

use chrono::{TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::CronParser;

/// Why a schedule's timing was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimingError {
    #[error("not a cron expression ({0}): 5 fields, or 6 with seconds first")]
    Cron(String),
    #[error("`{0}` is not an IANA time zone (e.g. `Europe/Berlin`, `UTC`)")]
    TimeZone(String),
    #[error(
        "`{0}` is not an interval: a whole number and a unit, s, m, h or d (e.g. `90s`, `15m`)"
    )]
    Every(String),
}

/// When a schedule fires.
#[derive(Debug, Clone)]
pub enum Timing {
    Cron {
        expression: String,
        zone: Tz,
        cron: Box<Cron>,
    },
    Every {
        every_ms: i64,
        /// The first fire; later ones are whole intervals after it.
        anchor_ms: i64,
    },
}

impl Timing {
    /// A cron expression in the IANA time zone `zone`.
    pub fn cron(expression: &str, zone: &str) -> Result<Self, TimingError> {
        let zone = Tz::from_str(zone).map_err(|_| TimingError::TimeZone(zone.to_string()))?;
        let cron = CronParser::new()
            .parse(expression)
            .map_err(|e| TimingError::Cron(e.to_string()))?;
        Ok(Timing::Cron {
            expression: expression.to_string(),
            zone,
            cron: Box::new(cron),
        })
    }

    /// Every `every` (e.g. `"90s"`), the first fire at `anchor_ms`.
    pub fn every(every: &str, anchor_ms: i64) -> Result<Self, TimingError> {
        Ok(Timing::Every {
            every_ms: parse_interval_ms(every)?,
            anchor_ms,
        })
    }

    /// The first fire strictly after `after_ms`; `None` when the expression never fires again.
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        match self {
            Timing::Cron { zone, cron, .. } => {
                // Whole seconds: croner keeps the fraction it is given.
                let floor_ms = after_ms.div_euclid(1000) * 1000;
                let after = zone
                    .from_utc_datetime(&Utc.timestamp_millis_opt(floor_ms).single()?.naive_utc());
                let next = cron.find_next_occurrence(&after, false).ok()?;
                Some(next.timestamp_millis())
            }
            Timing::Every {
                every_ms,
                anchor_ms,
            } => {
                if after_ms < *anchor_ms {
                    return Some(*anchor_ms);
                }
                let done = (after_ms - anchor_ms) / every_ms + 1;
                anchor_ms.checked_add(done.checked_mul(*every_ms)?)
            }
        }
    }

    /// The last fire at or before `at_ms`; `None` when there is none (before an `every`
    /// schedule's anchor, or a cron expression that never matched).
    pub fn prev_at_or_before(&self, at_ms: i64) -> Option<i64> {
        match self {
            Timing::Cron { zone, cron, .. } => {
                let floor_ms = at_ms.div_euclid(1000) * 1000;
                let at = zone
                    .from_utc_datetime(&Utc.timestamp_millis_opt(floor_ms).single()?.naive_utc());
                let prev = cron.find_previous_occurrence(&at, true).ok()?;
                Some(prev.timestamp_millis())
            }
            Timing::Every {
                every_ms,
                anchor_ms,
            } => {
                if at_ms < *anchor_ms {
                    return None;
                }
                let done = (at_ms - anchor_ms) / every_ms;
                anchor_ms.checked_add(done.checked_mul(*every_ms)?)
            }
        }
    }

    /// The next `n` fires strictly after `after_ms`.
    pub fn next_n(&self, after_ms: i64, n: usize) -> Vec<i64> {
        let mut out = Vec::with_capacity(n);
        let mut at = after_ms;
        while out.len() < n {
            match self.next_after(at) {
                Some(next) => {
                    out.push(next);
                    at = next;
                }
                None => break,
            }
        }
        out
    }
}

/// The longest interval: a hundred years.
const MAX_INTERVAL_MS: i64 = 100 * 366 * 86_400_000;

/// `"90s"`, `"15m"`, `"2h"`, `"1d"` in milliseconds (one second to a hundred years).
pub fn parse_interval_ms(text: &str) -> Result<i64, TimingError> {
    let bad = || TimingError::Every(text.to_string());
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (number, unit) = t.split_at(split);
    let n: i64 = number.parse().map_err(|_| bad())?;
    let unit_ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    let ms = n.checked_mul(unit_ms).ok_or_else(bad)?;
    // At least a second; at most a hundred years (so that no time computed from it overflows).
    if !(1_000..=MAX_INTERVAL_MS).contains(&ms) {
        return Err(bad());
    }
    Ok(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unix ms of a UTC wall-clock time.
    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> i64 {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0)
            .single()
            .expect("a UTC time")
            .timestamp_millis()
    }

    fn fires(expr: &str, zone: &str, after: i64, n: usize) -> Vec<i64> {
        Timing::cron(expr, zone).expect("timing").next_n(after, n)
    }

    /// Berlin springs forward on 2026-03-29 at 02:00 CET (01:00 UTC) to 03:00 CEST: 02:30 does
    /// not exist. The fixed time fires once, at 03:00 CEST (01:00 UTC), then at 02:30 CEST.
    #[test]
    fn a_fixed_time_in_berlins_gap_fires_right_after_it() {
        let got = fires("30 2 * * *", "Europe/Berlin", utc(2026, 3, 28, 12, 0), 2);
        assert_eq!(got, [utc(2026, 3, 29, 1, 0), utc(2026, 3, 30, 0, 30)]);
    }

    /// New York springs forward on 2026-03-08 at 02:00 EST (07:00 UTC): a step pattern skips
    /// the gap's fires (02:00, 02:30) and goes on at 03:00 EDT (07:00 UTC).
    #[test]
    fn a_step_pattern_skips_new_yorks_gap() {
        let got = fires("*/30 * * * *", "America/New_York", utc(2026, 3, 8, 6, 0), 3);
        // 01:30 EST, then 03:00 EDT (the same instant as 02:00 EST would have been), 03:30 EDT.
        assert_eq!(
            got,
            [
                utc(2026, 3, 8, 6, 30),
                utc(2026, 3, 8, 7, 0),
                utc(2026, 3, 8, 7, 30)
            ]
        );
    }

    /// Berlin falls back on 2026-10-25 at 03:00 CEST (01:00 UTC) to 02:00 CET: 02:30 happens
    /// twice. The fixed time fires once, at the first 02:30 (00:30 UTC), then the next day.
    #[test]
    fn a_fixed_time_in_berlins_overlap_fires_once() {
        let got = fires("30 2 * * *", "Europe/Berlin", utc(2026, 10, 24, 12, 0), 2);
        assert_eq!(got, [utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)]);
    }

    /// New York falls back on 2026-11-01 at 02:00 EDT (06:00 UTC) to 01:00 EST: each
    /// wall-clock time fires once, so a step pattern does not repeat 01:00 and 01:30 EST.
    #[test]
    fn a_step_pattern_does_not_repeat_new_yorks_overlap() {
        let got = fires(
            "*/30 * * * *",
            "America/New_York",
            utc(2026, 11, 1, 4, 45),
            4,
        );
        assert_eq!(
            got,
            [
                utc(2026, 11, 1, 5, 0),  // 01:00 EDT
                utc(2026, 11, 1, 5, 30), // 01:30 EDT
                utc(2026, 11, 1, 7, 0),  // 02:00 EST (01:00 and 01:30 EST not repeated)
                utc(2026, 11, 1, 7, 30), // 02:30 EST
            ]
        );
    }

    /// Six fields put seconds first; every answer is strictly after the time asked about.
    #[test]
    fn seconds_and_strictly_after() {
        let t = Timing::cron("*/10 * * * * *", "UTC").expect("timing");
        let at = utc(2026, 1, 1, 0, 0);
        assert_eq!(t.next_after(at), Some(at + 10_000));
        assert_eq!(t.next_after(at + 1), Some(at + 10_000));
    }

    /// An interval runs in absolute time from its anchor, across daylight saving too.
    #[test]
    fn every_counts_whole_intervals_from_its_anchor() {
        let anchor = utc(2026, 3, 29, 0, 0);
        let t = Timing::every("90s", anchor).expect("timing");
        assert_eq!(t.next_after(anchor - 5), Some(anchor));
        assert_eq!(t.next_after(anchor), Some(anchor + 90_000));
        assert_eq!(
            t.next_after(anchor + 90_000 * 40 + 1),
            Some(anchor + 90_000 * 41)
        );
        assert_eq!(parse_interval_ms("15m"), Ok(900_000));
        assert_eq!(parse_interval_ms("1d"), Ok(86_400_000));
    }

    #[test]
    fn bad_timings_are_refused_with_what_was_wrong() {
        assert!(matches!(
            Timing::cron("61 * * * *", "UTC"),
            Err(TimingError::Cron(_))
        ));
        assert!(matches!(
            Timing::cron("* * * *", "UTC"),
            Err(TimingError::Cron(_))
        ));
        assert_eq!(
            Timing::cron("* * * * *", "Mars/Olympus").err(),
            Some(TimingError::TimeZone("Mars/Olympus".into()))
        );
        for bad in [
            "",
            "10",
            "s",
            "0s",
            "500ms",
            "1w",
            "-5m",
            "99999999999999999d",
        ] {
            assert!(parse_interval_ms(bad).is_err(), "{bad}");
        }
    }
}
