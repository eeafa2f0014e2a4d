#!/bin/bash
# `make run`: serves the OpenAI API on 127.0.0.1:$PORT with redis-server,
# llm-engine and the distro's nginx loading the built module, in the
# foreground until Ctrl-C, which stops everything started here.
#
#   MODEL=path PORT=n REDIS_PORT=n THREADS=n BUILD=dir TENANTS=file \
#       tools/run.sh
#
# REDIS=host:port uses that Redis (limits, the prompt cache and the KV
# block tier of the prefix cache) instead of a redis-server started here
# on 127.0.0.1:$REDIS_PORT.  The prefix cache is on, with its Redis tier.
# TENANTS: the tenant directory (API keys, limits), conf/tenants.json by
# default; its demo keys are printed at start.
# ADAPTERS=DIR: every LoRA adapter folder inside DIR (peft layout) is
# registered under its folder name ("model": "NAME" or "smollm2:NAME",
# for the tenants whose "adapters" list it: in conf/tenants.json the demo
# tenant acme may use any, "*"); /admin/adapters loads more.
# ADAPTER_DTYPE=auto|f16|f32|int8: adapter weights on the device (llm-engine
# --adapter-dtype; auto by default: int8 on the Q4_1 default model).
set -u
cd "$(dirname "$0")/.."

BUILD=${BUILD:-build}
PORT=${PORT:-8080}
REDIS_PORT=${REDIS_PORT:-6379}
REDIS=${REDIS:-}
THREADS=${THREADS:-0}
MODEL=${MODEL:-$(tools/default-model.sh)}
RUN_DIR=${RUN_DIR:-$PWD/$BUILD/run}
MODULE=$PWD/$BUILD/ngx_http_llm_module.so
ADAPTERS=${ADAPTERS:-}
SOCK=$RUN_DIR/engine.sock
TENANTS=${TENANTS:-conf/tenants.json}
case "$TENANTS" in /*) ;; *) TENANTS=$PWD/$TENANTS ;; esac

if [ -z "$MODEL" ] || [ ! -e "$MODEL" ]; then
    echo "make run: no model (MODEL=$MODEL)" >&2
    exit 1
fi
if [ ! -r "$TENANTS" ]; then
    echo "make run: no tenants file (TENANTS=$TENANTS)" >&2
    exit 1
fi
for f in "$BUILD/llm-engine" "$MODULE"; do
    [ -e "$f" ] || { echo "make run: $f is missing; run make" >&2; exit 1; }
done
adapter_args=()
if [ -n "$ADAPTERS" ]; then
    [ -d "$ADAPTERS" ] || { echo "make run: ADAPTERS=$ADAPTERS is not a folder" >&2; exit 1; }
    adapter_args=(--adapters "$(cd "$ADAPTERS" && pwd)")
fi
if [ -n "${ADAPTER_DTYPE:-}" ]; then
    adapter_args+=(--adapter-dtype "$ADAPTER_DTYPE")
fi

mkdir -p "$RUN_DIR/logs" "$RUN_DIR/tmp"
pids=()
cleanup() {
    trap - INT TERM EXIT
    echo "stopping..."
    [ -f "$RUN_DIR/nginx.pid" ] && kill -QUIT "$(cat "$RUN_DIR/nginx.pid")" 2>/dev/null
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
    wait 2>/dev/null
    exit 0
}
trap cleanup INT TERM EXIT

# Redis: limits, prompt cache, KV block tier; reuse one already there.
if [ -n "$REDIS" ]; then
    echo "redis: $REDIS"
elif command -v redis-cli >/dev/null && redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then
    echo "redis: using the server already on 127.0.0.1:$REDIS_PORT"
elif command -v redis-server >/dev/null; then
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" \
        --appendonly no --dir "$RUN_DIR" --logfile "$RUN_DIR/logs/redis.log" &
    pids+=($!)
    echo "redis: 127.0.0.1:$REDIS_PORT (pid $!)"
fi
REDIS=${REDIS:-127.0.0.1:$REDIS_PORT}

"$BUILD/llm-engine" --model "$MODEL" --listen "unix:$SOCK" \
    --threads "$THREADS" --socket-mode 0666 "${adapter_args[@]}" \
    --prefix-cache on --kv-redis "$REDIS" &
pids+=($!)
for _ in $(seq 1 600); do
    [ -S "$SOCK" ] && break
    kill -0 "${pids[-1]}" 2>/dev/null || { echo "llm-engine failed" >&2; exit 1; }
    sleep 0.1
done

sed -e "s|@MODULE@|$MODULE|g" -e "s|@PORT@|$PORT|g" -e "s|@MODEL@|$MODEL|g" \
    -e "s|@ENGINE@|unix:$SOCK|g" -e "s|@RUN_DIR@|$RUN_DIR|g" \
    -e "s|@TENANTS@|$TENANTS|g" -e "s|@REDIS@|$REDIS|g" \
    conf/nginx.conf > "$RUN_DIR/nginx.conf"
/usr/sbin/nginx -p "$RUN_DIR" -c "$RUN_DIR/nginx.conf" -g "daemon off;" &
pids+=($!)

# The demo keys: plain keys in the file, and the known key of the example
# file's tenant stored as "sha256:" only.
KEYS=$(python3 - "$TENANTS" <<'PY' 2>/dev/null
import json, sys
known = {"8c319e0660a1a22407ff359f83b565fb2c32421fe2e3dd5cd9f779f24c6238f0":
         "sk-globex-demo-2222222222222222"}
for t in json.load(open(sys.argv[1])).get("tenants", []):
    for k in t.get("keys", []):
        k = known.get(k[7:], "") if k.startswith("sha256:") else k
        if k and not t.get("disabled"):
            print("%s %s" % (t["name"], k))
PY
)
KEY=$(echo "$KEYS" | awk 'NF == 2 { print $2; exit }')

cat <<EOF

ngx_llm is serving on http://127.0.0.1:$PORT  (Ctrl-C stops)
  model:   $MODEL${ADAPTERS:+
  adapters: the folders in $ADAPTERS (curl http://127.0.0.1:$PORT/admin/adapters)}
  tenants: $TENANTS (demo keys below)
  prefix cache: on, KV blocks also in Redis at $REDIS
$(echo "$KEYS" | awk 'NF == 2 { printf "    %-10s %s\n", $1, $2 }')

  curl http://127.0.0.1:$PORT/v1/chat/completions -H 'Content-Type: application/json' \\
       -H 'Authorization: Bearer ${KEY:-YOUR_KEY}' \\
       -d '{"model": "smollm2", "messages": [{"role": "user", "content": "Hello!"}]}'

  metrics: curl http://127.0.0.1:$PORT/metrics

EOF
wait -n "${pids[@]}"
echo "a process exited; see $RUN_DIR/logs" >&2
