"""`edgernn warmup`: fills the config's compile cache, proves a second process loads it, and `serve` uses it.

A fresh cache under tmp_path means one cold compile of the daemon's kernels (tens of seconds on two
cores). NUMBA_CACHE_DIR (set by conftest.py) stays in the environment: the config's compile_cache wins
over it, which is part of what is tested. No timings are asserted; the benchmark is in README.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from daemon_harness import write_config, write_model

from edgernn.runtime.compile_cache import compile_cache_dir
from edgernn.runtime.config import load_config


def edgernn_command(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgernn", *args], capture_output=True, text=True, timeout=1200,
                          env=env)


def cache_files(directory: Path) -> set[Path]:
    return {path for path in directory.rglob("*") if path.is_file()}


def test_warmup_fills_the_configured_cache_and_a_second_run_starts_warm(tmp_path):
    write_model(tmp_path / "model.ern", cell="lstm", hidden=16)
    cache = tmp_path / "kernels"
    config = write_config(tmp_path, 1883, state=f'compile_cache = "{cache}"')
    assert os.environ.get("NUMBA_CACHE_DIR") and not str(cache).startswith(os.environ["NUMBA_CACHE_DIR"])

    cold = edgernn_command("warmup", "--config", str(config), "--json", str(tmp_path / "cold.json"))
    assert cold.returncode == 0, cold.stderr
    assert f"compile cache: {cache} (the config's [state] compile_cache)" in cold.stdout
    assert "first process (cold)" in cold.stdout and "second process (warm)" in cold.stdout, cold.stdout
    assert "from process start to the first prediction" in cold.stdout
    report = json.loads((tmp_path / "cold.json").read_text())
    first, second = report["runs"]
    assert first["compiled"] > 0 and not first["warm"]
    assert second["compiled"] == 0 and second["loaded"] > 0 and second["warm"]
    assert 0 < first["first_prediction"] <= first["total"] and 0 < second["first_prediction"] <= second["total"]
    assert all(Path(path).is_relative_to(cache) for path in first["cache_paths"] + second["cache_paths"])
    filled = cache_files(cache)
    assert any(path.suffix == ".nbi" for path in filled) and any(path.suffix == ".nbc" for path in filled)

    warm = edgernn_command("warmup", "--config", str(config), "--json", str(tmp_path / "warm.json"))
    assert warm.returncode == 0, warm.stderr
    assert "first process (warm)" in warm.stdout and "second process" not in warm.stdout, warm.stdout
    (only,) = json.loads((tmp_path / "warm.json").read_text())["runs"]
    assert only["compiled"] == 0 and only["loaded"] == second["loaded"]
    assert cache_files(cache) == filled, "a warm run wrote new cache files"

    # `serve` hands Numba the same directory (checked in its own process, where numba reads it at import)
    check = edgernn_command("serve", "--config", str(config), "--check")
    assert check.returncode == 0, check.stderr
    assert f"edgernn: compile cache: {cache} (the config's [state] compile_cache)" in check.stderr


def test_without_compile_cache_the_environment_then_the_state_dir_decides(tmp_path):
    write_model(tmp_path / "model.ern")
    state = load_config(write_config(tmp_path, 1883)).state
    assert state.compile_cache is None
    assert compile_cache_dir(state, {"NUMBA_CACHE_DIR": "/var/cache/edgernn"}) == (
        Path("/var/cache/edgernn"), "NUMBA_CACHE_DIR in the environment")
    assert compile_cache_dir(state, {})[0] == tmp_path / "state" / "numba-cache"
    given = load_config(write_config(tmp_path, 1883, state='compile_cache = "kernels"')).state
    assert compile_cache_dir(given, {"NUMBA_CACHE_DIR": "/elsewhere"})[0] == tmp_path / "kernels"

    write_config(tmp_path, 1883)  # `serve` with neither: the state dir's numba-cache
    env = {name: value for name, value in os.environ.items() if name != "NUMBA_CACHE_DIR"}
    check = edgernn_command("serve", "--config", str(tmp_path / "edgernn.toml"), "--check", env=env)
    assert check.returncode == 0, check.stderr
    assert (f"compile cache: {tmp_path / 'state' / 'numba-cache'} (the default, [state] dir/numba-cache)"
            in check.stderr)


def test_warmup_refuses_a_cache_it_cannot_create(tmp_path):
    write_model(tmp_path / "model.ern")
    (tmp_path / "file").write_text("not a directory")
    config = write_config(tmp_path, 1883, state=f'compile_cache = "{tmp_path / "file" / "cache"}"')
    done = edgernn_command("warmup", "--config", str(config))
    assert done.returncode == 1
    assert f"compile cache {tmp_path / 'file' / 'cache'} (the config's [state] compile_cache): cannot create it" \
        in done.stderr


def test_warmup_without_numba_has_nothing_to_compile(tmp_path):
    write_model(tmp_path / "model.ern")
    config = write_config(tmp_path, 1883, state=f'compile_cache = "{tmp_path / "kernels"}"')
    done = edgernn_command("warmup", "--config", str(config), env=dict(os.environ, EDGERNN_DISABLE_NUMBA="1"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("nothing to compile: the kernels are numpy")
    assert not (tmp_path / "kernels").exists()


def test_config_errors_name_the_file_and_key(tmp_path):
    write_model(tmp_path / "model.ern")
    config = write_config(tmp_path, 1883, state="compile_cache = 3")
    done = edgernn_command("warmup", "--config", str(config))
    assert done.returncode == 1
    assert f"{config}: state.compile_cache: must be a string, got integer 3" in done.stderr


def test_the_systemd_unit_warms_up_before_it_serves():
    from test_sdnotify import UNIT, unit_directives

    service = {key: values for (section, key), values in unit_directives(UNIT.read_text()).items()
               if section == "Service"}
    assert service["ExecStartPre"] == ["/opt/edgernn/.venv/bin/edgernn warmup --config /etc/edgernn/edgernn.toml"]
    assert service["ExecStart"] == ["/opt/edgernn/.venv/bin/edgernn serve --config /etc/edgernn/edgernn.toml"]
    # warmup and serve share the cache the unit makes writable (the example config leaves compile_cache unset)
    assert "NUMBA_CACHE_DIR=/var/cache/edgernn" in service["Environment"] and service["CacheDirectory"] == ["edgernn"]
