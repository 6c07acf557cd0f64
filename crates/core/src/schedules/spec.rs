//! A schedule: what a client asks for ([`ScheduleSpec`]), what is stored ([`Schedule`]), and
//! the rule that decides, at a moment, which slots fire and which slot is next
//! ([`Schedule::plan`]). No I/O: the store runs the plan inside the transaction that creates
//! the fires' runs, so a slot fires once however many nodes look at it.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Timing, TimingError, WhenError, parse_when};
use crate::runs::{Backoff, RunRequest, RunStatus};

/// What a schedule does when a slot comes while the run of its previous fire is unfinished.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// Fire anyway: runs may overlap (cron's behaviour).
    #[default]
    Allow,
    /// Record the slot as skipped; no run.
    Skip,
    /// Create the run; it starts when the previous one has ended (the schedule's runs share a
    /// concurrency key).
    Queue,
}

/// What a schedule does with slots that passed while no node could fire them (downtime, or
/// every node serving its agent was away), found more than `schedules.missed_after_s` late.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Missed {
    /// Fire none of them; go on from the next slot.
    Skip,
    /// Fire once, for the latest of them, to catch up.
    #[default]
    Once,
    /// Fire each of them, oldest first, up to `missed_limit` (the latest ones).
    All,
}

/// A schedule as a client writes it (`POST /v1/schedules`), and as it is stored once
/// [`ScheduleSpec::prepare`]d: one-shot times resolved to RFC 3339, `times` folded into
/// `max_fires`, an `every` schedule's `start_at` set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    /// Unique among the schedules of one API key (and of the configuration's timers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 200))]
    pub name: Option<String>,
    /// The agent's id or name (stored as its id).
    pub agent: String,
    /// The entrypoint's tag.
    pub entrypoint: String,
    /// The keyword arguments of every fire's run, checked against the entrypoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub input: Option<Value>,

    /// A cron expression: 5 fields, or 6 with seconds first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// The IANA time zone of `cron` and of wall-clock times in `at` (default
    /// `schedules.default_timezone`, UTC unless configured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// A fixed interval: a whole number and a unit, `s`, `m`, `h` or `d` (`"90s"`, `"15m"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<String>,
    /// With `every`: how many times in all (Pulse's `repeat.times`); the same as `max_fires`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub times: Option<u64>,
    /// A one-shot time: RFC 3339, or English ("in 10 minutes", "tomorrow at 9am", "next monday
    /// 14:30 Europe/Paris"); answered as the RFC 3339 instant understood.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    /// A one-shot after this many seconds (answered as `at`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 0.0, maximum = 31536000.0))]
    pub delay_s: Option<f64>,
    /// What `at` said, when it was English (kept to show what was understood from what).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(read_only))]
    pub at_text: Option<String>,

    /// No fire before this time (RFC 3339). For `every`, the first fire (default: one interval
    /// after creation); later fires are whole intervals after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(format = DateTime))]
    pub start_at: Option<String>,
    /// No fire after this time (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(format = DateTime))]
    pub end_at: Option<String>,
    /// Fires (runs created) in all; then the schedule is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub max_fires: Option<u64>,
    #[serde(default)]
    pub overlap: Overlap,
    #[serde(default)]
    pub missed: Missed,
    /// With `missed: all`: how many of the missed slots fire at most (1 to 1000; default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 1000))]
    pub missed_limit: Option<u32>,

    /// The runs' priority (higher first; default: the entrypoint's configured `priority`, else 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// Each attempt's deadline, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(exclusive_minimum = 0.0))]
    pub timeout_s: Option<f64>,
    /// Attempts per run, the first included (1 to 100; default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 100))]
    pub max_attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub backoff: Option<Backoff>,
    /// The runs' concurrency key (with `overlap: queue`, default the schedule's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 256))]
    pub concurrency_key: Option<String>,
    /// Kept with every run, not interpreted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub metadata: Option<Value>,
    /// Where each run's end is POSTed (`docs/callbacks.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    /// One of the agent's named executors that its runs go to (`docs/executors.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor: Option<String>,
}

/// Why a schedule was refused (the API answers 422 naming the field).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ScheduleRejection {
    pub field: &'static str,
    pub message: String,
}

