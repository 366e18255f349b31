# One command each: `make test` (the whole suite against a real ComfyUI), `make demo` (the AMDM graph,
# headless, images + summary under out/), `make bench` (the benchmarks). Each builds .venv if missing.
# COMFYUI_PATH=/path/to/ComfyUI runs them against your own ComfyUI checkout instead of the pinned copy.
PYTHON := .venv/bin/python

.PHONY: env test demo bench
env:
	@bash scripts/setup_env.sh
	@bash scripts/setup_frontends.sh

test: env
	@bash scripts/setup_browser.sh
	$(PYTHON) -m pytest -c tests/pytest.ini --rootdir tests tests $(PYTEST_ARGS)

demo: env
	$(PYTHON) scripts/demo.py $(DEMO_ARGS)

bench: env
	$(PYTHON) bench/control_transfer.py
	$(PYTHON) bench/sampler_overhead.py
