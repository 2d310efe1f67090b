#!/usr/bin/env bash
# Node and Redis CPU (user + system, from /proc/PID/stat) per accepted fix
# over a 15 s steady window of `hexfleet-sim load`, against a release node on
# a private redis-server; loopback only, 35 s of load. Until `bench` reports
# this itself:
#   cargo build --release
#   scripts/cpu-per-fix.sh target/release now 800 10 0     # BIN_DIR LABEL DRIVERS RATE RIDERS
set -u
BIN=$1; LABEL=$2; DRIVERS=$3; RATE=$4; RIDERS=$5
free() { python3 -c 'import socket,sys;s=socket.socket(socket.AF_INET,int(sys.argv[1]));s.bind(("127.0.0.1",0));print(s.getsockname()[1])' $1; }
RPORT=$(free 1); QPORT=$(free 2); HPORT=$(free 1)
DIR=$(mktemp -d)
redis-server --port $RPORT --bind 127.0.0.1 --save "" --appendonly no --dir $DIR > /dev/null &
RPID=$!
sleep 0.5
export HEXFLEET_TOKEN_SECRET=measure-secret-0123456789abcdef HEXFLEET_DEV_DIR=$DIR
$BIN/hexfleet-node --redis-url redis://127.0.0.1:$RPORT --quic-listen 127.0.0.1:$QPORT --http-listen 127.0.0.1:$HPORT > $DIR/node.log 2>&1 &
NPID=$!
sleep 1
$BIN/hexfleet-sim load --node 127.0.0.1:$QPORT --http 127.0.0.1:$HPORT --drivers $DRIVERS --rate $RATE --riders $RIDERS --duration 35s > $DIR/sim.log 2>&1 &
SPID=$!
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
fixes() { curl -s http://127.0.0.1:$HPORT/metrics | awk '/^hexfleet_fixes_accepted_total /{print $2}'; }
items() { curl -s http://127.0.0.1:$HPORT/metrics | awk '/^hexfleet_delta_items_total/{s+=$2} END{print s}'; }
sleep 12
n0=$(cpu $NPID); r0=$(cpu $RPID); f0=$(fixes); d0=$(items)
sleep 15
n1=$(cpu $NPID); r1=$(cpu $RPID); f1=$(fixes); d1=$(items)
wait $SPID
kill -TERM $NPID; wait $NPID; NODE_EXIT=$?
kill $RPID; wait $RPID 2>/dev/null
python3 - "$LABEL" $n0 $n1 $r0 $r1 $f0 $f1 $d0 $d1 $NODE_EXIT <<'PY'
import sys
label,n0,n1,r0,r1,f0,f1,d0,d1,ex=sys.argv[1:]
n=(int(n1)-int(n0))*10_000; r=(int(r1)-int(r0))*10_000; f=float(f1)-float(f0); d=float(d1)-float(d0)
print(f"{label}: {f/15:.0f} fixes/s, {d/15:.0f} delta items/s; node {n/f:.1f} us CPU/fix (incl. fan-out), redis {r/f:.1f} us/fix; node exit {ex}")
PY
grep -E "latency|accepted" $DIR/sim.log | head -4
