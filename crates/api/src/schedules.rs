//! Schedules over HTTP (`docs/schedules.md`): create, read, list, change (a JSON merge patch),
//! delete, pause, resume, fire now (`trigger`), and the fires recorded. A schedule's fire is a
//! durable run built and checked as `POST /v1/runs` builds one; creating or changing a
//! schedule builds one to check it, so a schedule that cannot fire is refused up front.
//!
//! Access: the `schedules` scope; a key limited to some agents sees and touches only the
//! schedules of those agents (a schedule of an agent no longer served is for unrestricted keys
//! only, as for runs).

use std::sync::Arc;

use agentry_core::ErrorCode;
use agentry_core::runs::now_ms;
use agentry_core::schedules::{FireOutcome, Schedule, ScheduleFire, ScheduleSpec};
use agentry_core::store::ScheduleWrite;
use agentry_engine::TriggerError;
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::{IntoParams, ToSchema};

use crate::auth::{Caller, Principal, principal};
use crate::de::body_or_error;
use crate::error::{ApiError, invalid};
use crate::runs::{QueryResult, RunView, query, run_view};
use crate::state::AppState;
use crate::views::{ErrorEnvelope, rfc3339};

type S = Arc<AppState>;

/// Next slots a caller may ask for at once.
const MAX_NEXT: usize = 100;
/// Slots shown with a schedule just created or changed.
const NEXT_SHOWN: usize = 5;
/// Tries of a change that found the schedule changed meanwhile (a fire moved it on).
const WRITE_TRIES: usize = 5;

fn not_found(id: &str) -> ApiError {
    ApiError::new(ErrorCode::ScheduleNotFound, format!("no schedule `{id}`"))
}

fn name_taken(existing: &str) -> ApiError {
    ApiError::new(
        ErrorCode::Conflict,
        "another schedule of this API key has this name",
    )
    .with_details(json!({"schedule_id": existing}))
}

fn kept_changing() -> ApiError {
    ApiError::new(
        ErrorCode::Conflict,
        "the schedule kept changing while the request was applied; retry it",
    )
}

fn never_fires() -> ApiError {
    invalid(
        "cron",
        "a timing with a slot after now, within start_at, end_at and max_fires",
        "the schedule would never fire: its timing and bounds leave no slot after now",
    )
}

fn rejected(e: agentry_core::schedules::ScheduleRejection) -> ApiError {
    invalid(e.field, "see `docs/schedules.md`", e.message)
}

/// A schedule as the API shows it: its spec as stored (one-shot times resolved), and its
/// state.
#[derive(Serialize, ToSchema)]
#[schema(as = Schedule)]
pub(crate) struct ScheduleView {
    id: String,
    /// The fields of `ScheduleSpec`, as stored: one-shot times resolved (`at`, with what an
    /// English `at` said in `at_text`), `times` as `max_fires`, an `every` schedule's
    /// `start_at` set.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    spec: ScheduleSpec,
    /// `cron`, `every` or `once`.
    kind: &'static str,
    agent_name: Option<String>,
    paused: bool,
    /// The next slot; null when the schedule is done (its bounds reached, or a one-shot
    /// fired).
    next_fire_at: Option<String>,
    /// The next slots (five after a create or change; `?next=` on a read).
    #[serde(skip_serializing_if = "Option::is_none")]
    next_fires: Option<Vec<String>>,
    /// Scheduled fires that created a run (manual triggers not counted).
    fires: u64,
    last_fire_at: Option<String>,
    last_run_id: Option<String>,
    /// The id of the API key that created it (null: authentication off; `config`: a timer
    /// declared in the configuration).
    created_by: Option<String>,
    created_at: Option<String>,
    updated_at: Option<String>,
}