fn reject(field: &'static str, message: impl Into<String>) -> ScheduleRejection {
    ScheduleRejection {
        field,
        message: message.into(),
    }
}

/// Longest delay of a one-shot: a year.
const MAX_DELAY_S: f64 = 31_536_000.0;
/// Default and largest `missed_limit`.
pub const DEFAULT_MISSED_LIMIT: u32 = 100;
const MAX_MISSED_LIMIT: u32 = 1_000;
/// Slots one plan fires at most (a schedule more frequent than this many per
/// `missed_after_s` fires its latest ones).
const MAX_ON_TIME: usize = 1_000;
/// Missed cron slots counted for the log at most.
const MISSED_COUNTED: u64 = 100_000;

/// When a schedule fires: recurring, or once.
#[derive(Debug, Clone)]
pub enum When {
    Recurring(Timing),
    Once(i64),
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

fn parse_time(field: &'static str, text: &str) -> Result<i64, ScheduleRejection> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_millis())
        .map_err(|e| reject(field, format!("`{field}` is not an RFC 3339 time: {e}")))
}

impl ScheduleSpec {
    /// The zone of the cron expression and of English times.
    pub fn zone<'a>(&'a self, default_zone: &'a str) -> &'a str {
        self.timezone.as_deref().unwrap_or(default_zone)
    }

    /// Checks the timing fields and normalises them (see the type's doc), at `now`. The run
    /// fields are checked by building a run from [`Self::run_request`].
    pub fn prepare(self, now: i64, default_zone: &str) -> Result<Self, ScheduleRejection> {
        self.prepare_with(now, default_zone, true)
    }

    /// Checks a stored spec after a change that left its one-shot time alone: the time stays
    /// as it was resolved (it may have passed: the schedule fired).
    pub fn prepare_kept_time(
        self,
        now: i64,
        default_zone: &str,
    ) -> Result<Self, ScheduleRejection> {
        self.prepare_with(now, default_zone, false)
    }

    fn prepare_with(
        mut self,
        now: i64,
        default_zone: &str,
        resolve_at: bool,
    ) -> Result<Self, ScheduleRejection> {
        let kinds = [
            self.cron.is_some(),
            self.every.is_some(),
            self.at.is_some() || self.delay_s.is_some(),
        ];
        if kinds.iter().filter(|k| **k).count() != 1 {
            return Err(reject(
                "cron",
                "give exactly one of `cron`, `every`, or a one-shot time (`at` or `delay_s`)",
            ));
        }
        if let Some(name) = &self.name
            && (name.trim().is_empty() || name.chars().count() > 200)
        {
            return Err(reject("name", "`name` must be 1 to 200 characters"));
        }
        if let Some(input) = &self.input
            && !input.is_object()
            && !input.is_null()
        {
            return Err(reject("input", "`input` must be an object"));
        }
        if let Some(metadata) = &self.metadata
            && !metadata.is_object()
            && !metadata.is_null()
        {
            return Err(reject("metadata", "`metadata` must be an object"));
        }
        let zone = self.zone(default_zone).to_string();
        if zone.parse::<chrono_tz::Tz>().is_err() {
            return Err(reject("timezone", TimingError::TimeZone(zone).to_string()));
        }
        let start = self
            .start_at
            .as_deref()
            .map(|t| parse_time("start_at", t))
            .transpose()?;
        let end = self
            .end_at
            .as_deref()
            .map(|t| parse_time("end_at", t))
            .transpose()?;
        if let (Some(s), Some(e)) = (start, end)
            && e < s
        {
            return Err(reject("end_at", "`end_at` is before `start_at`"));
        }
        if self.max_fires == Some(0) {
            return Err(reject("max_fires", "`max_fires` must be at least 1"));
        }
        match (self.times, &self.every) {
            (Some(_), None) => return Err(reject("times", "`times` goes with `every`")),
            (Some(0), _) => return Err(reject("times", "`times` must be at least 1")),
            (Some(t), Some(_)) => {
                if self.max_fires.is_some_and(|m| m != t) {
                    return Err(reject("times", "give `times` or `max_fires`, not both"));
                }
                self.max_fires = Some(t);
                self.times = None;
            }
            _ => {}
        }
        if let Some(limit) = self.missed_limit
            && !(1..=MAX_MISSED_LIMIT).contains(&limit)
        {
            return Err(reject("missed_limit", "`missed_limit` must be 1 to 1000"));
        }
        if let Some(url) = &self.callback_url
            && !(url.starts_with("https://") || url.starts_with("http://"))
        {
            return Err(reject(
                "callback_url",
                "`callback_url` must be an http(s) URL",
            ));
        }
        if let Some(expression) = &self.cron {
            Timing::cron(expression, &zone).map_err(|e| reject("cron", e.to_string()))?;
        }
        if let Some(every) = &self.every {
            let every_ms =
                super::parse_interval_ms(every).map_err(|e| reject("every", e.to_string()))?;
            if start.is_none() {
                let first = now
                    .checked_add(every_ms)
                    .ok_or_else(|| reject("every", "`every` is too long"))?;
                self.start_at = Some(rfc3339(first));
            }
        }
        match (self.at.take(), self.delay_s.take()) {
            (Some(_), Some(_)) => {
                return Err(reject("delay_s", "give `at` or `delay_s`, not both"));
            }
            (Some(text), None) if !resolve_at => {
                parse_time("at", &text)?;
                self.at = Some(text);
            }
            (Some(text), None) => {
                let at = parse_when(&text, now, &zone).map_err(|e| match e {
                    WhenError::TimeZone(_) => reject("timezone", e.to_string()),
                    _ => reject("at", e.to_string()),
                })?;
                if chrono::DateTime::parse_from_rfc3339(text.trim()).is_err() {
                    self.at_text = Some(text);
                }
                self.at = Some(rfc3339(at));
            }
            (None, Some(d)) if d.is_finite() && (0.0..=MAX_DELAY_S).contains(&d) => {
                self.at = Some(rfc3339(now + (d * 1000.0) as i64));
            }
            (None, Some(_)) => {
                return Err(reject(
                    "delay_s",
                    "`delay_s` must be a number of seconds from 0 to 31536000",
                ));
            }
            (None, None) => {}
        }
        Ok(self)
    }

