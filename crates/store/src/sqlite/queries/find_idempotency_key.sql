SELECT id, request_hash FROM runs WHERE idempotency_key = ?1
