-- Buckets some node is drawing on (TAT ahead of now), with the clock they are read against.
WITH clock AS (
    SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint AS now_us
)
SELECT clock.now_us, b.bucket, b.tat_us
FROM clock LEFT JOIN agentry_rate_buckets AS b ON b.tat_us > clock.now_us
