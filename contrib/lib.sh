# Sourced by contrib/deps.sh, demo.sh and test.sh: run one step with its
# output kept in a log, and when it fails say which step, show the end of
# the log and what to do next, instead of dying silently.

# The logs go to build-logs/ (ignored by git) in the source tree.
STRATA_LOG_DIR=${STRATA_LOG_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/build-logs}

# step NAME HINT COMMAND...: runs COMMAND with stdout and stderr in
# $STRATA_LOG_DIR/NAME.log; on failure prints the log's last 25 lines and
# HINT, and exits with COMMAND's status.
step() {
    local name=$1 hint=$2 rc=0
    shift 2
    mkdir -p "$STRATA_LOG_DIR"
    local log=$STRATA_LOG_DIR/$name.log
    "$@" >"$log" 2>&1 || rc=$?
    ((rc == 0)) && return 0
    {
        echo "strata: step '$name' failed (exit status $rc): $*"
        echo "strata: the last lines of $log:"
        tail -n 25 "$log" | sed 's/^/    /'
        echo "strata: $hint"
    } >&2
    exit "$rc"
}