    /// When a prepared spec fires.
    pub fn when(&self, default_zone: &str) -> Result<When, ScheduleRejection> {
        if let Some(at) = &self.at {
            return parse_time("at", at).map(When::Once);
        }
        if let Some(expression) = &self.cron {
            return Timing::cron(expression, self.zone(default_zone))
                .map(When::Recurring)
                .map_err(|e| reject("cron", e.to_string()));
        }
        let every = self.every.as_deref().unwrap_or_default();
        let anchor = match &self.start_at {
            Some(t) => parse_time("start_at", t)?,
            None => 0,
        };
        Timing::every(every, anchor)
            .map(When::Recurring)
            .map_err(|e| reject("every", e.to_string()))
    }

    /// The kind of timing, as the API shows it.
    pub fn kind(&self) -> &'static str {
        if self.cron.is_some() {
            "cron"
        } else if self.every.is_some() {
            "every"
        } else {
            "once"
        }
    }
}

/// A stored schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// `sch_` and a UUIDv7.
    pub id: String,
    /// The id of the API key that created it (empty: authentication off, or configuration).
    pub owner: String,
    /// Prepared; its `agent` is the agent's id.
    pub spec: ScheduleSpec,
    pub paused: bool,
    /// The next slot to fire; `None` when the schedule is done.
    pub next_fire_at: Option<i64>,
    /// Fires that created a run (manual triggers not counted).
    pub fires: u64,
    /// The slot of the last fire.
    pub last_fire_at: Option<i64>,
    /// The run of the last fire (scheduled or manual), for the overlap policy.
    pub last_run_id: Option<String>,
    /// Raised by every write; an update names the version it read (optimistic concurrency).
    pub version: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A new schedule id.
pub fn new_schedule_id() -> String {
    format!("sch_{}", uuid::Uuid::now_v7().simple())
}

/// One slot's fate in a [`Plan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlannedFire {
    /// Create the slot's run.
    Create(i64),
    /// The previous fire's run is unfinished and the policy is `skip`.
    SkipOverlap(i64),
}

