-- RunAgent's counts for an agent, and the mean time of its completed calls.
SELECT count(*), count(*) FILTER (WHERE status = 'completed'),
       count(*) FILTER (WHERE status = 'failed'), count(*) FILTER (WHERE status = 'pending'),
       avg(execution_time_ms) FILTER (WHERE status = 'completed')
FROM agent_invocations WHERE agent_id = $1
