-- Locks runs' rows in id order, the order every multi-run writer takes them in, so that two
-- of them (a node's lease renewal and its batched attempts' ends) never deadlock.
SELECT 1 FROM runs WHERE id = ANY($1) ORDER BY id FOR UPDATE
