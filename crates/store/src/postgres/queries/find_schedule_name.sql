SELECT id FROM schedules WHERE owner = $1 AND name = $2 AND id <> $3
