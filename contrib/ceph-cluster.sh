#!/usr/bin/env bash
# A throw-away single-node Ceph cluster on 127.0.0.1 for tests and benchmarks.
#
#   contrib/ceph-cluster.sh start DIR   create (first time) and start it in DIR
#   contrib/ceph-cluster.sh stop DIR    stop its daemons by PID (DIR is kept)
#   contrib/ceph-cluster.sh env DIR     print 'export CEPH_CONF=DIR/ceph.conf'
#   contrib/ceph-cluster.sh status DIR  exit 0 when its mon and osd run
#
# One ceph-mon and one ceph-osd with the in-memory object store (memstore:
# data lives in RAM, about twice what is written: keep images small), cephx
# authentication, pool size 1, and a pool 'rbd' initialised for RBD.  No
# ceph-mgr: pools, rbd and librbd work without one.  Daemons run in their
# own session (setsid) so that a test's process-group kill leaves them to
# 'stop'.  Every wait is bounded; start and stop are idempotent.
#
# Clients need CEPH_CONF=DIR/ceph.conf (the admin keyring is named in it).
# DIR/client.strata.keyring holds a second, less privileged client
# (client.strata: rbd profile on pool rbd) for credential tests.
#
# Needs the Debian packages ceph-mon, ceph-osd and ceph-common.
set -euo pipefail

START_TIMEOUT=${CEPH_START_TIMEOUT:-60}   # seconds for the whole start

die() { echo "ceph-cluster: $*" >&2; exit 1; }

usage() { die "usage: $0 start|stop|env|status DIR"; }

(($# == 2)) || usage
cmd=$1
mkdir -p "$2"
dir=$(cd "$2" && pwd)
conf=$dir/ceph.conf

# Is the daemon whose pid file is $1 running (and is it that program)?
running() {
    local pidfile=$1 prog=$2 pid
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ -r /proc/$pid/comm ]] && [[ $(</proc/"$pid"/comm) == "$prog"* ]]
}

# Runs a client command with a bound on its time.
client() {
    timeout 20 "$@" --conf "$conf"
}

