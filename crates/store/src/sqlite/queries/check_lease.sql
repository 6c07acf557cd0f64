SELECT 1 FROM runs WHERE id = ?1 AND status = 'running' AND lease_owner = ?2 AND attempt = ?3
