-- An agent's invocations, newest first, optionally of one status.
SELECT invocation_id, agent_id, input_data, output_data, error_detail, request_timestamp,
       response_timestamp, execution_time_ms, status, entrypoint_tag, sdk_type, client_info
FROM agent_invocations WHERE agent_id = $1 AND ($2::TEXT IS NULL OR status = $2)
ORDER BY request_timestamp DESC LIMIT $3
