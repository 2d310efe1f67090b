#!/usr/bin/env bash
# Sums up a `cargo test` log: every test that failed, by test binary; the
# binaries that failed without naming a test (a crash, a build error); and
# the totals, as the last line.
# Usage: scripts/test-summary.sh LOG
set -euo pipefail
log=${1:?usage: scripts/test-summary.sh LOG}
awk '
  /^ *Running / { binary = $0; sub(/^ *Running /, "", binary); next }
  /^ *Doc-tests / { binary = "doc-tests " $2; next }
  /^test .* \.\.\. FAILED$/ {
    name = $0; sub(/^test /, "", name); sub(/ \.\.\. FAILED$/, "", name)
    failed[++n] = name "  (" binary ")"; next
  }
  /^test result: / {
    binaries++
    if ($3 == "FAILED.") red++
    for (i = 4; i <= NF; i++) {
      if ($(i) ~ /^passed/) passed += $(i - 1)
      if ($(i) ~ /^failed/) failing += $(i - 1)
      if ($(i) ~ /^ignored/) ignored += $(i - 1)
    }
  }
  /^error: .*targets? failed/ { targets = $0; listing = 1; next }
  listing && /^    `/ { targets = targets "\n" $0; next }
  { listing = 0 }
  END {
    printf "\n== test summary: %d test binaries ran, %d of them red\n", binaries, red
    for (i = 1; i <= n; i++) printf "FAILED %s\n", failed[i]
    if (targets != "") print targets
    printf "(full output: %s)\n", FILENAME
    printf "tests: %d passed, %d failed, %d skipped\n", passed, failing, ignored
  }
' "$log"