fn view(state: &S, s: &Schedule, next: usize) -> ScheduleView {
    let next_fires = (next > 0).then(|| {
        s.upcoming(&state.scheduler.rules(), next)
            .into_iter()
            .filter_map(rfc3339)
            .collect()
    });
    ScheduleView {
        id: s.id.clone(),
        spec: s.spec.clone(),
        kind: s.spec.kind(),
        agent_name: state
            .agent(&s.spec.agent)
            .map(|a| a.config.agent_name.clone()),
        paused: s.paused,
        next_fire_at: s.next_fire_at.and_then(rfc3339),
        next_fires,
        fires: s.fires,
        last_fire_at: s.last_fire_at.and_then(rfc3339),
        last_run_id: s.last_run_id.clone(),
        created_by: (!s.owner.is_empty()).then(|| s.owner.clone()),
        created_at: rfc3339(s.created_at),
        updated_at: rfc3339(s.updated_at),
    }
}

fn created(state: &S, s: &Schedule) -> Response {
    let mut resp = (StatusCode::CREATED, Json(view(state, s, NEXT_SHOWN))).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/schedules/{}", s.id)) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// A fire as the API shows it.
#[derive(Serialize, ToSchema)]
#[schema(as = ScheduleFire)]
pub(crate) struct FireView {
    /// Its place among all fires (pass as `cursor` to page back).
    seq: i64,
    schedule_id: String,
    /// The slot fired (for a manual fire, when it was asked for).
    slot: Option<String>,
    /// A `trigger`, not a slot.
    manual: bool,
    outcome: FireOutcome,
    run_id: Option<String>,
    /// Why no run was created, when none was.
    detail: Option<String>,
    /// The node that fired it.
    node: String,
    fired_at: Option<String>,
}

fn fire_view(f: &ScheduleFire) -> FireView {
    FireView {
        seq: f.seq,
        schedule_id: f.schedule_id.clone(),
        slot: rfc3339(f.slot),
        manual: f.manual,
        outcome: f.outcome,
        run_id: f.run_id.clone(),
        detail: f.detail.clone(),
        node: f.node.clone(),
        fired_at: rfc3339(f.fired_at),
    }
}

/// Whether the caller may see and touch this schedule.
fn may_touch(state: &S, who: &Principal, s: &Schedule) -> bool {
    match state.agent(&s.spec.agent) {
        Some(agent) => who.allows(agent),
        None => who.agent_limit().is_none(),
    }
}

/// The schedule, if it exists and the caller may touch it.
async fn find(state: &S, who: &Principal, id: &str) -> Result<Schedule, ApiError> {
    let s = state
        .scheduler
        .store()
        .get_schedule(id)
        .await
        .map_err(ApiError::from_store)?
        .ok_or_else(|| not_found(id))?;
    if may_touch(state, who, &s) {
        Ok(s)
    } else {
        Err(not_found(id))
    }
}

/// Resolves the spec's agent to its id (refusing one the caller may not touch), prepares the
/// timing, and checks that a fire's run can be built now.
fn check(
    state: &S,
    who: &Principal,
    mut schedule: Schedule,
    now: i64,
) -> Result<Schedule, ApiError> {
    let agent = state
        .agent(&schedule.spec.agent)
        .ok_or_else(|| crate::error::agent_not_found(&schedule.spec.agent))?;
    if !who.allows(agent) {
        return Err(ApiError::new(
            ErrorCode::PermissionError,
            "the API key is limited to other agents",
        ));
    }
    schedule.spec.agent = agent.config.agent_id.clone();
    crate::runs::refuse_private_literal(state, schedule.spec.callback_url.as_deref())?;
    state
        .scheduler
        .build_run(&schedule, now)
        .map_err(crate::error::run_rejected)?;
    Ok(schedule)
}

/// The body of a create, parsed (unknown fields refused).
fn spec_of(state: &S, body: Result<Bytes, BytesRejection>) -> Result<ScheduleSpec, ApiError> {
    let body = body_or_error(body, state.config.http.max_body_bytes)?;
    let mut spec: ScheduleSpec = crate::de::object_body(&body)?;
    // Ours to fill in, never the client's.
    spec.at_text = None;
    Ok(spec)
}

/// Create a schedule. Its fires are durable runs of `agent`'s `entrypoint` with `input`.
#[utoipa::path(post, path = "/v1/schedules", tag = "schedules",
    request_body(content = ScheduleSpec),
    responses(
        (status = 201, description = "The schedule, with its next five slots", body = ScheduleView,
            headers(("Location" = String, description = "`/v1/schedules/{id}`"))),
        (status = 403, description = "`permission_error`: the key is limited to other agents", body = ErrorEnvelope),
        (status = 404, description = "`agent_not_found`, `entrypoint_not_found`", body = ErrorEnvelope),
        (status = 409, description = "`conflict`: the name is taken", body = ErrorEnvelope),
        (status = 422, description = "`validation_error`: the timing, bounds or run options, or the input against the entrypoint", body = ErrorEnvelope),
    ))]
