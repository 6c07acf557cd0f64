UPDATE runs SET lease_expires_at = ?4, updated_at = ?5
WHERE id = ?1 AND status = 'running' AND lease_owner = ?2 AND attempt = ?3
RETURNING cancel_requested
