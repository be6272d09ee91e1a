# The two quickstart commands: `make run` (set up + the default experiment) and
# `make test` (set up + the test suite). Extra arguments for `flexlora run`: ARGS="...".
.PHONY: setup run test

setup:
	bash scripts/setup.sh

run: setup
	.venv/bin/flexlora run $(ARGS)

test: setup
	.venv/bin/python -m pytest $(PYTEST_ARGS)
