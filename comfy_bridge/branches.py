"""What the branches share: the models their conditioning needs loaded, and the switch between branches
whose patchers are clones of one UNet (docs/nodes.md, "How it runs inside ComfyUI" and "Dynamic VRAM")."""
import comfy.model_management
import comfy.model_patcher
import comfy.sampler_helpers
import comfy.utils
import torch

from .settings import AMDMInputError, branch_name

# Clones of one UNet with different weight patches under ComfyUI 0.33's dynamic VRAM are switched by
# _DynamicSwitch, which no CPU can run (ComfyUI builds the classic patcher there). Until
# bench/gpu_dynamic_vram.py has run green on a GPU, check_switchable refuses that combination; the script
# sets this for its own run.
DYNAMIC_VRAM_SWITCH_VERIFIED = False


def cond_models(guider):
    """The models a guider's conditioning needs loaded (ControlNets, GLIGEN, additional_models), as
    `prepare_sampling` collects them."""
    models, _ = comfy.sampler_helpers.get_additional_models(guider.original_conds, guider.model_patcher.model_dtype())
    return models


def weight_state(patcher):
    """What a patcher writes INTO its shared BaseModel at load: weight patches (by uuid), object patches and
    injections. Two clones of one BaseModel with equal states compute with identical weights and object
    patches: they run interleaved, or batched into one forward, without any re-load."""
    weights = patcher.patches_uuid if (patcher.patches or patcher.weight_wrapper_patches) else None
    objects = tuple(sorted((name, id(obj)) for name, obj in patcher.object_patches.items()))
    return weights, objects, tuple(sorted(patcher.injections)), patcher.force_cast_weights


def _is_dynamic(patcher):
    """ComfyUI 0.33's ModelPatcherDynamic (dynamic VRAM, the default on NVIDIA GPUs) says so."""
    return bool(getattr(patcher, "is_dynamic", lambda: False)())


def _by_model(patchers):
    """{id of a BaseModel: [(branch index, patcher), ...]} for the BaseModels whose clones differ in state."""
    groups = {}
    for index, patcher in enumerate(patchers):
        groups.setdefault(id(patcher.model), []).append((index, patcher))
    return {model_id: members for model_id, members in groups.items()
            if len({weight_state(p) for _, p in members}) > 1}


def check_switchable(patchers):
    """Under dynamic VRAM the switch between clones with different weight patches has not run on a GPU
    yet (DYNAMIC_VRAM_SWITCH_VERIFIED): refuse that combination before any step."""
    if DYNAMIC_VRAM_SWITCH_VERIFIED:
        return
    for members in _by_model(patchers).values():
        if any(_is_dynamic(p) for _, p in members):
            names = " and ".join(branch_name(i) for i, _ in members)
            raise AMDMInputError(
                f"{names} are clones of one model with different weight patches (e.g. a LoRA on one of them) under "
                "ComfyUI's dynamic VRAM, which AMDM does not switch between yet; start ComfyUI with "
                "--disable-dynamic-vram, or give every branch that uses this checkpoint the same LoRAs")


def _patch_lists(patcher, key):
    """A patcher's patches of one weight, by identity: clones copy the lists, not the patches."""
    return tuple(id(patch) for patch in patcher.patches.get(key, ()))


def _differing_keys(patchers):
    """The weights whose patches differ between some of the clones `patchers` (the ones a switch changes)."""
    keys = set().union(*(p.patches for p in patchers))
    return sorted(k for k in keys if len({_patch_lists(p, k) for p in patchers}) > 1)


def _version_bytes(patchers, keys):
    """Bytes of every version of `keys` beyond one: one version per distinct patch list of a weight."""
    model = patchers[0].model
    return sum((len({_patch_lists(p, key) for p in patchers}) - 1) * comfy.utils.get_attr(model, key).nbytes
               for key in keys)


