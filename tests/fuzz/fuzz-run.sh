#!/usr/bin/env bash
# Fuzzes one target for a bounded time (the suite's fuzz-TARGET tests and
# contrib/fuzz.sh):
#
#   fuzz-run.sh FUZZER SECONDS TARGET MAX_LEN SRCDIR SCRATCH FINDINGS [ARGS...]
#
# FUZZER is the libFuzzer binary, SRCDIR tests/fuzz in the source tree
# (its corpus/TARGET/ is read, never written; TARGET.dict is used when
# present), SCRATCH the directory that receives new inputs, FINDINGS where
# a failing input goes (FINDINGS/TARGET-crash-...); ARGS go to libFuzzer
# (-runs=N ends after N executions instead of SECONDS).  The daemon's own
# log lines ("stratad: ...", e.g. the corruption a fuzzed image shows) are
# left out of the output; everything else (libFuzzer's, the sanitizers',
# the target's property messages) stays.  Exits 0 when nothing was found,
# 1 when something was (libFuzzer's default 77 reads as "skipped" to meson).
set -uo pipefail
[[ $# -ge 7 ]] || { echo "usage: $0 FUZZER SECONDS TARGET MAX_LEN SRCDIR SCRATCH FINDINGS [ARGS...]" >&2; exit 2; }
fuzzer=$1 seconds=$2 target=$3 max_len=$4 src=$5 scratch=$6 findings=$7
shift 7
# STRATA_FUZZ_FRESH=1 (the suite): start from the corpus in the tree only,
# so that a fixed seed and run count make the same inputs every time
[[ ${STRATA_FUZZ_FRESH:-} == 1 ]] && rm -rf "$scratch"
mkdir -p "$scratch" "$findings"
dict=()
[[ -f $src/$target.dict ]] && dict=(-dict="$src/$target.dict")
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:detect_stack_use_after_return=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
# -timeout: an input that runs this long is a hang.  Wall-clock time:
# generous, since on a loaded machine a niced fuzzer can stall for seconds.
"$fuzzer" "${dict[@]}" -max_total_time="$seconds" -timeout=60 \
    -rss_limit_mb=2048 -max_len="$max_len" -print_final_stats=1 \
    -error_exitcode=1 -timeout_exitcode=1 \
    -artifact_prefix="$findings/$target-" "$@" \
    "$scratch" "$src/corpus/$target" 2>&1 | grep -v '^stratad: '
exit "${PIPESTATUS[0]}"
