# The README's two commands: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test test-all lint bench parity clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sweep run studies/quickstart.yaml
	$(BIN)/sweep report results/quickstart --html results/quickstart/_report/report.html
	@echo "HTML report: $(CURDIR)/results/quickstart/_report/report.html"

# pytest exits 5 when it collected no test: that is a failure here, not a pass.
test: $(STAMP)
	@$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

test-all: $(STAMP)
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/python -m ruff check sweep models data tests bench
	$(BIN)/python -m ruff format --check sweep models data tests bench

bench: $(STAMP)
	$(BIN)/python bench/patchcore_fit.py
	$(BIN)/python bench/engine_overhead.py

# bench/parity.py runs anomalib 2.7 (the field's reference) beside the zoo; it lives in a venv of
# its own so that no test can come to depend on it.
PARITY_VENV ?= .venv-parity
$(PARITY_VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(PARITY_VENV)/bin/python || $(PYTHON) -m venv $(PARITY_VENV)
	$(PARITY_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PARITY_VENV)/bin/python -m pip install --quiet -c constraints.txt -e '.[parity]'
	@touch $@

parity: $(PARITY_VENV)/.installed
	$(PARITY_VENV)/bin/python bench/parity.py

clean:
	rm -rf results .pytest_cache .ruff_cache
