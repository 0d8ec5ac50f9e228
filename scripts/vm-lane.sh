#!/usr/bin/env bash
# The VM lane: the privileged integration suite on a Debian release's own kernel, in QEMU.
#
# The native lane runs on this machine's kernel; this one proves the eBPF programs on the
# kernels and bcc versions users have (--distro):
#   bullseye  Debian 11: kernel 5.10, bcc 0.18 (ubuntu-22.04's bcc, an older kernel than it)
#   bookworm  Debian 12: kernel 6.1, bcc 0.26 (the default)
#   trixie    Debian 13: kernel 6.12, bcc 0.31
# all older than 6.10, where cgroup_skb programs have no current-task helpers. As root:
#   1. builds, or reuses from /var/cache/depfence-vm, a root filesystem of that release
#      made with debootstrap from the Debian archive apt already uses: linux-image-amd64
#      with the matching linux-headers-amd64, python3-bpfcc, the lab's real clients, and a
#      virtualenv with the project's PyPI dependencies (the VM has no network);
#   2. copies the working tree (no .git, .venv, caches) into a 9p share and boots the
#      image's own kernel with qemu-system-x86_64, no network device, the root disk in
#      snapshot mode (the cache is never written to);
#   3. the guest (scripts/vm/guest-init.sh) runs `pytest --depfence-lab
#      --depfence-require` on the chosen tests and powers off;
#   4. prints the pytest summary, copies the JUnit file out, and exits with pytest's code.
#
# Usage: scripts/vm-lane.sh [options] [-- extra pytest args]
#   --distro NAME        bullseye, bookworm (default) or trixie; each has its own image
#   --suite full|kernel  full (default): tests/integration and examples, what tox's
#                        integration env runs. kernel: the named subset KERNEL_SUBSET
#                        below, every kernel-facing path in about half the time.
#   --junit PATH         where the JUnit XML goes (default ./vm-junit.xml)
#   --console PATH       where the VM's serial console log goes (default ./vm-console.log)
#   --artifacts DIR      also keep the guest's results there: pytest.log, dmesg.txt, env.txt
#   --timeout MINUTES    for the VM run, boot to power-off (default 40)
#   --accel auto|kvm|tcg auto (default) tries KVM (-cpu host), falls back to TCG by
#                        itself, and says which it used
#   --build-only         build (or check) the cached image and stop
#   --rebuild            build the image again even if it is cached
#   -q, --quiet          do not stream the guest's console while the suite runs
# Environment: DEPFENCE_VM_CACHE (default /var/cache/depfence-vm), DEPFENCE_VM_MIRROR
# and DEPFENCE_VM_SECURITY_MIRROR (default: the Debian archive apt uses here, for any
# release: the same archive serves all three).
# Exit codes: pytest's own (0 passed, 1 failed, ...); 124 the VM timed out; 125 the lane
# could not run (image build failed, VM did not boot, no result came back).
set -euo pipefail

# Bump when the image recipe changes in a way the package lists do not show.
SCRIPT_VERSION=1

REPO="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
CACHE_ROOT="${DEPFENCE_VM_CACHE:-/var/cache/depfence-vm}"

# Debian packages of the guest. linux-image-amd64 and linux-headers-amd64 come from the
# same archive snapshot, so /lib/modules/$(uname -r)/build exists in the guest.
DEB_PACKAGES=(
    linux-image-amd64 linux-headers-amd64 kmod initramfs-tools
    python3-bpfcc python3-venv python3-pip
    iproute2 curl wget dnsutils busybox git ca-certificates util-linux procps gcc
)
# Debugging aids (tests/integration/test_cleanup.py lists attached programs with bpftool);
# a release whose archive cannot serve them still builds (bullseye-security has listed a
# bpftool its pool did not have).
OPTIONAL_DEB_PACKAGES=(bpftool)
# Used when pyproject.toml cannot be read (no tomllib): the runtime and test deps.
FALLBACK_PY_PACKAGES=("dnslib>=0.9" "pyroute2>=0.7" "pytest>=7" pytest-xdist jsonschema
                      "hatchling>=1.18" editables)
# Test extras that only the lint step uses: not needed in the guest.
LINT_ONLY="ruff mypy"

