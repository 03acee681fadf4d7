#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 600) each, seeded from
# fuzz/seeds/ (real captures). Crashes land in fuzz/artifacts/TARGET/.
# Needs cargo-fuzz (cargo install cargo-fuzz --locked); stable Rust runs it
# with RUSTC_BOOTSTRAP=1, which lets cargo-fuzz pass its sanitizer flags.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-600}
targets=(first_packet frame_tracker auth_messages patroni_data config)
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target"
  cp -n seeds/"$target"/* "corpus/$target/" 2>/dev/null || true
  echo "fuzz: $target for ${seconds}s" >&2
  RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" "corpus/$target" -- -max_total_time="$seconds" -rss_limit_mb=2048
done
