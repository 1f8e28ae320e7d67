# `make demo` and `make test` each build .venv (Python >= 3.12), install requirements.txt, and run.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# loadgroup: tests sharing an expensive module fixture (xdist_group) run on one worker, so it is built once.
PYTEST_ARGS ?= -n 2 --dist loadgroup

.PHONY: demo test venv clean-venv

venv: $(STAMP)

$(STAMP): requirements.txt
	@py=$$(scripts/find_python.sh) || exit 1; \
	echo "using $$py ($$($$py --version))"; \
	[ -x $(PY) ] || $$py -m venv $(VENV); \
	$(PY) -m pip install -q --upgrade pip && \
	$(PY) -m pip install -q -r requirements.txt && touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The smoke suite: every variant of the three sweeps as a tiny model on the embedded corpus (CPU minutes);
# prints the three tables (results/efficientllm_benchmark/). Two variants at a time (the tables say their time
# figures were contended). Finished variants are skipped on a rerun.
demo: $(STAMP)
	$(PY) -m launch.bench all --scale=smoke --jobs=2

clean-venv:
	rm -rf $(VENV)
