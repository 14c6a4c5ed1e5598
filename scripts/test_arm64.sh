#!/usr/bin/env bash
# Run tests on aarch64 (the Raspberry Pi 4/5 target: 64-bit Raspberry Pi OS = Debian 12, Python 3.11)
# under qemu-user, in an arm64 Debian 12 chroot built on this x86 machine.
#
#   scripts/test_arm64.sh                         # the smoke subset (SMOKE_TESTS below): what CI runs
#   scripts/test_arm64.sh tests                   # the whole suite
#   scripts/test_arm64.sh tests/test_cells.py -x  # arguments go to pytest as they are
#   make test-arm64 ARGS='tests/test_model.py'
#
# Needs root (chroot, mounts, binfmt registration); re-runs itself under sudo otherwise.
# The first run builds the root (~6 min) and caches it outside the repo; later runs reuse it.
# Emulation proves correctness on aarch64, never speed: tests run 8-15x slower than native.
#
# Exit status: pytest's, or 77 (SKIPPED, decided before the root is built) where the kernel will not let
# qemu-aarch64 be registered with binfmt_misc (no binfmt_misc, or a container that may not mount or write
# it): the one case where aarch64 cannot be run here at all. .ci/run passes on 77, fails on anything else.
#
# Environment:
#   EDGERNN_ARM64_ROOT     where the arm64 root lives (default /var/tmp/edgernn-arm64); delete it to rebuild
#   EDGERNN_ARM64_MIRROR   Debian mirror for the root (default http://deb.debian.org/debian)
#   EDGERNN_ARM64_TIMEOUT  seconds pytest may run before it is stopped (default 900 for the smoke subset,
#                          5400 otherwise)
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
SKIPPED=77                           # binfmt_misc cannot be registered: aarch64 cannot run here
SUITE=bookworm                       # Debian 12, as Raspberry Pi OS (64-bit) is
PACKAGES=python3,python3-venv,python3-dev,gcc,ca-certificates,mosquitto
SRC=/work/edgernn                    # where the repository's copy lives inside the root
VENV=/opt/edgernn-venv               # the venv inside the root

log() { printf '\n== %s\n' "$*" >&2; }

# --- what runs without arguments: a smoke subset, every part that could differ on aarch64 -------------
# The imports and the kernel selection are checked before pytest starts (see "versions inside the root").
# Whole test functions, every parametrization: a renamed test fails the run ("not found"), never shrinks it.
SMOKE_TESTS=(
    # every kernel (step_one, run_sequence, run_layers, step_rows, step_rows_parallel) on every cell
    # family against the float64 NumPy reference or the one-stream kernel, at small sizes
    tests/test_cells.py::test_step_matches_the_reference_step_by_step
    tests/test_cells.py::test_run_from_a_given_state_matches_the_reference
    tests/test_cells.py::test_reverse_and_bidirectional_layers_match_the_reference
    tests/test_cells.py::test_step_batch_equals_one_stream_at_a_time
    tests/test_cells.py::test_parallel_and_serial_kernels_agree
    # the .ern file: written and read back on aarch64, per dtype
    tests/test_format.py::test_float32_round_trip_is_exact
    tests/test_format.py::test_metadata_is_readable_by_safetensors
    tests/test_format.py::test_saved_model_computes_what_the_original_does
    # the NumPy kernels (32-bit Pi OS has no numba) against numba and the reference
    tests/test_numpy_fallback.py::test_the_numpy_kernels_compute_what_numba_and_the_reference_compute
    # the daemon: a few interleaved streams through the root's own Mosquitto, and a restart from its snapshot
    tests/test_daemon.py::test_interleaved_streams_equal_offline_runs
    tests/test_daemon.py::test_sigterm_and_restart_continue_every_stream
)

# --- root -------------------------------------------------------------------------------------------
if [ "$(id -u)" != 0 ]; then
    exec sudo --preserve-env=EDGERNN_ARM64_ROOT,EDGERNN_ARM64_MIRROR,EDGERNN_ARM64_TIMEOUT "$0" "$@"
fi

