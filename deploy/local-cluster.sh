#!/usr/bin/env bash
# Starts a 3-node hexfleet cluster on a 3-master Redis Cluster, all on this
# machine's loopback, and stops everything on Ctrl-C.
#
#   deploy/local-cluster.sh
#   # in another shell: spread a simulated fleet over the three nodes
#   HEXFLEET_CA=/tmp/hexfleet-cluster/cert.der target/release/hexfleet-sim load \
#     --node 127.0.0.1:4431 --node 127.0.0.1:4432 --node 127.0.0.1:4433 \
#     --http 127.0.0.1:8081 --http-tls false --drivers 300 --riders 50
#   curl -H "Authorization: Bearer $(target/release/hexfleet-node token --dashboard ops)" \
#     http://127.0.0.1:8081/v1/cluster
#
# Ports: Redis 7001-7003, QUIC 4431-4433, HTTP 8081-8083 (plain HTTP: a
# loopback development cluster), admin 9091-9093. The nodes share the public
# development token secret (loopback only) and one development certificate in
# $HEXFLEET_CLUSTER_DIR (default /tmp/hexfleet-cluster).
set -euo pipefail
cd "$(dirname "$0")/.."

dir=${HEXFLEET_CLUSTER_DIR:-/tmp/hexfleet-cluster}
mkdir -p "$dir"
cargo build --release --locked -p hexfleet-node -p hexfleet-sim

pids=()
stop() {
  kill "${pids[@]}" 2>/dev/null || true
  for port in 7001 7002 7003; do redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true; done
}
trap stop EXIT INT TERM

seeds=()
for port in 7001 7002 7003; do
  rm -f "$dir/nodes-$port.conf"
  redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" --save '' --appendonly no \
    --cluster-enabled yes --cluster-config-file "nodes-$port.conf" \
    --logfile "$dir/redis-$port.log" --daemonize yes
  seeds+=("127.0.0.1:$port")
done
for port in 7001 7002 7003; do
  until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.1; done
done
redis-cli --cluster create "${seeds[@]}" --cluster-replicas 0 --cluster-yes >/dev/null
until redis-cli -p 7001 cluster info | grep -q cluster_state:ok; do sleep 0.1; done
echo "Redis Cluster up on ${seeds[*]}"

urls=$(printf 'redis://%s,' "${seeds[@]}")
for i in 1 2 3; do
  HEXFLEET_DEV_DIR="$dir" target/release/hexfleet-node \
    --node-id "node-$i" --cluster --redis-url "${urls%,}" --store redis-cluster \
    --quic-listen "127.0.0.1:443$i" --http-listen "127.0.0.1:808$i" --http-tls false \
    --admin-listen "127.0.0.1:909$i" \
    >"$dir/node-$i.log" 2>&1 &
  pids+=($!)
  # The first node writes the development certificate the others reuse.
  until curl -fs "http://127.0.0.1:909$i/healthz" >/dev/null; do sleep 0.1; done
done
echo "hexfleet nodes: QUIC 127.0.0.1:4431-4433, HTTP 127.0.0.1:8081-8083, admin 127.0.0.1:9091-9093 (logs in $dir)"
# Every node sees the others within one renewal (1 s).
auth="Authorization: Bearer $(target/release/hexfleet-node token --dashboard ops)"
until [ "$(curl -s -H "$auth" http://127.0.0.1:8081/v1/cluster | grep -o '"instance"' | wc -l)" = 3 ]; do sleep 0.2; done
curl -s -H "$auth" http://127.0.0.1:8081/v1/cluster; echo
echo "Ctrl-C to stop."
wait
