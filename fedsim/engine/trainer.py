"""Local training of a chunk of clients in one vectorized computation, and the sequential reference.

Clients' parameters are stacked, ``{name: [C, *shape]}``. One local step for the whole chunk is:

1. gather the minibatches ``x[C, B, ...]`` (ragged clients use a mask ``m[C, B]``);
2. forward with ``vmap(functional_call)`` and per-client masked mean loss
   ``L_c = sum_b m_cb l(f(w_c; x_cb), y_cb) / max(1, sum_b m_cb)``;
3. gradients: because clients' parameters are disjoint, ``d(sum_c L_c)/dw_c = dL_c/dw_c``, so one
   ``autograd.grad`` of the summed loss gives every client's own gradient (``grad_mode="sum"``, the
   default); ``grad_mode="vmap"`` uses ``vmap(grad_and_value)`` instead (same numbers);
4. the client algorithm's gradient transform, then the functional optimizer, then the algorithm's
   ``after_step`` and ``project`` hooks; clients whose step is fully
   masked (ragged epochs) keep their parameters and optimizer state unchanged, and the forward and backward
   pass of such a step run on the active clients only (no compute is spent on masked steps).

Optional, when the client algorithm asks for them: per-microbatch gradients (``algorithm.microbatches``
equal slices of each minibatch, merged by ``algorithm.combine_microbatches``: GAF's filter), and a recorded
trajectory of per-step deltas, microbatch or per-sample gradients ``[C, U, D]`` handed to
``algorithm.regulate`` after ``algorithm.finish`` (ECGR, BHerd; see :mod:`fedsim.engine.trajectory`).

``train_sequential`` runs each client alone through the plain (unbatched) model and is the reference the
vectorized path is tested against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, vmap

from fedsim.core.errors import FedsimError, unknown
from fedsim.core.protocol import ClientAlgorithm, LocalContext, TrajectorySpec
from fedsim.core.pytree import Tree, flatten, stack

from .sample_clipping import SampleClipping
from .stacked import stacked_forward, stacked_linear_layers, traced_forward
from .trajectory import Trajectory, num_units

GRAD_MODES = ("sum", "vmap")
LossFn = Callable[[Tensor, Tensor], Tensor]  # (logits [B, classes], targets [B]) -> per-sample loss [B]


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-sample cross-entropy loss."""
    return F.cross_entropy(logits, targets, reduction="none")


@dataclass
class ChunkResult:
    """Per-client results of local training, stacked in chunk order."""

    deltas: Tree
    num_steps: Tensor
    train_loss: Tensor
    extras: Tree
    client_state: Tree
    opt_state: Tree = field(default_factory=dict)
    stats: Tree = field(default_factory=dict)
    samples_processed: Tensor | None = None
    """Samples each client processed in the round (valid minibatch entries over its steps; set by the executor)."""


def _masked_mean(losses: Tensor, mask: Tensor) -> Tensor:
    return (losses * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)


def _select(active: Tensor, new: Tree, old: Tree) -> Tree:
    """Per client, take ``new`` where ``active`` else ``old``."""
    out = {}
    for k, v in new.items():
        a = active.reshape(-1, *([1] * (v.dim() - 1)))
        out[k] = torch.where(a, v, old[k])
    return out


def _scatter_rows(rows: Tensor, sub: Tree, num_rows: int) -> Tree:
    """A stacked tree of ``num_rows`` rows, zero except ``rows``, which hold ``sub``."""
    out = {}
    for k, v in sub.items():
        full = v.new_zeros(num_rows, *v.shape[1:])
        full[rows] = v
        out[k] = full
    return out


def _per_client(weights: Tensor, like: Tensor) -> Tensor:
    """Reshape ``[C, n]`` weights to broadcast against ``[C, n, *shape]``."""
    return weights.reshape(*weights.shape, *([1] * (like.dim() - weights.dim()))).to(like.dtype)


def check_microbatches(batch_size: int, microbatches: int) -> int:
    """Microbatch size; the batch must split into equal slices."""
    if batch_size % microbatches:
        raise FedsimError(f"batch size {batch_size} does not split into {microbatches} equal microbatches")
    return batch_size // microbatches