/// What to do for a schedule now: the slots to fire, in order, and the next slot after them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub fires: Vec<PlannedFire>,
    pub next_fire_at: Option<i64>,
    /// Slots passed over by the missed-fire policy (not recorded one by one).
    pub missed: u64,
}

/// The schedules section's rules the plan needs.
#[derive(Debug, Clone, Copy)]
pub struct PlanRules<'a> {
    pub default_zone: &'a str,
    /// A slot found later than this is missed (downtime), not merely late.
    pub missed_after_ms: i64,
}

impl Schedule {
    /// A schedule not stored yet: a new id, never fired, created and changed `now`; its
    /// `next_fire_at` is for the caller to set.
    pub fn new(owner: String, spec: ScheduleSpec, now: i64) -> Self {
        Self {
            id: new_schedule_id(),
            owner,
            spec,
            paused: false,
            next_fire_at: None,
            fires: 0,
            last_fire_at: None,
            last_run_id: None,
            version: 1,
            created_at: now,
            updated_at: now,
        }
    }

    /// The first slot after `after` (strictly) that the schedule's bounds allow, given that
    /// `fired` fires happened: `None` when it is done.
    pub fn slot_after(&self, when: &When, after: i64, fired: u64) -> Option<i64> {
        if self.spec.max_fires.is_some_and(|m| fired >= m) {
            return None;
        }
        let start = self
            .spec
            .start_at
            .as_deref()
            .and_then(|t| parse_time("start_at", t).ok());
        let end = self
            .spec
            .end_at
            .as_deref()
            .and_then(|t| parse_time("end_at", t).ok());
        let slot = match when {
            When::Once(at) => (*at > after).then_some(*at)?,
            When::Recurring(timing) => {
                let from = match start {
                    Some(s) if s > after => s - 1,
                    _ => after,
                };
                timing.next_after(from)?
            }
        };
        match end {
            Some(e) if slot > e => None,
            _ => Some(slot),
        }
    }

    /// The slots from `now` on, at most `n` (the API's "next five").
    pub fn upcoming(&self, rules: &PlanRules<'_>, n: usize) -> Vec<i64> {
        let Ok(when) = self.spec.when(rules.default_zone) else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(n);
        let mut fired = self.fires;
        let mut at = self.next_fire_at;
        while let Some(slot) = at
            && out.len() < n
        {
            out.push(slot);
            fired += 1;
            at = self.slot_after(&when, slot, fired);
        }
        out
    }

