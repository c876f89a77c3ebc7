# The README's commands. `make demo` and `make test` set everything up from nothing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FASHION := /usr/share/datasets/fashion-mnist

.PHONY: demo test lint bench data clean dev-image dev-audio eval-image eval-audio confirm-image \
	confirm-audio docs docs-pages

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
	$(BIN)/torchpurify run configs/demo.yaml --results runs/demo/results.db --cache runs/demo/models \
		--executor ray --cpus-per-task 1
	$(BIN)/torchpurify report runs/demo/results.db --out runs/demo/report

# Development and evaluation cells (docs/methods.md §12.1); each spec file ≤ 90 min on 2 cores.
RUN_GRID = $(BIN)/torchpurify run --executor ray --cpus-per-task 1
dev-image dev-audio: $(STAMP) data
	$(RUN_GRID) configs/$@.yaml --results docs/results/$@/results.db --cache runs/$@/models
	$(RUN_GRID) configs/$@-candidates.yaml --results docs/results/$@/results.db --cache runs/$@/models
	$(BIN)/torchpurify report docs/results/$@/results.db --out docs/results/$@/report --force

eval-image: $(STAMP) data
	for part in eval-image eval-image-controls; do \
		$(RUN_GRID) configs/$$part.yaml --results docs/results/eval-image/results.db \
			--cache runs/eval-image/models || exit 1; \
	done
	$(BIN)/torchpurify report docs/results/eval-image/results.db --out docs/results/eval-image/report --force

eval-audio: $(STAMP) data
	for part in eval-audio-seed0 eval-audio-seed1 eval-audio-seed2 eval-audio-res8; do \
		$(RUN_GRID) configs/$$part.yaml --results docs/results/eval-audio/results.db \
			--cache runs/eval-audio/models || exit 1; \
	done
	$(BIN)/torchpurify report docs/results/eval-audio/results.db --out docs/results/eval-audio/report --force

# The confirmation grid on seeds 3-5 (methods.md §12.1): resumable parts, models cached (and
# committed) beside the store so every cell's weights can be re-read; then the report.
CONFIRM_IMAGE = confirm-image-seed3 confirm-image-baselines-seed3 confirm-image-seed4 \
	confirm-image-baselines-seed4 confirm-image-seed5 confirm-image-baselines-seed5
CONFIRM_AUDIO = confirm-audio-seed3a confirm-audio-seed3b confirm-audio-seed4a confirm-audio-seed4b \
	confirm-audio-seed5a confirm-audio-seed5b confirm-audio-res8a confirm-audio-res8b
confirm-image confirm-audio: $(STAMP) data
	for part in $(if $(filter confirm-image,$@),$(CONFIRM_IMAGE),$(CONFIRM_AUDIO)); do \
		$(RUN_GRID) configs/$$part.yaml --results docs/results/$@/results.db \
			--cache docs/results/$@/models || exit 1; \
	done
	$(BIN)/torchpurify report docs/results/$@/results.db --out docs/results/$@/report --force

test: $(STAMP) data
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

# The docs site (mkdocs.yml) into site/: the generated tables of docs/ must be current (the
# defaults and their sources, the § index, the home page from README.md; `make docs-pages`
# rewrites them), then mkdocs with warnings as errors. The API pages read src/ statically.
DOCS_STAMP := $(VENV)/.docs-installed
$(DOCS_STAMP): $(STAMP)
	$(BIN)/pip install --quiet --constraint constraints.txt --editable '.[docs]'
	touch $@

docs: $(DOCS_STAMP)
	$(BIN)/python docs/tools/pages.py --check
	$(BIN)/mkdocs build --strict --site-dir site

docs-pages: $(STAMP)
	$(BIN)/python docs/tools/pages.py

bench: $(STAMP) data
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs demo site
