-- Up to $3 rows of the agents $2 beyond the newest $1 of them, oldest first.
DELETE FROM agent_invocations WHERE invocation_id IN (
    SELECT invocation_id FROM agent_invocations WHERE agent_id = ANY($2)
    ORDER BY request_timestamp DESC OFFSET $1 LIMIT $3)
