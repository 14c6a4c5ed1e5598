"""`edgernn doctor --config F`: checks a device's set-up and says what to fix, before (or beside) the daemon.

Each check gives a `Finding`: ``ok``, ``warn`` (works, but slower or riskier than it should) or ``fail``
(the daemon cannot do its job), a line saying what was found, and for the others what to do. Checked:

- the config file (the daemon's own checks: every model loads with its backend, codecs and time options fit);
- the kernels: numba importable, or the NumPy fallback in use and why;
- the compile cache: writable, and warm (compiled kernels in it) or cold (the first start compiles for
  tens of seconds on this machine, minutes on a Pi: run `edgernn warmup`). It judges the cache this process
  would use (``[state] compile_cache``, else ``NUMBA_CACHE_DIR``, else the state dir's): run doctor with the
  daemon's environment (a systemd unit's ``NUMBA_CACHE_DIR``) and as its user. "Warm" means compiled
  kernels are there, not that they fit this numba and edgernn (`edgernn warmup` checks that);
- the state directory: writable (a file written, fsynced, removed), its filesystem (tmpfs loses the states
  at reboot) and free space;
- the broker: reachable with the configured address, TLS and credentials, as a client of its own
  (``<client_id>-doctor``, clean session: the daemon's session is never touched);
- the clocks: this machine's NTP synchronisation where systemd says, and the devices' ``ts`` against this
  clock, from the samples seen on the pipelines' topics within ``listen`` seconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

OK, WARN, FAIL = "ok", "warn", "fail"
LOW_DISK_BYTES = 100 * 2**20
"""Free space below which the state directory gets a warning (snapshots are written beside the old one)."""
VOLATILE_FILESYSTEMS = {"tmpfs", "ramfs"}
OVERLAY_FILESYSTEMS = {"overlay", "overlayfs"}
UNIX_SECONDS_DOUBT = 10 * 365 * 86400.0
"""A median skew beyond ten years says the devices' ts is not in Unix seconds at all."""
CLOCK_SKEW_WARN = 2.0
"""Seconds between a device's ``ts`` and this clock (median over the samples seen) that get a warning."""
PROBE_SUFFIX = "-doctor"


@dataclass
class Finding:
    check: str
    status: str  # OK, WARN or FAIL
    detail: str
    fix: str = ""

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def run_checks(config_path, listen: float = 3.0, cache_origin: str | None = None) -> list[Finding]:
    """Every check, in the order a user would fix them. A config that does not load stops the checks that
    need it; the kernel and clock checks still run. ``cache_origin``: where the caller's compile cache came
    from (`compile_cache.use_compile_cache`, which exports it: asked afterwards, it names the environment)."""
    from .config import ConfigError, load_config

    try:
        config = load_config(config_path)
    except ConfigError as error:
        return [Finding("config", FAIL, str(error), "fix the option it names"), _kernels(), _ntp()]
    cache = _compile_cache(config, cache_origin)  # before the models load: that may compile into the cache
    findings = [_models(config), _kernels(), cache, _state_dir(config.state.dir)]
    findings += _broker_and_devices(config, listen)
    findings.append(_ntp())
    return findings


# ---- the checks ------------------------------------------------------------------------------------------
def _models(config) -> Finding:
    from .daemon import check

    try:
        lines = check(config)
    except Exception as error:  # noqa: BLE001 -- a model or option the daemon would refuse: say which
        return Finding("config", FAIL, f"{config.source}: {error}", "fix the model file or option it names")
    return Finding("config", OK, f"{config.source}: {len(lines)} pipeline(s): " + "; ".join(lines))


