-- $1: idle time in microseconds.
DELETE FROM agentry_rate_buckets
WHERE tat_us < (extract(epoch FROM clock_timestamp()) * 1000000)::bigint - $1
