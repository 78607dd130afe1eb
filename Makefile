# Two commands set everything up: `make demo` and `make test` (both install first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
VD := $(VENV)/bin/vd
DEMO ?= demo

.PHONY: install chromium demo test docs docs-serve bench bench-full bench-memory bench-gpu smoke-gpu clean mutation

install: $(VENV)/.installed chromium

# Debian's Chromium for tests/test_ui_browser.py (Playwright drives it; no browser is downloaded). Idempotent:
# nothing happens when /usr/bin/chromium exists; as root (CI) apt installs it, otherwise a note says how.
chromium:
	@if [ ! -x /usr/bin/chromium ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver \
			|| { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }; \
		else \
			echo "note: /usr/bin/chromium is missing, so tests/test_ui_browser.py will skip; as root run:" \
			     "apt-get install -y chromium chromium-driver"; \
		fi; \
	fi

# torch first (on these machines pip takes torch/torchvision from local disk), then sam2 without its
# optional CUDA extension (it builds against the torch already installed), then vd itself.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install torch torchvision
	SAM2_BUILD_CUDA=0 $(PIP) install --no-build-isolation "sam2>=1.1.0"
	$(PIP) install -e '.[dev]'
	touch $@

demo: install
	$(VD) demo $(DEMO)

test: install
	$(PY) -m pytest

bench: install
	$(PY) bench/bench.py --size tiny

bench-full: install
	$(PY) bench/bench.py --size full --device cuda --dtype bf16

# Measured memory model of every pass on the full architecture (fake tensors, CPU, about an hour on 2 cores);
# prints the coefficients of stages/models/memory.py. bench/memory.py --help for smaller runs.
bench-memory: install
	OMP_NUM_THREADS=1 $(PY) bench/memory.py --real-check

# The full-size inversion (sd15-random, 16 frames, 512 px, bf16) under each --checkpointing level on one GPU:
# measured vs predicted peak, s/step, memory outside torch, equality of results, appended to bench/RESULTS.md
# (under 8 minutes on one H100). Needs the venv only (not `install`'s browser for the UI tests).
bench-gpu: $(VENV)/.installed
	$(PY) bench/gpu.py

# The first command on a GPU: mask (random SAM2), invert, edit, export with sd15-random at 16 x 512² in bf16 in
# under 2 minutes; asserts finite outputs and peaks within 15% of the memory model, appends to bench/RESULTS.md.
# Without CUDA it prints one line and exits 0 (notes/readme-gpu.md).
smoke-gpu: $(VENV)/.installed
	$(PY) bench/smoke_gpu.py

clean:
	rm -rf $(DEMO) .pytest_cache

# Mutation testing of the method's math (slow, minutes to hours; not in CI; notes/mutation.md). mutmut runs in
# a copy under build/ (git-ignored) so the working tree is never touched; rerunning refreshes the copy and
# mutmut re-tests only what changed. Settings: [tool.mutmut] in pyproject.toml. MUTANTS narrows the run,
# e.g. `make mutation MUTANTS='stages.method.ddim.*'`.
MUTDIR ?= build/mutation
MUTANTS ?= stages.method.ddim.* stages.method.guidance.* stages.method.control.editing.* stages.method.prompts.* \
	stages.invert.nulltext.x__step__mutmut_* stages.edit.sampling.x_edit_latents__mutmut_*
mutation: install
	mkdir -p $(MUTDIR)
	tar --exclude=./.venv --exclude=./.git --exclude=./build --exclude=./$(DEMO) -cf - . | tar -xf - -C $(MUTDIR)
	cd $(MUTDIR) && PATH="$(abspath $(VENV))/bin:$$PATH" mutmut run $(foreach m,$(MUTANTS),'$(m)'); \
		PATH="$(abspath $(VENV))/bin:$$PATH" mutmut results | grep -v ': not checked' || true

# The documentation site (docs/, mkdocs.yml) into build/site; --strict turns a broken link or a page
# missing from the nav into an error (tests/test_docs.py runs the same build in the suite).
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

docs-serve: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve
