# The README's two commands: `make test` and `make demo`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
TORCH  ?= torch==2.13.0

.PHONY: test demo install clean

$(BIN)/glmtrt: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[export,test]"
	touch $(BIN)/glmtrt

install: $(BIN)/glmtrt

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

demo: install
	$(BIN)/glmtrt demo

clean:
	rm -rf $(VENV) engines/*/ .pytest_cache
