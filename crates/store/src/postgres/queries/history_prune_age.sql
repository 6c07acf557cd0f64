-- Up to $3 rows of the agents $2 older than $1.
DELETE FROM agent_invocations WHERE invocation_id IN (
    SELECT invocation_id FROM agent_invocations
    WHERE request_timestamp < $1 AND agent_id = ANY($2) LIMIT $3)
