# Two commands a newcomer needs: `make demo` and `make test`. Each builds what it needs by itself.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch==2.13.0 is the CPU build (a plain `torch` can pull a multi-GB CUDA build).
DEV_INSTALL := -e '.[dev]' 'torch==2.13.0'

.PHONY: demo test bench broker clean clean-cache

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(DEV_INSTALL)
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/quickstart.py

test: $(VENV)/.installed broker
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) benchmarks/step_latency.py

# The daemon's tests start their own Mosquitto; install it where it is missing (Debian/Raspberry Pi OS).
broker:
	@command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && $$SUDO apt-get install -y -q mosquitto; }

# Numba caches compiled kernels beside the sources; the tests key theirs by a hash of the sources.
clean-cache:
	find . -path ./$(VENV) -prune -o \( -name '*.nbi' -o -name '*.nbc' \) -print -delete
	rm -rf .numba_cache

clean: clean-cache
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
