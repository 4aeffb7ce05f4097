# make install | make test | make demo  -- everything runs from a fresh clone, CPU only.
# make test-fast: the inner loop (no slow, multi-process or GPU tests); make lint: ruff (pyproject.toml) and
# the lock check. make test-latest: the canary (newest releases setup.py allows); make lock: move the lock.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The exact set `make install` installs (.ci/lockfile.py says how it is made and checked).
LOCK   := requirements.lock
# LOCKED=0: install the newest releases setup.py's ranges allow instead (the canary's venv)
LOCKED ?= 1
LATEST := .venv-latest
EXTRAS := dev,dali,wandb
# The venv's bin first on PATH: DeepSpeed's JIT ops (ninja) and the console script come from there.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install system-deps lint test test-fast test-latest lock demo demo-qa gpu-check wheelhouse clean

install: system-deps $(STAMP)

# Debian's SLURM for the launcher test (a real 2-node cluster on localhost); needs root and apt.
system-deps:
	@command -v slurmctld >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing slurmctld slurmd slurm-client (apt)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client >/dev/null; \
	  else echo "note: SLURM not installed (needs root and apt): its launcher test will be skipped"; fi; }
# Debian's chromium and its driver for the search page's browser test (selenium drives them).
	@command -v chromedriver >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing chromium chromium-driver (apt)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "note: chromium not installed (needs root and apt): the browser test will be skipped"; fi; }

# Locked: the lock's pip first, then every package at the lock's version with nothing resolved (--no-deps),
# the sdists' build environments (deepspeed, iscc-samples, this project) held to the lock's setuptools, wheel
# and poetry-core (--build-constraint);
# packages the lock lacks are removed, then `pip check` and the venv == lock comparison prove the set whole.
$(STAMP): setup.py $(if $(filter 1,$(LOCKED)),$(LOCK))
ifeq ($(LOCKED),1)
	@$(PYTHON) .ci/lockfile.py platform $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $$(grep -E '^pip==' $(LOCK))
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --build-constraint $(LOCK) -r $(LOCK)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --build-constraint $(LOCK) -e .
	@extra="$$($(PY) .ci/lockfile.py extra $(LOCK))"; if [ -n "$$extra" ]; then \
	  echo "removing packages the lock does not have: $$extra"; $(PY) -m pip uninstall -q -y $$extra; fi
	$(PY) .ci/lockfile.py verify $(LOCK)
else
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# the newest pip and build backends, installed so that the lock records the versions the builds used
	$(PY) -m pip install -q --disable-pip-version-check -U pip setuptools wheel poetry-core
	$(PY) -m pip install -q --disable-pip-version-check -U -e ".[$(EXTRAS)]"
endif
	@echo "building DeepSpeed's CPU allreduce op once (about 2 minutes)"
	$(PY) -c "from singularity_ds.dist import build_ops; build_ops()"
	touch $(STAMP)

lint: install
	$(VENV)/bin/ruff check singularity_ds tests .ci
	$(PY) .ci/lockfile.py check setup.py $(LOCK)

# every test (markers and --strict-markers: pyproject.toml), after the lint
test: lint
	$(PY) -m pytest -q --durations=40 tests

test-fast: install
	$(PY) -m pytest -q $(PYTEST_ARGS) -m "not slow and not multiproc and not gpu" tests

# The canary: a throw-away venv with the newest releases setup.py allows, `make test-fast` in it, then which
# packages differ from the lock and what failed. Passing, `make lock` moves the lock to that venv's set.
test-latest:
	rm -rf $(LATEST)
	$(MAKE) --no-print-directory install VENV=$(LATEST) LOCKED=0
	@rc=0; $(MAKE) --no-print-directory test-fast VENV=$(LATEST) LOCKED=0 PYTEST_ARGS="-rfE" || rc=$$?; \
	  echo $$rc > $(LATEST)/test-fast.rc; echo; \
	  $(LATEST)/bin/python .ci/lockfile.py diff $(LOCK); \
	  if [ $$rc = 0 ]; then echo "test-latest: test-fast passed on the newest releases (make lock moves the lock there)"; \
	  else echo "test-latest: test-fast FAILED on the newest releases (exit $$rc; the failures are listed above)"; fi; \
	  exit $$rc

# Writes the lock from the venv `make test-latest` built and tested (it must have passed).
lock:
	@test "$$(cat $(LATEST)/test-fast.rc 2>/dev/null)" = 0 || { \
	  echo "make lock: no passing canary venv in $(LATEST): run make test-latest first (the lock is the set it tested)"; exit 2; }
	$(LATEST)/bin/python .ci/lockfile.py write $(LOCK)
	$(LATEST)/bin/python .ci/lockfile.py check setup.py $(LOCK)

demo: install
	$(VENV)/bin/singularity-ds demo $(DEMO_ARGS)

demo-qa: install  # after `make demo`: video QA from its single-frame pretraining (~2.5 min)
	$(VENV)/bin/singularity-ds demo --qa

# One report (gpu-check/gpu_check.md + .json): gpu tests, bench train (MFU), end-to-end train from shards
# (data-wait), bench eval itm, bench kernels; <= 8 min on one H200 (docs/gpu-check.md). DRY=1: every step at
# CPU size. No install step: a node without the package index installs from a wheelhouse (`make wheelhouse`).
GPU_PY := $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_PY) -m singularity_ds.gpu_check --out $(or $(OUT),gpu-check) $(if $(filter 1,$(DRY)),--dry)

# An offline install for nodes that cannot reach the package index: every wheel of the lock for a target
# Python and platform in one folder (docs/install.md). WHEELHOUSE_ARGS: --python 3.12, --platform TAG,
# --exclude torch ..., --only NAME ..., --part-size 2GB.
WHEELHOUSE ?= wheelhouse
wheelhouse: install
	$(PY) -m singularity_ds.wheelhouse build $(WHEELHOUSE) --lock $(LOCK) $(WHEELHOUSE_ARGS)

clean:
	rm -rf $(VENV) $(LATEST) *.egg-info
