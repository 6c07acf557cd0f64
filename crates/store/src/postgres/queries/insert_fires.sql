-- A batch of fires (parallel arrays). A slot already fired inserts nothing: the fires that
-- were stored are returned, by their schedule and slot (and run, for manual ones).
INSERT INTO schedule_fires (schedule_id, slot, manual, outcome, run_id, detail, node, fired_at)
SELECT * FROM unnest($1::TEXT[], $2::BIGINT[], $3::BOOLEAN[], $4::TEXT[], $5::TEXT[],
                     $6::TEXT[], $7::TEXT[], $8::BIGINT[])
ON CONFLICT (schedule_id, slot) WHERE NOT manual DO NOTHING
RETURNING seq, schedule_id, slot, run_id