pub(crate) async fn create_schedule(
    State(state): State<S>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let who = principal(caller);
    let now = now_ms();
    let spec = spec_of(&state, body)?
        .prepare(now, state.scheduler.default_timezone())
        .map_err(rejected)?;
    let owner = who.0.as_ref().map(|k| k.key.id.clone()).unwrap_or_default();
    let mut schedule = Schedule::new(owner, spec, now);
    schedule = check(&state, &who, schedule, now)?;
    let when = schedule
        .spec
        .when(state.scheduler.default_timezone())
        .map_err(rejected)?;
    schedule.next_fire_at = schedule.first_slot(&when, now);
    if schedule.next_fire_at.is_none() {
        return Err(never_fires());
    }
    match state
        .scheduler
        .store()
        .create_schedule(schedule)
        .await
        .map_err(ApiError::from_store)?
    {
        ScheduleWrite::Done(s) => {
            state.scheduler.changed();
            Ok(created(&state, &s))
        }
        ScheduleWrite::NameTaken(existing) => Err(name_taken(&existing)),
        ScheduleWrite::Stale | ScheduleWrite::Missing => Err(kept_changing()),
    }
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct GetQuery {
    /// Also show the next this many slots (0 to 100).
    #[param(minimum = 0, maximum = 100)]
    next: Option<usize>,
}

fn next_of(n: Option<usize>) -> Result<usize, ApiError> {
    match n {
        Some(n) if n > MAX_NEXT => Err(invalid(
            "next",
            "integer from 0 to 100",
            "`next` must be from 0 to 100",
        )),
        n => Ok(n.unwrap_or(0)),
    }
}

/// One schedule.
#[utoipa::path(get, path = "/v1/schedules/{id}", tag = "schedules",
    params(("id" = String, Path, description = "The schedule's id"), GetQuery),
    responses(
        (status = 200, description = "The schedule", body = ScheduleView),
        (status = 404, description = "`schedule_not_found`", body = ErrorEnvelope),
        (status = 422, description = "`validation_error`", body = ErrorEnvelope),
    ))]
pub(crate) async fn get_schedule(
    State(state): State<S>,
    caller: Caller,
    Path(id): Path<String>,
    q: QueryResult<GetQuery>,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    let next = next_of(q.next)?;
    let who = principal(caller);
    let s = find(&state, &who, &id).await?;
    Ok(Json(view(&state, &s, next)).into_response())
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Only this agent's schedules (id or name).
    agent: Option<String>,
    /// At most this many (1 to 500; default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<usize>,
    /// `next_cursor` of the previous page.
    #[param(max_length = 100)]
    cursor: Option<String>,
}

/// A page of schedules.
#[derive(Serialize, ToSchema)]
pub(crate) struct ScheduleList {
    schedules: Vec<ScheduleView>,
    /// Pass as `cursor` for the next page; null on the last.
    next_cursor: Option<String>,
}

