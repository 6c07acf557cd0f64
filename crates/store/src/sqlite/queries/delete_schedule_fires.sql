DELETE FROM schedule_fires WHERE schedule_id = ?1
