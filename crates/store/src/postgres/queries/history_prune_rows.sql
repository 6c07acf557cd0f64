-- Up to $3 rows of the agents $2 older, by insertion, than the newest $1 rows, oldest first
-- (as RunAgent's file prunes by rowid: a bound on the table, kept without counting it).
DELETE FROM agent_invocations WHERE seq IN (
    SELECT seq FROM agent_invocations
    WHERE seq <= (SELECT max(seq) FROM agent_invocations) - $1 AND agent_id = ANY($2)
    ORDER BY seq LIMIT $3)
