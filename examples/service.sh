#!/usr/bin/env bash
# The job server, started and queried with curl, against the simulated LLM API (no key needed).
#
#   bash examples/service.sh
#
# 1. starts `python -m pipeline sim` and `python -m pipeline serve` with a bearer token,
# 2. submits a JSON job and streams its results as NDJSON while it runs,
# 3. uploads examples/data/reviews.jsonl as a job, follows its progress events (SSE),
# 4. answers a small batch synchronously (POST /v1/enrich),
# 5. cancels a slow job, then resumes it: every row exactly once.
# Needs curl and jq. Everything binds to 127.0.0.1 and is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'; }
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

sim_port=$(free_port)
port=$(free_port)
python -m pipeline sim --port "$sim_port" --latency-ms 40 >"$work/sim.log" 2>&1 &
pids+=($!)

PIPELINE_SERVER_TOKEN=$(python -c 'import secrets; print(secrets.token_urlsafe(24))')
export PIPELINE_SERVER_TOKEN
python -m pipeline serve --port "$port" --data-dir "$work/data" \
    --base-url "http://127.0.0.1:$sim_port/v1" --max-jobs 2 >"$work/server.log" 2>&1 &
pids+=($!)

api="http://127.0.0.1:$port"
auth="Authorization: Bearer $PIPELINE_SERVER_TOKEN"
for _ in $(seq 100); do  # wait until the server answers (bounded)
    curl -fsS -H "$auth" "$api/healthz" >/dev/null 2>&1 && break
    sleep 0.1
done
echo "without the token: HTTP $(curl -s -o /dev/null -w '%{http_code}' "$api/v1/jobs")"

echo "== 1. a JSON job; its results stream while it runs"
rows=$(python -c 'import json; print(json.dumps([{"id": i, "name": f"user {i}"} for i in range(20)]))')
job=$(curl -fsS -H "$auth" -H 'Content-Type: application/json' \
    -d "{\"rows\": $rows, \"settings\": {\"model\": \"sim-1\", \"prompt\": \"Greet {name}\", \"concurrency\": 4}}" \
    "$api/v1/jobs" | jq -r .id)
echo "submitted $job"
# (head stops reading after 3 rows; curl then reports a closed pipe, which is fine here)
curl -sN -H "$auth" "$api/v1/jobs/$job/results" | head -n 3 || true
curl -fsS -H "$auth" "$api/v1/jobs/$job/events" >/dev/null  # returns at the job's end
curl -fsS -H "$auth" "$api/v1/jobs/$job" | jq -c '{status, counters: (.counters | {ok, failed, requests, prompt_tokens, completion_tokens})}'

echo "== 2. a JSONL upload; progress as Server-Sent Events"
settings='{"model": "sim-1", "prompt": "Classify this {product} review: {text}", "id_field": "id", "output_field": "label"}'
upload=$(curl -fsS -H "$auth" -F "file=@examples/data/reviews.jsonl" -F "settings=$settings" "$api/v1/jobs" | jq -r .id)
curl -fsSN -H "$auth" "$api/v1/jobs/$upload/events" >"$work/events.txt"
echo "$(grep -c '^event: progress' "$work/events.txt") progress events, then:"
grep -A 1 '^event: end' "$work/events.txt" | sed -n 's/^data: //p' | jq -c '{status, rows, ok: .counters.ok}'
curl -fsS -H "$auth" "$api/v1/jobs/$upload/results" | jq -c -s '.[:2][] | {id, label: .label}'

echo "== 3. a small synchronous batch"
curl -fsS -H "$auth" -H 'Content-Type: application/json' \
    -d '{"rows": [{"name": "Ada"}, {"nom": "typo"}], "settings": {"model": "sim-1", "prompt": "Hello {name}"}}' \
    "$api/v1/enrich" | jq -c .

echo "== 4. cancel a slow job, then resume it"
rows=$(python -c 'import json; print(json.dumps([{"id": i} for i in range(60)]))')
slow=$(curl -fsS -H "$auth" -H 'Content-Type: application/json' \
    -d "{\"rows\": $rows, \"settings\": {\"model\": \"sim-1\", \"prompt\": \"Row {id}\", \"concurrency\": 1}}" \
    "$api/v1/jobs" | jq -r .id)
{ curl -sN -H "$auth" "$api/v1/jobs/$slow/results" | head -n 5 >/dev/null; } || true  # 5 done
curl -fsS -X DELETE -H "$auth" "$api/v1/jobs/$slow" >/dev/null
curl -fsS -H "$auth" "$api/v1/jobs/$slow/events" >/dev/null
curl -fsS -H "$auth" "$api/v1/jobs/$slow" | jq -c '{status, ok: .counters.ok}'
curl -fsS -X POST -H "$auth" "$api/v1/jobs/$slow/resume" >/dev/null
curl -fsS -H "$auth" "$api/v1/jobs/$slow/events" >/dev/null
curl -fsS -H "$auth" "$api/v1/jobs/$slow" | jq -c '{status, runs, skipped: .summary.resumed_skipped}'
echo "rows: $(curl -fsS -H "$auth" "$api/v1/jobs/$slow/results" | jq -s 'map(.id) | unique | length') unique of 60"
