#!/usr/bin/env bash
# Make this machine able to run pytest-depfence's full test suite, as root:
#   - distro packages: bcc (python3-bpfcc; the PyPI `bcc` is an unrelated package),
#     the real clients the lab tests drive (curl, wget, dig, busybox nslookup, git), nft, bpftool;
#     gcc, which builds the small program every fenced command starts through (depfence-enter),
#     util-linux's unshare, its stand-in without a compiler, and setpriv (tests);
#   - a kernel header tree at /lib/modules/$(uname -r)/build, which bcc compiles against;
#   - the virtualenv .venv with the project installed editable, plus its test extras;
#   - tracefs, for the tracepoints the project attaches to;
#   - the eBPF programs compiled once, kept for every later process's first fence.
# Idempotent: a second run checks state only (no apt, no pip) and takes seconds.
# `--bench` (or DEPFENCE_BENCH=1) also installs what bench/ measures against: dnsperf, iperf3 and
# dnsmasq-base (the binary only, no service: the bench starts it inside the lab).
# Debian 12 and Ubuntu 22.04/24.04. Works from any current directory.
set -euo pipefail

say() { printf 'bootstrap: %s\n' "$*"; }
die() { printf 'bootstrap: error: %s\n' "$*" >&2; exit 1; }

if [[ "$(id -u)" -ne 0 ]]; then
    die "must run as root: it installs distro packages, links kernel headers and mounts tracefs. Try: sudo $0"
fi

BENCH="${DEPFENCE_BENCH:-0}"
for arg in "$@"; do
    case "$arg" in
        --bench) BENCH=1 ;;
        *) die "unknown argument $arg (the only one is --bench)" ;;
    esac
done

REPO="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
KREL="$(uname -r)"
export DEBIAN_FRONTEND=noninteractive

DISTRO=unknown
if [[ -r /etc/os-release ]]; then
    # shellcheck source=/dev/null
    DISTRO="$(. /etc/os-release && echo "${ID:-unknown}")"
fi
command -v dpkg-query >/dev/null 2>&1 || die "this script needs a Debian-family system (dpkg/apt); found ID=$DISTRO"

# --- helpers -----------------------------------------------------------------

is_installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" == "installed" ]]
}

APT_UPDATED=0
apt_update_once() {
    if [[ "$APT_UPDATED" -eq 0 ]]; then
        say "apt-get update (package lists are needed before installing)"
        apt-get update -qq
        APT_UPDATED=1
    fi
}

apt_install() {
    say "apt-get install $*"
    apt-get install -y -qq --no-install-recommends "$@"
}

# A real (non-virtual) package of that name exists in the current lists.
has_candidate() {
    # No grep -q: it would close the pipe early, and pipefail would count apt-cache's SIGPIPE.
    apt-cache show --no-all-versions "$1" 2>/dev/null | grep '^Package:' >/dev/null
}

# --- (a) distro packages -----------------------------------------------------

NEEDED=(python3-bpfcc python3-venv python3-pip iproute2 curl wget dnsutils busybox git
        ca-certificates make nftables gcc)
MISSING=()
for pkg in "${NEEDED[@]}"; do
    is_installed "$pkg" || MISSING+=("$pkg")
