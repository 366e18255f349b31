"""One UNet forward for the branches that share it (docs/nodes.md, "One forward for branches of one model").

At a meeting point of the lockstep every branch waits for a model evaluation at the same sigma. The
evaluations of branches whose models are clones of one BaseModel with the same weights run side by side,
each in a turn of its own (amdm_core.Turns): the branch's own guider does all it does (CFG, pre/post-CFG
functions, ComfyUI's calc_cond_batch with its conds, areas, ControlNets and memory split), and where that
calls the diffusion model (`model.apply_model`, reached through the branch's model_function_wrapper, which
stays the branch's own around it) the call waits. Once every branch waits, the waiting calls that can share
a forward run as ONE `apply_model` over all their rows:

- rows: the branches' inputs, timesteps and conditioning concatenated (text conditioning of different
  lengths repeated to a common length by ComfyUI's own CONDCrossAttn where the model's conds are of that
  kind, as calc_cond_batch does; of other lengths they run apart); ControlNet
  residuals concatenated, zeros for a branch without them (added to the UNet's activations: no change);
- patches: each branch's block, attention and replace patches run on that branch's rows only, with the
  transformer_options it would see alone (its own keys, its cond_or_uncond, its shapes); a branch without a
  replacement at an attention gets ComfyUI's own attention there;
- memory: no more rows than ComfyUI's own estimate allows (`memory_required` * 1.5 below the free memory,
  the rule of calc_cond_batch); a group that does not fit is split.

The same call made by several branches (identical branches at the same latent) runs once, as any of them
would run it alone. Calls that cannot share a forward (another model or other weights, a patch or
transformer option this does not know how to split, inputs of other shapes) run one by one, as without
batching; a group whose forward
turns out not to split (a patch changed a tensor's shape for its rows) runs one by one from then on.
Checked on ComfyUI 0.3.75 and 0.33.0: comfy/samplers.py `_calc_cond_batch` (the model_function_wrapper
call, transformer_options, memory rule), comfy/ldm/modules/attention.py `BasicTransformerBlock.forward` and
comfy/ldm/modules/diffusionmodules/openaimodel.py `UNetModel.forward` (how patches are called).
"""
import math

import comfy.conds
import comfy.model_management
import torch
from comfy.ldm.modules import attention

from ..amdm_core import Turns

# The patch lists ComfyUI's UNet calls, with how many leading arguments a patch returns (the options dict
# is always the last argument): n, context, value = p(n, context, value, extra_options); x = p(x, options);
# h, hsp = p(h, hsp, transformer_options); emb = p(emb, model_channels, transformer_options).
PATCH_RESULTS = {"attn1_patch": 3, "attn2_patch": 3, "attn1_output_patch": 1, "attn2_output_patch": 1,
                 "middle_patch": 1, "input_block_patch": 1, "input_block_patch_after_skip": 1,
                 "output_block_patch": 2, "emb_patch": 1}
REPLACED_ATTENTION = ("attn1", "attn2")  # replace(q, k, v, extra_options) keyed by (block, id[, index])
# Off: every branch's calls run apart (what the benchmarks compare against; the result is the same within
# float rounding, docs/nodes.md).
SHARED_FORWARDS = True
# transformer_options keys that differ per branch and are split with its rows; every other key must agree.
PER_BRANCH = ("patches", "patches_replace", "cond_or_uncond", "uuids")
SHAPES = ("original_shape", "activations_shape")  # [rows, ...] of the whole forward


class _NotSplittable(Exception):
    """A patch's result cannot be put back together with the other branches' rows: the calls then run apart
    (as does any other error of a shared forward; an error of a call alone is the run's)."""


class _ApplyCall:
    """One branch's diffusion-model call as its calc_cond_batch makes it; `padded`: the conditioning keys its
    model pads to a common length when it batches them (CONDCrossAttn)."""
    __slots__ = ("branch", "apply_model", "input_x", "timestep", "c", "padded")

    def __init__(self, branch, apply_model, input_x, timestep, c, padded):
        self.branch, self.apply_model, self.input_x, self.timestep, self.c = branch, apply_model, input_x, timestep, c
        self.padded = padded

    @property
    def model(self):
        return getattr(self.apply_model, "__self__", None)

    @property
    def rows(self):
        return self.input_x.shape[0]

    @property
    def options(self):
        return self.c.get("transformer_options") or {}

    def run(self):
        return self.apply_model(self.input_x, self.timestep, **self.c)