# The suites, as pytest arguments relative to the project.
FULL_SUITE=(tests/integration examples)
# `kernel`: every test that drives the eBPF programs -- connect4/6, sendmsg4/6,
# recvmsg4/6, cgroup_skb egress, the exec/fork/exit and mount tracepoints -- through
# DNS over UDP, TCP and unconnected UDP, attribution, address enforcement (v4, v6,
# v4-mapped), the hosts-file pause, DNS to other ports, outages, audit, sub-cgroups and
# the SIGKILL cleanup. Left out: the CLI tests (each starts a `depfence` process that
# compiles the programs again, ~40 s apiece under TCG, through the same Fence) and the
# lab's own tests (no eBPF in them).
KERNEL_SUBSET=(tests/integration examples
               --ignore=tests/integration/test_cli.py --ignore=tests/integration/test_lab.py)

# --------------------------------------------------------------------------- helpers

T0=$(date +%s)
say() { printf 'vm-lane: [%s] %s\n' "$(dur $(( $(date +%s) - T0 )))" "$*"; }
die() { local code=$1; shift; printf 'vm-lane: error: %s\n' "$*" >&2; exit "$code"; }
dur() { printf '%dm%02ds' $(( $1 / 60 )) $(( $1 % 60 )); }

usage() { sed -n '/^# Usage:/,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -n 's/^# \{0,1\}//p'; }

DISTRO=bookworm SUITE=full JUNIT=./vm-junit.xml CONSOLE=./vm-console.log ARTIFACTS="" TIMEOUT_MIN=40 ACCEL=auto
BUILD_ONLY=0 REBUILD=0 QUIET=0
EXTRA_ARGS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --distro) DISTRO=${2:?}; shift 2 ;;
        --distro=*) DISTRO=${1#*=}; shift ;;
        --suite) SUITE=${2:?}; shift 2 ;;
        --suite=*) SUITE=${1#*=}; shift ;;
        --junit) JUNIT=${2:?}; shift 2 ;;
        --junit=*) JUNIT=${1#*=}; shift ;;
        --console) CONSOLE=${2:?}; shift 2 ;;
        --console=*) CONSOLE=${1#*=}; shift ;;
        --artifacts) ARTIFACTS=${2:?}; shift 2 ;;
        --artifacts=*) ARTIFACTS=${1#*=}; shift ;;
        --timeout) TIMEOUT_MIN=${2:?}; shift 2 ;;
        --timeout=*) TIMEOUT_MIN=${1#*=}; shift ;;
        --accel) ACCEL=${2:?}; shift 2 ;;
        --accel=*) ACCEL=${1#*=}; shift ;;
        --build-only) BUILD_ONLY=1; shift ;;
        --rebuild) REBUILD=1; shift ;;
        -q|--quiet) QUIET=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; EXTRA_ARGS=("$@"); break ;;
        *) usage >&2; die 2 "unknown argument: $1" ;;
    esac
done
case "$SUITE" in full|kernel) ;; *) die 2 "--suite must be full or kernel, not '$SUITE'" ;; esac
# The releases. Every one has unshare and setpriv in util-linux (setpriv left it only in
# Debian 10), and the same package names for the rest of DEB_PACKAGES.
# TCG runs each vCPU on a host thread of its own ("multi"), except for Debian 13: its
# 6.12 kernel, patching its own text while the other vCPU runs it (static keys and
# calls, flipped at boot and whenever a tracepoint or cgroup program is attached),
# has hit a breakpoint the patch had already removed (`Oops: int3` in sched_clock_cpu
# at boot, in syscall_trace_enter in the middle of the suite). One thread for both
# vCPUs ("single") never runs one while the other patches.
TCG_THREAD=multi
case "$DISTRO" in
    bullseye) DEBIAN_VERSION=11 ;;
    bookworm) DEBIAN_VERSION=12 ;;
    trixie) DEBIAN_VERSION=13 TCG_THREAD=single ;;
    *) die 2 "--distro must be bullseye, bookworm or trixie, not '$DISTRO'" ;;
esac
SUITE_NAME=$DISTRO
case "$ACCEL" in auto|kvm|tcg) ;; *) die 2 "--accel must be auto, kvm or tcg, not '$ACCEL'" ;; esac
[[ "$TIMEOUT_MIN" =~ ^[0-9]+$ && "$TIMEOUT_MIN" -gt 0 ]] || die 2 "--timeout takes whole minutes, not '$TIMEOUT_MIN'"
[[ "$(id -u)" -eq 0 ]] || die 125 "must run as root: debootstrap, chroot and the image cache in $CACHE_ROOT need it. Try: sudo $0"

