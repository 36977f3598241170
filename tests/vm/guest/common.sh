# strata VM guest library, sourced by every test's /init (busybox sh, PID 1).
#
# The protocol with the host (tests/vm/vmlib.py): progress lines start with
# "strata-vm:", and the boot ends with exactly one line
#     STRATA-VM: PASS            or     STRATA-VM: FAIL <reason>
# after which the guest powers off.  The kernel runs with panic=-1 and QEMU
# with -no-reboot, so even a crash of this script ends the VM; the host kills
# it at its deadline anyway.

export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
umask 022

# Busybox's shell runs its own applets before searching PATH (Debian builds
# it with FEATURE_PREFER_APPLETS), and it has a mke2fs of its own: call the
# real tools by these absolute paths.
export NBD_CLIENT=/sbin/nbd-client MKE2FS=/sbin/mke2fs E2FSCK=/sbin/e2fsck \
    DEBUGFS=/sbin/debugfs

vm_log() {
    echo "strata-vm: $*"
}

vm_poweroff() {
    sync
    poweroff -f
    # not reached unless poweroff failed: make the kernel stop the VM
    echo o > /proc/sysrq-trigger
    sleep 30
    exit 1
}

vm_result_done=
vm_pass() {
    [ -n "$vm_result_done" ] && vm_poweroff
    vm_result_done=1
    dmesg -n 1 2>/dev/null       # no kernel message inside the result line
    echo "STRATA-VM: PASS"
    vm_poweroff
}

vm_fail() {
    [ -n "$vm_result_done" ] && vm_poweroff
    vm_result_done=1
    dmesg -n 1 2>/dev/null
    echo "--- last kernel messages ---"
    dmesg 2>/dev/null | tail -n 25
    echo "STRATA-VM: FAIL $*"
    vm_poweroff
}

# vm_run DESCRIPTION COMMAND [ARG]...: runs it; on failure the boot fails.
vm_run() {
    vm_desc=$1
    shift
    vm_log "$vm_desc"
    "$@" || vm_fail "$vm_desc: exit $?"
}

# vm_expect DESCRIPTION EXPECTED COMMAND [ARG]...: its stdout must be EXPECTED.
vm_expect() {
    vm_desc=$1
    vm_want=$2
    shift 2
    vm_got=$("$@") || vm_fail "$vm_desc: exit $?"
    [ "$vm_got" = "$vm_want" ] ||
        vm_fail "$vm_desc: got '$vm_got', expected '$vm_want'"
    vm_log "$vm_desc: $vm_got"
}

# vm_arg NAME [DEFAULT]: the value of NAME=VALUE on the kernel command line.
vm_arg() {
    # shellcheck disable=SC2013  # words, not lines
    for vm_w in $(cat /proc/cmdline); do
        case "$vm_w" in
            "$1="*) echo "${vm_w#*=}"; return 0 ;;
        esac
    done
    echo "$2"
}

# vm_mailbox ADDR PORT: the current value of a host vmlib.Mailbox reached
# through a guestfwd rule (empty if it cannot be read).
vm_mailbox() {
    nc "$1" "$2" < /dev/null 2>/dev/null | head -n 1
}

# vm_wait_mailbox ADDR PORT VALUE TIMEOUT: polls until the mailbox says VALUE.
vm_wait_mailbox() {
    vm_i=0
    while [ "$(vm_mailbox "$1" "$2")" != "$3" ]; do
        vm_i=$((vm_i + 1))
        [ $vm_i -gt $(($4 * 2)) ] && return 1
        sleep 0.5
    done
}

# vm_pin_cpu N: this shell and what it starts from now on run on CPU N
# (the kernel's nbd driver sends a CPU's requests on that CPU's connection).
vm_pin_cpu() {
    taskset -p "$((1 << $1))" $$ > /dev/null || vm_fail "taskset CPU $1"
    vm_log "running on CPU $1"
}

# Mounts, modules (in dependency order, from the image builder), network.
vm_setup() {
    mount -t proc proc /proc || vm_fail "mount /proc"
    mount -t sysfs sysfs /sys
    mount -t devtmpfs devtmpfs /dev || vm_fail "mount /dev"
    mount -t tmpfs tmpfs /tmp
    mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
    vm_log "kernel $(uname -r), $(grep -c ^processor /proc/cpuinfo) cpu," \
           "uptime $(cut -d' ' -f1 /proc/uptime)s"
    while read -r m; do
        vm_mod_args=
        [ "$m" = nbd.ko ] && vm_mod_args="nbds_max=4"
        insmod "/lib/modules/strata/$m" $vm_mod_args ||
            vm_fail "insmod $m"
    done < /lib/modules/strata/order
    ip link set lo up
    ip link set eth0 up || vm_fail "no eth0"
    ip addr add 10.0.2.15/24 dev eth0 || vm_fail "ip addr"
    vm_log "set up: modules loaded, eth0 10.0.2.15," \
           "uptime $(cut -d' ' -f1 /proc/uptime)s"
}
