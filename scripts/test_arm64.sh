#!/usr/bin/env bash
# Run the test suite on aarch64 (the Raspberry Pi 4/5 target: 64-bit Raspberry Pi OS = Debian 12,
# Python 3.11) under qemu-user, in an arm64 Debian 12 chroot built on this x86 machine.
#
#   scripts/test_arm64.sh                         # the whole suite
#   scripts/test_arm64.sh tests/test_cells.py -x  # arguments go to pytest as they are
#   make test-arm64 ARGS='tests/test_model.py'
#
# Needs root (chroot, mounts, binfmt registration); re-runs itself under sudo otherwise.
# The first run builds the root (~6 min) and caches it outside the repo; later runs reuse it.
# Emulation proves correctness on aarch64, never speed: tests run 8-15x slower than native.
#
# Environment:
#   EDGERNN_ARM64_ROOT     where the arm64 root lives (default /var/tmp/edgernn-arm64); delete it to rebuild
#   EDGERNN_ARM64_MIRROR   Debian mirror for the root (default http://deb.debian.org/debian)
#   EDGERNN_ARM64_TIMEOUT  seconds pytest may run before it is stopped (default 5400)
#
# Only the runtime deps are installed in the root (`pip install -e '.[daemon]' pytest hypothesis`), plus onnx, so
# ONNX's own LSTM/GRU/RNN test cases (tests/test_onnx_backend.py) check the kernels on aarch64 too: no
# torch or onnxruntime. Conversion is a workstation job, and the tests that need them skip themselves.
#
# onnxruntime: under Debian 12's qemu (7.2) the guest reads the host's x86 /proc/cpuinfo, and
# onnxruntime's CPU detection crashes on import. If onnxruntime is ever installed here, bind-mount a
# file holding an aarch64 /proc/cpuinfo (processor/BogoMIPS/Features/CPU implementer/... lines, as a
# Pi 4 prints them) over "$ROOTFS/proc/cpuinfo" after /proc is mounted in run_in_root below.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOTFS=${EDGERNN_ARM64_ROOT:-/var/tmp/edgernn-arm64}
MIRROR=${EDGERNN_ARM64_MIRROR:-http://deb.debian.org/debian}
TIMEOUT=${EDGERNN_ARM64_TIMEOUT:-5400}
SUITE=bookworm                       # Debian 12, as Raspberry Pi OS (64-bit) is
PACKAGES=python3,python3-venv,python3-dev,gcc,ca-certificates,mosquitto
SRC=/work/edgernn                    # where the repository's copy lives inside the root
VENV=/opt/edgernn-venv               # the venv inside the root

log() { printf '\n== %s\n' "$*" >&2; }

# --- root -------------------------------------------------------------------------------------------
if [ "$(id -u)" != 0 ]; then
    exec sudo --preserve-env=EDGERNN_ARM64_ROOT,EDGERNN_ARM64_MIRROR,EDGERNN_ARM64_TIMEOUT "$0" "$@"
fi

# --- host packages: qemu-user-static (the emulator), binfmt-support (registers it), mmdebstrap -------
missing=()
[ -x /usr/bin/qemu-aarch64-static ] || missing+=(qemu-user-static)
command -v update-binfmts >/dev/null || missing+=(binfmt-support)
command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
command -v arch-test >/dev/null || missing+=(arch-test)   # lets mmdebstrap check that arm64 runs
command -v rsync >/dev/null || missing+=(rsync)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# --- binfmt: the kernel must hand aarch64 ELF binaries to qemu ---------------------------------------
# Without systemd (containers, CI) binfmt-support's service never runs, so mount binfmt_misc and
# register qemu-aarch64 by hand. Debian registers it with the F flag (the kernel opens the emulator
# once, at registration), so the chroot needs no copy of qemu inside it.
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    log "registering qemu-aarch64 with binfmt_misc"
    update-binfmts --enable qemu-aarch64 2>/dev/null || true
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    # Fall back to the systemd-binfmt line that qemu-user-static ships.
    cat /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register
fi
if [ "$(cat /proc/sys/fs/binfmt_misc/status)" != enabled ]; then
    echo 1 > /proc/sys/fs/binfmt_misc/status
fi
grep -q '^flags:.*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 || {
    echo "qemu-aarch64 is registered without the F (fix-binary) flag; this script expects Debian's" >&2
    echo "registration. Run: update-binfmts --disable qemu-aarch64; then run this script again." >&2
    exit 1
}

# --- the arm64 root: built once, cached outside the repo ---------------------------------------------
# minbase: only Essential and Priority:required packages plus what --include names (~480 MB; the venv adds ~320 MB).
# Built under a temporary name and renamed at the end, so an interrupted build is never reused.
# The marker records what the root was built with; a changed package list (say, mosquitto for the
# daemon's tests) rebuilds it.
ROOT_RECIPE="$SUITE $PACKAGES"
if [ "$(cat "$ROOTFS/.edgernn-root-ready" 2>/dev/null)" != "$ROOT_RECIPE" ]; then
    log "building the arm64 $SUITE root in $ROOTFS (about 6 minutes)"
    rm -rf "$ROOTFS.partial"
    mkdir -p "$(dirname "$ROOTFS")"
    mmdebstrap --mode=root --format=directory --architectures=arm64 --variant=minbase --include="$PACKAGES" \
        "$SUITE" "$ROOTFS.partial" "deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main"
    rm -rf "$ROOTFS"
    mv "$ROOTFS.partial" "$ROOTFS"
    echo "$ROOT_RECIPE" > "$ROOTFS/.edgernn-root-ready"