# --------------------------------------------------------------------------- host tools

export DEBIAN_FRONTEND=noninteractive
host_tools() {
    local missing=()
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
    command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
    command -v unshare >/dev/null || missing+=(util-linux)
    [[ -r /usr/share/keyrings/debian-archive-keyring.gpg ]] || missing+=(debian-archive-keyring)
    if [[ ${#missing[@]} -gt 0 ]]; then
        say "installing host packages: ${missing[*]}"
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# The Debian archive apt uses here (deb822 and one-line sources alike), whichever release
# this machine runs: the same archive serves every release. `main` is the archive of a
# release's own and -updates suites, `security` that of its -security suite; nothing
# when apt knows no Debian suite (the caller falls back to deb.debian.org).
apt_archive() {  # apt_archive main|security
    # shellcheck disable=SC2016  # apt's own $(FIELD) syntax, not the shell's
    apt-get indextargets --format '$(RELEASE) $(REPO_URI)' 2>/dev/null | awk -v kind="$1" '
        $1 ~ /^(oldoldstable|oldstable|stable|testing|unstable|buster|bullseye|bookworm|trixie|forky|sid)(-updates|-security|-backports)?$/ &&
        ($1 ~ /-security$/) == (kind == "security") {print $2; exit}'
}

# --------------------------------------------------------------------------- image recipe

# pyproject's runtime + test dependencies and build backend, minus lint-only tools.
py_packages() {
    local out
    if out=$(python3 - "$REPO/pyproject.toml" "$LINT_ONLY" 2>/dev/null <<'EOF'
import re, sys, tomllib
data = tomllib.load(open(sys.argv[1], "rb"))
skip = set(sys.argv[2].split())
project = data["project"]
reqs = list(project.get("dependencies", []))
reqs += project.get("optional-dependencies", {}).get("test", [])
reqs += data.get("build-system", {}).get("requires", [])
# pip install -e --no-build-isolation: hatchling builds editables with `editables`,
# which build isolation would have fetched.
if any(r.lower().startswith("hatchling") for r in reqs):
    reqs.append("editables")
for r in reqs:
    if re.split(r"[\s\[<>=!~;]", r, 1)[0].lower() not in skip:
        print(r)
EOF
    ) && [[ -n "$out" ]]; then
        printf '%s\n' "$out"
    else
        printf '%s\n' "${FALLBACK_PY_PACKAGES[@]}"
    fi
}

# Stage 1 of the guest's init, baked into the image; stage 2 (scripts/vm/guest-init.sh)
# comes with the project copy, so it can change without a rebuild.
STAGE1='#!/bin/sh
# depfence VM lane, stage 1 (baked into the image by scripts/vm-lane.sh): mount the
# host share and hand over to scripts/vm/guest-init.sh from the project copy in it.
PATH=/usr/sbin:/usr/bin:/sbin:/bin; export PATH
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /mnt/depfence
if modprobe 9pnet_virtio && modprobe 9p &&
   mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 depfence /mnt/depfence &&
   [ -f /mnt/depfence/project/scripts/vm/guest-init.sh ]; then
    exec /bin/bash /mnt/depfence/project/scripts/vm/guest-init.sh
fi
echo "depfence-vm: stage 1 failed: no 9p share with scripts/vm/guest-init.sh" >&2
sync
echo o >/proc/sysrq-trigger
sleep 30
'

# Run a command chrooted in ROOT with proc, sys and dev mounted in a private mount
# namespace: the mounts vanish with the command, however it ends.
in_chroot() {
    local root=$1; shift
    # shellcheck disable=SC2016  # expanded by the inner sh
    unshare --mount --propagation private -- /bin/sh -euc '
        root=$1; shift
        mount -t proc proc "$root/proc"
        mount -t sysfs sysfs "$root/sys"
        mount --rbind /dev "$root/dev"
        exec env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
            DEBIAN_FRONTEND=noninteractive chroot "$root" "$@"' sh "$root" "$@"
}

# Layer 1: debootstrap + apt, a directory tree. Keyed by the Debian package list only.
build_base() {  # build_base DIR MIRROR SECURITY_MIRROR
    local dir=$1 mirror=$2 security=$3 root=$1/root
    mkdir -p "$dir"
    # In its own mount namespace: debootstrap mounts proc and sys in the target, and a
    # killed debootstrap would otherwise leave them mounted.
    unshare --mount --propagation private -- \
        debootstrap --variant=minbase --components=main --include=ca-certificates \
        "$SUITE_NAME" "$root" "$mirror" >"$dir/debootstrap.log" 2>&1
    {
        echo "deb $mirror $SUITE_NAME main"
        echo "deb $mirror $SUITE_NAME-updates main"
        if [[ -n "$security" ]]; then echo "deb $security $SUITE_NAME-security main"; fi
    } >"$root/etc/apt/sources.list"
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"  # start no services
    chmod +x "$root/usr/sbin/policy-rc.d"
    cp /etc/resolv.conf "$root/etc/resolv.conf"  # for apt and pip during the build only
    in_chroot "$root" apt-get update -q >>"$dir/apt.log" 2>&1
    in_chroot "$root" apt-get install -y -q --no-install-recommends "${DEB_PACKAGES[@]}" \
        >>"$dir/apt.log" 2>&1
    # Failing that, the release's own version (pkg/SUITE) rather than its -security one.
    in_chroot "$root" apt-get install -y -q --no-install-recommends "${OPTIONAL_DEB_PACKAGES[@]}" \
        >>"$dir/apt.log" 2>&1 \
        || in_chroot "$root" apt-get install -y -q --no-install-recommends \
            "${OPTIONAL_DEB_PACKAGES[@]/%//$SUITE_NAME}" >>"$dir/apt.log" 2>&1 \
        || echo "optional packages not installed: ${OPTIONAL_DEB_PACKAGES[*]}" >>"$dir/apt.log"
    in_chroot "$root" apt-get clean
    rm -rf "$root"/var/lib/apt/lists/*
    in_chroot "$root" dpkg-query -W >"$dir/packages.txt"
}

# Layer 2: the base plus the guest's files and the virtualenv, as a bootable ext4 image.
build_image() {  # build_image BASE_ROOT DIR
    local base=$1 dir=$2 work=$2/root
    cp -a "$base" "$work"
    printf '%s' "$STAGE1" >"$work/sbin/depfence-vm-init"
    chmod 755 "$work/sbin/depfence-vm-init"
    echo depfence-vm >"$work/etc/hostname"
    printf '127.0.0.1\tlocalhost\n127.0.1.1\tdepfence-vm\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' \
        >"$work/etc/hosts"
    # Like a VM's DHCP-given resolver: the guest has no network, the lab is the upstream.
    cp /etc/resolv.conf "$work/etc/resolv.conf"
    # pip inside the chroot talks to PyPI with this machine's trust store.
    cp /etc/ssl/certs/ca-certificates.crt "$work/tmp/host-ca.crt" 2>/dev/null \
        || cp "$work/etc/ssl/certs/ca-certificates.crt" "$work/tmp/host-ca.crt"
    mapfile -t py < <(py_packages)
    in_chroot "$work" python3 -m venv /opt/depfence/venv
    # Debian 11's pip (20.3) cannot install a pyproject project editable (PEP 660: 21.3).
    in_chroot "$work" /opt/depfence/venv/bin/python -m pip install -q \
        --disable-pip-version-check --cert /tmp/host-ca.crt "pip>=23" >"$dir/pip.log" 2>&1
    in_chroot "$work" /opt/depfence/venv/bin/python -m pip install -q \
        --disable-pip-version-check --cert /tmp/host-ca.crt "${py[@]}" >>"$dir/pip.log" 2>&1
    in_chroot "$work" /opt/depfence/venv/bin/python -m pip freeze >"$dir/pip-freeze.txt"
    rm -f "$work/tmp/host-ca.crt"
    rm -rf "$work/root/.cache"
    printf 'nameserver 10.0.2.3\n' >"$work/etc/resolv.conf"

    local kver
    kver=$(basename "$(ls -d "$work"/lib/modules/*/ | sort -V | tail -n1)")
    # The package's link is absolute in the guest: resolve it inside the tree, not here.
    local build
    build=$(readlink "$work/lib/modules/$kver/build" || echo "/lib/modules/$kver/build")
    [[ "$build" == /* ]] || build=/lib/modules/$kver/$build
    if [[ ! -d "$work$build/include" ]]; then
        echo "no header tree at /lib/modules/$kver/build ($build) in the image" >&2
        return 1
    fi
    cp "$work/boot/vmlinuz-$kver" "$dir/vmlinuz"
    cp "$work/boot/initrd.img-$kver" "$dir/initrd.img"
    echo "$kver" >"$dir/kernel-release"

    # An ext4 image filled from the tree without mounting anything; 1.5 GiB free for the run.
    local used_mb
    used_mb=$(du -sm "$work" | cut -f1)
    rm -f "$dir/rootfs.img"
    truncate -s "$(( used_mb * 12 / 10 + 1536 ))M" "$dir/rootfs.img"
    mkfs.ext4 -q -F -L depfence-root -d "$work" "$dir/rootfs.img"
    rm -rf "$work"
}

# The cache keys: the package lists and the recipe itself (its functions' text).
sha() { sha256sum | cut -c1-16; }
BASE_KEY=$( { echo "v$SCRIPT_VERSION $SUITE_NAME"; printf '%s\n' "${DEB_PACKAGES[@]}" "${OPTIONAL_DEB_PACKAGES[@]}";
              declare -f build_base in_chroot; } | sha)
IMAGE_KEY=$( { echo "$BASE_KEY"; py_packages; printf '%s' "$STAGE1"; declare -f build_image; } | sha)
BASE_DIR="$CACHE_ROOT/base-$DISTRO-$BASE_KEY"
IMAGE_DIR="$CACHE_ROOT/image-$DISTRO-$IMAGE_KEY"

# Keep the newest few entries of one layer; an old key is never used again.
# shellcheck disable=SC2086
prune() {  # prune GLOB KEEP
    local n=0 d
    while IFS= read -r d; do
        n=$(( n + 1 ))
        [[ $n -gt $2 ]] && { say "pruning old cache entry $d"; rm -rf "$d"; }
    done < <(ls -dt $1 2>/dev/null)  # unquoted: $1 is a glob
    return 0
}

ensure_image() {
    mkdir -p "$CACHE_ROOT"
    exec {lock}>"$CACHE_ROOT/.lock"
    flock "$lock"   # one builder at a time; a second lane waits and then reuses
    if [[ "$REBUILD" -eq 1 ]]; then
        rm -rf "$IMAGE_DIR" "$BASE_DIR"
    fi
    # Entries named before the lane had releases (base-KEY): never used again. A lane
    # still running from one keeps its open image file.
    local legacy
    for legacy in "$CACHE_ROOT"/base-???????????????? "$CACHE_ROOT"/image-????????????????; do
        [[ -d "$legacy" ]] && { say "pruning old cache entry $legacy"; rm -rf "$legacy"; }
    done
    host_tools
    if [[ -f "$IMAGE_DIR/ready" ]]; then
        say "rootfs: cached at $IMAGE_DIR (kernel $(cat "$IMAGE_DIR/kernel-release"); first built in $(cat "$IMAGE_DIR/build-time"))"
        exec {lock}>&-
        return 0
    fi
    local mirror security t
    mirror=${DEPFENCE_VM_MIRROR:-$(apt_archive main)}
    mirror=${mirror:-http://deb.debian.org/debian/}
    security=${DEPFENCE_VM_SECURITY_MIRROR-$(apt_archive security)}
    if [[ ! -f "$BASE_DIR/ready" ]]; then
        t=$(date +%s)
        say "rootfs: debootstrap $SUITE_NAME from $mirror${security:+ (security: $security)} into $BASE_DIR"
        rm -rf "$BASE_DIR"
        # Called plainly, not with `|| die`: that would switch errexit off inside it.
        BUILDING=$BASE_DIR
        build_base "$BASE_DIR" "$mirror" "$security"
        BUILDING=""
        dur $(( $(date +%s) - t )) >"$BASE_DIR/build-time"
        touch "$BASE_DIR/ready"
        say "rootfs: base system built in $(cat "$BASE_DIR/build-time")"
        prune "$CACHE_ROOT/base-$DISTRO-*" 2
    else
        say "rootfs: base system cached at $BASE_DIR"
    fi
    t=$(date +%s)
    say "rootfs: image with the virtualenv ($(py_packages | tr '\n' ' ')) into $IMAGE_DIR"
    rm -rf "$IMAGE_DIR"
    mkdir -p "$IMAGE_DIR"
    BUILDING=$IMAGE_DIR
    build_image "$BASE_DIR/root" "$IMAGE_DIR"
    BUILDING=""
    dur $(( $(date +%s) - t )) >"$IMAGE_DIR/build-time"
    touch "$IMAGE_DIR/ready"
    say "rootfs: image built in $(cat "$IMAGE_DIR/build-time") (kernel $(cat "$IMAGE_DIR/kernel-release"), $(du -sh --apparent-size "$IMAGE_DIR/rootfs.img" | cut -f1) image)"
    prune "$CACHE_ROOT/image-$DISTRO-*" 2
    exec {lock}>&-
}

# --------------------------------------------------------------------------- run

RUN="" QEMU_PID="" TAIL_PID="" BUILDING=""
stop_qemu() {  # TERM, then KILL after 5 s; only the qemu this script started
    [[ -n "$QEMU_PID" ]] || return 0
    kill "$QEMU_PID" 2>/dev/null || return 0
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$QEMU_PID" 2>/dev/null || return 0; sleep 0.5; done
    kill -9 "$QEMU_PID" 2>/dev/null || true
}
# shellcheck disable=SC2317  # run by the EXIT trap
cleanup() {
    local rc=$?
    if [[ -n "$BUILDING" ]]; then
        # A failed build keeps its logs, not its half-made trees; the next run starts over.
        printf 'vm-lane: error: building the image failed (exit %s); logs in %s:\n' "$rc" "$BUILDING" >&2
        tail -n 20 "$(ls -t "$BUILDING"/*.log 2>/dev/null | head -n1)" 2>/dev/null | sed 's/^/  | /' >&2 || true
        rm -rf "$BUILDING/root" "$BUILDING/rootfs.img"
        rc=125
    fi
    stop_qemu
    if [[ -n "$TAIL_PID" ]]; then kill "$TAIL_PID" 2>/dev/null || true; fi
    [[ -n "$RUN" ]] && rm -rf "$RUN"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ensure_image
[[ "$BUILD_ONLY" -eq 1 ]] && { say "image ready: $IMAGE_DIR"; exit 0; }

RUN=$(mktemp -d /tmp/depfence-vm.XXXXXX)
SHARE=$RUN/share
mkdir -p "$SHARE/project" "$SHARE/results"
tar -C "$REPO" -cf - \
    --exclude=./.git --exclude=./.venv --exclude=./.vagrant --exclude=./.tox \
    --exclude=./.mypy_cache --exclude=./.ruff_cache --exclude=./.pytest_cache \
    --exclude=./.benchmarks --exclude=__pycache__ --exclude='*.egg-info' \
    --exclude=./build --exclude=./dist --exclude='./vm-*.xml' --exclude='./vm-*.log' . \
    | tar -C "$SHARE/project" -xf -
commit=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo "no git")
dirty=$( { git -C "$REPO" status --porcelain 2>/dev/null || true; } | wc -l)
say "project: copied the working tree ($commit, $dirty paths changed or untracked) into the guest share"

# Accelerators to try, in order. KVM fails in two ways on nested hosts: qemu aborts at
# once (e.g. "failed to set MSR 0x10a", IA32_ARCH_CAPABILITIES), or the hypervisor is
# not one a stock kernel can run on (a PVM host: the kernel hangs before its first line).
ACCELS=()
kvm_ok() { [[ -r /dev/kvm && -w /dev/kvm ]]; }
case "$ACCEL" in
    auto) if kvm_ok; then ACCELS=(kvm:host); fi; ACCELS+=(tcg:max) ;;
    kvm) kvm_ok || die 125 "--accel kvm: /dev/kvm is missing or not usable"
         ACCELS=(kvm:host) ;;
    tcg) ACCELS=(tcg:max) ;;
esac

# The tests to run, for the guest init to read.
if [[ "$SUITE" == kernel ]]; then args=("${KERNEL_SUBSET[@]}"); else args=("${FULL_SUITE[@]}"); fi
args+=(-v --durations=15 "${EXTRA_ARGS[@]}")
{ printf 'PYTEST_ARGS=('; printf '%q ' "${args[@]}"; printf ')\n'; } >"$SHARE/params"

KREL=$(cat "$IMAGE_DIR/kernel-release")
# Not `quiet`: the kernel's first line is how a hung accelerator is told from a slow one.
APPEND="root=/dev/vda rw console=ttyS0 init=/sbin/depfence-vm-init panic=-1"
boot() {  # boot ACCEL:CPU -> starts qemu in the background, sets QEMU_PID
    local kind=${1%%:*} cpu=${1#*:} accel_args
    if [[ "$kind" == kvm ]]; then accel_args=(-accel kvm -cpu "$cpu"); else accel_args=(-accel "tcg,thread=$TCG_THREAD" -cpu "$cpu"); fi
    : >"$RUN/console.log"
    # TMPDIR: where qemu puts the snapshot overlay of the root disk (removed with $RUN).
    TMPDIR=$RUN qemu-system-x86_64 -name depfence-vm -nodefaults -no-reboot \
        -machine pc "${accel_args[@]}" -m 2048 -smp 2 \
        -kernel "$IMAGE_DIR/vmlinuz" -initrd "$IMAGE_DIR/initrd.img" -append "$APPEND" \
        -drive "file=$IMAGE_DIR/rootfs.img,format=raw,if=virtio,snapshot=on" \
        -virtfs "local,path=$SHARE,mount_tag=depfence,security_model=none,id=depfence" \
        -device virtio-rng-pci -nic none \
        -display none -monitor none -serial "file:$RUN/console.log" \
        >"$RUN/qemu.out" 2>&1 &
    QEMU_PID=$!
    # Reaped by bash as usual, but not reported: an aborting qemu would otherwise add
    # a "line N: PID Aborted ..." line of its own. What went wrong is in qemu.out.
    disown "$QEMU_PID"
}

start_stream() {
    [[ "$QUIET" -eq 1 ]] && return 0
    # From the guest init's first line on (the kernel's boot log stays in the console
    # log file). tail ends by itself when qemu does.
    # (sed -u: Debian's awk, mawk, would hold the lines back in its input buffer.)
    tail --pid="$QEMU_PID" -n +1 -F "$RUN/console.log" 2>/dev/null \
        | sed -u -n '/^depfence-vm: /,$ { s/\r$//; s/^/  vm| /; p; }' &
    TAIL_PID=$!
}
stop_stream() {
    [[ -n "$TAIL_PID" ]] || return 0
    sleep 1  # let tail print the last lines
    kill "$TAIL_PID" 2>/dev/null || true
    wait "$TAIL_PID" 2>/dev/null || true
    TAIL_PID=""
}

USED="" T_BOOT0="" BOOT_PROBE=30
for candidate in "${ACCELS[@]}"; do
    say "boot: Debian $DEBIAN_VERSION ($DISTRO), kernel $KREL, accelerator ${candidate%%:*} (-cpu ${candidate#*:}), suite $SUITE"
    T_BOOT0=$(date +%s)
    boot "$candidate"
    # The last candidate is used whatever happens. Any other must show the kernel's
    # first line within BOOT_PROBE seconds (KVM prints it in well under one).
    if [[ "$candidate" != "${ACCELS[-1]}" ]]; then
        alive=0
        for _ in $(seq 1 $(( BOOT_PROBE * 2 ))); do
            kill -0 "$QEMU_PID" 2>/dev/null || break
            if grep -q 'Linux version' "$RUN/console.log"; then alive=1; break; fi
            sleep 0.5
        done
        if [[ "$alive" -eq 0 ]]; then
            if kill -0 "$QEMU_PID" 2>/dev/null; then
                stop_qemu
                why="the kernel printed nothing within ${BOOT_PROBE}s (a hypervisor a stock kernel cannot run on?)"
            else
                why="qemu stopped: $(grep -m1 -v '^$' "$RUN/qemu.out" || true)"
            fi
            QEMU_PID=""
            say "boot: ${candidate%%:*} -cpu ${candidate#*:} failed: $why"
            continue
        fi
    fi
    USED=$candidate
    break
done
[[ -n "$USED" ]] || die 125 "qemu could not start with any accelerator (tried: ${ACCELS[*]})"
say "boot: running with ${USED%%:*} (-cpu ${USED#*:})$([[ "$USED" == tcg:* ]] && echo ", software emulation: slow, thread=$TCG_THREAD")"
start_stream

# A guest kernel that panics before its init prints a line ran none of the project:
# under TCG, Debian 13's kernel has oopsed on a breakpoint left by its own boot-time
# text patching (int3 in sched_clock_cpu). Such a boot is retried, once, and said.
panicked_in_boot() {
    ! grep -q '^depfence-vm: ' "$RUN/console.log" && grep -q 'Kernel panic' "$RUN/console.log"
}
DEADLINE=$(( T_BOOT0 + TIMEOUT_MIN * 60 ))
T_PYTEST0="" TIMED_OUT=0 BOOTS=1
while true; do
    while kill -0 "$QEMU_PID" 2>/dev/null; do
        if [[ -z "$T_PYTEST0" ]] && grep -q 'depfence-vm: .* pytest start' "$RUN/console.log"; then
            T_PYTEST0=$(date +%s)
        fi
        if [[ $(date +%s) -ge $DEADLINE ]]; then
            TIMED_OUT=1
            break
        fi
        sleep 1
    done
    [[ "$TIMED_OUT" -eq 0 && "$BOOTS" -eq 1 ]] && panicked_in_boot || break
    stop_stream
    say "boot: the guest kernel panicked before the guest init ran; booting once more. The panic:"
    grep -m1 -B2 -A4 -E 'Oops|BUG:|Kernel panic' "$RUN/console.log" | sed 's/\r$//; s/^/  vm| /' >&2
    cp "$RUN/console.log" "${CONSOLE%.log}-boot1.log" 2>/dev/null || true
    BOOTS=2
    boot "$USED"
    start_stream
done
T_END=$(date +%s)
if [[ "$TIMED_OUT" -eq 1 ]]; then
    stop_qemu
fi
QEMU_PID=""
stop_stream
[[ -z "$T_PYTEST0" ]] && grep -q 'depfence-vm: .* pytest start' "$RUN/console.log" && T_PYTEST0=$T_END

RES=$SHARE/results
cp "$RUN/console.log" "$CONSOLE" 2>/dev/null || true
[[ -f "$RES/junit.xml" ]] && cp "$RES/junit.xml" "$JUNIT"
if [[ -n "$ARTIFACTS" ]]; then
    mkdir -p "$ARTIFACTS"
    cp -r "$RES/." "$ARTIFACTS/"
    cp "$RUN/console.log" "$ARTIFACTS/console.log"
fi

echo
say "---- timings (${USED%%:*}, suite $SUITE) ----"
if [[ -n "$T_PYTEST0" ]]; then
    say "boot to pytest start: $(dur $(( T_PYTEST0 - T_BOOT0 )))"
    say "tests (pytest start to power-off): $(dur $(( T_END - T_PYTEST0 )))"
fi
say "VM total: $(dur $(( T_END - T_BOOT0 )))"

if [[ -f "$RES/env.txt" ]]; then
    say "---- guest ----"
    sed 's/^/vm-lane:   /' "$RES/env.txt"
fi

fail_with_console() {  # fail_with_console CODE MESSAGE
    say "---- last 40 lines of the console ($CONSOLE) ----"
    tail -n 40 "$RUN/console.log" | sed 's/\r$//; s/^/  vm| /' >&2
    echo >&2  # the console's last line may have no newline yet
    [[ -s "$RUN/qemu.out" ]] && sed 's/^/  qemu| /' "$RUN/qemu.out" >&2
    die "$1" "$2"
}

if [[ "$TIMED_OUT" -eq 1 ]]; then
    fail_with_console 124 "the VM did not finish within --timeout $TIMEOUT_MIN min ($( [[ -n "$T_PYTEST0" ]] && echo 'pytest was running' || echo 'pytest never started'))"
fi
if [[ ! -f "$RES/exit-code" ]]; then
    fail_with_console 125 "the VM stopped without a result: $( [[ -n "$T_PYTEST0" ]] && echo 'pytest started but did not finish' || echo 'it did not boot as far as pytest')"
fi
CODE=$(cat "$RES/exit-code")
if [[ -f "$RES/pytest.log" ]]; then
    say "---- pytest summary (Debian $DEBIAN_VERSION $DISTRO, kernel $KREL, suite $SUITE) ----"
    # The short summary section if there is one, and the final line in any case.
    awk '/short test summary info/ {on = 1} on {print}' "$RES/pytest.log" | sed 's/^/vm-lane:   /'
    grep -q 'short test summary info' "$RES/pytest.log" \
        || tail -n 1 "$RES/pytest.log" | sed 's/^/vm-lane:   /'
fi
if [[ -f "$RES/junit.xml" ]]; then say "junit: $JUNIT"; else say "junit: none written"; fi
say "console log: $CONSOLE"
if [[ "$CODE" -eq 125 && ! -f "$RES/pytest.log" ]]; then
    fail_with_console 125 "the guest could not start pytest"
fi
say "exit $CODE (pytest's exit code)"
exit "$CODE"
