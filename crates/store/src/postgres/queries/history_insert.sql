-- A batch of invocation rows, each a JSON array of RunAgent's columns in order; a call
-- recorded twice keeps its last record (RunAgent's INSERT OR REPLACE).
INSERT INTO agent_invocations (invocation_id, agent_id, input_data, output_data, error_detail,
                               request_timestamp, response_timestamp, execution_time_ms, status,
                               entrypoint_tag, sdk_type, client_info)
SELECT v ->> 0, v ->> 1, v ->> 2, v ->> 3, v ->> 4, v ->> 5, v ->> 6, (v ->> 7)::DOUBLE PRECISION,
       v ->> 8, v ->> 9, v ->> 10, v ->> 11
FROM json_array_elements($1::JSON) AS v
ON CONFLICT (invocation_id) DO UPDATE SET
    agent_id = excluded.agent_id, input_data = excluded.input_data,
    output_data = excluded.output_data, error_detail = excluded.error_detail,
    request_timestamp = excluded.request_timestamp, response_timestamp = excluded.response_timestamp,
    execution_time_ms = excluded.execution_time_ms, status = excluded.status,
    entrypoint_tag = excluded.entrypoint_tag, sdk_type = excluded.sdk_type,
    client_info = excluded.client_info
