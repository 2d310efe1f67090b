#!/usr/bin/env bash
# Node and Redis CPU (user + system, from /proc/PID/stat) per accepted fix,
# and UDP datagrams per fix, over a 15 s steady window of `hexfleet-sim load`,
# against release nodes on a private redis-server; loopback only, 35 s of load
# by default. `bench` measures one node this way in every phase; this script
# also measures a cluster, and any build (A/B):
#   cargo build --release
#   scripts/cpu-per-fix.sh target/release now 800 10 0       # BIN_DIR LABEL DRIVERS RATE RIDERS [NODES]
#   scripts/cpu-per-fix.sh target/release three 800 10 0 3   # a 3-node cluster, clients spread over it
#   SETTLE=40 DURATION=60s scripts/cpu-per-fix.sh target/release big 10000 1 0   # 10,000 drivers need longer to connect
#   NODE_TOML='[store]\nflush_interval = "5ms"\n' scripts/cpu-per-fix.sh ...   # extra node settings
#   ZONES=10000 scripts/cpu-per-fix.sh target/release zones 10000 1 0   # zones over the city first
#   PERF=1 ...   # also `perf record` the (first) node over the window, to target/perf-<LABEL>.data
#   SCENARIO=simulators/scenarios/fan-out.toml scripts/cpu-per-fix.sh target/release f 0 0 0   # play a scenario file instead (DRIVERS RATE RIDERS unused)
#   TRANSPORT=websocket scripts/cpu-per-fix.sh target/release ws 2000 1 0   # clients over WebSocket (WSS), as where UDP is blocked
# With NODES > 1 (or CLUSTER=1) the nodes run as a cluster; CPU and fixes are
# summed over the nodes.
set -u
BIN=$1; LABEL=$2; DRIVERS=$3; RATE=$4; RIDERS=$5; NODES=${6:-1}
CLUSTER=${CLUSTER:-$([ "$NODES" -gt 1 ] && echo 1 || echo 0)}
free() { python3 -c 'import socket,sys;s=socket.socket(socket.AF_INET,int(sys.argv[1]));s.bind(("127.0.0.1",0));print(s.getsockname()[1])' $1; }
RPORT=$(free 1)
DIR=$(mktemp -d)
redis-server --port $RPORT --bind 127.0.0.1 --save "" --appendonly no --dir $DIR > /dev/null &
RPID=$!
sleep 0.5
export HEXFLEET_TOKEN_SECRET=measure-secret-0123456789abcdef HEXFLEET_DEV_DIR=$DIR
# Every simulated client comes from 127.0.0.1.
printf '[quic]\nmax_connections_per_address = 100000\n[http]\nmax_connections = 100000\nmax_connections_per_address = 100000\n%b' "${NODE_TOML:-}" > $DIR/node.toml
TRANSPORT=${TRANSPORT:-quic}
# WebSocket clients connect to the HTTPS port, as in production.
HTTP_TLS=$([ "$TRANSPORT" = quic ] && echo false || echo true)
NPIDS=(); HTTPS=(); ADMINS=(); TARGETS=()
for i in $(seq 1 $NODES); do
  QPORT=$(free 2); HPORT=$(free 1); APORT=$(free 1)
  FLAGS=(); [ "$CLUSTER" = 1 ] && FLAGS=(--cluster)
  $BIN/hexfleet-node --config $DIR/node.toml --node-id "node-$i" "${FLAGS[@]}" --redis-url redis://127.0.0.1:$RPORT \
    --quic-listen 127.0.0.1:$QPORT --http-listen 127.0.0.1:$HPORT --http-tls $HTTP_TLS \
    --admin-listen 127.0.0.1:$APORT > $DIR/node-$i.log 2>&1 &
  NPIDS+=($!); HTTPS+=(127.0.0.1:$HPORT); ADMINS+=(127.0.0.1:$APORT); TARGETS+=(--node 127.0.0.1:$QPORT)
  # The first writes the development certificate the others reuse.
  until curl -fs http://127.0.0.1:$APORT/healthz > /dev/null; do sleep 0.1; done
done
sleep 1
if [ "${ZONES:-0}" -gt 0 ]; then
  # Star-shaped zones 150-600 m across over the simulator's city (Berlin),
  # as bench puts them; the node applies them before the load starts.
  TOKEN=$($BIN/hexfleet-node token --dashboard zone-ops)
  python3 - "${HTTPS[0]}" "$TOKEN" "$ZONES" <<'PY'
