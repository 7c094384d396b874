#!/usr/bin/env bash
# A local multi-node Ray cluster on this one machine: a head and N worker "nodes", each its own
# raylet with its own CPU count, to run the job the way it runs on a real cluster.
#
#   cluster/local_cluster.sh start      # head + $XAI_CLUSTER_WORKERS workers (token auth on)
#   source /tmp/xai-cluster-$(id -un)/env.sh  # RAY_ADDRESS + auth settings (start prints this line)
#   xai-audit demo --output /tmp/demo-out          # a driver on this machine joins the cluster
#   XAI_CLUSTER_DASHBOARD=1 (needs ray[default]) enables `ray job submit`:
#   ray job submit --address "$XAI_DASHBOARD" --working-dir . -- xai-audit demo --output /tmp/d
#   cluster/local_cluster.sh status
#   cluster/local_cluster.sh stop       # stops only the processes this script started
#   cluster/local_cluster.sh check      # which Python, ray and env file it would use; starts nothing
#
# No activated venv needed: `ray` is the one beside the Python it runs with, $XAI_PYTHON if set,
# else the repository's .venv/bin/python, else python3 on PATH.
#
# Token authentication (Ray >= 2.5x): every process that joins or talks to the cluster (worker
# nodes, drivers, `ray job submit`, `ray status`) needs RAY_AUTH_MODE=token and the cluster's
# token (RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH pointing at a file holding it). This script makes
# a token in $XAI_CLUSTER_DIR/auth_token and writes both variables into env.sh.
#
# It never runs `ray stop` (that would stop every Ray on the machine): each node is started with
# `setsid ray start --block` in the background and stopped by the process group recorded at
# start.
set -euo pipefail

STATE=${XAI_CLUSTER_DIR:-/tmp/xai-cluster-$(id -un)}
ENV_FILE=$STATE/env.sh
PORT=${XAI_CLUSTER_PORT:-6390}
DASH_PORT=${XAI_CLUSTER_DASHBOARD_PORT:-8290}
WORKERS=${XAI_CLUSTER_WORKERS:-2}
CPUS=${XAI_CLUSTER_CPUS_PER_NODE:-1}
HOST=127.0.0.1

# the Python (and the `ray` beside it): no activated venv needed
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [[ -n "${XAI_PYTHON:-}" ]]; then
  PY=$XAI_PYTHON
elif [[ -x "$HERE/../.venv/bin/python" ]]; then
  PY=$HERE/../.venv/bin/python
else
  PY=$(command -v python3 || command -v python || true)
fi
RAY=$(dirname "${PY:-/nonexistent/python}")/ray

need_ray() {
  if [[ -z "${PY:-}" || ! -x "$RAY" ]]; then
    echo "no ray beside ${PY:-python3} (looked for $RAY); set XAI_PYTHON to your venv's python," \
      "e.g. XAI_PYTHON=.venv/bin/python $0 ${1:-start}" >&2
    exit 2
  fi
}

env_setup() {
  mkdir -p "$STATE"
  if [[ ! -s "$STATE/auth_token" ]]; then
    (umask 077 && "$PY" -c "import secrets; print(secrets.token_hex(32))" > "$STATE/auth_token")
  fi
  export RAY_AUTH_MODE=token
  export RAY_AUTH_TOKEN_PATH="$STATE/auth_token"
  unset RAY_AUTH_TOKEN || true
}

wait_for_nodes() {
  local want=$1
  for _ in $(seq 1 60); do
    if ! kill -0 "$(cat "$STATE/head.pid")" 2>/dev/null; then
      echo "the head node exited; see $STATE/head.log" >&2
      return 1
    fi
    local alive
    alive=$("$PY" - "$HOST:$PORT" <<'EOF' 2>/dev/null || echo 0
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
print(sum(1 for n in ray.nodes() if n["Alive"]))
EOF
)
    if [[ "${alive:-0}" -ge "$want" ]]; then
      echo "cluster up: $alive node(s)"
      return 0
    fi
    sleep 1
  done
  echo "cluster did not come up; see $STATE/*.log" >&2
  return 1
}

start() {
  need_ray start
  env_setup
  if [[ -f "$STATE/head.pid" ]] && kill -0 "$(cat "$STATE/head.pid")" 2>/dev/null; then
    echo "already running (head pid $(cat "$STATE/head.pid")); stop it first" >&2
    exit 1
  fi
  local dash=(--include-dashboard false)
  if [[ "${XAI_CLUSTER_DASHBOARD:-0}" == 1 ]]; then  # needs `pip install "ray[default]"`
    dash=(--include-dashboard true --dashboard-host "$HOST" --dashboard-port "$DASH_PORT")
  fi
  setsid "$RAY" start --head --node-ip-address "$HOST" --port "$PORT" --num-cpus "$CPUS" "${dash[@]}" \
    --block > "$STATE/head.log" 2>&1 &
  echo $! > "$STATE/head.pid"
  wait_for_nodes 1
  for i in $(seq 1 "$WORKERS"); do  # one at a time: a busy machine times out concurrent starts
    setsid "$RAY" start --address "$HOST:$PORT" --node-ip-address "$HOST" --num-cpus "$CPUS" \
      --block > "$STATE/worker-$i.log" 2>&1 &
    echo $! > "$STATE/worker-$i.pid"
    wait_for_nodes $((i + 1))
  done
  cat > "$ENV_FILE" <<EOF
export RAY_ADDRESS=$HOST:$PORT
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$STATE/auth_token
export XAI_DASHBOARD=http://$HOST:$DASH_PORT
EOF
  echo "source $ENV_FILE  # then: xai-audit run ... (joins $HOST:$PORT)"
}

stop() {
  shopt -s nullglob
  local pids=()
  for f in "$STATE"/worker-*.pid "$STATE"/head.pid; do
    pids+=("$(cat "$f")")
  done
  # each node runs in its own session (setsid), so its process group holds exactly its
  # processes, helpers included (Ray's agents can outlive their raylet)
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true  # `ray start --block` stops its node's processes
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -TERM -- "-$pid" 2>/dev/null || true
  done
  sleep 1
  for pid in "${pids[@]}"; do
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
  rm -f "$STATE"/worker-*.pid "$STATE"/head.pid
  echo "stopped ${#pids[@]} node(s)"
}

status() {
  need_ray status
  env_setup
  "$RAY" status --address "$HOST:$PORT"
}

check() {
  need_ray check
  echo "python: $PY"
  echo "ray: $RAY ($("$RAY" --version 2>/dev/null | head -1))"
  echo "env file: $ENV_FILE"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  check) check ;;
  *) sed -n '2,26p' "$0"; exit 2 ;;
esac