def _kernels() -> Finding:
    from edgernn.jit import NUMBA_AVAILABLE, UNAVAILABLE_REASON, thread_count

    if NUMBA_AVAILABLE:
        import numba

        return Finding("kernels", OK, f"numba {numba.__version__}, {thread_count()} thread(s)")
    return Finding("kernels", WARN, f"the NumPy kernels are in use: {UNAVAILABLE_REASON} (same results, many "
                                    "times slower)",
                   "unset EDGERNN_DISABLE_NUMBA" if "disabled" in (UNAVAILABLE_REASON or "")
                   else "install numba (pip install numba; 64-bit OS needed on a Raspberry Pi)")


def _compile_cache(config, origin: str | None) -> Finding:
    from edgernn.jit import NUMBA_AVAILABLE

    from .compile_cache import compile_cache_dir

    directory, found_origin = compile_cache_dir(config.state)
    origin = origin or found_origin
    if not NUMBA_AVAILABLE:
        return Finding("compile cache", OK, f"{directory} ({origin}): not used by the NumPy kernels")
    problem = _not_writable(directory)
    if problem:
        return Finding("compile cache", FAIL, f"{directory} ({origin}) is not writable: {problem}; every start "
                                              "compiles the kernels again", "make it writable for the daemon's "
                                              "user, or set [state] compile_cache")
    cached = sum(1 for _ in directory.rglob("*.nbi"))
    if not cached:
        return Finding("compile cache", WARN, f"{directory} ({origin}) was cold: the first start compiles every "
                                              "kernel (30-55 s here, minutes on a Pi); loading the models for the "
                                              "config check may have compiled a few",
                       f"edgernn warmup --config {config.source}")
    return Finding("compile cache", OK, f"{directory} ({origin}): warm, {cached} compiled kernel(s)")


def _state_dir(directory: Path) -> Finding:
    problem = _not_writable(directory, sync=True)
    if problem:
        return Finding("state dir", FAIL, f"{directory} is not writable by {_user()}: {problem}; stream states "
                                          "cannot be kept across restarts (run doctor as the daemon's user)", "create it and give the daemon's user write access, "
                                          "or set [state] dir")
    filesystem, mount = _filesystem(directory)
    free = shutil.disk_usage(directory).free
    detail = f"{directory}: writable by {_user()}, on {filesystem} ({mount}), {free / 2**20:,.0f} MiB free"
    if filesystem in VOLATILE_FILESYSTEMS:
        return Finding("state dir", WARN, detail + ": in memory, the states are lost at every reboot",
                       "set [state] dir to a directory on disk (e.g. /var/lib/edgernn)")
    if filesystem in OVERLAY_FILESYSTEMS:
        return Finding("state dir", WARN, detail + ": an overlay (Raspberry Pi OS's overlay file system keeps its "
                                                   "changes in memory): the states may be lost at reboot",
                       "put [state] dir on a persistent filesystem, or turn the overlay off")
    if free < LOW_DISK_BYTES:
        return Finding("state dir", WARN, detail + ": little room for snapshots", "free some space")
    return Finding("state dir", OK, detail)


