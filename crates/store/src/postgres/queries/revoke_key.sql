UPDATE api_keys SET revoked_at = coalesce(revoked_at, $2) WHERE id = $1
RETURNING id, name, hash, scopes, agents, created_at, expires_at, revoked_at, last_used_at