def _cacheable(patchers, keys):
    """Whether each branch's weights can be kept once and swapped by reference: the model is fully loaded
    and the switch only has to exchange tensors. Re-patching in place (weight_inplace_update), weights
    written through an op's set_/convert_ functions (quantized layers), per-weight wrapper functions and
    forced casting live in the module beyond its tensors, and patchers made separately around one model
    keep separate backups, so those switches stay exact re-patching."""
    model = patchers[0].model
    if model.model_lowvram or any(p.weight_inplace_update for p in patchers):
        return False
    if len({id(p.backup) for p in patchers}) > 1:
        return False
    if len({(tuple(sorted((k, tuple(map(id, f))) for k, f in p.weight_wrapper_patches.items())),
             p.force_cast_weights) for p in patchers}) > 1:
        return False
    for key in keys:
        _, set_func, convert_func = comfy.model_patcher.get_key_weight(model, key)
        if set_func is not None or convert_func is not None:
            return False
    return True


def _fits(patchers, extra_bytes):
    """The bound ComfyUI's own per-hook weight cache keeps (ModelPatcher.patch_hooks: a MemoryCounter of
    get_free_memory(load_device) with minimum_inference_memory() * 2 left over; 0.3.75 and 0.33.0)."""
    device = patchers[0].load_device
    spare = comfy.model_management.get_free_memory(device) - 2 * comfy.model_management.minimum_inference_memory()
    return extra_bytes <= spare


def _reload(patcher):
    """ComfyUI's own switch between clones: `partially_load` re-applies `patcher`'s patches to the shared
    module when the live weights are another patcher's (exact: re-patched from the backups), else only
    its object patches. A fully loaded model stays fully loaded (what LoadedModel.model_load asks for); a
    partially loaded one keeps its current budget (0.3.75 and 0.33.0)."""
    extra_memory = 0 if patcher.model.model_lowvram else 1e32
    patcher.partially_load(patcher.load_device, extra_memory)


class PatcherSwitch:
    """Makes a branch's patcher the live one on its (possibly shared) BaseModel before each call.

    `current_patcher` is a single slot on the BaseModel: it is re-pointed for every call. Where clones of
    one BaseModel differ in weight or object patches, `load_models_gpu` leaves an arbitrary one live, so
    before a call the branch's own patches are made live: by a `_CachedSwitch` (each branch's weights
    kept once, swapped by reference) where its extra copies fit ComfyUI's free-memory estimate, by a
    `_DynamicSwitch` under dynamic VRAM, else by re-patching at every switch (`_Repatching`).
    `kept_bytes`: what the switch keeps, at most, beyond one copy of the weights. Call `close()` once the
    run is over (after re-activating the main branch): it drops the kept copies."""

    def __init__(self, patchers):
        self._switches = {}
        self.kept_bytes = 0
        for model_id, members in _by_model(patchers).items():
            clones = [p for _, p in members]
            keys = _differing_keys(clones)
            if any(_is_dynamic(p) for p in clones):
                self._switches[model_id] = _DynamicSwitch(keys)
                continue
            extra = _version_bytes(clones, keys)
            if _cacheable(clones, keys) and _fits(clones, extra):
                self._switches[model_id] = _CachedSwitch(clones, keys)
                self.kept_bytes += extra
            else:
                self._switches[model_id] = _Repatching()

    def activate(self, patcher):
        switch = self._switches.get(id(patcher.model))
        if switch is not None:
            switch.activate(patcher)
        patcher.model.current_patcher = patcher

    def close(self):
        self._switches.clear()


class _Repatching:
    """Re-applies the branch's patches with ComfyUI's `partially_load` whenever another state is live
    (also when something else re-loaded the model: its weights uuid is then another one)."""

    def __init__(self):
        self._live = None

    def activate(self, patcher):
        state = weight_state(patcher)
        if self._live != state or patcher.model.current_weight_patches_uuid != patcher.patches_uuid:
            _reload(patcher)
            self._live = state


