# make install | make test | make demo  -- everything runs from a fresh clone, CPU only.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The venv's bin first on PATH: DeepSpeed's JIT ops (ninja) and the console script come from there.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q tests

demo: install
	$(VENV)/bin/singularity-ds demo

clean:
	rm -rf $(VENV) *.egg-info
