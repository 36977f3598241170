#!/usr/bin/env bash
# README command 2 (and .ci/run): from nothing to the whole test suite.
# Installs missing packages; builds twice with -Werror — once optimised,
# once with ASan+UBSan — and runs every test (unit and integration) under
# the sanitizer build, then the benchmark in smoke mode on the optimised one.
set -euo pipefail
cd "$(dirname "$0")/.."

contrib/deps.sh test

[[ -f build-ci/build.ninja ]] ||
    meson setup build-ci -Dwerror=true -Drbd=enabled --buildtype=debugoptimized >/dev/null
[[ -f build-san/build.ninja ]] ||
    meson setup build-san -Dwerror=true -Drbd=enabled \
        -Db_sanitize=address,undefined -Db_lundef=false --buildtype=debug >/dev/null
ninja -C build-ci
ninja -C build-san

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:detect_stack_use_after_return=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
rc=0
meson test -C build-san --print-errorlogs --num-processes 2 "$@" || rc=$?

# The benchmark must keep working: a short run on the optimised build.
if [[ $rc == 0 ]]; then
    STRATAD=$PWD/build-ci/daemon/stratad BENCH_QUICK=1 tests/bench/bench-raw.sh || rc=$?
    STRATAD=$PWD/build-ci/daemon/stratad BENCH_QUICK=1 tests/bench/bench-chain.sh || rc=$?
    STRATAD=$PWD/build-ci/daemon/stratad BENCH_QUICK=1 tests/bench/bench-rbd.sh || rc=$?
fi

# One plain closing line with the counts (from meson's test log).
/usr/bin/python3 - build-san/meson-logs/testlog.json <<'PY'
import json, sys
counts = {"OK": 0, "FAIL": 0, "SKIP": 0}
for line in open(sys.argv[1]):
    r = json.loads(line).get("result", "")
    key = "OK" if r in ("OK", "EXPECTEDFAIL") else "SKIP" if r == "SKIP" else "FAIL"
    counts[key] += 1
print(f"tests: {counts['OK']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
PY
exit $rc
