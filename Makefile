# Two commands on a fresh machine:  `make run` (default simulation)  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint install protos bench

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@if [ -n "$(TORCH)" ]; then $(PY) -m pip install -q torch==2.13.0 || \
		echo "torch==2.13.0 not installable here: torch reference tests will be skipped"; fi
	@if [ -n "$(TORCH)" ]; then $(PY) -m pip install -q -e '.[lora]' || \
		echo "peft not installable here: the LoRA example's test will be skipped"; fi
	touch $@

install: $(STAMP)

# The demo needs fedpipe alone (numpy, grpcio, protobuf, pydantic), not the dev tools.
RUN_STAMP := $(VENV)/.installed-core
$(RUN_STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

run: $(RUN_STAMP)
	$(VENV)/bin/fedpipe simulate

lint: $(STAMP)
	$(VENV)/bin/ruff check fedpipe tests benchmarks
	$(VENV)/bin/ruff format --check fedpipe tests benchmarks
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest

protos: $(STAMP)
	$(PY) -m fedpipe.proto.generate

bench: $(STAMP)
	$(PY) benchmarks/run_all.py
