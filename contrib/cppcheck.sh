#!/usr/bin/env bash
# Static analysis of the C sources with cppcheck: warnings, portability and
# performance, for both values of the one configuration macro that changes
# the code (STRATA_HAVE_RBD).  Exits 1 on any finding.
#
#   contrib/cppcheck.sh
#
# A false positive is suppressed inline (// cppcheck-suppress ID, with a
# comment saying why) or, for a file this script's owner does not edit, in
# contrib/cppcheck-suppressions.txt with its reason.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cppcheck >/dev/null || { echo "cppcheck is not installed" >&2; exit 1; }

dirs=(common proto backends formats daemon contrib tests/fuzz)
incs=()
for d in common proto backends formats daemon daemon/nbd daemon/control daemon/jobs; do
    incs+=(-I "$d")
done

rc=0
for rbd in 1 0; do
    # strata-config.h is generated in the build directory: its macros are
    # given here instead; system headers are not analysed.
    cppcheck --quiet --error-exitcode=1 --inline-suppr \
        --enable=warning,portability,performance --std=c11 \
        -D_GNU_SOURCE -DSTRATA_HAVE_RBD=$rbd '-DSTRATA_VERSION="0"' \
        "${incs[@]}" --suppress=missingIncludeSystem \
        --suppressions-list=contrib/cppcheck-suppressions.txt \
        -j "$(nproc)" "${dirs[@]}" || rc=1
done
[[ $rc == 0 ]] && echo "cppcheck: no findings"
exit $rc
