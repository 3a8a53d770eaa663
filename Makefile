# Fulcrum: the two commands are `make up` and `make test`; both run `make setup` first.
.PHONY: setup up test lint bench-overhead clean

PY := .venv/bin/python
ARGS ?=

setup:
	@bash deploy/setup.sh

up: setup
	$(PY) -m deploy.cli up $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

lint: setup
	.venv/bin/ruff check .

bench-overhead: setup
	$(PY) -m benchmarks.gateway_overhead $(ARGS)

clean:
	rm -rf .fulcrum .pytest_cache
