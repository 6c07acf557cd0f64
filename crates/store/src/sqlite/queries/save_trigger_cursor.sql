-- Moves a trigger's cursor forward, never back (two nodes may save out of order).
UPDATE trigger_cursors SET tx = ?2, gseq = ?3
WHERE name = ?1 AND (tx < ?2 OR (tx = ?2 AND gseq < ?3))