# Waits (bounded) until "$@" succeeds.
wait_for() {
    local what=$1; shift
    local deadline=$((SECONDS + START_TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "timed out waiting for $what (logs in $dir/log)"
        sleep 0.2
    done
}

write_conf() {
    local port=$1 fsid=$2
    cat >"$conf" <<EOF
[global]
fsid = $fsid
mon host = v2:127.0.0.1:$port
public addr = 127.0.0.1
ms bind msgr1 = false
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $dir/ceph.client.admin.keyring
run dir = $dir/run
log file = $dir/log/\$name.log
# clients (ceph, rbd, rados) give up on an unreachable cluster
client mount timeout = 15
log to stderr = false
err to stderr = false
pid file =
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
# fast start: a usable cluster in about 2.5 s instead of 9 s
paxos propose interval = 0.1
# no ceph-mgr, and health stays OK without one
mon mgr mkfs grace = 31536000
# A lone OSD that is paused (SIGSTOP in a fault test) for longer than its
# PGs' read lease (osd heartbeat grace x read lease ratio 0.8: 16 s by
# default) never serves again: every op stays "waiting for readable".
# A 60 s grace gives a 48 s lease; nothing else uses it with one OSD.
osd heartbeat grace = 60
# a killed client's exclusive lock is released after 5 s, not 30 s ...
osd client watch timeout = 5
# ... so clients must ping their watches more often than every 5 s (the
# default tick): else every watch times out now and then, and librbd
# re-watches and re-acquires its exclusive lock in the middle of the I/O
objecter tick interval = 1

[client]
# many clients at once (tests, servers, rbd): no admin sockets to collide
admin socket =

[mon]
admin socket = $dir/run/\$name.asok
mon data = $dir/mon
mon cluster log file = $dir/log/cluster.log

[osd]
admin socket = $dir/run/\$name.asok
osd data = $dir/osd
keyring = $dir/osd/keyring
osd objectstore = memstore
# a clean stop (SIGTERM) unmounts memstore, which saves its objects in
# osd data: the cluster can then be restarted with its images
osd fast shutdown = false
memstore device bytes = $((2 << 30))
osd max object name len = 256
osd max object namespace len = 64
EOF
}

free_port() {
    /usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start_daemon() {
    local prog=$1 pidfile=$2; shift 2
    # setsid: its own session and process group; -f: stay in the
    # foreground so $! is the daemon's PID.
    setsid "$prog" -f --conf "$conf" "$@" </dev/null >>"$dir/log/$prog.out" 2>&1 &
    echo $! >"$pidfile"
}

create() {
    for p in ceph-mon ceph-osd ceph ceph-authtool monmaptool rbd; do
        command -v "$p" >/dev/null ||
            die "$p is not installed (Debian: ceph-mon ceph-osd ceph-common)"
    done
    rm -rf "$dir/mon" "$dir/osd" "$dir/run" "$dir/log"
    mkdir -p "$dir/mon" "$dir/osd" "$dir/run" "$dir/log"
    local port fsid
    port=$(free_port)
    fsid=$(cat /proc/sys/kernel/random/uuid)
    write_conf "$port" "$fsid"

    ceph-authtool --create-keyring "$dir/mon.keyring" --gen-key -n mon. \
        --cap mon 'allow *' >/dev/null
    ceph-authtool --create-keyring "$dir/ceph.client.admin.keyring" --gen-key \
        -n client.admin --cap mon 'allow *' --cap osd 'allow *' \
        --cap mgr 'allow *' >/dev/null
    ceph-authtool "$dir/mon.keyring" \
        --import-keyring "$dir/ceph.client.admin.keyring" >/dev/null
    monmaptool --create --addv a "[v2:127.0.0.1:$port]" --fsid "$fsid" \
        "$dir/monmap" >/dev/null
    ceph-mon --conf "$conf" --mkfs -i a --monmap "$dir/monmap" \
        --keyring "$dir/mon.keyring" >>"$dir/log/mkfs.out" 2>&1 ||
        die "ceph-mon --mkfs failed (see $dir/log/mkfs.out)"
    start_daemon ceph-mon "$dir/run/mon.pid" -i a
    wait_for "the monitor" client ceph -s

    # The OSD: id, key and keyring (ceph-osd --mkfs does not write the
    # keyring file), then its memstore.
    local uuid key id
    uuid=$(cat /proc/sys/kernel/random/uuid)
    key=$(ceph-authtool --gen-print-key)
    id=$(printf '{"cephx_secret": "%s"}' "$key" |
        client ceph osd new "$uuid" -i -) || die "ceph osd new failed"
    [[ $id == 0 ]] || die "unexpected osd id '$id'"
    ceph-authtool --create-keyring "$dir/osd/keyring" --name osd.0 \
        --add-key "$key" >/dev/null
    ceph-osd --conf "$conf" -i 0 --mkfs --osd-uuid "$uuid" \
        >>"$dir/log/mkfs.out" 2>&1 ||
        die "ceph-osd --mkfs failed (see $dir/log/mkfs.out)"
    start_daemon ceph-osd "$dir/run/osd.pid" -i 0
    wait_for "the OSD to come up" sh -c \
        "timeout 20 ceph --conf '$conf' osd dump | grep -q '^osd.0 up'"

    client ceph osd pool create rbd 8 >/dev/null
    client rbd pool init rbd
    client ceph auth get-or-create client.strata mon 'profile rbd' \
        osd 'profile rbd pool=rbd' -o "$dir/client.strata.keyring"
    touch "$dir/created"
}

start() {
    if running "$dir/run/mon.pid" ceph-mon && running "$dir/run/osd.pid" ceph-osd; then
        return 0
    fi
    if [[ ! -e $dir/created ]]; then
        create
    else
        # memstore saved its objects at the last clean stop: restart
        running "$dir/run/mon.pid" ceph-mon || start_daemon ceph-mon "$dir/run/mon.pid" -i a
        wait_for "the monitor" client ceph -s
        running "$dir/run/osd.pid" ceph-osd || start_daemon ceph-osd "$dir/run/osd.pid" -i 0
    fi
    wait_for "the rbd pool to serve I/O" client rados -p rbd stat rbd_info
}

stop_one() {
    local pidfile=$1 prog=$2
    running "$pidfile" "$prog" || { rm -f "$pidfile"; return 0; }
    local pid
    pid=$(<"$pidfile")
    kill -CONT "$pid" 2>/dev/null || true   # a test may have paused it
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        running "$pidfile" "$prog" || { rm -f "$pidfile"; return 0; }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$pidfile"
}

case $cmd in
start)
    start
    echo "ceph-cluster: running in $dir (export CEPH_CONF=$conf)" >&2
    ;;
stop)
    stop_one "$dir/run/osd.pid" ceph-osd
    stop_one "$dir/run/mon.pid" ceph-mon
    ;;
env)
    echo "export CEPH_CONF=$conf"
    ;;
status)
    running "$dir/run/mon.pid" ceph-mon && running "$dir/run/osd.pid" ceph-osd
    ;;
*)
    usage
    ;;
esac