def _same(a, b):
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.device == b.device and torch.equal(a, b))
    try:
        return bool(a == b)
    except Exception:  # objects without a usable ==
        return False


def _chunks(tensor, call):
    return tensor.chunk(max(len(call.options.get("cond_or_uncond") or [0]), 1))


def _per_row(value, call):
    """A conditioning tensor with one entry per row of its call (else a constant of the forward)."""
    return isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == call.rows


def _conditioning_fits(key, a, b, call_a, call_b):
    if not (_per_row(a, call_a) and _per_row(b, call_b)):
        return _same(a, b)
    if a.dtype != b.dtype or a.device != b.device or a.ndim != b.ndim:
        return False
    if a.shape[1:] == b.shape[1:]:
        return True
    return key in call_a.padded and key in call_b.padded and a.ndim == 3 and comfy.conds.CONDCrossAttn(
        a[:1]).can_concat(comfy.conds.CONDCrossAttn(b[:1]))


def _control_fits(a, b):
    if a is None or b is None:
        return True
    if not (isinstance(a, dict) and isinstance(b, dict)) or set(a) != set(b):
        return False
    return all(isinstance(a[k], list) and isinstance(b[k], list) and len(a[k]) == len(b[k]) for k in a)


def _patches_fit(a, b):
    """Patches of two branches that one forward can carry: the same, or of kinds this module splits."""
    for name in set(a.get("patches", {})) | set(b.get("patches", {})):
        first, second = a.get("patches", {}).get(name, []), b.get("patches", {}).get(name, [])
        if name not in PATCH_RESULTS and not (len(first) == len(second) and all(
                x is y for x, y in zip(first, second))):
            return False
    kinds = set(a.get("patches_replace", {})) | set(b.get("patches_replace", {}))
    return all(kind in REPLACED_ATTENTION or a.get("patches_replace", {}).get(kind) is
               b.get("patches_replace", {}).get(kind) for kind in kinds)


def can_share_forward(a, b):
    """Whether the diffusion-model calls a and b (of two branches with the same weights) can run as one."""
    if a.model is None or a.model is not b.model or a.input_x.shape[1:] != b.input_x.shape[1:]:
        return False
    if a.input_x.dtype != b.input_x.dtype or a.input_x.device != b.input_x.device:
        return False
    if set(a.c) - {"control"} != set(b.c) - {"control"} or not _control_fits(a.c.get("control"), b.c.get("control")):
        return False
    for key in set(a.c) - {"control", "transformer_options"}:
        if not _conditioning_fits(key, a.c[key], b.c[key], a, b):
            return False
    first, second = a.options, b.options
    shared = (set(first) | set(second)) - set(PER_BRANCH) - set(SHAPES)
    return all(_same(first.get(k), second.get(k)) for k in shared) and _patches_fit(first, second)


