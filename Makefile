# One command for each chore. `make install` once, then the others.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install lint test run fake-api bench floor soak browser-check systemd-test lock clean

$(PY):
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'

install: $(PY)

lint: $(PY)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples
	$(VENV)/bin/mypy

test: $(PY)
	$(PY) -m pytest -q

run: $(PY)
	$(VENV)/bin/valmi-sidecar run

fake-api: $(PY)
	$(VENV)/bin/valmi-sidecar fake-api

# Ingest, peer queue, forwarding, backlog, footprint, side by side, then `make floor` (about
# 50 minutes; not in CI). Writes benchmarks/results/bench.{md,json,png} and floor.{md,json}.
# Uses wrk when installed (apt-get install wrk).
bench: $(PY)
	$(VENV)/bin/pip install --quiet -e '.[bench]'
	$(PY) benchmarks/run.py
	$(PY) benchmarks/floor_compare.py

# CPU per delivered event against a lean floor (benchmarks/floor.py) and bare aiohttp, paced
# at 10, 100 and 1,000 events/s (each after a 3 s closed loop, so on processes that have run)
# and in a closed loop, 3 interleaved rounds, the floor measured
# twice in each as the run's own noise (about 20 minutes;
# not in CI; needs wrk). Writes benchmarks/results/floor.{md,json}.
floor: $(PY)
	$(VENV)/bin/pip install --quiet -e '.[bench]'
	$(PY) benchmarks/floor_compare.py

# Ten minutes of steady load with upstream faults coming and going (not in CI).
soak: $(PY)
	$(PY) benchmarks/soak.py --duration-s 600

# The web-page attacks replayed by a real headless Chromium (not in CI; apt-get install chromium).
browser-check: $(PY)
	$(PY) benchmarks/browser_check.py

# The systemd unit under a real systemd as PID 1 in a container (not in CI; needs root,
# a running Docker engine and debootstrap): readiness, watchdog, journal, SIGHUP, stop,
# SIGKILL restart, a configuration error, the data directory's modes.
systemd-test: $(PY)
	bash .ci/systemd-test $(VENV)

# The image's dependencies and build backend, pinned with hashes (requirements/*.txt, which
# the Dockerfile installs with --require-hashes), from pyproject.toml. Rebuild the image after.
LOCK := $(VENV)/bin/uv pip compile --generate-hashes --universal --python-version 3.11 \
	--custom-compile-command "make lock"
lock: $(PY)
	$(VENV)/bin/pip install --quiet uv
	$(LOCK) pyproject.toml -o requirements/image.txt
	echo hatchling | $(LOCK) - -o requirements/build.txt

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache dist
