"""The AMDM loop: N sampler runs driven in lockstep and merged between their steps (docs/algorithm.md,
"The loop").

A branch is a sampler run handed over as `sample(hooks)`: it runs ANY sampler with `hooks.model(x, sigma,
call)` in place of its model (`call`: what the caller needs to evaluate that model call, handed back to
`evaluate`), reports step i through `hooks.report(i, denoised)` and passes its result through
`hooks.returned(x)`. The sampler's code, its multistep history and its noise stay its own; this module only
acts between steps. Branch 0 is the main branch; it runs in the calling thread, every aux branch in a thread
of its own, and only one of them runs at a time (each model call is a meeting point), so the run is as
deterministic as one sampler.

    every step i = 1 .. s, once every branch has taken it (y_k: branch k's latent entering step i + 1):
        xbar = aggregate(y_0 .. y_{N-1}; weights)
        y_k <- xbar - p_k (xbar_vp - mu_k) / |xbar_vp - mu_k|    (VP space at sigma_{i+1}), written into y_k
    after step s the aux branches stop; the main branch runs on alone.

mu_k ("reference"): reference_mean(VP of x_k at sigma_i, eps of step i - 1, timestep of sigma_{i-1});
mu_k ("exact"): the branch's DDIM mean x_k + (sigma_{i+1} - sigma_i)(x_k - D_k)/sigma_i in VP, x_k being the
latent that entered step i and D_k its x0 estimate there; "auto": reference where the model has a DDPM table.
sigma_i is the sigma the sampler evaluated step i's latent at (sigma_hat for a churning sampler).

Where a step begins (`map_steps`): a dry run of the sampler on a synthetic model, before any real model
call, records every model call and every step the sampler reports. Step j begins with the model call whose
output the sampler reports as step j's x0 estimate (a k-diffusion sampler reports its first evaluation of
the step's latent); a sampler that reports a transformed estimate begins step j with its first call after
reporting step j - 1. No table of samplers: the map is read off the running sampler itself. In the real
run the latent entering step j is the input of that call, and the merged latent is written into it before
the model sees it, so the sampler continues from the merged latent with its own state.
"""
import contextvars
import threading
from dataclasses import dataclass

import torch

from .aggregation import AGGREGATION_MODES, aggregate
from .deviation import deviation_direction, reference_mean, resolve_mean_mode
from .schedule import EPS_SPACE, from_vp, timestep_of_sigma, to_vp


class NotSteppable(ValueError):
    """The sampler's steps cannot be followed in lockstep; the message says why (to follow its name)."""


class LockstepError(RuntimeError):
    """The branches' samplers stopped moving in step during a run."""


@dataclass(frozen=True)
class StepMap:
    """Where a sampler's steps begin: boundaries[j] is the ordinal of the model call that evaluates the
    latent entering step j; calls is the number of model calls of the whole run."""
    boundaries: tuple
    calls: int

    @property
    def steps(self):
        return len(self.boundaries)

    def calls_through(self, step):
        """Model calls a branch makes in steps 0 .. step."""
        return self.boundaries[step + 1] if step + 1 < self.steps else self.calls

    def run_calls(self, branches, aggregation_steps):
        """Model calls of a lockstep run: the main branch's whole run and each aux branch's steps 0 .. s
        (s clamped to [0, T - 1]); T + (N - 1)(s + 1) for a sampler with one call per step."""
        window = min(max(int(aggregation_steps), 0), self.steps - 1)
        return self.calls + (int(branches) - 1) * self.calls_through(window)


class DryRun:
    """The record of a dry run (`dry_run`): the sampler's result, every model call's output and every report
    as (step, reported x0 estimate, model calls made so far). Its hooks stand the synthetic model in."""

    def __init__(self, dry_denoise):
        self.dry_denoise = dry_denoise
        self.result = None
        self.outputs = []
        self.reports = []

    def model(self, x, sigma, call):
        denoised = self.dry_denoise(x, sigma, call)
        self.outputs.append(denoised)
        return denoised

    def report(self, step, denoised):
        self.reports.append((int(step), denoised, len(self.outputs)))

    def returned(self, x):
        return x


