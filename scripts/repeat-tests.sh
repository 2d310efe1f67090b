#!/usr/bin/env bash
# Runs one test binary (or the whole suite) N times in a row and counts what
# failed, so a flaky test is caught by repetition rather than by luck.
#
#   scripts/repeat-tests.sh cluster 20     # services/node/tests/cluster.rs, 20 runs
#   scripts/repeat-tests.sh riders 10 -- a_rider_sees   # extra args go to the test binary
#   scripts/repeat-tests.sh all 5          # the whole suite: ./scripts/test.sh
#
# BINARY is an integration-test target's name (as `cargo test --test NAME`
# takes it), a package's name for its unit tests, or `all` (the README's
# test command, deploy checks included). Each run's
# output is kept in target/test-logs/repeat-BINARY-*/; the failing runs'
# logs are listed at the end with the tests that failed and how often.
# Exits non-zero when any run failed.
set -euo pipefail
cd "$(dirname "$0")/.."
binary=${1:?usage: scripts/repeat-tests.sh BINARY N [-- TEST ARGS]}
runs=${2:?usage: scripts/repeat-tests.sh BINARY N [-- TEST ARGS]}
shift 2
[ "${1:-}" = "--" ] && shift

if [ "$binary" = all ]; then
  run() { ./scripts/test.sh "$@"; }
else
  # The package holding the target, from cargo's own metadata.
  package=$(cargo metadata --no-deps --format-version 1 | python3 -c '
import json, sys
name = sys.argv[1]
for p in json.load(sys.stdin)["packages"]:
    for t in p["targets"]:
        if t["name"] == name and "test" in t["kind"]:
            print(p["name"], "--test"); sys.exit()
    if p["name"] == name:
        print(p["name"], "--lib"); sys.exit()
sys.exit("no test target or package named " + name)
' "$binary")
  read -r pkg kind <<<"$package"
  # With --workspace, the features are the whole workspace's, as in the
  # suite: the build is the suite's, not one of its own.
  if [ "$kind" = --test ]; then target=(--workspace --test "$binary"); else target=(-p "$pkg" --lib); fi
  run() { cargo test --locked "${target[@]}" -- "$@"; }
  cargo test --locked "${target[@]}" --no-run
fi
dir=target/test-logs/repeat-$binary-$(date +%Y%m%d-%H%M%S)
mkdir -p "$dir"
failed_runs=0
started=$(date +%s)
for i in $(seq 1 "$runs"); do
  log="$dir/run-$i.log"
  t0=$(date +%s)
  if run "$@" >"$log" 2>&1; then
    result=ok
  else
    result=FAILED
    failed_runs=$((failed_runs + 1))
  fi
  echo "run $i/$runs: $result in $(( $(date +%s) - t0 )) s; $(scripts/test-summary.sh "$log" | tail -1)"
  [ "$result" = ok ] && rm -f "$log" || true
done

echo
echo "== $binary: $runs runs, $((runs - failed_runs)) passed, $failed_runs failed ($(( $(date +%s) - started )) s)"
if [ "$failed_runs" -gt 0 ]; then
  echo "failing tests, with how many runs each failed in:"
  grep -h '^test .* \.\.\. FAILED$' "$dir"/run-*.log | sed 's/^test //; s/ \.\.\. FAILED$//' | sort | uniq -c | sort -rn
  echo "logs of the failing runs: $dir"
  exit 1
fi
