#!/usr/bin/env bash
# The whole test suite: unit tests, the data path against real PostgreSQL
# servers, and everything that needs a real Patroni cluster against a lab of
# its own on shifted ports (so it never touches a running demo). The lab is
# taken down at the end, also when a test fails.
#
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh

export LAB_PORT_OFFSET=${ROLEGATE_TEST_LAB_OFFSET:-100}
export LAB_DIR=${ROLEGATE_TEST_LAB_DIR:-/tmp/rolegate-test-lab}

# Build first: a compile error should not cost a cluster start.
cargo build --all-targets

teardown() { lab/lab down --wipe || true; }
trap teardown EXIT
lab/lab up

# Every suite runs even after one fails, so a red run lists all failures.
cargo test --all-targets --no-fail-fast "$@"