fi

# --- network inside the root -------------------------------------------------------------------------
# The host's resolver, and any local CA it trusts (a proxy that re-signs TLS must be trusted inside too).
cp -L /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
extra_cas=(/usr/local/share/ca-certificates/*.crt)
update_cas=0
for ca in "${extra_cas[@]}"; do
    [ -f "$ca" ] || continue
    if ! cmp -s "$ca" "$ROOTFS/usr/local/share/ca-certificates/$(basename "$ca")"; then
        cp "$ca" "$ROOTFS/usr/local/share/ca-certificates/"
        update_cas=1
    fi
done

# --- the repository: copied (not bind-mounted) so the host's .venv, Numba caches and egg-info stay apart
log "copying $REPO into the root"
mkdir -p "$ROOTFS$SRC"
rsync -a --delete \
    --exclude=/.git --exclude=/.venv --exclude=/.numba_cache --exclude=/.pytest_cache \
    --exclude=__pycache__ --exclude='*.pyc' --exclude='*.nbi' --exclude='*.nbc' \
    --exclude='*.egg-info' --exclude=/build --exclude=/dist \
    "$REPO/" "$ROOTFS$SRC/"

# Numba's cache, keyed like tests/conftest.py keys it: by a hash of edgernn's sources, so a changed
# kernel is always compiled afresh, never loaded stale. It lives in the root, outside the copy.
digest=$(cd "$ROOTFS$SRC" && find edgernn -name '*.py' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum \
         | sha256sum | cut -c1-16)
# The venv is rebuilt only when pyproject.toml changes.
deps_stamp=$( (sha256sum "$REPO/pyproject.toml"; echo onnx) | sha256sum | cut -c1-16)

# --- run a command inside the root -------------------------------------------------------------------
# A private mount namespace (and PID namespace) holds /proc, /sys and /dev: they vanish when the command
# ends, however it ends, and nothing is left running.
run_in_root() {
    unshare --mount --pid --fork --propagation private -- /bin/bash -euc '
        root=$1; shift
        mount -t proc proc "$root/proc"
        mount -t sysfs sysfs "$root/sys"
        mount --rbind /dev "$root/dev"
        exec chroot "$root" "$@"' _ "$ROOTFS" "$@"
}

# A clean environment: the host's pip settings (a local x86-only index, find-links, constraints)
# must not leak in. PIP_CONFIG_FILE=/dev/null ignores every pip config file; plain PyPI it is.
ENV=(env -i HOME=/root LANG=C.UTF-8 TERM="${TERM:-dumb}"
     PATH="$VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
     PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180
     PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
     NUMBA_CACHE_DIR="/var/cache/edgernn-numba/$digest" PYTHONDONTWRITEBYTECODE=1)

if [ "$update_cas" = 1 ]; then
    log "trusting the host's local CAs inside the root"
    run_in_root "${ENV[@]}" update-ca-certificates >/dev/null
fi

if [ "$(cat "$ROOTFS$VENV/.edgernn-deps" 2>/dev/null)" != "$deps_stamp" ]; then
    log "installing edgernn's runtime deps (aarch64 wheels from PyPI) into $VENV"
    # --only-binary: the compiled deps must come as aarch64 wheels; building one from source here would
    # mean the Pi would have to as well, so fail instead.
    run_in_root "${ENV[@]}" /bin/bash -euc '
        rm -rf "$1"
        python3 -m venv "$1"
        cd "$2"
        "$1/bin/python" -m pip install -q --only-binary=numpy,numba,llvmlite,safetensors,onnx \
            -e ".[daemon]" pytest hypothesis onnx
        echo "$3" > "$1/.edgernn-deps"' _ "$VENV" "$SRC" "$deps_stamp"
fi

log "versions inside the root"
run_in_root "${ENV[@]}" "$VENV/bin/python" -c '
import platform, sys, numpy, numba, llvmlite, llvmlite.binding as ll, safetensors
print("machine", platform.machine(), "| python", sys.version.split()[0], "| numpy", numpy.__version__,
      "| numba", numba.__version__, "| llvmlite", llvmlite.__version__, "| safetensors", safetensors.__version__)
print("llvm host cpu:", ll.get_host_cpu_name())'

log "running the tests on aarch64 (emulated): pytest $*"
started=$SECONDS
status=0
run_in_root "${ENV[@]}" /bin/bash -c 'mkdir -p "$NUMBA_CACHE_DIR" && cd "$1" && shift &&
    exec timeout --kill-after=30 "$0" python -m pytest -q -p no:cacheprovider "$@"' \
    "$TIMEOUT" "$SRC" "$@" || status=$?
log "pytest exited $status after $((SECONDS - started)) s"
exit "$status"
