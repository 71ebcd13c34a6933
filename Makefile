# Two commands do everything on a fresh clone: `make demo` and `make test`.
# Each sets itself up idempotently: virtual env, pinned dependencies, the native extension.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
DEPS   := $(VENV)/.deps-stamp
OUT    ?= stagetrace-demo

.PHONY: demo test build clean

$(DEPS): requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $(DEPS)

# ninja rebuilds only what changed, so this is cheap when nothing did.
build: $(DEPS)
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .

demo: build
	$(BIN)/stagetrace demo --out $(OUT)

test: build
	$(BIN)/python -m pytest -q

clean:
	rm -rf build stagetrace/low_level/_C*.so *.egg-info