    /// What to fire at `now`. `previous_unfinished`: the last fire's run has not ended (for
    /// `overlap: skip`).
    ///
    /// The due slots are found from `now` backwards, so a long downtime costs what the policy
    /// keeps, not what was missed: the slots within `missed_after_ms` of now fire as on time;
    /// of the older ones, the policy keeps none, the latest, or the latest `missed_limit`.
    pub fn plan(&self, now: i64, previous_unfinished: bool, rules: &PlanRules<'_>) -> Plan {
        let nothing = Plan {
            fires: Vec::new(),
            next_fire_at: self.next_fire_at,
            missed: 0,
        };
        let Some(first) = self.next_fire_at else {
            return nothing;
        };
        if first > now || self.paused {
            return nothing;
        }
        let Ok(when) = self.spec.when(rules.default_zone) else {
            return Plan {
                next_fire_at: None,
                ..nothing
            };
        };
        let late = now - first > rules.missed_after_ms;
        let limit = self
            .spec
            .missed_limit
            .unwrap_or(DEFAULT_MISSED_LIMIT)
            .min(MAX_MISSED_LIMIT) as usize;
        let left = self
            .spec
            .max_fires
            .map_or(usize::MAX, |m| m.saturating_sub(self.fires) as usize);
        let cap = MAX_ON_TIME.min(left);
        let mut due = Vec::new();
        let mut passed_over = false;
        if !late {
            // On time (or a little late): the due slots from the first, oldest first.
            let mut at = Some(first);
            while let Some(slot) = at
                && slot <= now
            {
                if due.len() >= cap {
                    passed_over = true;
                    break;
                }
                due.push(slot);
                at = self.slot_after(&when, slot, self.fires + due.len() as u64);
            }
        } else {
            // After downtime: from now backwards, the slots within the lateness allowed, then
            // as many older ones as the policy keeps (none, the latest, or `missed_limit`).
            let keep_older = match self.spec.missed {
                Missed::Skip => 0,
                Missed::Once => 1,
                Missed::All => limit,
            };
            let start = self.bound("start_at");
            let end = self.bound("end_at");
            let on_time_from = now - rules.missed_after_ms;
            let mut older = 0usize;
            let mut at = match &when {
                When::Once(at) => Some(*at),
                When::Recurring(timing) => {
                    timing.prev_at_or_before(end.map_or(now, |e| e.min(now)))
                }
            };
            while let Some(slot) = at {
                if slot < first || start.is_some_and(|s| slot < s) || slot > now {
                    break;
                }
                if due.len() >= cap {
                    passed_over = true;
                    break;
                }
                if slot < on_time_from {
                    if older >= keep_older {
                        passed_over = true;
                        break;
                    }
                    older += 1;
                }
                due.push(slot);
                at = match &when {
                    When::Once(_) => None,
                    When::Recurring(timing) => timing.prev_at_or_before(slot - 1),
                };
            }
            // `once` catches up with one fire: an on-time slot, if there is one, is it.
            if self.spec.missed == Missed::Once && older == 1 && due.len() > 1 {
                due.pop();
                passed_over = true;
            }
            due.reverse();
        }
        let mut fires = Vec::with_capacity(due.len());
        let mut fired = self.fires;
        let mut busy = previous_unfinished;
        for slot in &due {
            if self.spec.overlap == Overlap::Skip && busy {
                fires.push(PlannedFire::SkipOverlap(*slot));
            } else {
                fires.push(PlannedFire::Create(*slot));
                fired += 1;
                busy = true;
            }
        }
        let next_fire_at = self.slot_after(&when, now, fired);
        let missed = if passed_over {
            self.missed_between(&when, first, due.first().copied().unwrap_or(now + 1))
        } else {
            0
        };
        Plan {
            fires,
            next_fire_at,
            missed,
        }
    }

    /// The slots from `from` (inclusive) to `to` (exclusive), counted for the log: exactly for
    /// `every`, up to a bound for cron (a count, never kept).
    fn missed_between(&self, when: &When, from: i64, to: i64) -> u64 {
        match when {
            When::Once(_) => u64::from(from < to),
            When::Recurring(Timing::Every { every_ms, .. }) => ((to - from).max(0) + every_ms - 1)
                .checked_div(*every_ms)
                .unwrap_or(0) as u64,
            When::Recurring(timing) => {
                let mut n = 0u64;
                let mut at = Some(from);
                while let Some(slot) = at
                    && slot < to
                    && n < MISSED_COUNTED
                {
                    n += 1;
                    at = timing.next_after(slot);
                }
                n
            }
        }
    }

    fn bound(&self, field: &'static str) -> Option<i64> {
        let text = match field {
            "start_at" => self.spec.start_at.as_deref(),
            _ => self.spec.end_at.as_deref(),
        };
        text.and_then(|t| parse_time(field, t).ok())
    }

    /// The first slot at or after `now` (what a new, changed or resumed schedule fires next).
    pub fn first_slot(&self, when: &When, now: i64) -> Option<i64> {
        self.slot_after(when, now - 1, self.fires)
    }

    /// The request each fire's run is built from (checked as `POST /v1/runs` checks one).
    /// `input` and `metadata` are the JSON texts of the spec's (the caller keeps them alive).
    pub fn run_request<'a>(&'a self, input: &'a str, metadata: &'a str) -> RunRequest<'a> {
        RunRequest {
            agent: &self.spec.agent,
            entrypoint: &self.spec.entrypoint,
            input: Some(input),
            idempotency_key: None,
            idempotency_scope: None,
            priority: self.spec.priority,
            delay_s: None,
            run_at: None,
            timeout_s: self.spec.timeout_s,
            max_attempts: self.spec.max_attempts,
            backoff: self.spec.backoff,
            concurrency_key: self.concurrency_key(),
            metadata: Some(metadata),
            callback_url: self.spec.callback_url.as_deref(),
            correlation_id: None,
            executor: self.spec.executor.as_deref(),
        }
    }

    /// The runs' concurrency key: the spec's, or with `overlap: queue` the schedule's own.
    pub fn concurrency_key(&self) -> Option<&str> {
        match (&self.spec.concurrency_key, self.spec.overlap) {
            (Some(k), _) => Some(k),
            (None, Overlap::Queue) => Some(&self.id),
            (None, _) => None,
        }
    }

    /// The JSON texts of the runs' input and metadata.
    pub fn run_texts(&self) -> (String, String) {
        let text = |v: &Option<Value>| match v {
            Some(v) if v.is_object() => v.to_string(),
            _ => "{}".to_string(),
        };
        (text(&self.spec.input), text(&self.spec.metadata))
    }
}

