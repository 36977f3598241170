#!/usr/bin/env bash
# Builds the fuzz targets of tests/fuzz with clang and libFuzzer (ASan and
# UBSan on) in build-fuzz/, then runs each one for a bounded time.
#
#   contrib/fuzz.sh [--quick | SECONDS] [--keep] [TARGET...]
#
#   --quick   20 seconds per target (what contrib/test.sh runs)
#   SECONDS   seconds per target (default 300)
#   --keep    merge the inputs that found new coverage into the corpus in
#             the tree (tests/fuzz/corpus/TARGET/), minimised; otherwise
#             they stay in build-fuzz/corpus/TARGET/ and the tree is not
#             touched
#   TARGET    nbd-codec, rbd-spec, qcow2-header (default: all)
#
# Exits 1 if a target finds an input that crashes or breaks a property
# (the input is saved as build-fuzz/findings/TARGET-crash-*; replay it with
# build-fuzz/tests/fuzz/fuzz-TARGET FILE), 0 otherwise.  Without clang or
# libFuzzer (Debian: clang libclang-rt-14-dev) it says so and exits 0: the
# corpus is still replayed by every meson test run.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=300
keep=false
targets=()
for arg; do
    case $arg in
    --quick) seconds=20 ;;
    --keep) keep=true ;;
    ''|*[!0-9]*)
        case $arg in
        nbd-codec|rbd-spec|qcow2-header) targets+=("$arg") ;;
        *) echo "usage: $0 [--quick | SECONDS] [--keep] [TARGET...]" >&2
           exit 2 ;;
        esac ;;
    *) seconds=$arg ;;
    esac
done
[[ ${#targets[@]} -gt 0 ]] || targets=(nbd-codec rbd-spec qcow2-header)

if ! command -v clang >/dev/null ||
   ! echo 'int LLVMFuzzerTestOneInput(const char *d, long n) { return 0; }' |
     clang -fsanitize=fuzzer -x c - -o /dev/null 2>/dev/null; then
    echo "fuzz: clang with libFuzzer not found, not fuzzing" \
         "(apt-get install -y clang libclang-rt-14-dev)"
    exit 0
fi

build=build-fuzz
if [[ ! -f $build/build.ninja ]]; then
    CC=clang meson setup $build -Dfuzzing=enabled -Drbd=disabled \
        -Db_sanitize=address,undefined -Db_lundef=false \
        --buildtype=debugoptimized >/dev/null
fi
ninja -C $build $(printf 'tests/fuzz/fuzz-%s ' "${targets[@]}") >/dev/null

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:detect_stack_use_after_return=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
mkdir -p $build/findings
rc=0
for t in "${targets[@]}"; do
    scratch=$build/corpus/$t
    mkdir -p "$scratch"
    log=$build/fuzz-$t.log
    dict=()
    [[ -f tests/fuzz/$t.dict ]] && dict=(-dict=tests/fuzz/$t.dict)
    # New inputs go to the scratch corpus (the first directory); the one in
    # the tree is only read.
    if $build/tests/fuzz/fuzz-$t "${dict[@]}" -max_total_time="$seconds" -timeout=10 \
        -rss_limit_mb=2048 -max_len=8192 -print_final_stats=1 \
        -artifact_prefix=$build/findings/$t- \
        "$scratch" tests/fuzz/corpus/$t >"$log" 2>&1; then
        result=ok
    else
        result=FINDING
        rc=1
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    echo "fuzz $t: ${seconds}s, ${execs:-?} executions: $result"
    if [[ $result != ok ]]; then
        grep -E 'ERROR: |property does not hold|round trip|SUMMARY' "$log" |
            head -5 | sed 's/^/    /'
        echo "    log: $log"
    fi
    if $keep; then
        $build/tests/fuzz/fuzz-$t -merge=1 -max_len=8192 \
            tests/fuzz/corpus/$t "$scratch" >>"$log" 2>&1 || rc=1
    fi
done
exit $rc
