#!/usr/bin/env bash
# README command 2 (and .ci/run): from nothing to the whole test suite.
# Installs missing packages; builds twice with -Werror — once optimised,
# once with ASan+UBSan — and runs every test (unit and integration) under
# the sanitizer build, then the benchmark in smoke mode on the optimised one.
# Set-up and build output go to build-logs/NAME.log; a step that fails
# says so, with the end of its log and what to do.
set -euo pipefail
cd "$(dirname "$0")/.."
source contrib/lib.sh

contrib/deps.sh test

# Every test and the man pages are required here (-Dtests=enabled,
# -Ddocs=enabled): a missing dependency is an error, not a skipped test.
# CC=NAME before the directory picks its compiler; a directory configured
# with another one is made again.
setup() {
    local cc=${CC:-cc}
    local dir=$1
    shift
    if [[ -f $dir/build.ninja ]]; then
        grep -q "^CC=$cc\$" "$dir/.strata-cc" 2>/dev/null && return 0
        [[ ! -f $dir/.strata-cc && $cc == cc ]] && return 0
        rm -rf "$dir"
    fi
    local wipe=()
    [[ -f $dir/meson-private/coredata.dat ]] && wipe=(--wipe)
    step "meson-setup-$dir" "the configuration of $dir failed (see the lines above); 'contrib/deps.sh test' installs what the tests need" \
        env CC="$cc" meson setup "$dir" -Dwerror=true -Drbd=enabled -Dtests=enabled -Ddocs=enabled "${wipe[@]}" "$@"
    echo "CC=$cc" >"$dir/.strata-cc"
}
setup build-ci --buildtype=debugoptimized
setup build-san -Db_sanitize=address,undefined -Db_lundef=false --buildtype=debug \
    -Dfault_injection=true
# The libFuzzer targets need clang: a third build, of the fuzz targets
# only, whose suite replays every corpus and fuzzes each target for a
# bounded number of runs from a fixed seed (tests/fuzz).
CC=clang setup build-fuzz -Db_sanitize=address,undefined -Db_lundef=false --buildtype=debug \
    -Dfuzzing=enabled
step ninja-build-ci "the optimised build failed (see the compiler's messages above)" ninja -C build-ci
step ninja-build-san "the sanitizer build failed (see the compiler's messages above)" ninja -C build-san
fuzz_targets=$(ninja -C build-fuzz -t targets all | grep -o '^tests/fuzz/fuzz-[a-z0-9-]*' | sort -u)
step ninja-build-fuzz "the fuzz build failed (see clang's messages above)" ninja -C build-fuzz $fuzz_targets

# Static analysis: cppcheck over every C source, clean.
step cppcheck "cppcheck found something (see above); fix it, or suppress a false positive inline with the reason" contrib/cppcheck.sh

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:detect_stack_use_after_return=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
rc=0
# Each test's time limit only catches a hang (the tests bound their own
# steps); on a shared machine under load the sanitizer build runs several
# times slower, so the limits are tripled unless STRATA_TIMEOUT_MULTIPLIER
# says otherwise.
meson test -C build-san --print-errorlogs --num-processes 2 \
    --timeout-multiplier "${STRATA_TIMEOUT_MULTIPLIER:-3}" "$@" || rc=$?
# the fuzz suite, unless the arguments pick other tests
if [[ $# == 0 ]]; then
    meson test -C build-fuzz --no-rebuild --print-errorlogs --num-processes 2 \
        --timeout-multiplier "${STRATA_TIMEOUT_MULTIPLIER:-3}" --suite fuzz || rc=$?
fi
((rc == 0)) || echo "strata: some tests failed: their output is above, all of it in build-san/meson-logs/testlog.txt; run one alone with 'meson test -C build-san NAME -v'" >&2

# The benchmark must keep working: a short run on the optimised build.
if [[ $rc == 0 ]]; then
    benches=(raw chain rbd stall nbd-backend commit)
    [[ -f build-ci/nbdkit/nbdkit-strata-plugin.so ]] && benches+=(nbdkit)
    for b in "${benches[@]}"; do
        STRATAD=$PWD/build-ci/daemon/stratad STRATA_NBDKIT_PLUGIN=$PWD/build-ci/nbdkit/nbdkit-strata-plugin.so \
            BENCH_QUICK=1 tests/bench/bench-$b.sh || {
            rc=$?
            echo "strata: the $b benchmark (smoke mode) failed with status $rc: its output is above; run it alone with 'STRATAD=build-ci/daemon/stratad BENCH_QUICK=1 tests/bench/bench-$b.sh'" >&2
        }
    done
fi

# One plain closing line with the counts (from meson's test log).
/usr/bin/python3 - build-san/meson-logs/testlog.json build-fuzz/meson-logs/testlog.json <<'PY'
import json, os, sys
counts = {"OK": 0, "FAIL": 0, "SKIP": 0}
for log in sys.argv[1:]:
    if not os.path.exists(log):
        continue
    for line in open(log):
        r = json.loads(line).get("result", "")
        key = "OK" if r in ("OK", "EXPECTEDFAIL") else "SKIP" if r == "SKIP" else "FAIL"
        counts[key] += 1
print(f"tests: {counts['OK']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
PY
exit $rc
