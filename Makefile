# Two entry points: `make demo` and `make test`. Both create .venv if missing and install bitsmith into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bitsmith-installed

.PHONY: demo test install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch 2.13.0 CPU comes from the local wheel when no torch is present (a loose pin would pull CUDA packages).
$(STAMP): $(PY) pyproject.toml
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bitsmith demo

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest tests

clean:
	rm -rf $(VENV)