def dry_run(sample, dry_denoise, rng_devices=()):
    """Run `sample(hooks)` with dry_denoise(x, sigma, call) -> x0 in place of the model, leaving torch's global
    random state (CPU and the CUDA devices in rng_devices) as it was; returns its DryRun."""
    run = DryRun(dry_denoise)
    with torch.random.fork_rng(devices=list(rng_devices)):
        run.result = sample(run)
    return run


def map_steps(sample, steps, dry_denoise, rng_devices=()):
    """The StepMap of a sampler run `sample(hooks)` over `steps` steps, read off its dry run (`dry_run`);
    raises NotSteppable where the steps cannot be followed."""
    try:
        run = dry_run(sample, dry_denoise, rng_devices)
    except Exception as error:
        raise NotSteppable(f"could not be followed step by step: its dry run on a synthetic model failed "
                           f"({type(error).__name__}: {error})") from error
    reported = [step for step, _, _ in run.reports]
    if not reported:
        raise NotSteppable("does not report its steps (it never calls the sampler callback), so AMDM cannot tell "
                           "where one of its steps ends")
    if reported != list(range(steps)):
        raise NotSteppable(f"chooses its own step sizes (it took {len(reported)} steps where the schedule has "
                           f"{steps}), so its branches cannot step in lockstep on one sigma schedule; pick a "
                           "fixed-step sampler (e.g. dpmpp_2m or euler)")
    boundaries, previous = [], 0
    for step, denoised, made in run.reports:
        if made == previous:
            raise NotSteppable(f"reports step {step} without a model call of its own, so AMDM cannot tell where "
                               "that step begins")
        evaluated = [call for call in range(previous, made) if run.outputs[call] is denoised]
        boundaries.append(evaluated[-1] if evaluated else previous)
        previous = made
    return StepMap(tuple(boundaries), len(run.outputs))


def _per_branch(value, count, name):
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{name} needs one value per branch ({count} branches), got {len(value)}")
        return [float(v) for v in value]
    return [float(value)] * count


def _scalar_sigma(sigma):
    """A model call's sigma (sigma * ones(batch)) as the 0-dim tensor of its first item."""
    return sigma.reshape(-1)[0] if isinstance(sigma, torch.Tensor) else torch.tensor(float(sigma))


class _Merge:
    """What happens between steps: the aggregate, the deviation step toward each branch's mean, and the
    record of each branch's latents and x0 estimates that the means need."""

    def __init__(self, weights, aggregation, deviation_steps, mean_mode, sigma_table, space):
        self.weights = weights
        self.aggregation = aggregation
        self.p = deviation_steps
        self.mean_mode = mean_mode
        self.sigma_table = None if sigma_table is None else sigma_table.detach().cpu()
        self.space = space
        self.entered = {}  # step -> (every branch's latent entering it, its sigma)
        self.denoised = {}  # step -> every branch's x0 estimate of that latent

    def enter(self, step, latents, sigma):
        self.entered[step] = ([latent.clone() for latent in latents], _scalar_sigma(sigma))
        self.entered.pop(step - 3, None)
        self.denoised.pop(step - 3, None)

    def evaluated(self, step, denoised):
        self.denoised[step] = list(denoised)

    def _slope(self, k, step):
        (latents, sigma), denoised = self.entered[step], self.denoised[step]
        return (latents[k] - denoised[k]) / sigma

    def corrected(self, step, latents, sigma):
        """Every branch's latent entering `step` after the merge of step - 1's results `latents` (at sigma)."""
        sigma_next = _scalar_sigma(sigma)
        xbar = aggregate(latents, self.weights, self.aggregation)
        xbar_vp = to_vp(xbar, sigma_next, self.space)
        entered, sigma_now = self.entered[step - 1]
        corrected = []
        for k, latent in enumerate(entered):
            if self.mean_mode == "reference":
                previous, sigma_before = self.entered[step - 2]
                slope = self._slope(k, step - 2)
                eps = slope if self.space is EPS_SPACE else self.space.eps(
                    previous[k], self.denoised[step - 2][k], sigma_before)
                mu = reference_mean(to_vp(latent, sigma_now, self.space), eps,
                                    timestep_of_sigma(sigma_before, self.sigma_table), self.sigma_table)
            else:
                mu = to_vp(latent + self._slope(k, step - 1) * (sigma_next - sigma_now), sigma_next, self.space)
            # from_vp is linear: step in VP and scale back only the correction, so that p = 0 leaves xbar
            # bit-identical (no round trip through VP).
            corrected.append(xbar - self.p[k] * from_vp(deviation_direction(xbar_vp, mu), sigma_next, self.space))
        return corrected


