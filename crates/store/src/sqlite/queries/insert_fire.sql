-- A slot already fired (another writer got there first) inserts nothing.
INSERT INTO schedule_fires (schedule_id, slot, manual, outcome, run_id, detail, node, fired_at)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
ON CONFLICT (schedule_id, slot) WHERE manual = 0 DO NOTHING
RETURNING seq
