#!/usr/bin/env bash
# Runs every fuzz target for SECS seconds each (default 600), starting from the seed corpora that
# `seeds` writes. Needs a nightly toolchain (`rustup toolchain install nightly`) and cargo-fuzz
# (`cargo install cargo-fuzz`). A crash leaves its input under fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-600}"
target_dir="${CARGO_TARGET_DIR:-target}"
cargo +nightly fuzz build -O
"$target_dir/x86_64-unknown-linux-gnu/release/seeds"
for target in upload tensors_roundtrip task_config json_bodies requests; do
  echo "fuzz: $target for $secs s"
  cargo +nightly fuzz run -O "$target" -- -max_total_time="$secs" -print_final_stats=1
done
