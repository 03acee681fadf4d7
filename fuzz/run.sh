#!/usr/bin/env bash
# Usage: fuzz/run.sh [SECONDS] [TARGET...]
# Runs each fuzz target (default: all) for SECONDS (default 600), seeded from
# fuzz/seeds/ (real captures). A crash stops that target, not the run: its
# input lands in fuzz/artifacts/TARGET/, the others still run, and the exit
# status is 1. Needs cargo-fuzz (cargo install cargo-fuzz --locked); stable
# Rust runs it with RUSTC_BOOTSTRAP=1, which lets cargo-fuzz pass its
# sanitizer flags.
set -uo pipefail
cd "$(dirname "$0")"
seconds=${1:-600}
shift || true
targets=("$@")
((${#targets[@]})) || targets=(first_packet frame_tracker auth_messages patroni_data config proxy_header pooled_messages)
failed=()
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target"
  cp -n seeds/"$target"/* "corpus/$target/" 2>/dev/null || true
  echo "fuzz: $target for ${seconds}s" >&2
  if ! RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" "corpus/$target" -- \
      -max_total_time="$seconds" -rss_limit_mb=2048; then
    failed+=("$target")
  fi
done
if ((${#failed[@]})); then
  echo "fuzz: crashes in ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
echo "fuzz: ${#targets[@]} target(s), ${seconds}s each, no crash" >&2
