#!/bin/sh
# /init of the QEMU guest test (tests/vm/test-qemu-guest.py).
#
# /dev/vda is a stratad export that QEMU's own NBD client serves to a
# virtio-blk disk.  The guest makes an ext4 file system on it, mounts it
# with -o discard, and a background writer creates files of varied sizes
# (random data, its SHA-256 computed before the file reaches the disk),
# overwrites some in place, deletes the oldest ones when the live data
# passes a budget (discards reach stratad as trims), and syncs now and then.
# Every 8th file is kept to the end (it may still be overwritten), up to
# a second budget, so the final check covers files from every phase of the
# host's test.
# The list of live files and sums is kept in RAM (/tmp/sums) and copied to
# the disk (/SUMS) after every file.  Every file prints
#     strata-vm: wrote file N
# so the host knows the writes are flowing while it takes a snapshot and
# runs an active commit under them.  When the host's mailbox says "stop",
# the writer finishes its file, the guest syncs, drops its caches, checks
# every file against /tmp/sums (read back through stratad, on the chain as
# it is after the pivot), checks /SUMS, umounts, runs e2fsck -fn and says
# PASS or FAIL.
#
# Kernel command line: strata.size=BYTES (the disk's size)
# strata.mailbox=ADDR strata.mailport=PORT (the host's Mailbox)
# strata.budget=KIB (live data past which the oldest files are deleted)
# strata.keep=KIB (data in files kept to the end, at most)
# strata.timeout=S (how long to wait for the host's "stop" before failing).
# (functions run through vm_run look unreachable to shellcheck)
# shellcheck disable=SC2317
# shellcheck source=common.sh
. /lib/strata-vm/common.sh
vm_setup

size=$(vm_arg strata.size)
mbox=$(vm_arg strata.mailbox 10.0.2.100)
mport=$(vm_arg strata.mailport 7000)
budget=$(vm_arg strata.budget 40960)
keep=$(vm_arg strata.keep 65536)
limit=$(vm_arg strata.timeout 600)
dev=/dev/vda

vm_expect "disk size" "$size" blockdev --getsize64 $dev
vm_run "mkfs.ext4 -b 4096 (discards the disk first)" \
    "$MKE2FS" -t ext4 -F -q -b 4096 -L strata $dev
vm_run "mount -o discard" mount -t ext4 -o discard $dev /mnt
mkdir -p /mnt/w || vm_fail "mkdir /mnt/w"
: > /tmp/sums     # "SHA256  w/NAME" of every live file: the truth
: > /tmp/live     # "NAME BYTES", oldest first: deleted past the budget
: > /tmp/kept     # "NAME BYTES": never deleted

# w_fail REASON: the writer stops and the main loop fails the boot.
w_fail() {
    echo "$*" > /tmp/writer.err
    exit 1
}

# w_sum FILE: its SHA-256.
w_sum() {
    sha256sum < "$1" | cut -d' ' -f1
}

# w_forget NAME: drop NAME from the sums.
w_forget() {
    sed -i "/  w\/$1\$/d" /tmp/sums || w_fail "sed /tmp/sums"
}

