"""Local training of a chunk of clients in one vectorized computation, and the sequential reference.

Clients' parameters are stacked, ``{name: [C, *shape]}``. One local step for the whole chunk is:

1. gather the minibatches ``x[C, B, ...]`` (ragged clients use a mask ``m[C, B]``);
2. forward with ``vmap(functional_call)`` and per-client masked mean loss
   ``L_c = sum_b m_cb l(f(w_c; x_cb), y_cb) / max(1, sum_b m_cb)``;
3. gradients: because clients' parameters are disjoint, ``d(sum_c L_c)/dw_c = dL_c/dw_c``, so one
   ``autograd.grad`` of the summed loss gives every client's own gradient (``grad_mode="sum"``, the
   default); ``grad_mode="vmap"`` uses ``vmap(grad_and_value)`` instead (same numbers);
4. the client algorithm's gradient transform, then the functional optimizer; clients whose step is fully
   masked (ragged epochs) keep their parameters and optimizer state unchanged.

``train_sequential`` runs each client alone through the plain (unbatched) model and is the reference the
vectorized path is tested against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from .protocol import ClientAlgorithm, LocalContext
from .pytree import Tree, stack

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


def _masked_mean(losses: Tensor, mask: Tensor) -> Tensor:
    return (losses * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)


def _select(active: Tensor, new: Tree, old: Tree) -> Tree:
    """Per client, take ``new`` where ``active`` else ``old``."""
    out = {}
    for k, v in new.items():
        a = active.reshape(-1, *([1] * (v.dim() - 1)))
        out[k] = torch.where(a, v, old[k])
    return out


class VectorizedTrainer:
    """Trains a chunk of clients at once (see the module docstring for the math)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn = cross_entropy, grad_mode: str = "sum"):
        if grad_mode not in GRAD_MODES:
            from fedsim.errors import unknown

            raise unknown("grad_mode", grad_mode, GRAD_MODES)
        self.model = model
        self.loss_fn = loss_fn
        self.grad_mode = grad_mode
        model_forward = self._forward

        def client_loss(params: Tree, x: Tensor, y: Tensor, m: Tensor) -> Tensor:
            return _masked_mean(loss_fn(model_forward(params, x), y), m)

        self._vmapped_grad = vmap(grad_and_value(client_loss))
        self._vmapped_forward = vmap(self._forward)

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
    ) -> ChunkResult:
        """Run local training for a chunk: ``sample_index[C, K, B]`` global sample ids, ``mask[C, K, B]``.

        Clients start from ``global_params`` (federated) or from their own stacked ``start`` parameters
        (decentralized nodes); ``deltas = start - final``. ``opt_state`` continues a previous call's local
        optimizer state (returned in the result) instead of a fresh one.
        """
        num_clients, num_steps_max, _ = sample_index.shape
        ctx = LocalContext(global_params, broadcast or {}, client_state or {}, lr)
        params = {k: v.clone() for k, v in start.items()} if start is not None else stack(global_params, num_clients)
        origin = start if start is not None else {k: v.unsqueeze(0) for k, v in global_params.items()}
        opt_state = {k: v.clone() for k, v in opt_state.items()} if opt_state is not None else optimizer.init(params)
        maskf = mask.to(next(iter(params.values())).dtype)
        step_active = mask.any(dim=2)  # [C, K]
        all_active = step_active.all(dim=0).tolist()
        loss_sum = torch.zeros(num_clients, dtype=torch.float64, device=sample_index.device)
        for k in range(num_steps_max):
            idx = sample_index[:, k]
            grads, losses = self.grads(params, x[idx], y[idx], maskf[:, k])
            grads = algorithm.grad_transform(grads, params, ctx)
            if all_active[k]:  # params, grads and state are this chunk's own: update in place
                opt_state = optimizer.step_(grads, opt_state, params, lr)
            else:
                updates, new_state = optimizer.update(grads, opt_state, params, lr)
                active = step_active[:, k]
                params = _select(active, {name: p + updates[name] for name, p in params.items()}, params)
                opt_state = _select(active, new_state, opt_state)
            params = algorithm.project(params)
            loss_sum += losses.double() * step_active[:, k]
        steps = step_active.sum(dim=1)
        deltas = {name: origin[name] - p for name, p in params.items()}
        deltas, extras, new_client_state = algorithm.finish(deltas, steps, ctx)
        train_loss = (loss_sum / steps.clamp_min(1)).float()
        return ChunkResult(deltas, steps, train_loss, extras, new_client_state, opt_state)


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
) -> ChunkResult:
    """Reference path: every client trained alone, one after another, through the unbatched model
    (same ``start``/``opt_state`` semantics as :meth:`VectorizedTrainer.train`)."""
    results = []
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
        loss_sum, steps = 0.0, 0
        for k in range(sample_index.shape[1]):
            m = mask[c, k]
            if not bool(m.any()):
                continue
            leaves = {n: p[0].detach().requires_grad_(True) for n, p in params.items()}
            xb, yb = x[sample_index[c, k]], y[sample_index[c, k]]
            with torch.enable_grad():
                losses = loss_fn(functional_call(model, leaves, (xb,)), yb)
                loss = (losses * m).sum() / m.sum()
                g = torch.autograd.grad(loss, list(leaves.values()))
            grads = {n: gi.unsqueeze(0) for n, gi in zip(leaves, g, strict=True)}
            grads = algorithm.grad_transform(grads, params, ctx)
            updates, opt_state_c = optimizer.update(grads, opt_state_c, params, lr)
            params = algorithm.project({n: p + updates[n] for n, p in params.items()})
            loss_sum += float(loss.detach())
            steps += 1
        deltas = {n: origin[n] - p for n, p in params.items()}
        steps_t = torch.tensor([steps], device=sample_index.device)
        deltas, extras, new_state = algorithm.finish(deltas, steps_t, ctx)
        results.append((deltas, steps, loss_sum / max(steps, 1), extras, new_state, opt_state_c))
    cat = lambda i: {k: torch.cat([r[i][k] for r in results]) for k in results[0][i]}  # noqa: E731
    return ChunkResult(
        cat(0),
        torch.tensor([r[1] for r in results], device=sample_index.device),
        torch.tensor([r[2] for r in results], dtype=torch.float32),
        cat(3),
        cat(4),
        cat(5),
    )
