"""What the branches share: the models their conditioning needs loaded, and the switch between branches
whose patchers are clones of one UNet."""
import comfy.sampler_helpers

from .settings import AMDMInputError, branch_name


def cond_models(guider):
    """The models a guider's conditioning needs loaded (ControlNets, GLIGEN, additional_models), as
    `prepare_sampling` collects them."""
    models, _ = comfy.sampler_helpers.get_additional_models(guider.original_conds, guider.model_patcher.model_dtype())
    return models


def weight_state(patcher):
    """What a patcher writes INTO the shared module at load: weight patches (by uuid), object patches and
    injections. Two clones of one BaseModel with equal states compute with the same weights: they can run
    interleaved without any re-load, and share a forward."""
    weights = patcher.patches_uuid if (patcher.patches or patcher.weight_wrapper_patches) else None
    objects = tuple(sorted((name, id(obj)) for name, obj in patcher.object_patches.items()))
    return weights, objects, tuple(sorted(patcher.injections)), patcher.force_cast_weights


def _is_dynamic(patcher):
    """ComfyUI 0.33's ModelPatcherDynamic (dynamic VRAM, the default on NVIDIA GPUs) says so."""
    return bool(getattr(patcher, "is_dynamic", lambda: False)())


def check_switchable(patchers):
    """Branches whose clones of one UNet differ in weight patches are switched by re-patching the shared
    weights (PatcherSwitch). Under dynamic VRAM the weights are streamed by ComfyUI's own loader instead,
    which this switch is not tested with (no CPU can build one): refuse that combination before any step."""
    groups = {}
    for index, patcher in enumerate(patchers):
        groups.setdefault(id(patcher.model), []).append((index, patcher))
    for members in groups.values():
        if len({weight_state(p) for _, p in members}) > 1 and any(_is_dynamic(p) for _, p in members):
            names = " and ".join(branch_name(i) for i, _ in members)
            raise AMDMInputError(
                f"{names} are clones of one model with different weight patches (e.g. a LoRA on one of them) under "
                "ComfyUI's dynamic VRAM, which AMDM does not switch between; start ComfyUI with "
                "--disable-dynamic-vram, or give every branch that uses this checkpoint the same LoRAs")


class PatcherSwitch:
    """Makes a branch's patcher the live one on its (possibly shared) BaseModel before each call.

    `current_patcher` is a single slot on the BaseModel: it is re-pointed for every call. Where clones of
    one BaseModel differ in weight or object patches, `load_models_gpu` leaves an arbitrary one live, so
    before a call the branch's own patches are re-applied with `partially_load`, the same call ComfyUI's
    loader makes when it switches between clones (exact: weights are re-patched from the backups)."""

    def __init__(self, patchers):
        states = {}
        for patcher in patchers:
            states.setdefault(id(patcher.model), set()).add(weight_state(patcher))
        self._needs_reload = {model_id for model_id, s in states.items() if len(s) > 1}
        self._live = {}

    def activate(self, patcher):
        model = patcher.model
        if id(model) in self._needs_reload:
            state = weight_state(patcher)
            if self._live.get(id(model)) != state:
                # A fully loaded model stays fully loaded (what LoadedModel.model_load asks for); a partially
                # loaded one keeps its current budget.
                extra_memory = 0 if model.model_lowvram else 1e32
                patcher.partially_load(patcher.load_device, extra_memory)
                self._live[id(model)] = state
        model.current_patcher = patcher
