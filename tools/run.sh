#!/bin/bash
# `make run`: serves the OpenAI API on 127.0.0.1:$PORT with redis-server,
# llm-engine and the distro's nginx loading the built module, in the
# foreground until Ctrl-C, which stops everything started here.
#
#   MODEL=path PORT=n REDIS_PORT=n THREADS=n BUILD=dir tools/run.sh
set -u
cd "$(dirname "$0")/.."

BUILD=${BUILD:-build}
PORT=${PORT:-8080}
REDIS_PORT=${REDIS_PORT:-6379}
THREADS=${THREADS:-0}
MODEL=${MODEL:-$(tools/default-model.sh)}
RUN_DIR=${RUN_DIR:-$PWD/$BUILD/run}
MODULE=$PWD/$BUILD/ngx_http_llm_module.so
SOCK=$RUN_DIR/engine.sock

if [ -z "$MODEL" ] || [ ! -e "$MODEL" ]; then
    echo "make run: no model (MODEL=$MODEL)" >&2
    exit 1
fi
for f in "$BUILD/llm-engine" "$MODULE"; do
    [ -e "$f" ] || { echo "make run: $f is missing; run make" >&2; exit 1; }
done

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

# Redis: used by later features (limits, caches); reuse one already there.
if command -v redis-cli >/dev/null && redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then
    echo "redis: using the server already on 127.0.0.1:$REDIS_PORT"
elif command -v redis-server >/dev/null; then
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" \
        --appendonly no --dir "$RUN_DIR" --logfile "$RUN_DIR/logs/redis.log" &
    pids+=($!)
    echo "redis: 127.0.0.1:$REDIS_PORT (pid $!)"
fi

"$BUILD/llm-engine" --model "$MODEL" --listen "unix:$SOCK" \
    --threads "$THREADS" --socket-mode 0666 &
pids+=($!)
for _ in $(seq 1 600); do
    [ -S "$SOCK" ] && break
    kill -0 "${pids[-1]}" 2>/dev/null || { echo "llm-engine failed" >&2; exit 1; }
    sleep 0.1
done

sed -e "s|@MODULE@|$MODULE|g" -e "s|@PORT@|$PORT|g" -e "s|@MODEL@|$MODEL|g" \
    -e "s|@ENGINE@|unix:$SOCK|g" -e "s|@RUN_DIR@|$RUN_DIR|g" \
    conf/nginx.conf > "$RUN_DIR/nginx.conf"
/usr/sbin/nginx -p "$RUN_DIR" -c "$RUN_DIR/nginx.conf" -g "daemon off;" &
pids+=($!)

cat <<EOF

ngx_llm is serving on http://127.0.0.1:$PORT  (Ctrl-C stops)
  model: $MODEL

  curl http://127.0.0.1:$PORT/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "smollm2", "messages": [{"role": "user", "content": "Hello!"}]}'

EOF
wait -n "${pids[@]}"
echo "a process exited; see $RUN_DIR/logs" >&2
