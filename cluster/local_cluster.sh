#!/usr/bin/env bash
# A local multi-node Ray cluster on this one machine: a head and N worker "nodes", each its own
# raylet with its own CPU count, to run the job the way it runs on a real cluster.
#
#   cluster/local_cluster.sh start      # head + $XAI_CLUSTER_WORKERS workers (token auth on)
#   source /tmp/xai-cluster-$USER/env.sh   # RAY_ADDRESS + auth settings for drivers and clients
#   xai-audit demo --output /tmp/demo-out          # a driver on this machine joins the cluster
#   XAI_CLUSTER_DASHBOARD=1 (needs ray[default]) enables `ray job submit`:
#   ray job submit --address "$XAI_DASHBOARD" --working-dir . -- xai-audit demo --output /tmp/d
#   cluster/local_cluster.sh status
#   cluster/local_cluster.sh stop       # stops only the processes this script started
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

STATE=${XAI_CLUSTER_DIR:-${TMPDIR:-/tmp}/xai-cluster-$(id -un)}
PORT=${XAI_CLUSTER_PORT:-6390}
DASH_PORT=${XAI_CLUSTER_DASHBOARD_PORT:-8290}
WORKERS=${XAI_CLUSTER_WORKERS:-2}
CPUS=${XAI_CLUSTER_CPUS_PER_NODE:-1}
HOST=127.0.0.1

env_setup() {
  mkdir -p "$STATE"
  if [[ ! -s "$STATE/auth_token" ]]; then
    (umask 077 && python -c "import secrets; print(secrets.token_hex(32))" > "$STATE/auth_token")
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
    alive=$(python - "$HOST:$PORT" <<'EOF' 2>/dev/null || echo 0
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
  env_setup
  if [[ -f "$STATE/head.pid" ]] && kill -0 "$(cat "$STATE/head.pid")" 2>/dev/null; then
    echo "already running (head pid $(cat "$STATE/head.pid")); stop it first" >&2
    exit 1
  fi
  local dash=(--include-dashboard false)
  if [[ "${XAI_CLUSTER_DASHBOARD:-0}" == 1 ]]; then  # needs `pip install "ray[default]"`
    dash=(--include-dashboard true --dashboard-host "$HOST" --dashboard-port "$DASH_PORT")
  fi
  setsid ray start --head --node-ip-address "$HOST" --port "$PORT" --num-cpus "$CPUS" "${dash[@]}" \
    --block > "$STATE/head.log" 2>&1 &
  echo $! > "$STATE/head.pid"
  wait_for_nodes 1
  for i in $(seq 1 "$WORKERS"); do  # one at a time: a busy machine times out concurrent starts
    setsid ray start --address "$HOST:$PORT" --node-ip-address "$HOST" --num-cpus "$CPUS" \
      --block > "$STATE/worker-$i.log" 2>&1 &
    echo $! > "$STATE/worker-$i.pid"
    wait_for_nodes $((i + 1))
  done
  cat > "$STATE/env.sh" <<EOF
export RAY_ADDRESS=$HOST:$PORT
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$STATE/auth_token
export XAI_DASHBOARD=http://$HOST:$DASH_PORT
EOF
  echo "source $STATE/env.sh  # then: xai-audit run ... (joins $HOST:$PORT)"
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
  env_setup
  ray status --address "$HOST:$PORT"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) sed -n '2,22p' "$0"; exit 2 ;;
esac
