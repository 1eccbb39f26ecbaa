# Each target creates .venv on first use (torch pinned to the local CPU wheel via constraints.txt).
PY      := .venv/bin/python
STAMP   := .venv/.installed
DEMO_STEPS ?= 40000

.PHONY: demo test test-all bench bench-gpu experiments lint format clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	rm -rf runs/demo  # the demo's own output, regenerated (plumb train refuses to overwrite a run)
	.venv/bin/plumb train --preset lecture-deep --steps $(DEMO_STEPS) --threads 1 --out runs/demo

experiments: $(STAMP)
	.venv/bin/plumb experiment all --out runs/experiments

# make test: every test but the slow ones (full-length reproductions, the 20-kill soak,
# compiled curves), on both cores (pytest-xdist), property tests on a fixed fifth of their
# examples (tests/hyp.py). make test-all: the same with every example drawn afresh, then
# the slow ones.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "not slow" --durations=15

test-all: $(STAMP)
	PLUMB_HYPOTHESIS=full $(MAKE) --no-print-directory test
	PLUMB_HYPOTHESIS=full $(PY) -m pytest -q -m slow --durations=15

bench: $(STAMP)
	$(PY) bench/bench_step.py
	$(PY) bench/bench_data.py
	$(PY) bench/bench_probes.py
	$(PY) bench/bench_monitor_steps.py --models gpt,lstm,lecture-deep
	$(PY) bench/bench_doctor.py
	$(PY) bench/bench_checkpoint.py
	$(PY) bench/bench_dist.py
	$(PY) bench/bench_integrations.py

bench-gpu: $(STAMP)
	$(PY) bench/bench_gpu.py

lint: $(STAMP)
	.venv/bin/ruff check src tests bench examples
	.venv/bin/ruff format --check src tests bench examples

format: $(STAMP)
	.venv/bin/ruff format src tests bench
	.venv/bin/ruff check --fix src tests bench

clean:
	rm -rf .venv runs .pytest_cache build src/*.egg-info
