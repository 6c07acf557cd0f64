SELECT id FROM runs WHERE finished_at IS NOT NULL AND finished_at < ?1 LIMIT ?2
