"""Capture golden responses from a running RunAgent 0.1.49 local server.

usage: python capture_golden.py PORT AGENT_ID OUT.json
The cases here are replayed against `agentry serve` by crates/cli/tests/it/compat_golden.rs, which
compares status, content type and body byte for byte (timestamps, request ids, invocation ids and
execution times are redacted on both sides).
"""
import http.client
import json
import sys

from websockets.sync.client import connect

port, aid, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
RUN = f"/api/v1/agents/{aid}/run"
WS = f"/api/v1/agents/{aid}/run-stream"


def run_body(tag, kwargs=None, args=None):
    return json.dumps({"entrypoint_tag": tag, "input_args": args or [], "input_kwargs": kwargs or {}})


http_cases = [
    ("health", "GET", "/api/v1/health", None),
    ("info", "GET", "/api/v1", None),
    ("architecture", "GET", f"/api/v1/agents/{aid}/architecture", None),
    ("architecture_wrong_agent", "GET", "/api/v1/agents/nope/architecture", None),
    ("root_404", "GET", "/", None),
    ("health_404", "GET", "/health", None),
    ("run_wrong_method", "GET", RUN, None),
    ("run_echo", "POST", RUN, run_body("echo", {"message": "hi"})),
    ("run_echo_positional", "POST", RUN, run_body("echo", args=["pos"])),
    ("run_wrong_agent", "POST", "/api/v1/agents/nope/run", run_body("echo", {"message": "hi"})),
    ("run_unknown_tag", "POST", RUN, run_body("nope", {})),
    ("run_stream_tag", "POST", RUN, run_body("echo_stream", {"message": "hi"})),
    ("run_bad_kwarg", "POST", RUN, run_body("echo", {"msg": "hi"})),
    ("run_raises", "POST", RUN, run_body("boom", {"message": "bad"})),
    ("run_gen_not_stream", "POST", RUN, run_body("generator_plain")),
    ("run_extractor", "POST", RUN, run_body("extract", {"q": "why"})),
    ("run_async", "POST", RUN, run_body("async_echo", {"message": "hi"})),
    ("run_string_number_no_coercion", "POST", RUN, run_body("add", {"a": "2", "b": "3"})),
    ("run_defaults", "POST", RUN, json.dumps({"entrypoint_tag": "echo", "input_kwargs": {"message": "d"}})),
    ("run_extra_fields", "POST", RUN, json.dumps({"entrypoint_tag": "echo", "input_args": [], "input_kwargs": {"message": "x"}, "timeout_seconds": 300, "async_execution": False, "id": "run_start", "user_id": "u"})),
    ("v422_missing_tag", "POST", RUN, json.dumps({"input_kwargs": {}})),
    ("v422_tag_wrong_type", "POST", RUN, json.dumps({"entrypoint_tag": 5})),
    ("v422_args_wrong_type", "POST", RUN, json.dumps({"entrypoint_tag": "echo", "input_args": {"a": 1}})),
    ("v422_kwargs_wrong_type", "POST", RUN, json.dumps({"entrypoint_tag": "echo", "input_kwargs": [1]})),
    ("v422_body_is_list", "POST", RUN, "[1, 2]"),
    ("v422_body_is_string", "POST", RUN, "\"x\""),
    ("v422_empty_body", "POST", RUN, ""),
    ("v422_bad_json", "POST", RUN, "{\"entrypoint_tag\": "),
    ("v422_bad_json2", "POST", RUN, "{bad}"),
    ("v422_two_errors", "POST", RUN, json.dumps({"input_args": 3})),
    ("invocation_unknown", "GET", "/api/v1/invocations/00000000-0000-0000-0000-000000000000", None),
]
for kind in ["string", "integer", "big_integer", "number", "tenth", "large_float", "small_float", "nan", "inf",
             "neg_inf", "none", "true", "list", "tuple", "set", "dict", "nested_nan", "datetime", "date", "time",
             "bytes", "object", "to_dict", "model_dump", "dict_method", "unicode", "int_keys", "empty_string", "empty_list"]:
    http_cases.append((f"type_{kind}", "POST", RUN, run_body("value_of", {"kind": kind})))

ws_cases = [
    ("ws_echo_stream", WS, run_body("echo_stream", {"message": "hi", "n": 3})),
    ("ws_boom_stream", WS, run_body("boom_stream", {"n": 2})),
    ("ws_bad_kwarg", WS, run_body("echo_stream", {"nope": 1})),
    ("ws_list_stream", WS, run_body("list_stream", {"n": 2})),
    ("ws_async_stream", WS, run_body("async_stream", {"n": 2})),
    ("ws_unknown_tag", WS, run_body("x_stream", {})),
    ("ws_not_streaming", WS, run_body("echo", {"message": "x"})),
    ("ws_bad_json", WS, "{nope"),
    ("ws_missing_args", WS, json.dumps({"entrypoint_tag": "echo_stream", "input_kwargs": {}})),
    ("ws_missing_kwargs", WS, json.dumps({"entrypoint_tag": "echo_stream", "input_args": []})),
    ("ws_missing_tag", WS, json.dumps({"input_args": [], "input_kwargs": {}})),
]

results = {"http": [], "ws": []}
for name, method, path, body in http_cases:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    c.request(method, path, body=body, headers=headers)
    r = c.getresponse()
    data = r.read().decode()
    results["http"].append({"name": name, "method": method, "path": path, "body": body, "status": r.status,
                            "content_type": r.getheader("content-type"), "allow": r.getheader("allow"),
                            "response": data})

for name, path, send in ws_cases:
    frames, close_code = [], None
    try:
        with connect(f"ws://127.0.0.1:{port}{path}", open_timeout=10) as ws:
            ws.send(send)
            while True:
                try:
                    m = ws.recv(timeout=2)
                except TimeoutError:
                    close_code = "open"  # RunAgent leaves the socket open after the terminal frame
                    break
                frames.append(m)
    except Exception as e:  # noqa: BLE001 - closed by the server: record the close code
        close_code = getattr(getattr(e, "rcvd", None), "code", repr(e))
    results["ws"].append({"name": name, "path": path, "send": send, "frames": frames, "close_code": close_code})

try:
    with connect(f"ws://127.0.0.1:{port}/api/v1/agents/nope/run-stream", open_timeout=5) as ws:
        results["ws_wrong_agent"] = "accepted"
except Exception as e:  # noqa: BLE001
    results["ws_wrong_agent"] = repr(e)

with open(out, "w") as f:
    json.dump(results, f, indent=1, ensure_ascii=False)
print("captured", len(results["http"]), "http and", len(results["ws"]), "ws cases")
