WITH f AS (DELETE FROM schedule_fires WHERE schedule_id = $1)
DELETE FROM schedules WHERE id = $1