class _Recorder:
    """Writes a chunk's trajectory during local training (step deltas, microbatch or per-sample units).

    Step units stored in the parameters' dtype keep the iterates ``w_k`` (one copy per step) and difference
    them once at the end (:meth:`Trajectory.differences_`); in a narrower dtype every delta is formed in full
    precision against a copy of the previous iterate before it is stored."""

    def __init__(
        self, spec: TrajectorySpec, params: Tree, steps: int, batch: int, lr: float, buffer: Tensor | None = None
    ):
        self.spec, self.lr = spec, lr
        step_unit = spec.unit == "step"
        first = next(iter(params.values()))
        exact = spec.dtype is None or spec.dtype == first.dtype
        self.iterates = step_unit and exact
        # A narrower dtype stores units divided by the learning rate (gradient scale), so that small late-round
        # steps do not underflow float16; the trajectory undoes the scale in gram() and combine().
        scale = 1.0 if exact or lr == 0 else 1.0 / lr
        self.trajectory = Trajectory(
            params, num_units(spec, steps, batch), spec, buffer, zero=not step_unit, scale=scale
        )
        self.prev = {k: v.clone() for k, v in params.items()} if step_unit and not self.iterates else None

    def after_step(self, k: int, params: Tree, active: Tensor) -> None:
        """Step unit: ``D_k = w_before - w_after`` (zero for clients that did not step)."""
        if self.iterates:
            self.trajectory.write(k, params, active)
            return
        if self.prev is None:
            return
        for key, p in params.items():
            self.prev[key].sub_(p)
            if self.trajectory.scale != 1.0:
                self.prev[key].mul_(self.trajectory.scale)
        self.trajectory.write(k, self.prev, active)
        for key, p in params.items():
            self.prev[key].copy_(p)

    def finish(self, origin: Tree) -> Trajectory:
        """The completed trajectory (iterates turned into deltas)."""
        if self.iterates:
            self.trajectory.differences_(flatten(origin))
        return self.trajectory

    def microbatch(self, k: int, grads: Tree, counts: Tensor) -> None:
        """Microbatch unit: ``eta (n_m / n) g_m`` for the M slices of step k."""
        weights = counts / counts.sum(1, keepdim=True).clamp_min(1.0)
        step = self.lr * self.trajectory.scale
        units = {key: step * g * _per_client(weights, g) for key, g in grads.items()}
        m = counts.shape[1]
        self.trajectory.write(k * m, units, counts > 0, per_unit=True)

    def samples(self, k: int, grads: Tree, mask: Tensor) -> None:
        """Sample unit: ``eta g_s / b`` for the valid samples of step k (b of them)."""
        weights = mask / mask.sum(1, keepdim=True).clamp_min(1.0)
        step = self.lr * self.trajectory.scale
        units = {key: step * g * _per_client(weights, g) for key, g in grads.items()}
        self.trajectory.write(k * mask.shape[1], units, mask > 0, per_unit=True)


