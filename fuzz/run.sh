#!/usr/bin/env bash
# Builds a fuzz target with libFuzzer on the stable toolchain (cargo-fuzz needs
# nightly; these are the flags it would pass) and runs it on its committed corpus.
#
#   fuzz/run.sh [TARGET] [SECONDS] [extra libFuzzer flags]   default: ext_image, 60 s
#   fuzz/run.sh [TARGET] replay                              run the corpus once
#
# Targets: ext_image (the ext image reader), nbd_server (the NBD client under a
# hostile server). Needs a C++ compiler (libFuzzer is built from the libfuzzer-sys
# crate).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
target=ext_image
case "${1:-}" in
  ext_image|nbd_server) target="$1"; shift ;;
esac
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$here/../target/fuzz}"
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# An explicit --target keeps the coverage flags off build scripts, as cargo-fuzz does.
triple="$(rustc -vV | sed -n 's/^host: //p')"
cargo build --release --features fuzzer --bin "$target" --target "$triple"
bin="$CARGO_TARGET_DIR/$triple/release/$target"
mkdir -p "corpus/$target" artifacts
if [ "${1:-}" = replay ]; then
  exec "$bin" -runs=0 "corpus/$target"
fi
secs="${1:-60}"; shift || true
exec "$bin" "corpus/$target" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
  -malloc_limit_mb=512 -max_len=4096 -artifact_prefix=artifacts/ -print_final_stats=1 "$@"
