#!/bin/sh
# /init of the kernel nbd client test (tests/vm/test-kernel-nbd.py).
# Kernel command line: strata.mode=write|verify strata.conns=N strata.bs=N
# strata.fsbs=N|default (mkfs block size) strata.export=NAME
# strata.size=BYTES (strata.server / strata.port: where the host's guestfwd
# rule forwards to stratad; strata.hostport: stratad's port on the host,
# which the guest must not reach any other way) strata.tls=0|1 (1: over
# TLS with the client certificate in /tls, the server's name localhost).
#
# write:  connect, mkfs.ext4, mount, copy /data, sync, fstrim, re-read after
#         dropping caches, umount, e2fsck -fn, disconnect.
# verify: connect to the export served read-only, check the device is
#         read-only, mount -o ro, re-read every file, e2fsck -fn, disconnect.
# Every file is checked against /SHA256SUMS, made on the host.
# (functions run through vm_run look unreachable to shellcheck)
# shellcheck disable=SC2317
# shellcheck source=common.sh
. /lib/strata-vm/common.sh
vm_setup

mode=$(vm_arg strata.mode)
conns=$(vm_arg strata.conns 1)
bs=$(vm_arg strata.bs 1024)
fsbs=$(vm_arg strata.fsbs default)
name=$(vm_arg strata.export)
size=$(vm_arg strata.size)
server=$(vm_arg strata.server 10.0.2.100)
port=$(vm_arg strata.port 10809)
hostport=$(vm_arg strata.hostport)
tls=$(vm_arg strata.tls 0)
dev=/dev/nbd0

check_sums() {
    (cd /mnt && sha256sum -c /SHA256SUMS) > /tmp/sums.out 2>&1
    rc=$?
    want=$(wc -l < /SHA256SUMS)
    got=$(grep -c ': OK$' /tmp/sums.out)
    if [ "$rc" != 0 ] || [ "$got" != "$want" ]; then
        grep -v ': OK$' /tmp/sums.out | head -n 20
        return 1
    fi
    vm_log "$got files match their checksums"
}

drop_caches() {
    sync && echo 3 > /proc/sys/vm/drop_caches && blockdev --flushbufs "$dev"
}

# restrict=on: the host (10.0.2.2 in QEMU user networking) is unreachable,
# stratad included; only the guestfwd rule leads to it.
if [ -n "$hostport" ]; then
    vm_log "the host's stratad port must be unreachable at 10.0.2.2:$hostport"
    timeout 10 nc -w 3 10.0.2.2 "$hostport" < /dev/null > /tmp/nc.out 2>&1
    grep -q "can't connect" /tmp/nc.out ||
        vm_fail "the guest reached 10.0.2.2:$hostport: not restricted"
    vm_log "$(cat /tmp/nc.out)"
fi

set --
if [ "$tls" = 1 ]; then
    # nbd-client does the TLS in a proxy of its own and hands the kernel
    # the plaintext end of a socket pair
    set -- -cacertfile /tls/ca-cert.pem -certfile /tls/client-cert.pem \
        -keyfile /tls/client-key.pem -tlshostname localhost
fi
vm_run "nbd-client: $conns connection(s), block size $bs, export '$name'${*:+, TLS}" \
    "$NBD_CLIENT" "$server" "$port" $dev -N "$name" -b "$bs" -C "$conns" -t 120 "$@"
vm_expect "device size" "$size" blockdev --getsize64 $dev
vm_expect "logical block size" "$bs" blockdev --getss $dev

case "$mode" in
write)
    vm_expect "device read-only flag" 0 blockdev --getro $dev
    # mke2fs picks 1 KiB blocks on a device this small unless told
    [ "$conns" -gt 1 ] && vm_pin_cpu 0
    set --
    [ "$fsbs" != default ] && set -- -b "$fsbs"
    vm_run "mkfs.ext4 ${*:-(default block size)}, discarding the device" \
        "$MKE2FS" -t ext4 -F -q "$@" -L strata $dev
    vm_log "file system block size: $("$DEBUGFS" -R stats $dev 2>/dev/null |
        sed -n 's/^Block size: *//p')"
    vm_run "mount" mount -t ext4 $dev /mnt
    vm_run "copy the files" cp -a /data /mnt/
    vm_run "copy a scratch file" cp /scratch /mnt/scratch
    vm_run "sync" sync
    vm_run "remove the scratch file" rm /mnt/scratch
    vm_run "sync" sync
    vm_run "fstrim" fstrim -v /mnt
    vm_run "check the files (page cache)" check_sums
    vm_run "drop caches" drop_caches
    # with -C 2: read back from the other CPU, so that both connections
    # carry requests whatever CPU the writes happened to be issued on
    [ "$conns" -gt 1 ] && vm_pin_cpu 1
    vm_run "check the files (read back through nbd)" check_sums
    [ "$conns" -gt 1 ] && vm_pin_cpu 0
    vm_run "umount" umount /mnt
    ;;
verify)
    vm_expect "device read-only flag (server says READ_ONLY)" 1 \
        blockdev --getro $dev
    vm_run "mount read-only" mount -t ext4 -o ro $dev /mnt
    vm_run "check the files" check_sums
    vm_run "drop caches" drop_caches
    vm_run "check the files again" check_sums
    vm_run "umount" umount /mnt
    vm_log "a write to the device must fail"
    if dd if=/dev/zero of=$dev bs=4096 count=1 conv=fsync 2>/dev/null; then
        vm_fail "a write to the read-only device succeeded"
    fi
    ;;
*)
    vm_fail "unknown strata.mode '$mode'"
    ;;
esac

vm_run "e2fsck -fn" "$E2FSCK" -fn $dev
vm_run "disconnect" "$NBD_CLIENT" -d $dev
vm_pass
