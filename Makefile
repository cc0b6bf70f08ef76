# Two commands set everything up on a fresh machine:
#   make demo   installs what is missing, then runs the main job offline (tiny preset) -> demo.glb
#   make test   installs what is missing, then runs the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test addon clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m backend generate --preset tiny --prompt "a red ceramic mug" --out demo.glb

test: $(STAMP)
	$(PY) -m pytest -q

addon: $(STAMP)
	$(PY) build_addon.py --out dist

clean:
	rm -rf $(VENV) dist build *.egg-info
