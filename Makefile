# Entry points for a fresh machine: `make demo`, `make test` and `make lint`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

MILVUS_VENV := .venv-milvus
MILVUS_STAMP := $(MILVUS_VENV)/.installed

.PHONY: demo test lint install browser milvus-server clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# A small REIR (resnet18 shared, 48 heads x 12 meta classes, 32 px, random init) on the embedded glyphs,
# on the CPU, next to raw pixels and the untrained network (reir/cli/demo.py).
demo: $(STAMP)
	$(PY) -m reir.cli.demo --output_dir demo_output

# Headless Chromium and its driver for the browser tests, from Debian's packages (skipped when present).
# Without apt-get or root the browser tests are skipped and say what to install; with CI=true they fail.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	if command -v apt-get >/dev/null && { [ "$$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then \
		$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	elif [ "$$CI" = true ]; then echo "make browser: no apt-get or no root to install chromium and chromedriver" >&2; exit 1; \
	else echo "make browser: no apt-get or no root; the browser tests will be skipped (install chromium and chromedriver to run them)"; fi

# The Milvus standalone server the Milvus tests also run against (tests/milvus_server.py starts it, loopback
# only), from PyPI's milvus package, in a virtual environment of its own: its client extra pins a pymilvus
# older than the project's. Its binaries are unpacked here once, by the package's own routine, not at every start.
$(MILVUS_STAMP): requirements-milvus-server.txt
	$(PYTHON) -m venv $(MILVUS_VENV)
	$(MILVUS_VENV)/bin/python -m pip install --quiet -r requirements-milvus-server.txt
	$(MILVUS_VENV)/bin/python -c "import milvus; milvus._initialize_data_files('$(MILVUS_VENV)/unpacked')"
	touch $(MILVUS_STAMP)

milvus-server: $(MILVUS_STAMP)

# One test per core plus one (pytest-xdist; an idle worker takes queued tests from a busy one): the
# extra worker runs while others wait on the Milvus server, a browser or a child process (on 2 cores:
# 5 m 48 s with 3 workers, 6 m 39 s with 2). The slowest tests are listed so the suite's time stays
# visible. BROWSER=0 installs no browser and skips the browser tests (outside CI, where they always run).
BROWSER ?= 1
TEST_WORKERS ?= $(shell echo $$(( $$(nproc) + 1 )))
test: $(STAMP) $(if $(filter 0,$(BROWSER)),,browser) milvus-server
	REIR_BROWSER=$(BROWSER) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=15

# Ruff (pyproject.toml's rule set, import order included) on the package, tests and benchmarks; mypy on reir/.
lint: $(STAMP)
	$(VENV)/bin/ruff check reir tests benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) $(MILVUS_VENV) demo_output