/// Schedules, oldest first, a page at a time.
#[utoipa::path(get, path = "/v1/schedules", tag = "schedules",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of schedules", body = ScheduleList),
        (status = 404, description = "`agent_not_found`", body = ErrorEnvelope),
        (status = 422, description = "`validation_error`", body = ErrorEnvelope),
    ))]
pub(crate) async fn list_schedules(
    State(state): State<S>,
    caller: Caller,
    q: QueryResult<ListQuery>,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    let who = principal(caller);
    let limit = crate::de::page_limit(q.limit)?;
    if q.cursor.as_deref().is_some_and(|c| c.len() > 100) {
        return Err(invalid(
            "cursor",
            "a cursor from next_cursor",
            "invalid cursor",
        ));
    }
    let agents = crate::runs::agents_seen(&state, &who, q.agent.as_deref())?;
    let page = state
        .scheduler
        .store()
        .list_schedules(q.cursor.filter(|c| !c.is_empty()), agents, limit)
        .await
        .map_err(ApiError::from_store)?;
    let next_cursor = (page.len() == limit)
        .then(|| page.last().map(|s| s.id.clone()))
        .flatten();
    Ok(Json(ScheduleList {
        schedules: page.iter().map(|s| view(&state, s, 0)).collect(),
        next_cursor,
    })
    .into_response())
}

/// The fields whose change moves the next slot.
const TIMING_FIELDS: [&str; 9] = [
    "cron",
    "timezone",
    "every",
    "times",
    "at",
    "delay_s",
    "start_at",
    "end_at",
    "max_fires",
];

/// Applies a JSON merge patch (RFC 7386) to a spec: a field set to null goes back to its
/// default.
fn merge(
    spec: &ScheduleSpec,
    patch: &serde_json::Map<String, Value>,
) -> Result<ScheduleSpec, ApiError> {
    let mut doc = serde_json::to_value(spec)
        .map_err(|e| ApiError::new(ErrorCode::ServerError, e.to_string()))?;
    if let Some(fields) = doc.as_object_mut() {
        if patch.contains_key("at") || patch.contains_key("delay_s") {
            fields.remove("at");
            fields.remove("at_text");
        }
        if patch.contains_key("times") {
            // `times` is stored as `max_fires`.
            fields.remove("max_fires");
        }
        for (k, v) in patch {
            if k == "at_text" {
                continue;
            }
            if v.is_null() {
                fields.remove(k);
            } else {
                fields.insert(k.clone(), v.clone());
            }
        }
    }
    serde_json::from_value(doc)
        .map_err(|e| ApiError::new(ErrorCode::ValidationError, format!("invalid schedule: {e}")))
}

/// Change a schedule: a JSON merge patch of its fields (null resets one). A change of its
/// timing or bounds moves its next slot to the first one after now.
#[utoipa::path(patch, path = "/v1/schedules/{id}", tag = "schedules",
    params(("id" = String, Path, description = "The schedule's id")),
    request_body(content = Object, description = "Fields of a schedule (see `POST /v1/schedules`) to change; null resets one", content_type = "application/json"),
    responses(
        (status = 200, description = "The schedule as changed, with its next five slots", body = ScheduleView),
        (status = 403, description = "`permission_error`: the key is limited to other agents", body = ErrorEnvelope),
        (status = 404, description = "`schedule_not_found`, `agent_not_found`, `entrypoint_not_found`", body = ErrorEnvelope),
        (status = 409, description = "`conflict`", body = ErrorEnvelope),
        (status = 422, description = "`validation_error`", body = ErrorEnvelope),
    ))]
