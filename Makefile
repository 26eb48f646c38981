# `make demo` and `make test` do every set-up step on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-digits test bench install zoo clean

$(STAMP): pyproject.toml requirements-dev.txt web/package-lock.json
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: the CPU build that lies on this machine's disk.
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	# The browser page of `graft export web`: npm packages pinned by package-lock.json, bundled.
	cd web && npm ci --no-audit --no-fund --loglevel=error && npm run --silent build
	touch $(STAMP)

install: $(STAMP) zoo

# Set-up for the demo: the pretrained modules it uses, imported into $GRAFT_HOME once (about
# half a minute: graft.save exports and checks every program). `graft import` skips a module
# already stored, so this is idempotent and costs a second when done; `make test` needs none of
# it (the tests use their own stores).
zoo: $(STAMP)
	$(VENV)/bin/graft import efficientnet-lite0
	$(VENV)/bin/graft import minilm-l6

demo: install
	$(PY) examples/quickstart.py

# The full transfer-learning table (a few minutes): digits with 10 labels per class.
demo-digits: $(STAMP)
	$(PY) examples/transfer_digits.py

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/load.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info web/node_modules web/dist
