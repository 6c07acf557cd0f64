SELECT id, name, hash, scopes, agents, created_at, expires_at, revoked_at, last_used_at FROM api_keys ORDER BY created_at, id
