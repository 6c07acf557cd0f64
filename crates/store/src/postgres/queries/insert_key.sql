INSERT INTO api_keys (id, name, hash, scopes, agents, created_at, expires_at, revoked_at, last_used_at) VALUES ($1, $2, $3, $4, $5, $6, $7, NULL, NULL)