done
if [[ ${#MISSING[@]} -gt 0 ]]; then
    say "missing packages: ${MISSING[*]} (bcc, venv, and the real clients and tools the lab tests drive)"
    apt_update_once
    apt_install "${MISSING[@]}"
else
    say "distro packages: all present (${NEEDED[*]})"
fi

if [[ "$BENCH" == 1 ]]; then
    BENCH_NEEDED=(dnsperf dnsmasq-base iperf3)
    BENCH_MISSING=()
    for pkg in "${BENCH_NEEDED[@]}"; do
        is_installed "$pkg" || BENCH_MISSING+=("$pkg")
    done
    if [[ ${#BENCH_MISSING[@]} -gt 0 ]]; then
        say "bench extra: missing ${BENCH_MISSING[*]} (the baselines bench/ measures against)"
        apt_update_once
        apt_install "${BENCH_MISSING[@]}"
    else
        say "bench extra: all present (${BENCH_NEEDED[*]})"
    fi
fi

# Every fenced command starts through util-linux's unshare (its own cgroup namespace);
# the test suite runs some tests as nobody through setpriv. Both are in util-linux on
# Debian 12/13 and Ubuntu 22.04/24.04; Debian 11 ships setpriv as a package of its own.
if command -v unshare >/dev/null 2>&1 && command -v setpriv >/dev/null 2>&1; then
    say "unshare, setpriv: present"
else
    apt_update_once
    if ! command -v setpriv >/dev/null 2>&1 && has_candidate setpriv; then
        apt_install util-linux setpriv
    else
        apt_install util-linux
    fi
    command -v unshare >/dev/null 2>&1 && command -v setpriv >/dev/null 2>&1 \
        || die "unshare and setpriv are still missing after installing util-linux"
fi

# bpftool is for inspecting attached programs and maps when debugging; nothing needs it
# to run. Debian has a `bpftool` package; Ubuntu ships it in linux-tools.
if command -v bpftool >/dev/null 2>&1 || is_installed bpftool; then
    say "bpftool: present"
elif has_candidate bpftool; then
    apt_update_once
    apt_install bpftool
elif [[ "$DISTRO" == ubuntu ]]; then
    apt_update_once
    if has_candidate "linux-tools-$KREL"; then
        apt_install linux-tools-common "linux-tools-$KREL" \
            || say "could not install linux-tools-$KREL; continuing without bpftool (debugging aid only)"
    else
        say "no linux-tools-$KREL for the running kernel; continuing without bpftool (debugging aid only)"
    fi
else
    say "no bpftool package in the apt lists; continuing without it (debugging aid only)"
fi

# --- (b) kernel headers for bcc ----------------------------------------------

MODDIR="/lib/modules/$KREL"
BUILD="$MODDIR/build"
SOURCE="$MODDIR/source"

# Debian splits a header tree in two: linux-headers-R-amd64 (generated files, .config;
# this is `build`) and linux-headers-R-common (the headers themselves; `source`). bcc
# needs both links. Mirror what the headers package did for its own kernel R; where it
# made no `source` link (Ubuntu's flavour trees are complete), the tree serves as both.
source_tree_for() {
    local tree="$1" rel
    rel="${tree#/usr/src/linux-headers-}"
    if [[ -d "/lib/modules/$rel/source/include" ]]; then
        readlink -f "/lib/modules/$rel/source"
    else
        echo "$tree"
    fi
}

if [[ -d "$BUILD/include" ]]; then
    if [[ ! -e "$SOURCE" && ! -L "$SOURCE" ]]; then
        tree="$(readlink -f "$BUILD")"
        if [[ "$tree" == /usr/src/linux-headers-* ]]; then
            src="$(source_tree_for "$tree")"
            if [[ "$src" != "$tree" ]]; then
                say "linking $SOURCE -> $src: $BUILD is a split distro tree whose headers live there; bcc needs both"
                ln -s "$src" "$SOURCE"
            fi
        fi
    fi
    say "kernel headers: present at $BUILD -> $(readlink -f "$BUILD")"
elif [[ -e "$BUILD" || -L "$BUILD" ]]; then
    die "$BUILD exists but has no include/ (a broken link?). It is not this script's to replace: remove it (rm $BUILD) and run again"
else
    apt_update_once
    if has_candidate "linux-headers-$KREL"; then
        say "installing linux-headers-$KREL: bcc compiles the eBPF programs against the running kernel's headers"
        apt_install "linux-headers-$KREL"
    else
        case "$DISTRO" in
            ubuntu) meta=linux-headers-generic; flavour=generic ;;
            *)      flavour="$(dpkg --print-architecture)"; meta="linux-headers-$flavour" ;;
        esac
        if is_installed "$meta"; then
            say "$meta: present"
        else
            say "no linux-headers-$KREL package; installing $meta for a distro header tree"
            apt_install "$meta"
        fi
        tree=""
        while IFS= read -r cand; do
            [[ -d "$cand/include" ]] && tree="$cand"
        done < <(printf '%s\n' /usr/src/linux-headers-*-"$flavour" | sort -V)
        [[ -n "$tree" ]] || die "$meta installed no /usr/src/linux-headers-*-$flavour tree; bcc cannot compile without kernel headers"
        src="$(source_tree_for "$tree")"
        say "the running kernel $KREL has no packaged headers; our eBPF programs use only UAPI types, so the distro tree $tree works"
        mkdir -p "$MODDIR"
        say "linking $BUILD -> $tree"
        ln -s "$tree" "$BUILD"
        if [[ ! -e "$SOURCE" && ! -L "$SOURCE" ]]; then
            say "linking $SOURCE -> $src"
            ln -s "$src" "$SOURCE"
        fi
    fi
    [[ -d "$BUILD/include" ]] || die "still no $BUILD/include after installing headers"
fi

# --- (c) virtualenv ----------------------------------------------------------

cd "$REPO"
VENV="$REPO/.venv"
STAMP="$VENV/.depfence-installed"

# The distro interpreter, not --system-site-packages: the venv then holds exactly the
# project's PyPI dependencies, and the project finds the distro's bcc by itself.
if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c '' 2>/dev/null \
    && grep -qx 'home = /usr/bin' "$VENV/pyvenv.cfg" 2>/dev/null; then
    say "venv: present at $VENV"
else
    if [[ -e "$VENV" ]]; then
        say "removing $VENV: it does not run or was not made from /usr/bin/python3 (bcc is built for the distro Python)"
        rm -rf "$VENV"
    fi
    say "creating $VENV with /usr/bin/python3 -m venv"
    /usr/bin/python3 -m venv "$VENV"
fi

want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"
if [[ "$want" == "$have" ]] && [[ -d "$VENV/wheelhouse" ]] \
    && compgen -G "$VENV/lib/python3*/site-packages/pytest_depfence-*.dist-info" >/dev/null; then
    say "python packages: up to date (pyproject.toml unchanged since the last install)"
else
    say "pip install -e '.[test]' (pyproject.toml is new or changed since the last install)"
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q -e '.[test]'
    # The project's dependencies as wheels, so a test can install the built wheel into a
    # fresh virtualenv offline (tests/integration/test_wheel_project.py).
    say "pip download: the project's dependencies into $VENV/wheelhouse"
    rm -rf "$VENV/wheelhouse"
    "$VENV/bin/python" -m pip download --disable-pip-version-check -q --no-build-isolation \
        -d "$VENV/wheelhouse" "$REPO"
    rm -f "$VENV/wheelhouse"/pytest_depfence-*
    echo "$want" >"$STAMP"
fi

# --- (d) tracefs -------------------------------------------------------------

if mountpoint -q /sys/kernel/tracing; then
    say "tracefs: mounted at /sys/kernel/tracing"
else
    say "mounting tracefs at /sys/kernel/tracing: the project attaches eBPF programs to tracepoints"
    mount -t tracefs nodev /sys/kernel/tracing \
        || die "could not mount tracefs at /sys/kernel/tracing; tracepoints will not work"
fi

# Information only: the project finds the cgroup v2 mount itself.
cg2="$(awk '$3 == "cgroup2" {print $2; exit}' /proc/mounts)"
if [[ -n "$cg2" ]]; then
    say "cgroup v2: mounted at $cg2"
else
    say "warning: no cgroup v2 mount found; fences cannot be built on this machine"
fi

# --- (e) the eBPF programs --------------------------------------------------------

# Compiled once here and kept in the per-machine cache (pytest_depfence/kernel/progcache.py),
# so that every later process's first fence loads them (~0.3 s) instead of compiling
# (~0.65 s). A machine that cannot build them yet is no bootstrap failure: doctor says why.
warm='
import sys
from pytest_depfence.errors import FenceUnavailable
from pytest_depfence.kernel import programs
try:
    print(programs.load().built)
except FenceUnavailable as exc:
    sys.exit(exc.reason.splitlines()[0])
'
if built="$("$VENV/bin/python" -c "$warm" 2>&1)"; then
    say "eBPF programs: ${built##*$'\n'}"
else
    say "warning: the eBPF programs could not be built yet (${built##*$'\n'}); see: $VENV/bin/python -m pytest_depfence doctor"
fi

say "ready (venv: .venv)"
