-- One invocation.
SELECT invocation_id, agent_id, input_data, output_data, error_detail, request_timestamp,
       response_timestamp, execution_time_ms, status, entrypoint_tag, sdk_type, client_info
FROM agent_invocations WHERE invocation_id = $1
