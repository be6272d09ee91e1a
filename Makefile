# The two quickstart commands: `make run` (set up + the default experiment) and
# `make test` (set up + the test suite). Extra arguments for `flexlora run`: ARGS="...".
# `make lint`: ruff's check and format check (configured in pyproject.toml), as CI runs them.
.PHONY: setup run test lint

setup:
	bash scripts/setup.sh

run: setup
	.venv/bin/flexlora run $(ARGS)

test: setup
	.venv/bin/python -m pytest $(PYTEST_ARGS)

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
