#!/bin/bash
# PID 1 of the VM lane's guest (scripts/vm-lane.sh), stage 2.
#
# The cached Debian image (bullseye, bookworm or trixie: vm-lane.sh --distro) boots its
# own kernel (5.10, 6.1 or 6.12) with init= a small stage-1 script baked into the image
# (/sbin/depfence-vm-init), which mounts the host's 9p share at /mnt/depfence and execs
# this file from the project copy in it, so editing this file needs no image rebuild.
# The share holds:
#   project/   a copy of the working tree (no .git, .venv, caches)
#   params     bash assignments written by the host: PYTEST_ARGS=(...)
#   results/   written here: pytest.log, junit.xml, exit-code, env.txt, timings
#
# It makes the guest look like a Debian machine without systemd would after
# scripts/bootstrap.sh: pure cgroup v2 at /sys/fs/cgroup (nothing mounts v1 here),
# tracefs, the kernel's own header tree, the project installed editable in the venv
# baked into the image (offline: --no-index, hatchling is in the venv). Then it runs
# the privileged suite and powers the VM off. It must never simply exit: PID 1
# exiting is a kernel panic, which the host would only see as a missing result.
set -uo pipefail

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
SHARE=/mnt/depfence
PROJECT=$SHARE/project
RESULTS=$SHARE/results
VENV=/opt/depfence/venv

say() { printf 'depfence-vm: [%s] %s\n' "$(cut -d' ' -f1 /proc/uptime)s" "$*"; }

power_off() {
    sync
    # No systemd here, so no poweroff binary: ask the kernel directly. The host runs
    # qemu with -no-reboot, so a panic (the fallback if both fail) also ends the VM.
    busybox poweroff -f 2>/dev/null
    echo o >/proc/sysrq-trigger
    sleep 30
}

finish() {
    local code=$1
    say "done: pytest exit code $code"
    echo "$code" >"$RESULTS/exit-code.tmp" && mv "$RESULTS/exit-code.tmp" "$RESULTS/exit-code"
    power_off
}

trap 'say "guest init failed at line $LINENO"; finish 125' ERR

mkdir -p "$RESULTS"
say "stage 2 started (kernel $(uname -r))"

# --- the mounts a Debian machine would have -------------------------------------

mnt() {  # mnt TYPE TARGET [OPTIONS]: mount unless something is mounted there already
    local type=$1 target=$2 opts=${3:-}
    mkdir -p "$target"
    mountpoint -q "$target" && return 0
    mount -t "$type" ${opts:+-o "$opts"} "$type" "$target"
}
mnt proc /proc
mnt sysfs /sys
mnt devtmpfs /dev
mnt devpts /dev/pts
mnt tmpfs /dev/shm mode=1777
mnt tmpfs /run mode=755
# Pure v2: without systemd nothing mounts a v1 hierarchy, so every controller is free.
mnt cgroup2 /sys/fs/cgroup nsdelegate
mnt tracefs /sys/kernel/tracing
mnt debugfs /sys/kernel/debug
mnt bpf /sys/fs/bpf mode=700
hostname depfence-vm
dmesg -n 5  # warnings and worse on the console during the run; all of it in dmesg.txt
ip link set lo up

# --- environment report (the host prints it) ------------------------------------

KREL=$(uname -r)
BUILD=/lib/modules/$KREL/build
{
    echo "kernel:        $(uname -r) ($(uname -v))"
    echo "debian:        $(cat /etc/debian_version)"
    echo "cgroup2:       $(awk '$3 == "cgroup2" {printf "%s ", $2}' /proc/mounts)"
    echo "cgroup v1:     $(awk '$3 == "cgroup" {n++} END {print n + 0}' /proc/mounts) hierarchies mounted"
    echo "controllers:   $(cat /sys/fs/cgroup/cgroup.controllers)"
    echo "headers:       $BUILD -> $(readlink -f "$BUILD")"
    echo "bcc:           $(dpkg-query -W -f='${Version}' python3-bpfcc 2>/dev/null)"
    echo "python:        $("$VENV/bin/python" --version 2>&1)"
    echo "bpf_jit:       $(cat /proc/sys/net/core/bpf_jit_enable 2>/dev/null)"
    echo "cpus:          $(nproc), memory $(awk '/MemTotal/ {print $2 / 1024 " MiB"}' /proc/meminfo)"
} >"$RESULTS/env.txt"
sed 's/^/depfence-vm: env: /' "$RESULTS/env.txt"

