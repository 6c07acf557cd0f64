-- wrk script for the create-and-wait path: one no-op run per request, created, executed and
-- awaited by POST /v1/runs/wait (bench/runs.py).
wrk.method = "POST"
wrk.body = '{"agent":"runs_bench","entrypoint":"work","input":{"i":1}}'
wrk.headers["Content-Type"] = "application/json"
