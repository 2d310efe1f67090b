#!/usr/bin/env bash
# Runs one fault scenario at scale and prints what riders lived through:
# three hexfleet-node processes on a private redis-server, a fleet of
# drivers moving at 25 m/s, a rider on every node, the fault, then the
# checker's figures (longest time a vehicle was hidden or > 60 m behind, how
# long until every rider was right again) and what the store and the APIs
# held afterwards (ghosts, duplicates, stale states), which must be none.
#
#   scripts/chaos.sh SCENARIO [DRIVERS] [FAULT_SECONDS] [FIX_MS]
#
# SCENARIO: kill (kill -9 of the busiest node), freeze (SIGSTOP of it, then
# SIGCONT), redis-stall (SIGSTOP of Redis, data kept, a sixth of the
# drivers signing off meanwhile), redis-cut (one node cut from Redis
# through a relay, its clients still reaching it, a sixth of the drivers
# signing off meanwhile); on a three-master Redis Cluster with a replica
# each: cluster-master-kill (kill -9 of a master), cluster-failover
# (CLUSTER FAILOVER on a replica), cluster-slots (every slot holding the
# fleet's shards moved to another master with its keys); clocks (phones'
# clocks wrong from the start: a sixth 20 s ahead, a sixth 60 s behind, a
# sixth an hour ahead, each stamping its fixes itself, a sixth a day behind
# read by the SDK; at the fault a sixth jump a minute ahead); a node's client
# side, its QUIC address behind a UDP relay while it keeps Redis and its
# peers (the drivers QUIC-only, as if its HTTPS went with it): clientcut
# (every datagram dropped both ways), clientcut-in (toward it only),
# clientcut-out (from it only), client-loss (30% each way); slow (the
# busiest node at a 10% duty cycle, SIGSTOP 90 ms / SIGCONT 10 ms);
# redis-full (Redis refusing every write, maxmemory reached under
# noeviction, reads still answered, a sixth of the drivers signing off
# meanwhile).
# Defaults: 300 drivers, 8 s, a fix a second. CHAOS_CLUSTER_SETTINGS adds
# lines to every node's [cluster] section (e.g. 'unreachable_handoff = "5s"').
#
# Drivers connect again as soon as their connection is lost (the SDK's
# DriverClient::lost and resume); CHAOS_RESUME=0 makes them wait for their
# next fix, as an app that does not use them. CHAOS_TRACE=1 prints every
# rider's count of wrong vehicles every 100 ms for the first 4 s of the
# fault; CHAOS_NODE_LOGS=FILE keeps the nodes'
# logs there (NODE_LOG sets their RUST_LOG). The suite runs the same scenarios small
# (cluster.rs, chaos_*_small).
set -euo pipefail
cd "$(dirname "$0")/.."
scenario=${1:?usage: scripts/chaos.sh kill|freeze|redis-stall|redis-cut|cluster-master-kill|cluster-failover|cluster-slots|clocks|clientcut|clientcut-in|clientcut-out|client-loss|slow|redis-full [drivers] [fault seconds] [fix ms]}
export CHAOS_SCENARIO=$scenario
export CHAOS_DRIVERS=${2:-300}
export CHAOS_FAULT_S=${3:-8}
export CHAOS_FIX_MS=${4:-1000}
export RUST_LOG=${RUST_LOG:-warn}
exec cargo test --release --locked --workspace --test cluster -- \
  --ignored --exact chaos --nocapture
