# The README's commands. `make demo` and `make test` set everything up from nothing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FASHION := /usr/share/datasets/fashion-mnist

.PHONY: demo test lint bench data clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --constraint constraints.txt --editable '.[dev,ray]'
	touch $@

# Fashion-MNIST from Debian when we may install packages; otherwise torchpurify downloads it.
data:
	@if [ ! -d $(FASHION) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
		{ apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }; \
	fi

demo: $(STAMP) data
	$(BIN)/torchpurify run configs/demo.yaml --results runs/demo/results.db --cache runs/demo/models
	$(BIN)/torchpurify report runs/demo/results.db --out runs/demo/report

test: $(STAMP) data
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP) data
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs demo
