# Two commands for a newcomer: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: demo test install clean-data lock

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null || \
		{ echo "rrt-dist needs Python >= 3.11 (found: '$(PYTHON)'); run: make PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-cache-dir -c constraints.txt -e ".[cpu,dev]"
	touch $(STAMP)

install: $(STAMP)

## Main job on the embedded default: local Ray, generated benchmark, shipped weights.
demo: $(STAMP)
	$(BIN)/rrt-dist evaluate experiment=demo $(ARGS)

## The test suite.
test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 $(ARGS)

## Regenerate constraints.txt from the current environment (after changing dependencies), then pin the gpu
## extra (FAISS GPU and the CUDA libraries it adds) as resolved against those pins: one CUDA stack, one file.
lock: $(STAMP)
	{ sed '/^[^#]/,$$d' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | grep -v '^rrt-dist'; } > constraints.new
	$(BIN)/python -m pip install --dry-run --ignore-installed --quiet --report gpu-report.json -c constraints.new ".[gpu]"
	$(BIN)/python -c 'import json; pinned = {l.split("==")[0].lower() for l in open("constraints.new") if "==" in l}; \
		added = sorted("%s==%s" % (m["name"], m["version"]) for m in (p["metadata"] for p in json.load(open("gpu-report.json"))["install"]) \
		              if m["name"].lower() not in pinned | {"rrt-dist"}); \
		open("constraints.new", "a").write("# the gpu extra\n" + "".join(a + "\n" for a in added))'
	mv constraints.new constraints.txt && rm gpu-report.json

clean-data:
	rm -rf data outputs
