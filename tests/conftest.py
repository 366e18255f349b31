"""Session fixtures: one real ComfyUI booted in-process (CPU) with this pack loaded by ComfyUI's own
loader, tiny seeded models, and harnesses for the executor and the real server.

No ComfyUI module is mocked. A missing ComfyUI runtime makes every test that needs it error (never skip).
"""
import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # `harness` and the framework-free `amdm_core`

from harness import runtime, tiny_models  # noqa: E402

TINY_CHECKPOINT = "tiny_sd15.safetensors"
_session = {}  # the pytest config and the test that is running


def pytest_configure(config):
    _session["config"] = config


def pytest_runtest_logstart(nodeid, location):
    _session["running"] = nodeid


def pytest_keyboard_interrupt(excinfo):
    """scripts/run_tests.sh interrupts a leg that runs past LEG_TIMEOUT: say which test it was in."""
    reporter = _session["config"].pluginmanager.get_plugin("terminalreporter") if "config" in _session else None
    if reporter is not None and _session.get("running"):
        reporter.write_line(f"[run_tests] interrupted in {_session['running']}")


@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory):
    """The temp base directory of the in-process ComfyUI (models/, output/, custom_nodes/ ...)."""
    return str(tmp_path_factory.mktemp("comfy_base"))


@pytest.fixture(scope="session")
def comfy(comfy_base):
    """ComfyUI booted in-process; returns ComfyUI's `nodes` module."""
    runtime.boot(comfy_base)
    tiny_models.register_tiny_sd15()
    import nodes

    return nodes


@pytest.fixture(scope="session")
def pack(comfy):
    """This pack, loaded with `nodes.load_custom_node` exactly as ComfyUI loads custom nodes."""
    return runtime.load_pack()


@pytest.fixture(scope="session")
def pack_module(pack):
    """Import a submodule of the loaded pack: `pack_module("adapters.migc.model")`."""
    return runtime.pack_module


@pytest.fixture(scope="session")
def tiny_model(comfy):
    """An in-memory SD1.5-shaped ModelPatcher with seeded random weights. Clone it before patching."""
    return tiny_models.tiny_model_patcher(seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint(comfy, comfy_base):
    """A tiny SD1.5 checkpoint file in <base>/models/checkpoints; returns its name for the loaders."""
    tiny_models.write_tiny_checkpoint(os.path.join(comfy_base, "models", "checkpoints", TINY_CHECKPOINT))
    return TINY_CHECKPOINT


@pytest.fixture(scope="session")
def checkpoint(comfy, tiny_checkpoint):
    """(MODEL, CLIP, VAE) of the tiny checkpoint, loaded by the real CheckpointLoaderSimple."""
    return comfy.CheckpointLoaderSimple().load_checkpoint(tiny_checkpoint)


@pytest.fixture
def random_cond():
    """random_cond(seed) -> a CONDITIONING without CLIP: [[tokens(1, 77, 768), {"pooled_output": ...}]]."""
    import torch

    def make(seed, batch=1):
        gen = torch.Generator().manual_seed(seed)
        return [[torch.randn(batch, 77, 768, generator=gen), {"pooled_output": torch.randn(batch, 768, generator=gen)}]]

    return make


@pytest.fixture(scope="session")
def run_graph(pack):
    """run_graph(api_prompt) -> (ui outputs by node id, executor), through ComfyUI's real executor."""
    from harness.executor import run_graph as run

    return run


@pytest.fixture
def comfy_server(pack, tmp_path, tiny_checkpoint, comfy_base):
    """A factory for the real ComfyUI server on 127.0.0.1 with this pack; every server is stopped."""
    from harness.server import ComfyServer

    started = []

    def start(install_pack=True, link_checkpoint=True, tiny_models=False, threads=None, extra_args=(), frontend=None):
        base = tmp_path / f"server_base_{len(started)}"
        if link_checkpoint:
            ckpt_dir = base / "models" / "checkpoints"
            ckpt_dir.mkdir(parents=True)
            os.symlink(os.path.join(comfy_base, "models", "checkpoints", tiny_checkpoint), ckpt_dir / tiny_checkpoint)
        server = ComfyServer(str(base), install_pack=install_pack, tiny_models=tiny_models, threads=threads,
                             extra_args=extra_args, frontend=frontend)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()