class VectorizedTrainer:
    """Trains a chunk of clients at once (see the module docstring for the math)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn = cross_entropy, grad_mode: str = "sum"):
        if grad_mode not in GRAD_MODES:
            raise unknown("grad_mode", grad_mode, GRAD_MODES)
        self.model = model
        self.loss_fn = loss_fn
        self.grad_mode = grad_mode
        model_forward = self._forward

        def client_loss(params: Tree, x: Tensor, y: Tensor, m: Tensor) -> Tensor:
            return _masked_mean(loss_fn(model_forward(params, x), y), m)

        def sample_loss(params: Tree, x: Tensor, y: Tensor) -> Tensor:
            return loss_fn(model_forward(params, x.unsqueeze(0)), y.unsqueeze(0)).squeeze(0)

        self._trajectory_buffer: Tensor | None = None  # reused across chunks and rounds
        self._vmapped_grad = vmap(grad_and_value(client_loss))
        self._vmapped_forward = stacked_forward(model) or vmap(self._forward)  # same numbers; see engine.stacked
        self._per_sample_grad = vmap(vmap(grad(sample_loss), in_dims=(None, 0, 0)))
        self._per_sample_grad_and_loss = vmap(vmap(grad_and_value(sample_loss), in_dims=(None, 0, 0)))
        self._linear_layers = stacked_linear_layers(model)
        self._traced_forward = traced_forward(model) if self._linear_layers is not None else None

    def _forward(self, params: Tree, x: Tensor) -> Tensor:
        return functional_call(self.model, params, (x,))

    def grads(self, params: Tree, x: Tensor, y: Tensor, m: Tensor) -> tuple[Tree, Tensor]:
        """Per-client gradients and masked mean losses for stacked params and batches ``x[C, B, ...]``."""
        if self.grad_mode == "vmap":
            return self._vmapped_grad(params, x, y, m)
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        with torch.enable_grad():
            logits = self._vmapped_forward(leaves, x)
            c, b = y.shape
            losses = self.loss_fn(logits.reshape(c * b, -1), y.reshape(-1)).reshape(c, b)
            per_client = _masked_mean(losses, m)
            g = torch.autograd.grad(per_client.sum(), list(leaves.values()))
        return dict(zip(leaves, g, strict=True)), per_client.detach()

    def microbatch_grads(
        self, params: Tree, x: Tensor, y: Tensor, m: Tensor, microbatches: int
    ) -> tuple[Tree, Tensor, Tensor]:
        """Gradients of ``microbatches`` equal consecutive slices of every client's minibatch: ``[C, M, ...]``,
        the valid samples per slice ``[C, M]`` and each client's masked mean loss over the whole minibatch.
        Each slice is one more row of the stacked parameters (``repeat_interleave``), so one backward pass
        gives them all."""
        c, b = y.shape
        size = check_microbatches(b, microbatches)
        rows = c * microbatches
        leaves = {k: v.detach().repeat_interleave(microbatches, 0).requires_grad_(True) for k, v in params.items()}
        xs, ys, ms = x.reshape(rows, size, *x.shape[2:]), y.reshape(rows, size), m.reshape(rows, size)
        with torch.enable_grad():
            logits = self._vmapped_forward(leaves, xs)
            losses = self.loss_fn(logits.reshape(rows * size, -1), ys.reshape(-1)).reshape(rows, size)
            per_slice = _masked_mean(losses, ms)
            g = torch.autograd.grad(per_slice.sum(), list(leaves.values()))
        counts = ms.sum(1).reshape(c, microbatches)
        grads = {k: gi.reshape(c, microbatches, *gi.shape[1:]) for k, gi in zip(leaves, g, strict=True)}
        loss = (per_slice.detach().reshape(c, microbatches) * counts).sum(1) / counts.sum(1).clamp_min(1.0)
        return grads, counts, loss

    def per_sample_grads(self, params: Tree, x: Tensor, y: Tensor) -> Tree:
        """Per-sample gradients ``[C, B, ...]`` at stacked ``params`` (``vmap`` over clients of ``vmap(grad)``
        over samples)."""
        return self._per_sample_grad({k: v.detach() for k, v in params.items()}, x, y)

    def private_grads(
        self, params: Tree, x: Tensor, y: Tensor, m: Tensor, clipping: SampleClipping, keys: tuple[int, np.ndarray],
        step: int,
    ) -> tuple[Tree, Tensor, Tensor]:  # fmt: skip
        """DP-SGD's step gradients (:mod:`fedsim.engine.sample_clipping`), masked mean losses and clipped counts
        of stacked ``params``; ``keys``: the round and the clients' ids (the noise's keys)."""
        if self._linear_layers is not None:
            return self._ghost_private_grads(params, x, y, m, clipping, keys, step)
        g_s, losses = self._per_sample_grad_and_loss({k: v.detach() for k, v in params.items()}, x, y)
        grads, clipped = clipping.gradient(g_s, m, keys[0], keys[1], step)
        return grads, _masked_mean(losses.detach(), m), clipped

    def _ghost_private_grads(
        self, params: Tree, x: Tensor, y: Tensor, m: Tensor, clipping: SampleClipping, keys: tuple[int, np.ndarray],
        step: int,
    ) -> tuple[Tree, Tensor, Tensor]:  # fmt: skip
        """:meth:`private_grads` of a ``Linear``-layer model without per-sample gradients (ghost clipping: see
        :mod:`fedsim.engine.sample_clipping`)."""
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        with torch.enable_grad():
            logits, inputs, outputs = self._traced_forward(leaves, x)
            c, b = y.shape
            losses = self.loss_fn(logits.reshape(c * b, -1), y.reshape(-1)).reshape(c, b)
            deltas = torch.autograd.grad((losses * m).sum(), outputs)
        squares = 0
        for (_, bias), a, d in zip(self._linear_layers, inputs, deltas, strict=True):
            d_sq = d.pow(2).sum(-1)
            squares = squares + a.detach().pow(2).sum(-1) * d_sq + (d_sq if bias else 0)
        norms = squares.sqrt()
        scale = clipping.scales(norms, m)
        sums = {}
        for (name, bias), a, d in zip(self._linear_layers, inputs, deltas, strict=True):
            weighted = d * scale.unsqueeze(-1).to(d.dtype)
            sums[f"{name}.weight"] = torch.bmm(weighted.transpose(1, 2), a.detach())
            if bias:
                sums[f"{name}.bias"] = weighted.sum(1)
        grads = clipping.finish({k: sums[k] for k in params}, keys[0], keys[1], step)
        return grads, _masked_mean(losses.detach(), m), clipping.clipped(norms, m)

    def _step_grads(
        self, params: Tree, x: Tensor, y: Tensor, m: Tensor, active: Tensor, everyone: bool,
        algorithm: ClientAlgorithm, recorder: _Recorder | None, k: int, origin: Tree,
        clipping: SampleClipping | None = None, keys: tuple[int, np.ndarray] | None = None,
    ) -> tuple[Tree, Tensor, Tensor | None]:  # fmt: skip
        """Step gradients (``[C, ...]``, zero for inactive clients), losses and which clients take the step
        (``None``: the active ones), computed on the active clients only."""
        num = y.shape[0]
        rows = None if everyone else active.nonzero().squeeze(1)
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])  # noqa: E731
        sub = params if rows is None else {key: v[rows] for key, v in params.items()}
        xs, ys, ms = pick(x), pick(y), pick(m)
        keep = None
        if clipping is not None:
            ids = keys[1] if rows is None else keys[1][rows.cpu().numpy()]
            grads, losses, clipped = self.private_grads(sub, xs, ys, ms, clipping, (keys[0], ids), k)
            self.clipped += clipped if rows is None else _scatter_rows(rows, {"n": clipped}, num)["n"]
        elif algorithm.microbatches > 1:
            g_mb, counts, losses = self.microbatch_grads(sub, xs, ys, ms, algorithm.microbatches)
            grads, keep = algorithm.combine_microbatches(g_mb, counts)
            if recorder is not None and recorder.spec.unit == "microbatch":
                if rows is not None:
                    g_mb, counts = _scatter_rows(rows, g_mb, num), _scatter_rows(rows, {"n": counts}, num)["n"]
                recorder.microbatch(k, g_mb, counts)
        else:
            grads, losses = self.grads(sub, xs, ys, ms)
        if recorder is not None and recorder.spec.unit == "sample":
            at = {key: v.expand(len(ys), *v.shape[1:]) if v.shape[0] == 1 else pick(v) for key, v in origin.items()}
            g_s = self.per_sample_grads(at, xs, ys)
            if rows is not None:
                g_s = _scatter_rows(rows, g_s, num)
            recorder.samples(k, g_s, m)
        if rows is not None:
            grads = _scatter_rows(rows, grads, num)
            losses = _scatter_rows(rows, {"l": losses}, num)["l"]
            if keep is not None:
                keep = _scatter_rows(rows, {"k": keep}, num)["k"]
        return grads, losses, keep

    def train(
        self,
        global_params: Tree,
        x: Tensor,
        y: Tensor,
        sample_index: Tensor,
        mask: Tensor,
        optimizer,
        lr: float,
        algorithm: ClientAlgorithm,
        broadcast: Tree | None = None,
        client_state: Tree | None = None,
        start: Tree | None = None,
        opt_state: Tree | None = None,
        clipping: SampleClipping | None = None,
        keys: tuple[int, np.ndarray] | None = None,
        planned: Tensor | None = None,
    ) -> ChunkResult:
        """Run local training for a chunk: ``sample_index[C, K, B]`` global sample ids, ``mask[C, K, B]``.

        Clients start from ``global_params`` (federated) or from their own stacked ``start`` parameters
        (decentralized nodes); ``deltas = start - final``. ``opt_state`` continues a previous call's local
        optimizer state (returned in the result) instead of a fresh one. ``clipping``: DP-SGD steps with
        noise keyed by ``keys = (round, client ids)``; a client takes each of its ``planned[c]`` steps even
        when its Poisson batch is empty (the step's gradient is then noise only).
        """
        num_clients, num_steps_max, batch = sample_index.shape
        ctx = LocalContext(global_params, broadcast or {}, client_state or {}, lr)
        params = {k: v.clone() for k, v in start.items()} if start is not None else stack(global_params, num_clients)
        origin = start if start is not None else {k: v.unsqueeze(0) for k, v in global_params.items()}
        opt_state = {k: v.clone() for k, v in opt_state.items()} if opt_state is not None else optimizer.init(params)
        maskf = mask.to(next(iter(params.values())).dtype)
        step_active = mask.any(dim=2)  # [C, K]
        if planned is not None:
            step_active = torch.arange(num_steps_max, device=mask.device)[None, :] < planned[:, None]
        self.clipped = torch.zeros(num_clients, dtype=torch.long, device=mask.device)
        all_active = step_active.all(dim=0).tolist()
        spec = algorithm.trajectory
        recorder = None
        if spec is not None:
            recorder = _Recorder(spec, params, num_steps_max, batch, lr, self._trajectory_buffer)
            self._trajectory_buffer = recorder.trajectory.units
        loss_sum = torch.zeros(num_clients, dtype=torch.float64, device=sample_index.device)
        taken = torch.zeros(num_clients, dtype=torch.long, device=sample_index.device)
        for k in range(num_steps_max):
            idx = sample_index[:, k]
            active = step_active[:, k]
            grads, losses, keep = self._step_grads(
                params,
                x[idx],
                y[idx],
                maskf[:, k],
                active,
                all_active[k],
                algorithm,
                recorder,
                k,
                origin,
                clipping,
                keys,
            )
            everyone = all_active[k]
            if keep is not None:  # a filter rejected some clients' steps: they see a zero gradient, like masked ones
                active = active & keep
                everyone = everyone and bool(keep.all())
                grads = _select(keep, grads, {name: torch.zeros_like(g) for name, g in grads.items()})
            grads = algorithm.grad_transform(grads, params, ctx)
            if everyone:  # params, grads and state are this chunk's own: update in place
                opt_state = optimizer.step_(grads, opt_state, params, lr)
                params = algorithm.after_step(params, ctx)
            else:  # the same in-place step on copies (the same bits as a chunk of active clients), then select
                stepped = {name: p.clone() for name, p in params.items()}
                new_state = optimizer.step_(grads, {name: v.clone() for name, v in opt_state.items()}, stepped, lr)
                stepped = algorithm.after_step(stepped, ctx)
                params = _select(active, stepped, params)
                opt_state = _select(active, new_state, opt_state)
            params = algorithm.project(params)
            if recorder is not None:
                recorder.after_step(k, params, active)
            loss_sum += losses.double() * step_active[:, k]
            taken += active
        batches = step_active.sum(dim=1)
        deltas = {name: origin[name] - p for name, p in params.items()}
        deltas, extras, new_client_state = algorithm.finish(deltas, taken, ctx)
        trajectory = recorder.finish(origin) if recorder is not None else None
        deltas, stats = algorithm.regulate(deltas, trajectory, taken)
        train_loss = (loss_sum / batches.clamp_min(1)).float()
        if clipping is not None:
            stats = {**stats, "clipped_samples": self.clipped}
        return ChunkResult(deltas, taken, train_loss, extras, new_client_state, opt_state, stats)


def _sequential_grads(model, loss_fn, params: Tree, xb: Tensor, yb: Tensor, m: Tensor) -> tuple[Tree, Tensor]:
    """One client's masked mean loss and its gradient through the plain (unbatched) model (``[1, ...]`` trees)."""
    leaves = {n: p[0].detach().requires_grad_(True) for n, p in params.items()}
    with torch.enable_grad():
        losses = loss_fn(functional_call(model, leaves, (xb,)), yb)
        loss = (losses * m).sum() / m.sum().clamp_min(1.0)
        g = torch.autograd.grad(loss, list(leaves.values()))
    return {n: gi.unsqueeze(0) for n, gi in zip(leaves, g, strict=True)}, loss.detach()


def train_sequential(
    model: nn.Module,
    global_params: Tree,
    x: Tensor,
    y: Tensor,
    sample_index: Tensor,
    mask: Tensor,
    optimizer,
    lr: float,
    algorithm: ClientAlgorithm,
    broadcast: Tree | None = None,
    client_state: Tree | None = None,
    start: Tree | None = None,
    opt_state: Tree | None = None,
    loss_fn: LossFn = cross_entropy,
    clipping: SampleClipping | None = None,
    keys: tuple[int, np.ndarray] | None = None,
    planned: Tensor | None = None,
) -> ChunkResult:
    """Reference path: every client trained alone, one after another, through the unbatched model
    (same ``start``/``opt_state``/``clipping`` semantics as :meth:`VectorizedTrainer.train`); microbatch and
    per-sample gradients are plain loops over slices and samples."""
    results = []
    num_steps_max, batch = sample_index.shape[1], sample_index.shape[2]
    microbatches = algorithm.microbatches
    for c in range(sample_index.shape[0]):
        state_c = {k: v[c : c + 1] for k, v in (client_state or {}).items()}
        ctx = LocalContext(global_params, broadcast or {}, state_c, lr)
        source = start if start is not None else {k: v.unsqueeze(0) for k, v in global_params.items()}
        origin = {k: v[c : c + 1] if start is not None else v for k, v in source.items()}
        params = {k: v.detach().clone() for k, v in origin.items()}
        if opt_state is not None:
            opt_state_c = {k: v[c : c + 1].clone() for k, v in opt_state.items()}
        else:
            opt_state_c = optimizer.init(params)
        spec = algorithm.trajectory
        recorder = _Recorder(spec, params, num_steps_max, batch, lr) if spec is not None else None
        loss_sum, steps, taken, clipped = 0.0, 0, 0, 0
        for k in range(num_steps_max):
            m = mask[c, k].to(next(iter(params.values())).dtype)
            if clipping is not None and k < int(planned[c]):
                grads, loss, n_clipped = _sequential_private_grads(
                    model, loss_fn, params, x[sample_index[c, k]], y[sample_index[c, k]], m, clipping,
                    (keys[0], keys[1][c : c + 1]), k,
                )  # fmt: skip
                clipped += n_clipped
                grads = algorithm.grad_transform(grads, params, ctx)
                updates, opt_state_c = optimizer.update(grads, opt_state_c, params, lr)
                params = algorithm.project(algorithm.after_step({n: p + updates[n] for n, p in params.items()}, ctx))
                loss_sum, steps, taken = loss_sum + float(loss), steps + 1, taken + 1
                continue
            if not bool(m.any()):
                if recorder is not None:
                    recorder.after_step(k, params, torch.zeros(1, dtype=torch.bool))
                continue
            xb, yb = x[sample_index[c, k]], y[sample_index[c, k]]
            keep = None
            if microbatches > 1:
                size = check_microbatches(batch, microbatches)
                parts = [
                    _sequential_grads(model, loss_fn, params, xb[j * size : (j + 1) * size],
                                      yb[j * size : (j + 1) * size], m[j * size : (j + 1) * size])
                    for j in range(microbatches)
                ]  # fmt: skip
                g_mb = {n: torch.stack([g[n] for g, _ in parts], dim=1) for n in params}
                counts = torch.stack([m[j * size : (j + 1) * size].sum() for j in range(microbatches)]).unsqueeze(0)
                grads, keep = algorithm.combine_microbatches(g_mb, counts)
                loss = sum(float(l) * float(n) for (_, l), n in zip(parts, counts[0], strict=True)) / float(m.sum())
                if recorder is not None and spec.unit == "microbatch":
                    recorder.microbatch(k, g_mb, counts)
            else:
                grads, loss = _sequential_grads(model, loss_fn, params, xb, yb, m)
            if recorder is not None and spec.unit == "sample":
                per_sample = [_sequential_grads(model, loss_fn, origin, xb[s : s + 1], yb[s : s + 1], m[s : s + 1])[0]
                              for s in range(batch)]  # fmt: skip
                recorder.samples(k, {n: torch.stack([g[n] for g in per_sample], dim=1) for n in params}, m.unsqueeze(0))
            step = keep is None or bool(keep[0])
            if step:
                grads = algorithm.grad_transform(grads, params, ctx)
                updates, opt_state_c = optimizer.update(grads, opt_state_c, params, lr)
                stepped = algorithm.after_step({n: p + updates[n] for n, p in params.items()}, ctx)
                params = algorithm.project(stepped)
                taken += 1
            if recorder is not None:
                recorder.after_step(k, params, torch.tensor([step]))
            loss_sum += float(loss)
            steps += 1
        deltas = {n: origin[n] - p for n, p in params.items()}
        steps_t = torch.tensor([taken], device=sample_index.device)
        deltas, extras, new_state = algorithm.finish(deltas, steps_t, ctx)
        trajectory = recorder.finish(origin) if recorder is not None else None
        deltas, stats = algorithm.regulate(deltas, trajectory, steps_t)
        if clipping is not None:
            stats = {**stats, "clipped_samples": torch.tensor([clipped])}
        results.append((deltas, taken, loss_sum / max(steps, 1), extras, new_state, opt_state_c, stats))
    cat = lambda i: {k: torch.cat([r[i][k] for r in results]) for k in results[0][i]}  # noqa: E731
    return ChunkResult(
        cat(0),
        torch.tensor([r[1] for r in results], device=sample_index.device),
        torch.tensor([r[2] for r in results], dtype=torch.float32),
        cat(3),
        cat(4),
        cat(5),
        cat(6),
    )


def _sequential_private_grads(
    model, loss_fn, params: Tree, xb: Tensor, yb: Tensor, m: Tensor, clipping: SampleClipping,
    keys: tuple[int, np.ndarray], step: int,
) -> tuple[Tree, Tensor, int]:  # fmt: skip
    """One client's DP-SGD step gradient by a loop over its valid samples (the reference of
    :meth:`VectorizedTrainer.private_grads`): clip each sample's gradient, sum, add noise, divide."""
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    losses, clipped = [], 0
    for s in m.nonzero().squeeze(1).tolist():
        g, loss = _sequential_grads(model, loss_fn, params, xb[s : s + 1], yb[s : s + 1], m[s : s + 1])
        norm = float(torch.stack([v.pow(2).sum() for v in g.values()]).sum().sqrt())
        scale = min(1.0, clipping.clip / max(norm, 1e-12))
        clipped += norm > clipping.clip
        total = {n: total[n] + g[n] * scale for n in total}
        losses.append(loss)
    if clipping.noise_multiplier > 0:
        noise = clipping.noise(total, keys[0], keys[1], step)
        total = {n: v + noise[n] for n, v in total.items()}
    loss = torch.stack(losses).mean() if losses else torch.zeros(())
    return {n: v / clipping.expected_batch for n, v in total.items()}, loss, clipped
