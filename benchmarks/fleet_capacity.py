"""How many simulated devices one core drives at 50 Hz without falling behind (`edgernn simulate`'s fleet).

Run from the repository root::

    .venv/bin/python benchmarks/fleet_capacity.py            # 10 s per step
    .venv/bin/python benchmarks/fleet_capacity.py --quick    # 3 s per step, a coarser search (~1 min)

The script starts its own Mosquitto (tests/broker.py: a free loopback port, never the system broker) and
runs each step in a fresh process: a `Fleet` of N ``imu`` devices at ``--rate`` Hz (QoS ``--qos``), one
thread. With two or more CPUs the fleet process is pinned to CPU 0 and Mosquitto to CPU 1, so "one core"
means one core for the fleet, and the broker's CPU use is measured beside it (from /proc).

A step is *sustained* when the fleet took at least 99 % of the samples due (``achieved_ratio``) and at
most 1 % of them later than one sample period (``late_samples``: the loop fell behind its schedule).
The device count doubles from ``--start`` until a step fails, then bisects between the last sustained
and the first failed count. The answer is the largest sustained count; the fleet's CPU per message is
reported too, since on a shared machine a step can fail for want of CPU time rather than cost.
Results: printed, and written to benchmarks/results/fleet_capacity.json (``--json`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # tests/broker.py (Mosquitto)

from proc import cpu_seconds  # noqa: E402 -- benchmarks/proc.py, beside this script

ACHIEVED_MIN = 0.99
LATE_MAX = 0.01


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 s steps, coarser search")
    parser.add_argument("--duration", type=float, help="seconds per step (default 10, quick 3)")
    parser.add_argument("--rate", type=float, default=50.0, help="samples per second per device (default 50)")
    parser.add_argument("--qos", type=int, choices=(0, 1), default=1)
    parser.add_argument("--start", type=int, default=25, help="first device count (default 25)")
    parser.add_argument("--max", type=int, default=4000, help="largest device count tried (default 4000)")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "fleet_capacity.json"))
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # one step, in its own process
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    duration = args.duration or (3.0 if args.quick else 10.0)
    if args.child:
        return child(args, duration)
    return ramp(args, duration)


def child(args, duration: float) -> int:
    """One step: a fleet of ``args.child`` devices; prints its stats and CPU time as JSON."""
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    from edgernn.firmware_sim.fleet import Fleet

    fleet = Fleet("imu", args.child, args.rate, port=args.port, seed=0, qos=args.qos, connect_wait=30.0)
    fleet.start(duration)
    cpu = time.process_time()
    fleet.wait()
    cpu = time.process_time() - cpu
    stats = fleet.stop()
    stats["fleet_cpu_s"] = round(cpu, 3)
    print(json.dumps(stats))
    return 0


def step(devices: int, args, duration: float, broker, fleet_cpu: int | None) -> dict:
    command = [sys.executable, __file__, "--child", str(devices), "--port", str(broker.port), "--rate",
               str(args.rate), "--qos", str(args.qos), "--duration", str(duration)]
    if fleet_cpu is not None:
        command += ["--cpu", str(fleet_cpu)]
    broker_before = cpu_seconds(broker.process.pid)
    load = os.getloadavg()[0]
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 120)
    if done.returncode != 0:
        raise RuntimeError(f"step with {devices} devices failed:\n{done.stderr}")
    stats = json.loads(done.stdout.strip().splitlines()[-1])
    broker_cpu = cpu_seconds(broker.process.pid) - broker_before
    elapsed = stats["elapsed_s"]
    late = stats["lag"]["late_samples"] / max(1, stats["samples"])
    messages = stats["published"]
    return {
        "devices": devices, "target_msgs_per_s": round(devices * args.rate), "elapsed_s": elapsed,
        "achieved_ratio": stats["achieved_ratio"], "late_fraction": round(late, 4),
        "lag_max_ms": stats["lag"]["max_ms"], "lag_p99_ms_at_most": stats["lag"]["p99_ms_at_most"],
        "published": messages, "acked": stats["acked"],
        "fleet_cpu_share": round(stats["fleet_cpu_s"] / elapsed, 3) if elapsed else None,
        "fleet_cpu_us_per_msg": round(stats["fleet_cpu_s"] / messages * 1e6, 1) if messages else None,
        "broker_cpu_share": round(broker_cpu / elapsed, 3) if elapsed else None,
        "load_average_1m_before": round(load, 2),
        "sustained": (stats["achieved_ratio"] or 0) >= ACHIEVED_MIN and late <= LATE_MAX,
    }


def ramp(args, duration: float) -> int:
    from broker import Mosquitto

    cpus = sorted(os.sched_getaffinity(0))
    fleet_cpu = cpus[0] if len(cpus) >= 2 else None
    with tempfile.TemporaryDirectory() as directory:
        broker = Mosquitto(Path(directory)).start()
        try:
            if len(cpus) >= 2:
                os.sched_setaffinity(broker.process.pid, {cpus[1]})
            steps = search(args, duration, broker, fleet_cpu)
        finally:
            broker.stop()
    sustained = [s["devices"] for s in steps if s["sustained"]]
    capacity = max(sustained) if sustained else 0
    best = max((s for s in steps if s["sustained"]), key=lambda s: s["devices"], default=None)
    per_msg = [s["fleet_cpu_us_per_msg"] for s in steps if s["fleet_cpu_us_per_msg"]]
    result = {
        "benchmark": "fleet_capacity", "profile": "imu", "rate_hz": args.rate, "qos": args.qos,
        "step_duration_s": duration, "quick": args.quick,
        "criteria": f"achieved_ratio >= {ACHIEVED_MIN} and late_fraction <= {LATE_MAX} (late: > 1 period)",
        "capacity_devices": capacity,
        "capacity_msgs_per_s": round(capacity * args.rate),
        "fleet_pinned_to_cpu": fleet_cpu, "broker_pinned_to_cpu": cpus[1] if len(cpus) >= 2 else None,
        "broker_cpu_share_at_capacity": best["broker_cpu_share"] if best else None,
        "fleet_cpu_us_per_msg_median": sorted(per_msg)[len(per_msg) // 2] if per_msg else None,
        "steps": steps,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "paho_mqtt": _version("paho-mqtt"), "mosquitto": _mosquitto_version()},
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(f"\ncapacity: {capacity} devices at {args.rate:g} Hz (QoS {args.qos}) = {capacity * args.rate:,.0f} msg/s "
          f"from one thread on one core; the broker used {result['broker_cpu_share_at_capacity']} of another core; "
          f"the fleet costs ~{result['fleet_cpu_us_per_msg_median']} us of CPU per message")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


def search(args, duration: float, broker, fleet_cpu: int | None) -> list[dict]:
    """Double until a step fails, then bisect to within 10 % (25 % with --quick)."""
    steps: list[dict] = []
    print(f"{'devices':>8}{'msg/s':>8}{'achieved':>10}{'late':>8}{'p99 lag':>9}{'max lag':>10}"
          f"{'fleet cpu':>11}{'us/msg':>8}{'broker cpu':>12}{'load':>6}  sustained")

    def run(devices: int) -> bool:
        result = step(devices, args, duration, broker, fleet_cpu)
        steps.append(result)
        print(f"{devices:>8}{result['target_msgs_per_s']:>8}{result['achieved_ratio']:>10.4f}"
              f"{result['late_fraction']:>8.2%}{str(result['lag_p99_ms_at_most']) + ' ms':>9}"
              f"{result['lag_max_ms']:>8.0f} ms{result['fleet_cpu_share']:>11.2f}{result['fleet_cpu_us_per_msg']:>8}"
              f"{result['broker_cpu_share']:>12.2f}{result['load_average_1m_before']:>6}  {result['sustained']}",
              flush=True)
        return result["sustained"]

    good, bad = 0, None
    devices = args.start
    while devices <= args.max:
        if not run(devices):
            bad = devices
            break
        good = devices
        devices *= 2
    tolerance = 0.25 if args.quick else 0.10
    while bad is not None and bad - good > max(5, tolerance * good):
        middle = (good + bad) // 2
        if run(middle):
            good = middle
        else:
            bad = middle
    return steps


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _mosquitto_version() -> str | None:
    from broker import mosquitto_binary

    binary = mosquitto_binary()
    if binary is None:
        return None
    done = subprocess.run([binary, "-h"], capture_output=True, text=True)
    first = (done.stdout or done.stderr).splitlines()
    return first[0] if first else None


if __name__ == "__main__":
    sys.exit(main())
