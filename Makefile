# One command each: `make test` (the whole suite against real ComfyUIs: 0.3.75 and 0.33.0, each in its own
# venv, see scripts/run_tests.sh), `make demo` (the AMDM graph, headless, images + summary under out/),
# `make bench` (the benchmarks). Each builds what it needs if missing (scripts/setup_env.sh; `make test` also
# the browser and the npm test tools: scripts/setup_browser.sh, scripts/setup_node_tools.sh).
# COMFYUI_PATH=/path/to/ComfyUI runs them against your own ComfyUI checkout instead of the pinned copies.
PYTHON := .venv/bin/python
# With COMFYUI_PATH the suite runs once, on that checkout in .venv: the 0.33.0 leg's venv is not needed.
TEST_ENV := $(if $(COMFYUI_PATH),env-0.3.75,env)

.PHONY: env env-0.3.75 env-0.33.0 test demo bench
env: env-0.3.75 env-0.33.0

env-0.3.75:
	@bash scripts/setup_env.sh
	@bash scripts/setup_frontends.sh

env-0.33.0:
	@bash scripts/setup_env.sh 0.33.0

test: $(TEST_ENV)
	@bash scripts/setup_browser.sh
	@bash scripts/setup_node_tools.sh
	@bash scripts/run_tests.sh

demo: env-0.3.75
	$(PYTHON) scripts/demo.py $(DEMO_ARGS)

bench: env-0.3.75
	$(PYTHON) bench/control_transfer.py
	$(PYTHON) bench/sampler_overhead.py