writer() {
    n=0 live=0 kept=0 overwrites=0 deletes=0 r=1 total=0
    while [ ! -e /tmp/stop ]; do
        n=$((n + 1))
        # a pseudo-random number from the last checksum (busybox ash may
        # lack $RANDOM)
        r=$(( 0x$(echo "${sum:-0123456789}" | cut -c1-7) ))
        kind=$((r % 8))
        if [ $kind = 7 ] && [ -s /tmp/live ]; then
            # overwrite a live file in place with new data of its size:
            # the same blocks, which may sit in any layer of the chain
            cat /tmp/live /tmp/kept > /tmp/all
            lines=$(wc -l < /tmp/all)
            line=$(sed -n "$((r / 8 % lines + 1))p" /tmp/all)
            name=${line% *} bytes=${line#* }
            head -c "$bytes" /dev/urandom > /tmp/new || w_fail "urandom"
            sum=$(w_sum /tmp/new)
            dd if=/tmp/new of="/mnt/w/$name" bs=65536 conv=notrunc,fsync \
                2>/tmp/dd.err || w_fail "overwrite $name: $(cat /tmp/dd.err)"
            w_forget "$name"
            echo "$sum  w/$name" >> /tmp/sums
            overwrites=$((overwrites + 1))
            total=$((total + (bytes + 1023) / 1024))
        else
            case $kind in
            0|1|2) bytes=$(( (r / 8 % 16384) + 1 )) ;;            # < 16 KiB
            3|4|5) bytes=$(( (r / 8 % 458752) + 65536 )) ;;       # 64-512 KiB
            *)     bytes=$(( (r / 8 % 1048576) + 1048576 )) ;;    # 1-2 MiB
            esac
            name=$(printf 'f%05d' $n)
            head -c $bytes /dev/urandom > /tmp/new || w_fail "urandom"
            sum=$(w_sum /tmp/new)
            cp /tmp/new "/mnt/w/$name" 2>/tmp/cp.err ||
                w_fail "cp $name: $(cat /tmp/cp.err)"
            echo "$sum  w/$name" >> /tmp/sums
            total=$((total + (bytes + 1023) / 1024))
            if [ $((n % 8)) = 0 ] && [ $kept -lt "$keep" ]; then
                echo "$name $bytes" >> /tmp/kept
                kept=$((kept + (bytes + 1023) / 1024))
            else
                echo "$name $bytes" >> /tmp/live
                live=$((live + (bytes + 1023) / 1024))
            fi
        fi
        # keep the live data under the budget: delete the oldest files
        while [ $live -gt "$budget" ]; do
            line=$(head -n 1 /tmp/live)
            name=${line% *} bytes=${line#* }
            rm "/mnt/w/$name" || w_fail "rm $name"
            w_forget "$name"
            sed -i 1d /tmp/live
            live=$((live - (bytes + 1023) / 1024))
            deletes=$((deletes + 1))
        done
        { cp /tmp/sums /mnt/SUMS.new && mv /mnt/SUMS.new /mnt/SUMS; } ||
            w_fail "SUMS"
        [ $((n % 4)) = 0 ] && { sync || w_fail "sync"; }
        echo "strata-vm: wrote file $n ($total KiB written, $live KiB live," \
             "$overwrites overwrites, $deletes deletes)"
    done
    echo "$n" > /tmp/writer.done
}

writer &
wpid=$!
vm_log "writer started"

i=0
while :; do
    [ -e /tmp/writer.err ] && vm_fail "writer: $(cat /tmp/writer.err)"
    [ "$(vm_mailbox "$mbox" "$mport")" = stop ] && break
    i=$((i + 1))
    [ $i -gt $((limit * 2)) ] && vm_fail "no 'stop' from the host in ${limit}s"
    sleep 0.5
done
vm_log "the host says stop"
touch /tmp/stop
wait $wpid
[ -e /tmp/writer.err ] && vm_fail "writer: $(cat /tmp/writer.err)"
[ -e /tmp/writer.done ] || vm_fail "the writer died"
vm_log "writer stopped after $(cat /tmp/writer.done) files"

check_sums() {
    (cd /mnt && sha256sum -c /tmp/sums) > /tmp/sums.out 2>&1
    rc=$?
    want=$(wc -l < /tmp/sums)
    got=$(grep -c ': OK$' /tmp/sums.out)
    if [ "$rc" != 0 ] || [ "$got" != "$want" ]; then
        grep -v ': OK$' /tmp/sums.out | head -n 20
        return 1
    fi
    vm_log "$got files match their checksums"
}

vm_run "sync" sync
vm_run "drop caches" sh -c 'echo 3 > /proc/sys/vm/drop_caches'
vm_run "check every file (read back through stratad)" check_sums
vm_run "/SUMS on the disk is the list in RAM" cmp /mnt/SUMS /tmp/sums
vm_expect "files in /mnt/w" "$(wc -l < /tmp/sums)" \
    sh -c 'ls /mnt/w | wc -l'
vm_log "SUMS: $(wc -l < /tmp/sums) files, sha256 $(w_sum /tmp/sums)"
vm_run "umount" umount /mnt
vm_run "e2fsck -fn" "$E2FSCK" -fn $dev
vm_pass