pub(crate) async fn update_schedule(
    State(state): State<S>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let who = principal(caller);
    let body = body_or_error(body, state.config.http.max_body_bytes)?;
    let patch: serde_json::Map<String, Value> = crate::de::object_body(&body)?;
    let retime = TIMING_FIELDS.iter().any(|f| patch.contains_key(*f));
    for _ in 0..WRITE_TRIES {
        let current = find(&state, &who, &id).await?;
        let now = now_ms();
        let merged = merge(&current.spec, &patch)?;
        let zone = state.scheduler.default_timezone();
        let spec = if patch.contains_key("at") || patch.contains_key("delay_s") {
            merged.prepare(now, zone)
        } else {
            merged.prepare_kept_time(now, zone)
        }
        .map_err(rejected)?;
        let mut changed = Schedule {
            spec,
            updated_at: now,
            ..current.clone()
        };
        changed = check(&state, &who, changed, now)?;
        if retime {
            let when = changed
                .spec
                .when(state.scheduler.default_timezone())
                .map_err(rejected)?;
            changed.next_fire_at = changed.first_slot(&when, now);
            if changed.next_fire_at.is_none() && !changed.spec.at.is_some() {
                return Err(never_fires());
            }
        }
        match write(&state, changed).await? {
            Some(s) => return Ok(Json(view(&state, &s, NEXT_SHOWN)).into_response()),
            None => continue,
        }
    }
    Err(kept_changing())
}

/// Stores a changed schedule; `None` when it changed meanwhile (read it again).
async fn write(state: &S, s: Schedule) -> Result<Option<Schedule>, ApiError> {
    let id = s.id.clone();
    match state
        .scheduler
        .store()
        .update_schedule(s)
        .await
        .map_err(ApiError::from_store)?
    {
        ScheduleWrite::Done(s) => {
            state.scheduler.changed();
            Ok(Some(s))
        }
        ScheduleWrite::Stale => Ok(None),
        ScheduleWrite::NameTaken(existing) => Err(name_taken(&existing)),
        ScheduleWrite::Missing => Err(not_found(&id)),
    }
}

/// Pauses or resumes; a resumed schedule goes on from its first slot after now (what passed
/// while it was paused does not fire).
async fn set_paused(
    state: &S,
    who: &Principal,
    id: &str,
    paused: bool,
) -> Result<Response, ApiError> {
    for _ in 0..WRITE_TRIES {
        let current = find(state, who, id).await?;
        if current.paused == paused {
            return Ok(Json(view(state, &current, 0)).into_response());
        }
        let now = now_ms();
        let mut changed = Schedule {
            paused,
            updated_at: now,
            ..current.clone()
        };
        if !paused && let Ok(when) = changed.spec.when(state.scheduler.default_timezone()) {
            changed.next_fire_at = changed.first_slot(&when, now);
        }
        if let Some(s) = write(state, changed).await? {
            return Ok(Json(view(state, &s, 0)).into_response());
        }
    }
    Err(kept_changing())
}

/// Pause a schedule: no slot fires until it is resumed.
#[utoipa::path(post, path = "/v1/schedules/{id}/pause", tag = "schedules",
    params(("id" = String, Path, description = "The schedule's id")),
    responses(
        (status = 200, description = "The schedule, paused", body = ScheduleView),
        (status = 404, description = "`schedule_not_found`", body = ErrorEnvelope),
        (status = 409, description = "`conflict`", body = ErrorEnvelope),
    ))]
pub(crate) async fn pause_schedule(
    State(state): State<S>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    set_paused(&state, &principal(caller), &id, true).await
}

/// Resume a paused schedule from its first slot after now.
#[utoipa::path(post, path = "/v1/schedules/{id}/resume", tag = "schedules",
    params(("id" = String, Path, description = "The schedule's id")),
    responses(
        (status = 200, description = "The schedule, resumed", body = ScheduleView),
        (status = 404, description = "`schedule_not_found`", body = ErrorEnvelope),
        (status = 409, description = "`conflict`", body = ErrorEnvelope),
    ))]
pub(crate) async fn resume_schedule(
    State(state): State<S>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    set_paused(&state, &principal(caller), &id, false).await
}