def _broker_and_devices(config, listen: float) -> list[Finding]:
    """The broker, as a client of its own; then the devices' ``ts`` against this clock, if any came."""
    from .connect_failures import uses_tls
    from .mqtt import probe

    broker = dataclasses.replace(config.broker, client_id=config.broker.client_id[:100] + PROBE_SUFFIX,
                                 connection_timeout=min(config.broker.connection_timeout, 10.0))
    skews: list[float] = []
    fields = {p.ts_field for p in config.pipelines if p.data_format == "json"}

    def on_message(topic: str, payload: bytes, retained: bool) -> None:
        if retained:  # kept by the broker from whenever: not a device's clock now
            return
        try:
            body = json.loads(payload)
        except ValueError:
            return
        for name in fields:
            value = body.get(name) if isinstance(body, dict) else None
            if isinstance(value, int | float) and not isinstance(value, bool):
                skews.append(time.time() - float(value))
                return

    subscriptions = [pattern for p in config.pipelines for pattern in p.subscribe] if listen > 0 else []
    failure = probe(broker, subscriptions, listen, on_message)
    tls = "TLS" if uses_tls(config.broker) else "no TLS"
    user = f"user {config.broker.username!r}" if config.broker.username else "no username"
    if failure:
        return [Finding("broker", FAIL, failure, "check [broker] host, port, TLS and credentials")]
    found = [Finding("broker", OK, f"{broker.host}:{broker.port} reachable ({tls}, {user}), "
                                   f"as {broker.client_id!r}")]
    if not listen:
        return found
    if not skews:
        found.append(Finding("device clocks", OK, f"no sample with a ts on the pipelines' topics in {listen:g} s: "
                                                  "nothing to compare"))
        return found
    median = statistics.median(skews)
    if abs(median) > UNIX_SECONDS_DOUBT:
        found.append(Finding("device clocks", WARN, f"{len(skews)} sample(s): their ts is {median:+.3g} s off this "
                                                    "clock: not Unix seconds (milliseconds? uptime?)",
                             "send ts in seconds since 1970 (UTC), or leave it out"))
        return found
    detail = (f"{len(skews)} sample(s) in {listen:g} s: this clock minus their ts, median {median:+.3f} s, "
              f"range {min(skews):+.3f} .. {max(skews):+.3f} s")
    if abs(median) > CLOCK_SKEW_WARN:
        found.append(Finding("device clocks", WARN, detail + ": the devices' clocks and this one disagree",
                             "synchronise the devices' clocks (NTP/SNTP) and this machine's (timedatectl)"))
    else:
        found.append(Finding("device clocks", OK, detail))
    return found


def _ntp() -> Finding:
    """systemd's word on this machine's clock (no systemd: cannot tell, not a failure)."""
    if shutil.which("timedatectl") is None:
        return Finding("clock", OK, "timedatectl not found: NTP synchronisation not checked")
    try:
        answer = subprocess.run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"], capture_output=True,
                                text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired) as error:
        return Finding("clock", OK, f"timedatectl did not answer ({error}): NTP synchronisation not checked")
    value = answer.stdout.strip()
    if answer.returncode != 0 or value not in ("yes", "no"):
        return Finding("clock", OK, "systemd does not say whether the clock is synchronised (no timedated here)")
    if value == "no":
        return Finding("clock", WARN, "this machine's clock is not NTP-synchronised: sample times and TLS "
                                      "certificate checks depend on it", "timedatectl set-ntp true (and network "
                                      "access to an NTP server)")
    return Finding("clock", OK, "NTP-synchronised")


# ---- helpers ---------------------------------------------------------------------------------------------
def _not_writable(directory: Path, sync: bool = False) -> str | None:
    """Why a file cannot be written in ``directory`` (created if missing), or None."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".edgernn-doctor-") as file:
            file.write(b"x")
            file.flush()
            if sync:
                os.fsync(file.fileno())
    except OSError as error:
        return error.strerror or str(error)
    return None


def _user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def _filesystem(directory: Path) -> tuple[str, str]:
    """(filesystem type, mount point) of ``directory``, from /proc/mounts (the longest mount point above it)."""
    path = os.path.realpath(directory)
    best = ("unknown", "/")
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mount = parts[1].replace("\\040", " ")
                inside = path == mount or path.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best[1]):
                    best = (parts[2], mount)
    except OSError:
        pass
    return best


def report(findings: list[Finding]) -> str:
    """The findings as lines for a terminal: ``[ ok ] check: detail`` and, below a problem, what to do."""
    lines = []
    for finding in findings:
        lines.append(f"[{finding.status:^4}] {finding.check}: {finding.detail}")
        if finding.fix:
            lines.append(f"       fix: {finding.fix}")
    failed = sum(f.status == FAIL for f in findings)
    warned = sum(f.status == WARN for f in findings)
    lines.append(f"{failed} problem(s), {warned} warning(s)" if failed or warned else "all good")
    return "\n".join(lines)
