# Two commands a newcomer needs: `make demo` and `make test`. Each builds what it needs by itself.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch==2.13.0 is the CPU build (a plain `torch` can pull a multi-GB CUDA build).
DEV_INSTALL := -e '.[dev]' 'torch==2.13.0'

.PHONY: demo test bench bench-daemon bench-fleet bench-cluster reliability broker clean clean-cache test-arm64

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(DEV_INSTALL)
	touch $@

# A simulated fleet streams into the bundled GRU through a local broker and `edgernn serve`, watched live.
demo: $(VENV)/.installed
	$(PY) -m edgernn demo $(ARGS)

test: $(VENV)/.installed broker
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) benchmarks/step_latency.py

# The daemon through a Mosquitto of its own, against a bare subscriber and a bare relay (needs mosquitto).
bench-daemon: $(VENV)/.installed broker
	$(PY) benchmarks/daemon_throughput.py

# How many simulated 50 Hz devices one core drives (needs mosquitto).
bench-fleet: $(VENV)/.installed broker
	$(PY) benchmarks/fleet_capacity.py

# Scale-out: 1, 2 and 3 workers behind a 3-node NATS cluster of its own, against a bare relay (needs nats-server).
bench-cluster: $(VENV)/.installed broker
	$(PY) benchmarks/cluster_throughput.py --json benchmarks/results/cluster_throughput.json

# The long reliability runs of docs/reliability.md (about an hour in all; `make test` runs their quick modes).
# Each writes its figures to benchmarks/results/reliability/<name>.json.
RELIABILITY := soak fuzz_live flood crash_cycles network_faults cluster_faults
reliability: $(VENV)/.installed broker
	mkdir -p benchmarks/results/reliability
	set -e; for script in $(RELIABILITY); do \
		$(PY) reliability/$$script.py --json benchmarks/results/reliability/$$script.json; done

# The daemon's tests start their own Mosquitto, the scale-out tests their own nats-server cluster; install
# them where they are missing (Debian/Raspberry Pi OS: nats-server 2.9 is the Debian 12 package).
broker:
	@command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && $$SUDO apt-get install -y -q mosquitto; }
	@command -v nats-server >/dev/null 2>&1 || test -x /usr/sbin/nats-server || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && $$SUDO apt-get install -y -q nats-server; }

# Tests on aarch64 (the Pi target) under qemu-user, in an arm64 Debian 12 chroot cached in
# /var/tmp/edgernn-arm64 (EDGERNN_ARM64_ROOT). Needs root; the first run builds the root (~6 min).
# Without ARGS: the smoke subset CI runs (imports, every kernel against its reference, the file format,
# the daemon against the root's Mosquitto; listed in scripts/test_arm64.sh). ARGS go to pytest instead,
# e.g. make test-arm64 ARGS='tests/test_cells.py -x', or ARGS=tests for the whole suite.
test-arm64:
	bash scripts/test_arm64.sh $(ARGS)

# Numba caches compiled kernels beside the sources; the tests key theirs by a hash of the sources.
clean-cache:
	find . -path ./$(VENV) -prune -o \( -name '*.nbi' -o -name '*.nbc' \) -print -exec rm -f {} +
	rm -rf .numba_cache

clean: clean-cache
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
