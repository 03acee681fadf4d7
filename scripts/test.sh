#!/usr/bin/env bash
# The whole test suite: unit tests, the data path against real PostgreSQL
# servers, everything that needs a real Patroni cluster, against labs of
# its own on shifted ports (so it never touches a running demo), and the
# container suite (docker/lab's images and compose cluster, on a Docker
# engine it starts when none runs). The suites
# that need Patroni (lab, patroni, faults, drivers) run against both stacks
# people run: Debian 12's Patroni 3.0.2 + PostgreSQL 15, then Patroni 4.1 +
# PostgreSQL 18 from PyPI. Each lab is taken down at the end, also when a
# test fails.
#
# Usage: scripts/test.sh [extra cargo test args]
#   ROLEGATE_TEST_STACKS  the stacks to run the Patroni suites on
#                         (default "debian current")
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh

stacks=${ROLEGATE_TEST_STACKS:-debian current}
patroni_suites=(--test lab --test patroni --test faults --test drivers)

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

teardown() {
  local stack
  for stack in $stacks; do
    (use_lab "$stack" && lab/lab down --wipe) || true
  done
}
trap teardown EXIT

# Build first: a compile error should not cost a cluster start. The release
# binary is the one the container suite puts in its image (docker/lab).
cargo build --all-targets
cargo build --release --locked --bin rolegate

# Every suite runs even after one fails, so a red run lists all failures.
status=0
first=1
for stack in $stacks; do
  use_lab "$stack"
  echo "== Patroni stack: $stack (lab offset $LAB_PORT_OFFSET)" >&2
  lab/lab up
  if ((first)); then
    cargo test --all-targets --no-fail-fast "$@" || status=1
    first=0
  else
    cargo test "${patroni_suites[@]}" --no-fail-fast "$@" || status=1
  fi
  # One cluster at a time on this machine's two cores.
  lab/lab down --wipe
done
exit $status
