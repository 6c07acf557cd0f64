"""Drives RunAgent's own Python SDK (runagent==0.1.49, unmodified) against a server and prints
what it got, as JSON, so that runs against RunAgent and against Agentry can be compared.

usage: python sdk_check.py OUT.json AGENT_ID [HOST PORT]
Without HOST and PORT the SDK finds the server by agent_id in RunAgent's database
($RUNAGENT_CACHE_DIR/runagent_local.db), as its users do.
"""
import json
import sys

from runagent import RunAgentClient

out_path, agent_id = sys.argv[1], sys.argv[2]
address = {"host": sys.argv[3], "port": int(sys.argv[4])} if len(sys.argv) > 4 else {}


def client(tag):
    return RunAgentClient(agent_id=agent_id, entrypoint_tag=tag, local=True, **address)


def attempt(fn):
    try:
        return {"ok": fn()}
    except Exception as e:  # noqa: BLE001 - the error is what we compare
        return {"error": type(e).__name__, "code": getattr(e, "code", None), "message": str(e)}


results = {
    "echo": attempt(lambda: client("echo").run(message="hi")),
    "echo_positional": attempt(lambda: client("echo").run("pos")),
    "value_float": attempt(lambda: client("value_of").run(kind="large_float")),
    "value_nan": attempt(lambda: client("value_of").run(kind="nan")),
    "value_list": attempt(lambda: client("value_of").run(kind="list")),
    "value_unicode": attempt(lambda: client("value_of").run(kind="unicode")),
    "async": attempt(lambda: client("async_echo").run(message="a")),
    "extractor": attempt(lambda: client("extract").run(q="why")),
    "stream": attempt(lambda: list(client("echo_stream").run(message="s", n=3))),
    "async_stream": attempt(lambda: list(client("async_stream").run(n=2))),
    "raises": attempt(lambda: client("boom").run(message="bad")),
    "bad_kwarg": attempt(lambda: client("echo").run(msg="x")),
    "unknown_tag": attempt(lambda: client("nope").run()),
    "generator_plain": attempt(lambda: client("generator_plain").run()),
    "stream_raises": attempt(lambda: list(client("boom_stream").run(n=2))),
    "stream_bad_kwarg": attempt(lambda: list(client("echo_stream").run(nope=1))),
}
# The SDK prints its own progress on stdout, so the results go to a file.
with open(out_path, "w") as f:
    json.dump(results, f, sort_keys=True, indent=1, ensure_ascii=False)
