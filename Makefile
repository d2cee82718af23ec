# The two entry points a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_DATABASE_URL ?= postgresql+psycopg://postgres@127.0.0.1:5432/test

.PHONY: run test lint typecheck test-sqlite test-postgres bench openapi clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# `make run PORT=8001` when 8000 is taken: the links in mails and the pages' forms follow
# (NEWSLETTER_PUBLIC_URL, unless it is set).
PORT ?= 8000
run: $(STAMP)
	NEWSLETTER_PUBLIC_URL="$${NEWSLETTER_PUBLIC_URL:-http://127.0.0.1:$(PORT)}" $(BIN)/newsletter serve --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy --strict app

test-sqlite: $(STAMP)
	@echo "== test suite on SQLite =="
	TEST_DATABASE_URL= $(BIN)/pytest -q

test-postgres: $(STAMP)
	@echo "== test suite on PostgreSQL ($(TEST_DATABASE_URL)) =="
	TEST_DATABASE_URL=$(TEST_DATABASE_URL) $(BIN)/pytest -q

# The two databases' runs side by side (each one's output shown whole when it ends): much
# of a run is waiting (servers starting, browsers, timeouts), so on two cores the pair
# takes little longer than the longer of the two.
test: lint typecheck
	@$(MAKE) --no-print-directory -j2 --output-sync=target test-sqlite test-postgres

# The performance suite (bench/README.md): `make bench BENCH_ARGS=--quick` for a short run.
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

openapi: $(STAMP)
	$(BIN)/newsletter openapi --output openapi.json

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
