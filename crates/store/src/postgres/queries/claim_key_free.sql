-- Under the key's lock: no run of the key is running, and no older one of it is queued.
SELECT NOT EXISTS (SELECT 1 FROM runs WHERE concurrency_key = $1 AND status = 'running')
   AND NOT EXISTS (SELECT 1 FROM runs WHERE concurrency_key = $1 AND status = 'queued' AND seq < $2)