if [ $# -eq 0 ]; then
    set -- --durations=10 "${SMOKE_TESTS[@]}"
    TIMEOUT=${EDGERNN_ARM64_TIMEOUT:-900}
else
    TIMEOUT=${EDGERNN_ARM64_TIMEOUT:-5400}
fi

# --- binfmt: the kernel must hand aarch64 ELF binaries to qemu ---------------------------------------
# skip WHY: the one way out that is not a failure (exit 77); CI passes on it, saying why.
skip() {
    printf '\nSKIPPED: aarch64 tests cannot run on this machine: %s\n' "$*" >&2
    exit "$SKIPPED"
}
# Without systemd (containers, CI) binfmt-support's service never runs, so mount binfmt_misc here.
# Checked before any package is installed or the root built: a machine that cannot run aarch64 costs nothing.
BINFMT=/proc/sys/fs/binfmt_misc
if [ ! -e "$BINFMT/register" ]; then
    grep -qw binfmt_misc /proc/filesystems || modprobe binfmt_misc 2>/dev/null || true
    grep -qw binfmt_misc /proc/filesystems || skip "the kernel has no binfmt_misc (not in /proc/filesystems)"
    why=$(mount -t binfmt_misc binfmt_misc "$BINFMT" 2>&1) || skip "cannot mount binfmt_misc on $BINFMT: $why"
fi
# Already registered (by the host of a container, say): nothing to write. Else register must be writable.
[ -e "$BINFMT/qemu-aarch64" ] || [ -w "$BINFMT/register" ] ||
    skip "qemu-aarch64 is not registered and $BINFMT/register is not writable (mounted read-only, or a container without the privilege)"

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

# Register qemu-aarch64 by hand. Debian registers it with the F flag (the kernel opens the emulator
# once, at registration), so the chroot needs no copy of qemu inside it.
if [ ! -e "$BINFMT/qemu-aarch64" ]; then
    log "registering qemu-aarch64 with binfmt_misc"
    update-binfmts --enable qemu-aarch64 2>/dev/null || true
fi
if [ ! -e "$BINFMT/qemu-aarch64" ]; then
    # Fall back to the systemd-binfmt line that qemu-user-static ships.
    conf=/usr/lib/binfmt.d/qemu-aarch64.conf
    [ -f "$conf" ] || { echo "$conf is missing: reinstall qemu-user-static" >&2; exit 1; }
    why=$( (cat "$conf" > "$BINFMT/register") 2>&1) ||
        skip "the kernel refused to register qemu-aarch64 with binfmt_misc: $why"
fi
if [ "$(cat "$BINFMT/status")" != enabled ]; then
    why=$( (echo 1 > "$BINFMT/status") 2>&1) || skip "binfmt_misc is disabled and cannot be enabled: $why"
fi
grep -q '^flags:.*F' "$BINFMT/qemu-aarch64" || {
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

log "versions inside the root, and the imports"
# edgernn and every runtime module import on aarch64, and the compiled (numba) kernels are the ones in use:
# were numba not importable here, the kernel tests below would quietly test the NumPy fallback instead.
run_in_root "${ENV[@]}" "$VENV/bin/python" -c '
import importlib, pkgutil, platform, sys, numpy, numba, llvmlite, llvmlite.binding as ll, safetensors
print("machine", platform.machine(), "| python", sys.version.split()[0], "| numpy", numpy.__version__,
      "| numba", numba.__version__, "| llvmlite", llvmlite.__version__, "| safetensors", safetensors.__version__)
print("llvm host cpu:", ll.get_host_cpu_name())
import edgernn, edgernn.cli, edgernn.jit, edgernn.runtime
names = [m.name for m in pkgutil.walk_packages(edgernn.runtime.__path__, "edgernn.runtime.")]
for name in names:
    importlib.import_module(name)
print("imported edgernn, edgernn.cli and", len(names), "edgernn.runtime modules | kernels:", edgernn.jit.KERNELS)
assert platform.machine() == "aarch64", platform.machine()
assert edgernn.jit.KERNELS == "numba", edgernn.jit.KERNELS'

log "running the tests on aarch64 (emulated): pytest $*"
started=$SECONDS
status=0
run_in_root "${ENV[@]}" /bin/bash -c 'mkdir -p "$NUMBA_CACHE_DIR" && cd "$1" && shift &&
    exec timeout --kill-after=30 "$0" python -m pytest -q -p no:cacheprovider "$@"' \
    "$TIMEOUT" "$SRC" "$@" || status=$?
log "pytest exited $status after $((SECONDS - started)) s"
exit "$status"