/// A schedule due now, as the store hands it to the planner: with the status of its last
/// fire's run (`None`: no run, or deleted by retention).
#[derive(Debug, Clone)]
pub struct DueSchedule {
    pub schedule: Schedule,
    pub last_run_status: Option<RunStatus>,
}

impl DueSchedule {
    pub fn previous_unfinished(&self) -> bool {
        self.last_run_status.is_some_and(|s| !s.is_terminal())
    }
}

/// How a fire ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum FireOutcome {
    /// Its run was created.
    Created,
    /// The previous fire's run was unfinished (`overlap: skip`).
    SkippedOverlap,
    /// Its run could not be built (the agent or entrypoint is no longer served, or the input
    /// no longer fits the entrypoint); `detail` says why.
    Refused,
}

impl FireOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::SkippedOverlap => "skipped_overlap",
            Self::Refused => "refused",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Created, Self::SkippedOverlap, Self::Refused]
            .into_iter()
            .find(|o| o.as_str() == s)
    }
}

/// A fire to record (and its run to create, for `Created`).
#[derive(Debug, Clone)]
pub struct NewFire {
    pub slot: i64,
    /// A `trigger` request, not a slot: not unique, not counted in `fires`.
    pub manual: bool,
    pub outcome: FireOutcome,
    pub run: Option<crate::runs::NewRun>,
    pub detail: Option<String>,
}

/// What the planner decided for one due schedule.
#[derive(Debug, Clone)]
pub struct FirePlan {
    pub fires: Vec<NewFire>,
    pub next_fire_at: Option<i64>,
}

