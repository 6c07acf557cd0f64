SELECT id, request_hash FROM runs WHERE idempotency_scope = $1 AND idempotency_key = $2
