"""comfyui-amdm: AMDM (Aggregation of Multiple Diffusion Models) for ComfyUI.

ComfyUI imports this file from custom_nodes/; it only gathers the node mappings of the pack's modules.
"""
from .adapters.interactdiffusion import nodes as _interactdiffusion_nodes
from .adapters.ipadapter import nodes as _ipadapter_nodes
from .adapters.migc import nodes as _migc_nodes
from .nodes import latent_nodes as _latent_nodes
from .nodes import sampler_nodes as _sampler_nodes

_NODE_MODULES = (_sampler_nodes, _latent_nodes, _interactdiffusion_nodes, _migc_nodes, _ipadapter_nodes)

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _module in _NODE_MODULES:
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
