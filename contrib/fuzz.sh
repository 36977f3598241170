#!/usr/bin/env bash
# Builds the fuzz targets of tests/fuzz with clang and libFuzzer (ASan and
# UBSan on, every library instrumented) in build-fuzz/, then runs each one
# for a bounded time or number of executions.
#
#   contrib/fuzz.sh [--quick | SECONDS] [--runs N] [--keep] [TARGET...]
#
#   --quick   15 seconds per target (what the suite's fuzz-TARGET tests do)
#   SECONDS   seconds per target (default 300)
#   --runs N  stop a target after N executions instead (a campaign:
#             --runs 10000000); SECONDS, if given too, still bounds it
#   --keep    merge the inputs that found new coverage into the corpus in
#             the tree (tests/fuzz/corpus/TARGET/), minimised; otherwise
#             they stay in build-fuzz/corpus/TARGET/ and the tree is not
#             touched
#   TARGET    nbd-codec, rbd-spec, nbd-spec, qcow2-header, qcow2-image,
#             nbd-conn, qmp, qmp-dispatch
#             (default: all)
#
# One target at a time, one process each (-jobs/-workers are not used),
# niced (19): the machine stays usable.  Exits 1 if a target finds an input that
# crashes or breaks a property (the input is saved as
# build-fuzz/findings/TARGET-crash-*; replay it with
# build-fuzz/tests/fuzz/fuzz-TARGET FILE, FUZZ_VERBOSE=1 for qcow2-image, qmp and
# qmp-dispatch to see what it does), 0 otherwise.  Without clang or libFuzzer
# (Debian: clang libclang-rt-14-dev) it says so and exits 0: the corpus is
# still replayed by every meson test run.
set -euo pipefail
cd "$(dirname "$0")/.."

all=(nbd-codec rbd-spec nbd-spec qcow2-header qcow2-image nbd-conn qmp qmp-dispatch)
seconds=
runs=
keep=false
targets=()
while (($#)); do
    arg=$1
    shift
    case $arg in
    --quick) seconds=15 ;;
    --keep) keep=true ;;
    --runs)
        [[ ${1:-} =~ ^[0-9]+$ ]] || { echo "$0: --runs needs a number" >&2; exit 2; }
        runs=$1
        shift ;;
    ''|*[!0-9]*)
        if [[ " ${all[*]} " == *" $arg "* ]]; then
            targets+=("$arg")
        else
            echo "usage: $0 [--quick | SECONDS] [--runs N] [--keep] [TARGET...]" >&2
            exit 2
        fi ;;
    *) seconds=$arg ;;
    esac
done
[[ ${#targets[@]} -gt 0 ]] || targets=("${all[@]}")
# --runs alone: no time bound (libFuzzer's 0)
[[ -n $seconds ]] || { [[ -n $runs ]] && seconds=0 || seconds=300; }

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

# The longest input of each target (as tests/fuzz/meson.build has them).
declare -A max_len=([qcow2-image]=131072 [nbd-conn]=16384)
rc=0
for t in "${targets[@]}"; do
    scratch=$PWD/$build/corpus/$t
    log=$build/fuzz-$t.log
    extra=()
    [[ -n $runs ]] && extra=(-runs="$runs")
    if nice -n 19 tests/fuzz/fuzz-run.sh "$build/tests/fuzz/fuzz-$t" \
        "$seconds" "$t" "${max_len[$t]:-8192}" tests/fuzz "$scratch" \
        "$PWD/$build/findings" "${extra[@]}" >"$log" 2>&1; then
        result=ok
    else
        result=FINDING
        rc=1
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    echo "fuzz $t: ${execs:-?} executions (${rate:-?}/s): $result"
    if [[ $result != ok ]]; then
        { grep -E 'ERROR: |property does not hold|round trip|SUMMARY|Test unit written' "$log" || true; } |
            head -6 | sed 's/^/    /'
        echo "    log: $log"
    fi
    if $keep; then
        "$build/tests/fuzz/fuzz-$t" -merge=1 -max_len="${max_len[$t]:-8192}" \
            tests/fuzz/corpus/$t "$scratch" >>"$log" 2>&1 || rc=1
    fi
done
exit $rc