_STOP = object()


class _Stopped(BaseException):
    """Raised inside a paused function to end it (a BaseException, so that its `except Exception` does not
    swallow it)."""


class Turns:
    """`body(turns)` run in a thread of its own, one turn at a time: `resume(reply)`, from the calling thread,
    runs it until it calls `turns.pause(request)` (which then returns the next resume's reply) or returns;
    meanwhile the caller waits, so only one of the two ever runs. The thread has the caller's context
    variables and grad / inference mode. After a turn: `request` (what it paused with) or `finished` and
    `result`; an exception it raised is raised by resume. `stop()` ends it (a paused body gets an exception
    out of its pause) and joins the thread."""

    def __init__(self, body, name):
        self.body = body
        self.request = self.result = self.reply = self.error = None
        self.finished = False
        self._turn = threading.Semaphore(0)
        self._yielded = threading.Semaphore(0)
        modes = torch.is_inference_mode_enabled(), torch.is_grad_enabled()
        context = contextvars.copy_context()
        self.thread = threading.Thread(target=context.run, args=(self._run, modes), daemon=True, name=name)
        self.thread.start()

    def _run(self, modes):
        self._turn.acquire()
        try:
            if self.reply is _STOP:  # stopped before its first turn
                return
            with torch.inference_mode(modes[0]), torch.set_grad_enabled(modes[1]):
                self.result = self.body(self)
        except _Stopped:
            pass
        except BaseException as error:  # handed to the caller, which raises it
            self.error = error
        finally:
            self.finished = True
            self.request = None
            self._yielded.release()

    def pause(self, request):
        """In the thread: hand `request` to the caller and wait for its reply."""
        self.request = request
        self._yielded.release()
        self._turn.acquire()
        reply, self.reply = self.reply, None
        if reply is _STOP:
            raise _Stopped
        return reply

    def resume(self, reply=None):
        """From the caller: hand over `reply`, wait until the body pauses again or ends."""
        self.reply = reply
        self._turn.release()
        self._yielded.acquire()
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def stop(self):
        while not self.finished:
            self.resume(_STOP)
        self.thread.join()


class _Request:
    __slots__ = ("x", "sigma", "call")

    def __init__(self, x, sigma, call):
        self.x, self.sigma, self.call = x, sigma, call


def _rng_state(devices):
    return torch.get_rng_state(), [torch.cuda.get_rng_state(device) for device in devices]


def _set_rng_state(state, devices):
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for device, device_state in zip(devices, cuda):
        torch.cuda.set_rng_state(device_state, device)


class _Worker:
    """An aux branch's sampler in Turns of its own: given a turn, it runs until its next model call (posted as
    `request`) or its end. As its own stream it draws from a copy of torch's global random state."""

    def __init__(self, index, sample, rng_state, rng_devices):
        self.index = index
        self.rng_state = rng_state
        self.rng_devices = rng_devices
        self.result = None
        self.turns = Turns(lambda turns: sample(self), name=f"amdm-branch-{index + 1}")

    @property
    def finished(self):
        return self.turns.finished

    @property
    def request(self):
        return self.turns.request

    # The branch's hooks, called by its sampler in the branch's thread.
    def model(self, x, sigma, call):
        return self.turns.pause(_Request(x, sigma, call))

    def report(self, step, denoised):
        pass

    def returned(self, x):
        self.result = x
        return x

    # Called by the main thread.
    def advance(self, reply=None):
        """Hand the branch its last call's output and wait until it posts its next model call or ends."""
        main_state = _rng_state(self.rng_devices)
        _set_rng_state(self.rng_state, self.rng_devices)
        try:
            self.turns.resume(reply)
        finally:
            self.rng_state = _rng_state(self.rng_devices)
            _set_rng_state(main_state, self.rng_devices)

    def stop(self):
        self.turns.stop()