/// A recorded fire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleFire {
    /// Its order among all fires (the fires list's cursor).
    pub seq: i64,
    pub schedule_id: String,
    pub slot: i64,
    pub manual: bool,
    pub outcome: FireOutcome,
    pub run_id: Option<String>,
    pub detail: Option<String>,
    /// The node that fired it.
    pub node: String,
    pub fired_at: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: PlanRules<'static> = PlanRules {
        default_zone: "UTC",
        missed_after_ms: 60_000,
    };

    fn every_second(now: i64) -> Schedule {
        let spec: ScheduleSpec = serde_json::from_value(serde_json::json!({
            "agent": "a", "entrypoint": "e", "every": "1s"
        }))
        .expect("a spec");
        let spec = spec.prepare(now, "UTC").expect("valid");
        let mut s = Schedule {
            id: "sch_1".into(),
            owner: String::new(),
            spec,
            paused: false,
            next_fire_at: None,
            fires: 0,
            last_fire_at: None,
            last_run_id: None,
            version: 1,
            created_at: now,
            updated_at: now,
        };
        let when = s.spec.when("UTC").expect("timing");
        s.next_fire_at = s.slot_after(&when, now, 0);
        s
    }

    #[test]
    fn an_every_schedule_starts_one_interval_after_creation() {
        let s = every_second(10_000);
        assert_eq!(s.next_fire_at, Some(11_000));
        assert_eq!(
            s.upcoming(&RULES, 5),
            vec![11_000, 12_000, 13_000, 14_000, 15_000]
        );
    }

    #[test]
    fn an_on_time_slot_fires_and_the_next_follows_it() {
        let s = every_second(10_000);
        let plan = s.plan(11_003, false, &RULES);
        assert_eq!(plan.fires, vec![PlannedFire::Create(11_000)]);
        assert_eq!(plan.next_fire_at, Some(12_000));
        assert_eq!(s.plan(10_999, false, &RULES).fires, vec![]);
    }

    #[test]
    fn missed_slots_follow_the_policy() {
        let mut s = every_second(0);
        // Down from 1 s to 200 s: 200 slots due, 60 of them within the minute allowed.
        let now = 200_500;
        s.spec.missed = Missed::Skip;
        let plan = s.plan(now, false, &RULES);
        assert_eq!(plan.fires.len(), 60);
        assert_eq!(plan.fires[0], PlannedFire::Create(141_000));
        assert_eq!(plan.missed, 140);
        assert_eq!(plan.next_fire_at, Some(201_000));

        let long = 10_000_500;
        s.spec.missed = Missed::Skip;
        let plan = s.plan(long, false, &RULES);
        assert_eq!(plan.fires.len(), 60);
        s.spec.missed = Missed::Once;
        let mut once = s.clone();
        once.spec.every = Some("1h".into());
        once.spec.start_at = Some(rfc3339(3_600_000));
        once.next_fire_at = Some(3_600_000);
        let plan = once.plan(4 * 3_600_000 + 120_000, false, &RULES);
        assert_eq!(plan.fires, vec![PlannedFire::Create(4 * 3_600_000)]);
        assert_eq!(plan.missed, 3);
        assert_eq!(plan.next_fire_at, Some(5 * 3_600_000));
        once.spec.missed = Missed::All;
        once.spec.missed_limit = Some(2);
        let plan = once.plan(4 * 3_600_000 + 120_000, false, &RULES);
        assert_eq!(
            plan.fires,
            vec![
                PlannedFire::Create(3 * 3_600_000),
                PlannedFire::Create(4 * 3_600_000)
            ]
        );
        assert_eq!(plan.missed, 2);
    }

    #[test]
    fn a_long_downtime_fires_the_latest_slots_and_costs_what_is_kept() {
        // Two days down, every second: `once` fires the slot of just now, not an old one.
        let mut s = every_second(0);
        let now = 2 * 86_400_000 + 500;
        let plan = s.plan(now, false, &RULES);
        assert_eq!(plan.fires.len(), 60, "the last minute's slots are on time");
        assert_eq!(
            plan.fires.last(),
            Some(&PlannedFire::Create(2 * 86_400_000))
        );
        assert_eq!(plan.missed, 2 * 86_400 - 60);
        s.spec.missed = Missed::All;
        s.spec.missed_limit = Some(5);
        assert_eq!(s.plan(now, false, &RULES).fires.len(), 65);
        // A per-second cron down for two days: planned from now backwards, at once.
        let mut cron = s.clone();
        cron.spec.every = None;
        cron.spec.start_at = None;
        cron.spec.cron = Some("* * * * * *".into());
        cron.spec.missed = Missed::Once;
        cron.next_fire_at = Some(1_000);
        let t = std::time::Instant::now();
        let plan = cron.plan(now, false, &RULES);
        assert!(
            t.elapsed() < std::time::Duration::from_secs(2),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(
            plan.fires.last(),
            Some(&PlannedFire::Create(2 * 86_400_000))
        );
        assert_eq!(plan.next_fire_at, Some(2 * 86_400_000 + 1_000));
    }

    #[test]
    fn a_one_shot_for_now_fires_at_once() {
        let spec: ScheduleSpec = serde_json::from_value(serde_json::json!({
            "agent": "a", "entrypoint": "e", "delay_s": 0
        }))
        .expect("a spec");
        let mut s = every_second(5_000);
        s.spec = spec.prepare(5_000, "UTC").expect("valid");
        let when = s.spec.when("UTC").expect("timing");
        s.next_fire_at = s.first_slot(&when, 5_000);
        assert_eq!(s.next_fire_at, Some(5_000));
        let plan = s.plan(5_001, false, &RULES);
        assert_eq!(plan.fires, vec![PlannedFire::Create(5_000)]);
        assert_eq!(plan.next_fire_at, None);
    }

    #[test]
    fn overlap_skip_records_the_slot_without_a_run() {
        let mut s = every_second(0);
        s.spec.overlap = Overlap::Skip;
        let plan = s.plan(1_000, true, &RULES);
        assert_eq!(plan.fires, vec![PlannedFire::SkipOverlap(1_000)]);
        assert_eq!(plan.next_fire_at, Some(2_000));
        let plan = s.plan(2_000, false, &RULES);
        assert_eq!(
            plan.fires,
            vec![PlannedFire::Create(1_000), PlannedFire::SkipOverlap(2_000)]
        );
        s.spec.overlap = Overlap::Queue;
        assert_eq!(s.concurrency_key(), Some("sch_1"));
    }

    #[test]
    fn bounds_end_a_schedule() {
        let mut s = every_second(0);
        s.spec.max_fires = Some(2);
        assert_eq!(s.upcoming(&RULES, 5), vec![1_000, 2_000]);
        let plan = s.plan(5_000, false, &RULES);
        assert_eq!(
            plan.fires,
            vec![PlannedFire::Create(1_000), PlannedFire::Create(2_000)]
        );
        assert_eq!(plan.next_fire_at, None);
        s.spec.max_fires = None;
        s.spec.end_at = Some(rfc3339(3_500));
        assert_eq!(s.upcoming(&RULES, 5), vec![1_000, 2_000, 3_000]);
        s.paused = true;
        assert_eq!(s.plan(5_000, false, &RULES).fires, vec![]);
    }

    #[test]
    fn a_one_shot_fires_once_at_the_time_understood() {
        let spec: ScheduleSpec = serde_json::from_value(serde_json::json!({
            "agent": "a", "entrypoint": "e", "at": "in 10 minutes"
        }))
        .expect("a spec");
        let spec = spec.prepare(1_000_000, "UTC").expect("valid");
        assert_eq!(spec.at.as_deref(), Some("1970-01-01T00:26:40.000Z"));
        assert_eq!(spec.at_text.as_deref(), Some("in 10 minutes"));
        assert!(matches!(spec.when("UTC"), Ok(When::Once(1_600_000))));
    }

    #[test]
    fn bad_specs_name_their_field() {
        let bad = |v: serde_json::Value| {
            let mut spec = serde_json::json!({"agent": "a", "entrypoint": "e"});
            if let (Some(o), Some(extra)) = (spec.as_object_mut(), v.as_object()) {
                o.extend(extra.clone());
            }
            serde_json::from_value::<ScheduleSpec>(spec)
                .expect("a spec")
                .prepare(0, "UTC")
                .expect_err("refused")
                .field
        };
        assert_eq!(bad(serde_json::json!({})), "cron");
        assert_eq!(
            bad(serde_json::json!({"cron": "* * *", "every": "1s"})),
            "cron"
        );
        assert_eq!(bad(serde_json::json!({"cron": "nope"})), "cron");
        assert_eq!(
            bad(serde_json::json!({"cron": "* * * * *", "timezone": "Mars/Base"})),
            "timezone"
        );
        assert_eq!(bad(serde_json::json!({"every": "1x"})), "every");
        assert_eq!(bad(serde_json::json!({"every": "106751991167d"})), "every");
        assert_eq!(bad(serde_json::json!({"every": "1s", "times": 0})), "times");
        assert_eq!(
            bad(serde_json::json!({"cron": "* * * * *", "times": 3})),
            "times"
        );
        assert_eq!(bad(serde_json::json!({"at": "whenever"})), "at");
        assert_eq!(bad(serde_json::json!({"delay_s": -1.0})), "delay_s");
        assert_eq!(
            bad(serde_json::json!({"every": "1s", "max_fires": 0})),
            "max_fires"
        );
        assert_eq!(
            bad(serde_json::json!({"every": "1s", "missed_limit": 0})),
            "missed_limit"
        );
        assert_eq!(
            bad(serde_json::json!({"every": "1s", "input": [1]})),
            "input"
        );
        assert_eq!(
            bad(serde_json::json!({"every": "1s", "callback_url": "ftp://x"})),
            "callback_url"
        );
        assert_eq!(
            bad(
                serde_json::json!({"every": "1s", "start_at": "2026-01-02T00:00:00Z", "end_at": "2026-01-01T00:00:00Z"})
            ),
            "end_at"
        );
    }
}