import json, math, random, sys, urllib.request
http, token, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(7)
for i in range(n):
    lat, lon = rng.uniform(52.38, 52.62), rng.uniform(13.20, 13.62)
    r, k = rng.uniform(150, 600), rng.randrange(6, 24)
    ring = []
    for j in range(k):
        a, d = j / k * 2 * math.pi, rng.uniform(0.5 * r, r)
        ring.append([lon + d * math.sin(a) / (111320 * math.cos(math.radians(lat))), lat + d * math.cos(a) / 111320])
    ring.append(ring[0])
    body = json.dumps({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}}).encode()
    req = urllib.request.Request(f"http://{http}/v1/zones/z{i}", data=body, method="PUT",
                                 headers={"Authorization": f"Bearer {token}"})
    urllib.request.urlopen(req).read()
PY
fi
if [ -n "${SCENARIO:-}" ]; then
  $BIN/hexfleet-sim run "$SCENARIO" "${TARGETS[@]}" --http ${HTTPS[0]} --http-tls $HTTP_TLS --transport $TRANSPORT --duration ${DURATION:-35s} > $DIR/sim.log 2>&1 &
else
  $BIN/hexfleet-sim load "${TARGETS[@]}" --http ${HTTPS[0]} --http-tls $HTTP_TLS --transport $TRANSPORT --drivers $DRIVERS --rate $RATE --riders $RIDERS --duration ${DURATION:-35s} > $DIR/sim.log 2>&1 &
fi
SPID=$!
cpu() { local s=0; for p in "$@"; do s=$((s + $(awk '{print $14+$15}' /proc/$p/stat))); done; echo $s; }
metric() { local s=0; for h in "${ADMINS[@]}"; do s=$(curl -s http://$h/metrics | awk -v s=$s -v m="$1" '$1 ~ "^"m {s+=$2} END{print s}'); done; echo $s; }
fixes() { metric 'hexfleet_fixes_accepted_total'; }
items() { metric 'hexfleet_delta_items_total'; }
frames() { metric 'hexfleet_delta_frames_total'; }
datagrams() { metric 'hexfleet_udp_datagrams_total'; }
# Every UDP datagram sent on this machine (loopback: each once), a cross-check
# for nodes that do not count their own.
udp_out() { awk '/^Udp: [0-9]/{print $5}' /proc/net/snmp; }
sleep ${SETTLE:-12}
n0=$(cpu "${NPIDS[@]}"); r0=$(cpu $RPID); f0=$(fixes); d0=$(items); e0=$(frames); g0=$(datagrams); u0=$(udp_out)
if [ "${PERF:-0}" = 1 ]; then
  perf record -e cpu-clock -F 499 --call-graph dwarf,16384 -p ${NPIDS[0]} -o target/perf-$LABEL.data -- sleep 15 > /dev/null 2>&1
else
  sleep 15
fi
n1=$(cpu "${NPIDS[@]}"); r1=$(cpu $RPID); f1=$(fixes); d1=$(items); e1=$(frames); g1=$(datagrams); u1=$(udp_out)
if [ "$NODES" -gt 1 ]; then
  for h in "${ADMINS[@]}"; do
    curl -s http://$h/metrics | awk -v h=$h '/^hexfleet_(fixes_accepted_total|replicas|shards_held|bus_batches_total|subscribers) /{printf "%s=%s ", $1, $2} END{print "(" h ")"}'
  done
fi
wait $SPID
NODE_EXIT=0
for p in "${NPIDS[@]}"; do kill -TERM $p; wait $p || NODE_EXIT=$?; done
kill $RPID; wait $RPID 2>/dev/null
python3 - "$LABEL" $n0 $n1 $r0 $r1 $f0 $f1 $d0 $d1 $g0 $g1 $u0 $u1 $NODE_EXIT $NODES $e0 $e1 <<'PY'
import sys
label,n0,n1,r0,r1,f0,f1,d0,d1,g0,g1,u0,u1,ex,nodes,e0,e1=sys.argv[1:]
n=(int(n1)-int(n0))*10_000; r=(int(r1)-int(r0))*10_000; f=float(f1)-float(f0); d=float(d1)-float(d0); g=float(g1)-float(g0); u=float(u1)-float(u0); e=float(e1)-float(e0)
print(f"{label} ({nodes} node(s)): {f/15:.0f} fixes/s, {d/15:.0f} delta items/s in {e/15:.0f} frames/s; node {n/15/1e6:.3f} cores; nodes {n/f:.1f} us CPU/fix summed (incl. fan-out), redis {r/f:.1f} us/fix, {g/f:.2} UDP datagrams/fix (node's count), {u/f:.2} (machine's sendmsg count); node exit {ex}")
PY
grep -E "latency|accepted" $DIR/sim.log | head -4
