-- TAT = max(TAT, now) + charge for each bucket, in one statement. Rows are locked in bucket
-- order, the same on every node, so concurrent charges never deadlock.
-- $1: bucket names (sorted), $2: charges in microseconds.
WITH clock AS (
    SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint AS now_us
)
INSERT INTO agentry_rate_buckets AS b (bucket, tat_us)
SELECT t.bucket, clock.now_us + t.charge_us
FROM unnest($1::text[], $2::bigint[]) AS t (bucket, charge_us), clock
ORDER BY t.bucket
ON CONFLICT (bucket) DO UPDATE
    SET tat_us = greatest(b.tat_us + (EXCLUDED.tat_us - (SELECT now_us FROM clock)), EXCLUDED.tat_us)
RETURNING bucket, tat_us, (SELECT now_us FROM clock) AS now_us