@dataclass
class LockstepResult:
    x: torch.Tensor  # the main branch's result
    latents: list  # every branch's latent at its end (an aux branch's: the one it would have entered step s + 1 with)
    aux_denoised: list  # each aux branch's x0 estimate of its last step (step s)
    model_calls: int  # model calls of every branch


class _Lockstep:
    """One run: the main branch's hooks, which move the aux branches one model call at a time beside it."""

    def __init__(self, branches, step_map, window, merge, evaluate, check_interrupt, final_sigma, rng_devices):
        self.step_map = step_map
        self.window = window
        self.merge = merge
        self.evaluate_calls = evaluate
        self.check_interrupt = check_interrupt
        self.final_sigma = final_sigma
        self.step_at = {ordinal: step for step, ordinal in enumerate(step_map.boundaries)}
        self.made = 0
        self.model_calls = 0
        start_state = _rng_state(rng_devices)
        self.workers = [_Worker(k, sample, start_state, rng_devices) for k, sample in enumerate(branches[1:], 1)]
        self.started = False
        self.pending = {}  # aux index -> its last call's output, handed over when it moves on
        self.latents = [None] * len(branches)
        self.aux_denoised = [None] * len(self.workers)

    def evaluate(self, calls):
        self.model_calls += len(calls)
        return self.evaluate_calls(calls)

    def _request(self, worker, ordinal, x, sigma):
        worker.advance(self.pending.pop(worker.index, None))
        if worker.finished:
            raise LockstepError(f"branch {worker.index + 1}'s sampler ended after {ordinal} model calls while the "
                                "main branch's makes more; its branches cannot step in lockstep")
        request = worker.request
        if request.x.shape != x.shape or not torch.equal(torch.as_tensor(request.sigma), torch.as_tensor(sigma)):
            raise LockstepError(
                f"at model call {ordinal} branch {worker.index + 1}'s sampler evaluates a latent of shape "
                f"{tuple(request.x.shape)} at sigma {_scalar_sigma(request.sigma).item():g} where the main "
                f"branch's evaluates {tuple(x.shape)} at {_scalar_sigma(sigma).item():g}: the sampler's steps "
                "depend on the latent, so its branches cannot step in lockstep; pick a fixed-step sampler")
        return request

    def _stop_workers(self):
        for worker in self.workers:
            worker.stop()
        self.workers = []

    # The main branch's hooks.
    def model(self, x, sigma, call):
        ordinal, self.made = self.made, self.made + 1
        step = self.step_at.get(ordinal)
        if step is not None and self.check_interrupt is not None:
            self.check_interrupt()
        if not self.workers:
            return self.evaluate([(0, x, sigma, call)])[0]
        requests = [self._request(worker, ordinal, x, sigma) for worker in self.workers]
        latents = [x] + [request.x for request in requests]
        if step is not None:
            if 2 <= step <= self.window + 1:
                for latent, value in zip(latents, self.merge.corrected(step, latents, sigma)):
                    latent.copy_(value)
            self.merge.enter(step, latents, sigma)
            if step == self.window + 1:  # the aux branches ran steps 0 .. s: they stop here
                self.latents[1:] = latents[1:]
                for k, worker in enumerate(self.workers):
                    self.aux_denoised[k] = self.merge.denoised[step - 1][k + 1]
                self._stop_workers()
                return self.evaluate([(0, x, sigma, call)])[0]
        calls = [(0, x, sigma, call)] + [(worker.index, request.x, request.sigma, request.call)
                                         for worker, request in zip(self.workers, requests)]
        results = self.evaluate(calls)
        if step is not None:
            self.merge.evaluated(step, results)
        for worker, result in zip(self.workers, results[1:]):
            self.pending[worker.index] = result
        return results[0]

    def report(self, step, denoised):
        pass

    def returned(self, x):
        """The main branch's result; where the window covers the last step, the aux branches finish too and
        the results are merged once more."""
        if not self.workers:
            return x
        finals = []
        for worker in self.workers:
            worker.advance(self.pending.pop(worker.index, None))
            if not worker.finished:
                raise LockstepError(f"branch {worker.index + 1}'s sampler makes more model calls than the main "
                                    "branch's; its branches cannot step in lockstep")
            finals.append(worker.result)
        last = self.step_map.steps - 1
        for k in range(len(self.workers)):
            self.aux_denoised[k] = self.merge.denoised[last][k + 1]
        self.workers = []
        latents = [x] + finals
        if self.window >= 1:
            latents = self.merge.corrected(last + 1, latents, self.final_sigma)
        self.latents[1:] = latents[1:]
        return latents[0]

    def close(self):
        """Stop every aux branch that is still running (after an error or an interrupt) and join its thread."""
        self._stop_workers()


