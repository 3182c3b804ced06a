# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create (or reuse) the virtual environment in .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-all install clean bases benchmark-quick benchmark-minilm benchmark-world benchmarks

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m lit_amdet.demo

# two pytest-xdist workers, a test file to each (a module's fixtures built once), one torch thread each (conftest.py):
# the suite keeps about 1.2 of 2 cores busy run serially (13.5 against 9.8 minutes on session 2026-12-07 (n)'s cores)
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

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

# the quick detection benchmark (the real MiniLM; no `make bases`), its figures and the speed baseline:
# every "quick" table of BENCHMARKS.md. Resumable; about 2 h on 2 CPU cores.
QUICK_ZOO := runs/benchmark_quick/zoo
benchmark-quick: $(STAMP)
	$(VENV)/bin/lit-amdet benchmark --config configs/benchmark_quick.yaml
	$(PY) benchmarks/figures.py $(foreach i,000 001 002 003,--backdoored $(QUICK_ZOO)/minilm-test-backdoored-$(i)) \
		--benign $(QUICK_ZOO)/minilm-test-benign-000 --out benchmarks/figures --tensorboard runs/figures/tb
	$(PY) benchmarks/reference_scan.py --models $(QUICK_ZOO)/minilm-test-backdoored-000 \
		$(QUICK_ZOO)/minilm-test-benign-000 --anchor minilm --probe-prompts 1000 --max-length 32 --grid 50 --epochs 2 \
		--out benchmarks/results/reference_speed.json

# the MiniLM benchmark at the issue's size (a 20 + 20 test zoo, 3 adaptive attacks), two processes on a 2-core CPU
# (DDP, one torch thread each). Resumable. 1 h 50 min on 2 free CPU cores given the quick zoo's 14 members of the
# same plans (calibration, controls, 4 adaptive; see BENCHMARKS.md); about 2 h 25 min from nothing (estimate).
benchmark-minilm: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/lit-amdet benchmark --config configs/benchmark_minilm.yaml \
		--trainer.accelerator cpu --trainer.strategy ddp --trainer.devices 2

# the world-base families (CLIP, SigLIP, LongCLIP, open_clip) at 20 + 20 test and 8 + 8 calibration models each;
# needs `make bases` first. Resumable. About 2 h 40 min on 2 free CPU cores from nothing (estimate; see BENCHMARKS.md).
benchmark-world: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/lit-amdet benchmark --config configs/benchmark_world.yaml \
		--trainer.accelerator cpu --trainer.strategy ddp --trainer.devices 2

# every table of BENCHMARKS.md's detection-benchmark section, in one command: the quick MiniLM zoo with its figures
# and the speed baseline, the MiniLM at the issue's size, the world bases and their four zoos. Resumable.
# About 7-9 h on 2 free CPU cores from nothing (estimate: bases ~30 min to 2 h by the machine, quick ~70 min,
# minilm ~2 h 25 min, world ~2 h 40 min).
benchmarks: bases benchmark-quick benchmark-minilm benchmark-world
