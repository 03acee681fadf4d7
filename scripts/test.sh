#!/usr/bin/env bash
# The whole test suite: unit tests, the data path against real PostgreSQL
# servers, everything that needs a real Patroni cluster, against labs of
# its own on shifted ports (so it never touches a running demo), and the
# container suite (docker/lab's images and compose cluster, on a Docker
# engine it starts when none runs). The suites that need Patroni (lab,
# patroni, faults, drivers) run against both stacks people run: Debian 12's
# Patroni 3.0.2 + PostgreSQL 15 and Patroni 4.1 + PostgreSQL 18 from PyPI.
#
# Each stack is a lane with a lab of its own, and the lanes run side by
# side: most of a Patroni test is waiting on Patroni's clocks (a leader
# key's TTL, a loop_wait), so two lanes take little more than the longer
# one. The first stack's lane runs every suite but the container suite and
# streams its output; the last lane also runs the container suite, and the
# other lanes' output is printed whole once the first lane is done. Each
# lab is taken down at the end, also when a test fails.
#
# The test binaries are run directly (cargo holds its artifact lock for a
# whole `cargo test`, so two at once would take turns).
#
# Usage: scripts/test.sh [arguments for every test binary, e.g. a filter]
#   ROLEGATE_TEST_STACKS  the stacks, one lane each (default "debian current")
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh

read -r -a stacks <<<"${ROLEGATE_TEST_STACKS:-debian current}"
patroni_suites=(lab patroni faults drivers)
logs=$(mktemp -d /tmp/rolegate-test-lanes.XXXXXX)
lane_pids=()

# The lab of one stack: offset, directory.
lab_of() {
  case $1 in
    debian) echo "${ROLEGATE_TEST_LAB_OFFSET:-100} ${ROLEGATE_TEST_LAB_DIR:-/tmp/rolegate-test-lab}" ;;
    current) echo "300 /tmp/rolegate-test-lab-current" ;;
    *) echo "scripts/test.sh: unknown stack '$1' (debian, current)" >&2; exit 2 ;;
  esac
}

use_lab() {
  local offset dir
  read -r offset dir < <(lab_of "$1")
  export LAB_STACK=$1 LAB_PORT_OFFSET=$offset LAB_DIR=$dir
}

# shellcheck disable=SC2317  # run by the EXIT trap
teardown() {
  local pid stack
  for pid in "${lane_pids[@]}"; do
    kill -- "-$pid" 2>/dev/null || true
  done
  for stack in "${stacks[@]}"; do
    (use_lab "$stack" && lab/lab down --wipe) || true
  done
  rm -rf "$logs"
}
trap teardown EXIT

for stack in "${stacks[@]}"; do
  lab_of "$stack" >/dev/null
done

# Build first: a compile error should not cost a cluster start. The release
# binary is the one the container suite puts in its image (docker/lab).
cargo build --all-targets
cargo build --release --locked --bin rolegate

# Every test binary as "name path"; the crate's own unit tests are "unit".
cargo test --all-targets --no-run --message-format=json 2>/dev/null |
  jq -r 'select(.reason == "compiler-artifact" and .profile.test)
         | "\(if .target.kind[0] == "test" then .target.name else "unit-\(.target.kind[0])" end) \(.executable)"' \
    >"$logs/binaries"

binary_of() {
  awk -v name="$1" '$1 == name { print $2 }' "$logs/binaries"
}

# The suites of lane `index` (of `count`): the first lane's start with the
# unit tests, so a plain mistake shows within seconds.
suites_of() {
  local index=$1 count=$2
  if ((index == 0)); then
    awk '$1 ~ /^unit-/ { print $1 }' "$logs/binaries" | sort
    awk '$1 !~ /^unit-/ && $1 != "containers" { print $1 }' "$logs/binaries" | sort
  else
    printf '%s\n' "${patroni_suites[@]}"
  fi
  if ((index == count - 1)); then
    echo containers
  fi
}

# One lane: its suites in turn against its lab (every one, even after a
# failure, so a red run lists all failures), then its lab down, which
# leaves the machine to the other lanes.
lane() {
  local index=$1 stack=${stacks[$1]} status=0 suite binary
  shift
  use_lab "$stack"
  while read -r suite; do
    binary=$(binary_of "$suite")
    if [[ -z $binary ]]; then
      echo "scripts/test.sh: no test binary '$suite'" >&2
      status=1
      continue
    fi
    echo "     Running $suite [$stack] (${binary#"$PWD/"})"
    "$binary" "$@" || status=1
  done < <(suites_of "$index" "${#stacks[@]}")
  lab/lab down --wipe
  return $status
}

# The labs start one after the other (a start is mostly CPU).
for stack in "${stacks[@]}"; do
  (use_lab "$stack" && echo "== Patroni stack: $stack (lab offset $LAB_PORT_OFFSET)" && lab/lab up)
done

# The other lanes, each in a process group of its own so that teardown can
# stop it by id.
status=0
set -m
for ((i = 1; i < ${#stacks[@]}; i++)); do
  lane "$i" "$@" >"$logs/lane-$i.log" 2>&1 &
  lane_pids+=($!)
done
set +m
lane 0 "$@" 2>&1 | tee "$logs/lane-0.log" || status=1
for ((i = 1; i < ${#stacks[@]}; i++)); do
  wait "${lane_pids[$((i - 1))]}" || status=1
  echo "== lane $i (Patroni stack ${stacks[$i]}), run beside the first:"
  cat "$logs/lane-$i.log"
done
lane_pids=()

# A red run ends with every failed test's own message, whatever the length
# of the output above (a CI page may show only its head and tail).
if ((status != 0)); then
  echo "== what failed, lane by lane:"
  for ((i = 0; i < ${#stacks[@]}; i++)); do
    echo "-- lane $i (Patroni stack ${stacks[$i]})"
    awk '/^ *Running / { suite = $0 }
         /^failures:$/ { inside = !inside; if (inside) print suite; next }
         inside' "$logs/lane-$i.log"
  done
fi
exit $status
