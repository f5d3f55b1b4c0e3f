# The two commands of the README: `make demo` and `make test`. Both install first (once).
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: install artifacts demo test test-fast gpu-wheels

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install.sh scripts/constraints.txt scripts/build_ops.py scripts/fetch_artifacts.py
	bash scripts/install.sh $(VENV)
	touch $@

# Real SmolLM2-135M-Instruct, tokenizers and chat templates ($$FTL_ARTIFACTS, default ~/.cache/ftl/artifacts).
artifacts: install
	$(VENV)/bin/python scripts/fetch_artifacts.py

demo: install
	$(VENV)/bin/ftl demo

# The Slurm tests run beside the others (scripts/test.sh): they mostly wait on slurmctld.
test: install
	bash scripts/test.sh $(VENV)/bin/python $(PYTEST_ARGS)

test-fast: install
	$(VENV)/bin/python -P -m pytest -q -m "not slow and not multiprocess" $(PYTEST_ARGS)

# What benchmarks/gpu_check.py installs on a lent GPU machine (no registry there): .whl/, at most 50 MiB.
gpu-wheels:
	bash scripts/gpu_wheels.sh
