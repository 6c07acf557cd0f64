-- Schedules after their fires (parallel arrays): the next slot, the fires counted, the last
-- fire's slot and run.
UPDATE schedules s
SET next_fire_at = a.next_fire_at, fires = s.fires + a.counted,
    last_fire_at = coalesce(a.last_slot, s.last_fire_at),
    last_run_id = coalesce(a.last_run, s.last_run_id), updated_at = $6, version = s.version + 1
FROM unnest($1::TEXT[], $2::BIGINT[], $3::BIGINT[], $4::BIGINT[], $5::TEXT[])
     AS a(id, next_fire_at, counted, last_slot, last_run)
WHERE s.id = a.id
RETURNING s.id, s.owner, s.name, s.agent, s.spec, s.paused, s.next_fire_at, s.fires, s.last_fire_at, s.last_run_id, s.version, s.created_at, s.updated_at