def _evaluate_in_turn(calls):
    return [call(x, sigma) for _, x, sigma, call in calls]


def run_lockstep(branches, step_map, *, aggregation_steps, weights, aggregation="sequential", deviation_steps=0.3,
                 mean_mode="auto", sigma_table=None, space=EPS_SPACE, final_sigma=0.0, evaluate=_evaluate_in_turn,
                 check_interrupt=None, rng_devices=()):
    """Sample N branches in lockstep with AMDM aggregation in steps 1 .. s (module docstring).

    branches[k]: sample(hooks) -> latent, branch k's sampler run (main first); step_map: the sampler's
    StepMap (map_steps); aggregation_steps: s; weights: one per aux branch; deviation_steps: p for every
    branch or a list of p_k; mean_mode: "auto", "reference" or "exact"; sigma_table: the model's 1000-step
    DDPM sigma table, None where it has none (required for "reference"); space: the family's NoiseSpace;
    final_sigma: the sigma of a sampler's result (the merge after the last step, where s = T - 1);
    evaluate([(branch, x, sigma, call), ...]) -> x0 estimates: the model calls of one meeting point (by
    default each `call(x, sigma)`); check_interrupt(): called before every step of the main branch (raise to
    stop); rng_devices: the CUDA devices whose random state each aux branch keeps apart from the main one's.
    Every aux thread has ended when this returns or raises.
    """
    weights = list(weights)
    n = len(branches)
    if n < 1:
        raise ValueError("run_lockstep needs at least one branch (the main one)")
    if len(weights) != n - 1:
        raise ValueError(f"weights needs one value per aux branch ({n - 1}), got {len(weights)}")
    if aggregation not in AGGREGATION_MODES:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATION_MODES}")
    if aggregation == "paper" and n > 3:
        raise ValueError(f"aggregation 'paper' is defined for 2 or 3 branches, got {n}; use 'sequential'")
    if int(aggregation_steps) < 0:
        raise ValueError(f"aggregation_steps must be >= 0, got {aggregation_steps}")
    merge = _Merge(weights, aggregation, _per_branch(deviation_steps, n, "deviation_steps"),
                   resolve_mean_mode(mean_mode, sigma_table), sigma_table, space)
    window = min(int(aggregation_steps), step_map.steps - 1)
    run = _Lockstep(branches, step_map, window, merge, evaluate, check_interrupt, final_sigma, list(rng_devices))
    try:
        x = branches[0](run)
    finally:
        run.close()
    run.latents[0] = x
    return LockstepResult(x=x, latents=run.latents, aux_denoised=run.aux_denoised, model_calls=run.model_calls)