def _equal(a, b):
    """Equal values, tensors compared by content, dicts and sequences element by element, anything else by
    identity (patch functions) or ==."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if callable(a) or callable(b):
        return a is b
    return _same(a, b)


def same_call(a, b):
    """Whether the diffusion-model calls a and b are the same call (what identical branches make at the same
    latent): then one forward, of exactly the rows either would run alone, serves both. The per-cond uuids
    are names, not inputs."""
    if a.model is None or a.model is not b.model or a.c.keys() != b.c.keys() or a.input_x.shape != b.input_x.shape:
        return False
    first, second = dict(a.options), dict(b.options)
    first.pop("uuids", None)
    second.pop("uuids", None)
    # the patches first (no device sync), then the tensors
    if not _equal(first.get("patches"), second.get("patches")) or not _equal(first, second):
        return False
    return (_same(a.input_x, b.input_x) and _same(a.timestep, b.timestep)
            and all(_equal(a.c[k], b.c[k]) for k in a.c if k != "transformer_options"))


def _concat_conditioning(key, values, calls):
    if not all(_per_row(value, call) for value, call in zip(values, calls)):
        return values[0]  # the same for every call (can_share_forward)
    if len({v.shape[1:] for v in values}) > 1:  # lengths a CONDCrossAttn key may differ in (can_share_forward)
        return comfy.conds.CONDCrossAttn(values[0]).concat([comfy.conds.CONDCrossAttn(v) for v in values[1:]])
    return torch.cat(values)


def _concat_control(calls, controls):
    """ControlNet residuals of every branch in row order; zeros where a branch has none."""
    present = [c for c in controls if c is not None]
    if not present:
        return None
    combined = {}
    for part in present[0]:
        entries = []
        for index in range(len(present[0][part])):
            like = next((c[part][index] for c in present if c[part][index] is not None), None)
            if like is None:
                entries.append(None)
                continue
            rows = []
            for call, control in zip(calls, controls):
                value = None if control is None else control[part][index]
                rows.append(value if value is not None else like.new_zeros((call.rows,) + tuple(like.shape[1:])))
            entries.append(torch.cat(rows))
        combined[part] = entries
    return combined


class _Branch:
    """One branch inside a shared forward: its rows and the transformer_options its patches see, kept for
    the whole forward (a patch may leave state in them for a later block, as it could alone)."""

    def __init__(self, call, start):
        self.call = call
        self.start, self.end = start, start + call.rows
        self.state = dict(call.options)
        self.patches = call.options.get("patches", {})
        self.replaced = call.options.get("patches_replace", {})

    def view(self, options):
        """The branch's options for a patch call of the shared forward (whose `options` hold the block,
        index and shapes of the moment)."""
        for key, value in options.items():
            if key in PER_BRANCH:
                continue
            if key in SHAPES and isinstance(value, (list, tuple)) and value:
                value = [self.end - self.start] + list(value[1:])
            self.state[key] = value
        return self.state

    def rows(self, value, total):
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == total:
            return value[self.start:self.end]
        return value


def _join(parts):
    """The branches' results in row order: tensors concatenated, tuples element by element."""
    first = parts[0]
    if isinstance(first, tuple) and all(isinstance(part, tuple) and len(part) == len(first) for part in parts):
        return tuple(_join([part[i] for part in parts]) for i in range(len(first)))
    if all(isinstance(part, torch.Tensor) for part in parts):
        try:
            return torch.cat(parts)
        except RuntimeError as error:  # shapes a patch changed for its own rows only
            raise _NotSplittable(str(error)) from error
    if all(part is first for part in parts):
        return first
    raise _NotSplittable(f"the branches' results ({', '.join(type(part).__name__ for part in parts)}) cannot be "
                         "joined")


def _patch_list(name, branches, total):
    """The one patch of a shared forward standing for every branch's own `name` patches."""
    returns = PATCH_RESULTS[name]

    def patch(*args):
        parts = []
        for branch in branches:
            local = [branch.rows(arg, total) for arg in args[:-1]] + [branch.view(args[-1])]
            for own in branch.patches.get(name, []):
                result = own(*local)
                result = result if isinstance(result, tuple) else (result,)
                local[:len(result)] = result
            parts.append(tuple(local[:returns]))
        joined = _join(parts)
        return joined if returns > 1 else joined[0]

    return patch


def _replaced_attention(kind, branches, total):
    """The one attention replacement of a shared forward: each branch's own replacement at this block, else
    ComfyUI's own attention (what the block computes without one: its projections are the block's)."""
    def replace(q, k, v, extra_options):
        block = extra_options.get("block")
        keys = [] if block is None else [(block[0], block[1], extra_options.get("block_index", 0)), block]
        parts = []
        for branch in branches:
            options = branch.view(extra_options)
            own = next((branch.replaced.get(kind, {})[key] for key in keys if key in branch.replaced.get(kind, {})),
                       None)
            q_rows, k_rows, v_rows = (branch.rows(t, total) for t in (q, k, v))
            if own is not None:
                parts.append(own(q_rows, k_rows, v_rows, options))
            else:
                parts.append(attention.optimized_attention(q_rows, k_rows, v_rows, options["n_heads"],
                                                           attn_precision=options.get("attn_precision"),
                                                           transformer_options=options))
        return _join(parts)

    return replace