# The headers match the kernel (both from the same release), so the package's own links serve
# bcc; this only guards against an image built from mismatched archives.
if [[ ! -d "$BUILD/include" ]]; then
    say "error: no kernel header tree at $BUILD for the running kernel $KREL"
    ls -l /lib/modules/ /usr/src/ >&2 || true
    finish 125
fi

# --- the project, installed as bootstrap.sh installs it ---------------------------

cd "$PROJECT" || finish 125
say "pip install -e (offline, no deps: they are baked into the image)"
if ! "$VENV/bin/python" -m pip install --disable-pip-version-check -q --no-index \
        --no-deps --no-build-isolation -e . >"$RESULTS/pip.log" 2>&1; then
    cat "$RESULTS/pip.log"
    say "error: pip install -e failed"
    finish 125
fi

# --- the cgroup-BPF static key, kept on -------------------------------------------
# Before 5.13 one static key guards every cgroup-BPF hook in the kernel, and each fence's
# attach and detach turns it on and off again, patching kernel text (inet_release and the
# like) every time. Under TCG a vCPU has twice been left spinning at such a site, in
# close(), for minutes (soft lockup; Debian 11's 5.10), and the lane failed. A program
# attached to an empty cgroup for the whole run keeps the key on: a fence's attach then
# only counts. BPF_PROG_ATTACH's attachment outlives the process that made it. Nothing
# runs in that cgroup, so the program never runs.
KEEP=/sys/fs/cgroup/vm-keep-cgroup-bpf-key
mkdir -p "$KEEP"
if ! python3 - "$KEEP" >"$RESULTS/keep-key.log" 2>&1 <<'PY'
import ctypes, os, sys
from bcc import BPF
bpf = BPF(text=b"int keep(struct __sk_buff *skb) { return 1; }")
fn = bpf.load_func(b"keep", 8)  # BPF_PROG_TYPE_CGROUP_SKB
# BPF_PROG_ATTACH (8) by syscall (321, x86-64): bcc 0.18 has no attach_func().
# union bpf_attr: target_fd, attach_bpf_fd, attach_type (BPF_CGROUP_INET_EGRESS), flags.
attr = (ctypes.c_uint32 * 4)(os.open(sys.argv[1], os.O_RDONLY), fn.fd, 1, 0)
libc = ctypes.CDLL(None, use_errno=True)
if libc.syscall(321, 8, ctypes.byref(attr), ctypes.sizeof(attr)) != 0:
    sys.exit("BPF_PROG_ATTACH: " + os.strerror(ctypes.get_errno()))
PY
then
    cat "$RESULTS/keep-key.log"
    say "error: could not attach the program that keeps the cgroup-BPF static key on"
    finish 125
fi
say "cgroup-BPF static key kept on ($KEEP)"

# --- the suite ------------------------------------------------------------------

PYTEST_ARGS=()
# shellcheck source=/dev/null
source "$SHARE/params"

say "pytest start"
date +%s >"$RESULTS/pytest-start"
trap - ERR  # pytest's own failure is the result, not an error of this script
"$VENV/bin/python" -m pytest --depfence-lab --depfence-require -p no:cacheprovider \
    --junitxml="$RESULTS/junit.xml" "${PYTEST_ARGS[@]}" 2>&1 | tee "$RESULTS/pytest.log"
code=${PIPESTATUS[0]}
date +%s >"$RESULTS/pytest-end"
say "pytest end"

# Kernel messages from the run (verifier splats, warnings) for the host to keep.
dmesg >"$RESULTS/dmesg.txt" 2>&1 || true
finish "$code"
