# The two commands of the README: `make demo` and `make test`. Both install first (once).
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: install demo test test-fast

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install.sh scripts/constraints.txt scripts/build_ops.py
	bash scripts/install.sh $(VENV)
	touch $@

demo: install
	$(VENV)/bin/ftl demo

test: install
	$(VENV)/bin/python -P -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(VENV)/bin/python -P -m pytest -q -m "not slow and not multiprocess" $(PYTEST_ARGS)
