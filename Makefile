# make install | make test | make demo  -- everything runs from a fresh clone, CPU only.
# make test-fast: the inner loop (no slow, multi-process or GPU tests); make lint: ruff (pyproject.toml).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The venv's bin first on PATH: DeepSpeed's JIT ops (ninja) and the console script come from there.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install system-deps lint test test-fast demo demo-qa gpu-check gpu-wheels clean

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

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev,dali,wandb]"
	@echo "building DeepSpeed's CPU allreduce op once (about 2 minutes)"
	$(PY) -c "from singularity_ds.dist import build_ops; build_ops()"
	touch $(STAMP)

lint: install
	$(VENV)/bin/ruff check singularity_ds tests

# every test (markers and --strict-markers: pyproject.toml), after the lint
test: lint
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q -m "not slow and not multiproc and not gpu" tests

demo: install
	$(VENV)/bin/singularity-ds demo $(DEMO_ARGS)

demo-qa: install  # after `make demo`: video QA from its single-frame pretraining (~2.5 min)
	$(VENV)/bin/singularity-ds demo --qa

# One report (gpu-check/gpu_check.md + .json): gpu tests, bench train (MFU), end-to-end train from shards
# (data-wait), bench eval itm, bench kernels; <= 8 min on one H200 (docs/gpu-check.md). DRY=1: every step at
# CPU size, here. No install step: on the GPU machine the packages come as wheels (`make gpu-wheels`).
GPU_PY := $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_PY) -m singularity_ds.gpu_check --out $(or $(OUT),gpu-check) $(if $(filter 1,$(DRY)),--dry)

# The wheels the GPU machine lacks, packed into loads of < 64 MiB per device call; DALI=1 adds DALI (~200 MB).
gpu-wheels: install
	$(PY) -m singularity_ds.gpu_wheels prepare $(if $(filter 1,$(DALI)),--dali)

clean:
	rm -rf $(VENV) *.egg-info