def _shared_options(calls, branches, total):
    """The transformer_options of the shared forward: the keys every branch agrees on, the rows' cond_or_uncond
    and uuids in row order, and one patch / replacement per site standing for every branch's own."""
    first = calls[0].options
    options = {k: v for k, v in first.items() if k not in PER_BRANCH}
    for key in ("cond_or_uncond", "uuids"):
        if any(key in call.options for call in calls):
            options[key] = [item for call in calls for item in call.options.get(key, [])]
    names = set().union(*(call.options.get("patches", {}) for call in calls))
    patches = {}
    for name in names:
        lists = [call.options.get("patches", {}).get(name, []) for call in calls]
        shared = all(len(lst) == len(lists[0]) and all(x is y for x, y in zip(lst, lists[0])) for lst in lists)
        patches[name] = lists[0] if shared else [_patch_list(name, branches, total)]
    if patches:
        options["patches"] = patches
    kinds = set().union(*(call.options.get("patches_replace", {}) for call in calls))
    replaced = {}
    for kind in kinds:
        per_branch = [call.options.get("patches_replace", {}).get(kind) for call in calls]
        if all(p is per_branch[0] for p in per_branch):
            replaced[kind] = per_branch[0]
        else:
            dispatch = _replaced_attention(kind, branches, total)
            replaced[kind] = {key: dispatch for p in per_branch if p for key in p}
    if replaced:
        options["patches_replace"] = replaced
    return options


def _forward_together(calls):
    """ONE apply_model over the rows of every call; each call's rows of the output."""
    branches, start = [], 0
    for call in calls:
        branches.append(_Branch(call, start))
        start += call.rows
    total = start
    c = {}
    for key in set(calls[0].c) - {"control"}:
        values = [call.c[key] for call in calls]
        if key == "transformer_options":
            c[key] = _shared_options(calls, branches, total)
        else:
            c[key] = _concat_conditioning(key, values, calls)
    control = _concat_control(calls, [call.c.get("control") for call in calls])
    if control is not None:
        c["control"] = control
    output = calls[0].apply_model(torch.cat([call.input_x for call in calls]),
                                  torch.cat([call.timestep for call in calls]), **c)
    return [output[branch.start:branch.end] for branch in branches]


def _fits_in_memory(calls):
    """ComfyUI's own rule for one batch (calc_cond_batch): memory_required of its shapes, times 1.5, below the
    free memory of the device."""
    model = calls[0].model
    shape = [sum(call.rows for call in calls)] + list(calls[0].input_x.shape[1:])
    cond_shapes = {}
    for call in calls:
        for key, value in call.c.items():
            if isinstance(value, torch.Tensor):
                cond_shapes.setdefault(key, []).append(value.size())
    patcher = getattr(model, "current_patcher", None)
    device = calls[0].input_x.device
    free = (patcher.get_free_memory(device) if hasattr(patcher, "get_free_memory")
            else comfy.model_management.get_free_memory(device))
    return model.memory_required(shape, cond_shapes=cond_shapes) * 1.5 < free


def _padded_keys(model):
    """The conditioning keys a branch's model pads to a common length when batching (its processed conds'
    CONDCrossAttn entries: text cross-attention of UNets, not the joint-attention text of Flux or SD3,
    whose CONDRegular needs equal lengths), read off the guider the sampler's model wraps."""
    guider = getattr(model, "inner_model", model)
    conds = getattr(guider, "conds", None) or {}
    return frozenset(key for entries in conds.values() for cond in entries or ()
                     for key, value in (cond.get("model_conds") or {}).items()
                     if isinstance(value, comfy.conds.CONDCrossAttn))


