# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create (or reuse) the virtual environment in .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-all install clean bases

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m lit_amdet.demo

test: $(STAMP)
	$(PY) -m pytest -q

# only the tests marked slow (the real MiniLM backdoored-vs-benign scan); .ci/run runs them after `make test`
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# everything, slow tests included
test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

clean:
	rm -rf $(VENV) .pytest_cache runs lightning_logs

# the world's pretrained bases (CLIP, SigLIP, LongCLIP, open_clip) in .cache/bases; cached
bases: $(STAMP)
	$(PY) -m lit_amdet.bases --cache .cache/bases
