#!/usr/bin/env bash
# Runs every fuzz target (or the ones named) for a fixed budget each, on the stable toolchain.
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]      (default: 60 seconds, every target)
#
# Each target starts from its committed corpus (fuzz/corpus/NAME, read only) and writes what it
# discovers to fuzz/work/NAME. A crash, a panic, an input over the memory limits, or an input
# slower than 10 s fails the run; the input is saved under fuzz/artifacts/NAME/. The last line
# says "fuzz: N passed, M failed"; the exit status is non-zero when a target failed.
#
# Optional per-target libFuzzer flags: fuzz/options/NAME (one line, e.g. -max_len=65536).
# Environment: CARGO_TARGET_DIR is honoured (default fuzz/target); FUZZ_FLAGS adds libFuzzer
# flags to every target.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
secs=${1:-60}
shift || true
if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    targets=()
    for f in "$here"/fuzz_targets/*.rs; do
        targets+=("$(basename "$f" .rs)")
    done
fi

triple=$(rustc -vV | sed -n 's/^host: //p')
target_dir=${CARGO_TARGET_DIR:-$here/target}

# What cargo-fuzz passes (coverage instrumentation, AddressSanitizer for the malloc limit, debug
# assertions and overflow checks); RUSTC_BOOTSTRAP lets the stable compiler take -Z flags.
export RUSTC_BOOTSTRAP=1
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Zsanitizer=address \
-Cdebug-assertions -Coverflow-checks -Cforce-frame-pointers"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0}

bins=()
for t in "${targets[@]}"; do bins+=(--bin "$t"); done
cargo build --release --locked --manifest-path "$here/Cargo.toml" --target "$triple" \
    --target-dir "$target_dir" "${bins[@]}"

passed=0
failed=0
failures=()
for t in "${targets[@]}"; do
    mkdir -p "$here/work/$t" "$here/artifacts/$t" "$here/corpus/$t"
    opts=()
    if [ -f "$here/options/$t" ]; then
        read -r -a opts < "$here/options/$t"
    fi
    echo "== $t: ${secs}s"
    # -rss_limit_mb bounds the whole process, -malloc_limit_mb any single allocation.
    # shellcheck disable=SC2086
    if "$target_dir/$triple/release/$t" "$here/work/$t" "$here/corpus/$t" \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=1024 -malloc_limit_mb=64 \
        -artifact_prefix="$here/artifacts/$t/" -print_final_stats=1 \
        "${opts[@]}" ${FUZZ_FLAGS:-} 2> "$here/work/$t.log"; then
        passed=$((passed + 1))
        grep -E "^stat::number_of_executed_units|^stat::peak_rss_mb" "$here/work/$t.log" | tr '\n' ' '
        echo
    else
        failed=$((failed + 1))
        failures+=("$t")
        tail -n 40 "$here/work/$t.log"
    fi
done
if [ "$failed" -gt 0 ]; then
    echo "failed: ${failures[*]} (inputs in fuzz/artifacts/, logs in fuzz/work/)"
fi
echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