class BatchedEvaluation:
    """The `evaluate` of a lockstep run (amdm_core.run_lockstep) that shares forwards where it can.

    patchers: every branch's ModelPatcher; weights: every branch's weight state (comfy_bridge.branches); the
    switch makes a branch's patcher the live one."""

    def __init__(self, patchers, weights, switch):
        self.patchers = patchers
        self.weights = weights
        self.switch = switch
        self.apart = set()  # pairs of branches whose shared forward did not split: run apart from then on

    def __call__(self, calls):
        groups = {}
        for position, (index, x, sigma, call) in enumerate(calls):
            key = (id(self.patchers[index].model), self.weights[index])
            groups.setdefault(key, []).append(position)
        results = [None] * len(calls)
        for positions in groups.values():
            group = [calls[p] for p in positions]
            if (not SHARED_FORWARDS or len(group) == 1
                    or any("multigpu_clones" in (c[3].kwargs.get("model_options") or {}) for c in group)):
                outputs = [self._alone(*c) for c in group]
            else:
                outputs = self._together(group)
            for position, output in zip(positions, outputs):
                results[position] = output
        return results

    def _alone(self, index, x, sigma, call):
        self.switch.activate(self.patchers[index])
        return call(x, sigma)

    def _together(self, group):
        turns = [Turns(lambda t, entry=entry: self._evaluate(t, *entry), name="amdm-evaluation") for entry in group]
        try:
            for entry, turn in zip(group, turns):
                self.switch.activate(self.patchers[entry[0]])
                turn.resume()
            while True:
                waiting = [(entry, turn) for entry, turn in zip(group, turns) if not turn.finished]
                if not waiting:
                    return [turn.result for turn in turns]
                outputs = self._run([turn.request for _, turn in waiting])
                for (entry, turn), output in zip(waiting, outputs):
                    self.switch.activate(self.patchers[entry[0]])
                    turn.resume(output)
        finally:
            for turn in turns:
                turn.stop()

    def _evaluate(self, turns, index, x, sigma, call):
        """A branch's evaluation, its diffusion-model calls handed to the meeting (`turns.pause`) instead of
        run; the branch's own model_function_wrapper stays around them."""
        options = dict(call.kwargs.get("model_options") or {})
        own_wrapper = options.get("model_function_wrapper")
        padded = _padded_keys(call.model)

        def wrapper(apply_model, args):
            def meet(input_x, timestep, **c):
                return turns.pause(_ApplyCall(index, apply_model, input_x, timestep, c, padded))

            if own_wrapper is not None:
                return own_wrapper(meet, args)
            return meet(args["input"], args["timestep"], **args["c"])

        options["model_function_wrapper"] = wrapper
        return call.model(x, sigma, **{**call.kwargs, "model_options": options})

    def _run(self, calls):
        """Run the waiting diffusion-model calls: the same call once, those that can share a forward as one,
        the rest apart."""
        distinct, served_by = [], {}
        for call in calls:
            twin = next((other for other in distinct if (other.branch, call.branch) not in self.apart
                         and same_call(other, call)), None)
            if twin is None:
                distinct.append(call)
            served_by[id(call)] = twin or call
        sets = []
        for call in distinct:
            for members in sets:
                first = members[0]
                if (first.branch, call.branch) not in self.apart and can_share_forward(first, call):
                    members.append(call)
                    break
            else:
                sets.append([call])
        outputs = {}
        for members in sets:
            for part, results in self._run_set(members):
                for call, output in zip(part, results):
                    outputs[id(call)] = output
        return [outputs[id(call)] if served_by[id(call)] is call else outputs[id(served_by[id(call)])].clone()
                for call in calls]

    def _run_set(self, members):
        """(calls, outputs) of one set: one forward where it fits in memory, halves where it does not."""
        if len(members) == 1:
            self.switch.activate(self.patchers[members[0].branch])
            return [(members, [members[0].run()])]
        self.switch.activate(self.patchers[members[0].branch])
        if not _fits_in_memory(members):
            half = math.ceil(len(members) / 2)
            return self._run_set(members[:half]) + self._run_set(members[half:])
        try:
            return [(members, _forward_together(members))]
        except comfy.model_management.InterruptProcessingException:
            raise
        except Exception:  # a patch that does not split (or memory): each call alone, as without batching
            self.apart.update((a.branch, b.branch) for a in members for b in members if a is not b)
            return [part for call in members for part in self._run_set([call])]