class _CachedSwitch:
    """Each branch's versions of the weights whose patches differ, kept once and installed by reference.

    A version comes from ComfyUI's loader: the weights `load_models_gpu` left live; for a branch that
    patches none of the switched weights, their originals from the live patcher's backup (what ComfyUI's
    `unpatch_model` puts back, moved to the module's device as `load` moves it); for any other branch,
    the module after ComfyUI's own `partially_load` at its first activation (one exact re-patch). With it
    the branch's backup entries are kept: installing a version leaves the module, `backup` and
    `current_weight_patches_uuid` as ComfyUI's `partially_load` for that branch leaves them (ModelPatcher
    `partially_load`, `unpatch_model` and `load` of 0.3.75 and 0.33.0), so ComfyUI's next load or unpatch
    restores the original weights. Nothing writes into a kept tensor (in-place re-patching is excluded by
    _cacheable). If anything else re-loads the model in between (another uuid, another device), the kept
    versions are dropped and taken again the same way; while ComfyUI keeps the model partially loaded (to
    free memory), the switch re-patches instead."""

    def __init__(self, patchers, keys):
        model = patchers[0].model
        self._uuids = {p.patches_uuid for p in patchers}
        self._keys = keys
        self._slots = [(comfy.utils.get_attr(model, k.rsplit(".", 1)[0]), k.rsplit(".", 1)[1]) for k in keys]
        self._versions = {}  # patches uuid -> ([Parameter per key], backup entries)
        self._live = None  # (weight_state, patches uuid, model device) as made live last
        self._repatching = _Repatching()

    def _keep(self, uuid, tensors, backup):
        self._versions[uuid] = ([torch.nn.Parameter(t, requires_grad=False) for t in tensors], backup)
        return self._versions[uuid]

    def _keep_live(self, patcher):
        return self._keep(patcher.model.current_weight_patches_uuid,
                          [getattr(module, name).detach() for module, name in self._slots], dict(patcher.backup))

    def _keep_originals(self, patcher):
        backup = patcher.backup
        tensors = [backup[key].weight.to(getattr(module, name).device) if key in backup
                   else getattr(module, name).detach() for key, (module, name) in zip(self._keys, self._slots)]
        return self._keep(patcher.patches_uuid, tensors, {k: v for k, v in backup.items() if k in patcher.patches})

    def activate(self, patcher):
        model, state = patcher.model, weight_state(patcher)
        if self._live is not None and self._live[1:] != (model.current_weight_patches_uuid, model.device):
            self._versions.clear()
            self._live = None
        if model.model_lowvram:
            self._versions.clear()
            self._live = None
            self._repatching.activate(patcher)
            return
        if self._live is not None and self._live[0] == state:
            return
        ours = model.current_weight_patches_uuid in self._uuids  # else: another workflow's patches are live
        if self._live is None and ours:
            self._keep_live(patcher)
        kept = self._versions.get(patcher.patches_uuid)
        if kept is None and ours and not any(key in patcher.patches for key in self._keys):
            kept = self._keep_originals(patcher)
        if kept is None:
            _reload(patcher)
            self._keep_live(patcher)
        else:
            params, backup = kept
            for (module, name), param in zip(self._slots, params):
                setattr(module, name, param)
            patcher.backup.clear()
            patcher.backup.update(backup)
            model.current_weight_patches_uuid = patcher.patches_uuid
            if self._live is None or self._live[0][1:] != state[1:]:
                _reload(patcher)  # the weights are live: ComfyUI only swaps object patches and injections
        self._live = (state, patcher.patches_uuid, model.device)


class _DynamicSwitch:
    """Dynamic VRAM (ModelPatcherDynamic, read on ComfyUI 0.33.0) patches no weight into the module: each layer
    applies its patcher's patches when it is fetched (`<param>_lowvram_function`, a LowVramPatch, in
    comfy/ops.py `cast_bias_weight`) and keeps the patched result resident while its `_v_signature`
    holds. ComfyUI's own clone switch, `ModelPatcherDynamic.partially_load` -> `load(dirty=...)`,
    re-points every layer's functions to the new patcher and, when the patches uuid changed, marks
    every layer stale. Here only the layers whose patches differ are marked stale (what `load`'s
    `set_dirty` does to one layer), and the uuid is set first, so the other layers stay resident.
    Where the live uuid is not the one this switch installed, ComfyUI's whole-model switch runs."""

    def __init__(self, keys):
        self._layers = sorted({key.rsplit(".", 1)[0] for key in keys})
        self._live = None  # (weight_state, patches uuid) as installed last

    def activate(self, patcher):
        model, state = patcher.model, weight_state(patcher)
        if self._live is not None and model.current_weight_patches_uuid == self._live[1]:
            if self._live[0] == state:
                return
            for name in self._layers:
                comfy.utils.get_attr(model, name)._v_signature = None
            model.current_weight_patches_uuid = patcher.patches_uuid
        _reload(patcher)
        self._live = (state, patcher.patches_uuid)
