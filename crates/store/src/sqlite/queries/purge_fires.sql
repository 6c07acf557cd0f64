DELETE FROM schedule_fires
WHERE seq IN (SELECT seq FROM schedule_fires WHERE fired_at < ?1 ORDER BY fired_at LIMIT ?2)