/// What `trigger` answers.
#[derive(Serialize, ToSchema)]
pub(crate) struct Triggered<'a> {
    run: RunView<'a>,
    fire: FireView,
}

/// Fire a schedule now, outside its timing (paused or not): a run, recorded as a manual fire.
#[utoipa::path(post, path = "/v1/schedules/{id}/trigger", tag = "schedules",
    params(("id" = String, Path, description = "The schedule's id")),
    responses(
        (status = 202, description = "The run created, and its fire", body = Triggered),
        (status = 404, description = "`schedule_not_found`, `agent_not_found`, `entrypoint_not_found`", body = ErrorEnvelope),
        (status = 422, description = "`validation_error`: the schedule's input no longer fits its entrypoint", body = ErrorEnvelope),
    ))]
pub(crate) async fn trigger_schedule(
    State(state): State<S>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let who = principal(caller);
    let schedule = find(&state, &who, &id).await?;
    let (run, fire) = match state.scheduler.trigger(&schedule).await {
        Ok(Some(done)) => done,
        Ok(None) => return Err(not_found(&id)),
        Err(TriggerError::Rejected(r)) => return Err(crate::error::run_rejected(r)),
        Err(TriggerError::Store(e)) => return Err(ApiError::from_store(e)),
    };
    let mut resp = (
        StatusCode::ACCEPTED,
        Json(Triggered {
            run: run_view(&state, &run, &who),
            fire: fire_view(&fire),
        }),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/runs/{}", run.id)) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

/// Delete a schedule and its fires (its runs stay).
#[utoipa::path(delete, path = "/v1/schedules/{id}", tag = "schedules",
    params(("id" = String, Path, description = "The schedule's id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "`schedule_not_found`", body = ErrorEnvelope),
    ))]
pub(crate) async fn delete_schedule(
    State(state): State<S>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let who = principal(caller);
    find(&state, &who, &id).await?;
    let deleted = state
        .scheduler
        .store()
        .delete_schedule(&id)
        .await
        .map_err(ApiError::from_store)?;
    if !deleted {
        return Err(not_found(&id));
    }
    state.scheduler.changed();
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct FiresQuery {
    /// At most this many (1 to 500; default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<usize>,
    /// `next_cursor` of the previous page.
    #[param(pattern = "^([0-9]{1,18})?$")]
    cursor: Option<String>,
}

/// A page of fires.
#[derive(Serialize, ToSchema)]
pub(crate) struct FireList {
    fires: Vec<FireView>,
    /// Pass as `cursor` for the next page; null on the last.
    next_cursor: Option<String>,
}

/// The schedule's fires, newest first: each slot fired (or skipped by its overlap policy, or
/// refused), with its run.
#[utoipa::path(get, path = "/v1/schedules/{id}/fires", tag = "schedules",
    params(("id" = String, Path, description = "The schedule's id"), FiresQuery),
    responses(
        (status = 200, description = "A page of fires", body = FireList),
        (status = 404, description = "`schedule_not_found`", body = ErrorEnvelope),
        (status = 422, description = "`validation_error`", body = ErrorEnvelope),
    ))]
pub(crate) async fn list_fires(
    State(state): State<S>,
    caller: Caller,
    Path(id): Path<String>,
    q: QueryResult<FiresQuery>,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    let who = principal(caller);
    let limit = crate::de::page_limit(q.limit)?;
    let before = crate::de::seq_cursor(q.cursor.as_deref())?;
    find(&state, &who, &id).await?;
    let fires = state
        .scheduler
        .store()
        .list_fires(&id, before, limit)
        .await
        .map_err(ApiError::from_store)?;
    let next_cursor = (fires.len() == limit)
        .then(|| fires.last().map(|f| f.seq.to_string()))
        .flatten();
    Ok(Json(FireList {
        fires: fires.iter().map(fire_view).collect(),
        next_cursor,
    })
    .into_response())
}
