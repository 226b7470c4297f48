"""Executors train the clients of a plan. ``LocalExecutor``: in-process, chunk by chunk, on one device.

Client state (SCAFFOLD/FedDyn-style) is kept stacked for all clients on the host and only the chunk's rows
travel to the device. Results are concatenated in client order, so they do not depend on the chunk size.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from fedsim.core.protocol import ClientAlgorithm, ClientUpdates, Plan
from fedsim.core.pytree import Tree, stack
from fedsim.data.samplers import Batches, Sampler, sample_by_key, steps_per_client

from .sample_clipping import SampleClipping
from .store import ClientStore
from .streamed import StreamingRound, chunk_updates
from .trainer import LossFn, VectorizedTrainer, cross_entropy, train_sequential
from .trajectory import num_units, planned_bytes


def device_memory(device: torch.device) -> int:
    """Memory budget base of ``device``: free GPU memory (``cuda.mem_get_info``), or the host's total RAM
    (stable across runs, unlike MemAvailable). The engine calls it once per run."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def activation_bytes(model: nn.Module, x_example: torch.Tensor) -> int:
    """Bytes of activations one sample produces in a forward pass (sum over leaf modules' outputs)."""
    total = 0

    def hook(_module, _inputs, output):
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(x_example[:1])
    finally:
        for h in handles:
            h.remove()
    return total


def auto_chunk_size(
    model: nn.Module,
    params: Tree,
    x_example: torch.Tensor,
    batch_size: int,
    device: torch.device,
    state_copies: int = 2,
    budget_fraction: float = 0.3,
    extra_bytes: int = 0,
) -> int:
    """Clients per chunk that fit in ``budget_fraction`` of the device's memory (see :func:`device_memory`).

    Per client: parameters, gradient, update, delta and optimizer state (``4 + state_copies`` copies of
    the model) plus the activations of one minibatch kept for the backward pass (x3 for gradients and
    temporaries), plus ``extra_bytes`` (a regulator's trajectory buffer when it lives on the device).
    """
    model_bytes = sum(v.numel() * v.element_size() for v in params.values())
    per_client = (4 + state_copies) * model_bytes + 3 * batch_size * activation_bytes(model, x_example) + extra_bytes
    budget = budget_fraction * device_memory(device)
    fits = max(1, int(budget // max(per_client, 1)))
    if device.type == "cpu":
        # On CPU a chunk whose stacked parameters stay within a few tens of MB runs fastest (measured on the
        # digits MLP: 128-256 clients of 55k params beat 1,000 at once by 1.5-2x); bigger chunks only add
        # memory traffic and page faults.
        fits = min(fits, max(16, CPU_CHUNK_BYTES // max(model_bytes, 1)))
    return fits


CPU_CHUNK_BYTES = 32 << 20


class LocalExecutor:
    """Trains a plan's clients chunk by chunk on one device (vectorized, or sequential as a reference)."""

    checkpoints = True
    encodes_uploads = True
    """It applies a plan's ``encode`` to each chunk (it runs in the driver's process)."""
    """Its client and sampler state can be checkpointed (see :class:`fedsim.core.protocol.Executor`)."""

    def __init__(
        self,
        model: nn.Module,
        store: ClientStore,
        sampler: Sampler,
        optimizer,
        algorithm: ClientAlgorithm,
        *,
        seed: int,
        local_steps: int | None,
        local_epochs: int | None,
        batch_size: int,
        chunk_size: int | None = None,
        grad_mode: str = "sum",
        sequential: bool = False,
        loss_fn: LossFn = cross_entropy,
        clients: np.ndarray | None = None,
        clipping: SampleClipping | None = None,
    ):
        self.model, self.store, self.sampler = model, store, sampler
        self.optimizer, self.algorithm = optimizer, algorithm
        self.seed, self.local_steps, self.local_epochs = seed, local_steps, local_epochs
        self.batch_size, self.chunk_size = batch_size, chunk_size
        self.sequential, self.loss_fn = sequential, loss_fn
        self.trainer = VectorizedTrainer(model, loss_fn=loss_fn, grad_mode=grad_mode)
        self.sampler_state = None
        self.clients = np.arange(store.num_clients) if clients is None else np.asarray(clients, dtype=np.int64)
        """Sorted global ids of the clients this executor trains and keeps state for (a Ray actor's shard)."""
        self.client_state: Tree = {}
        self.clipping = clipping
        """DP-SGD's per-sample clipping and noise at every local step (:mod:`.sample_clipping`), or None."""

    @property
    def device(self) -> torch.device:
        return self.store.x.device

    def init_client_state(self, params: Tree) -> None:
        """Allocate the persistent per-client state of the client algorithm (host memory, one row per client
        of :attr:`clients`)."""
        template = self.algorithm.init_client_state(params)
        self.client_state = {k: v.cpu() for k, v in stack(template, len(self.clients)).items()}

    def state_rows(self, client_ids: np.ndarray) -> np.ndarray:
        """Rows of :attr:`client_state` that hold ``client_ids``."""
        return np.searchsorted(self.clients, client_ids)

    def close(self) -> None:
        """Release the executor's workers (nothing to release in-process)."""

    def resolve_chunk_size(self, params: Tree, num_selected: int) -> int:
        if self.chunk_size:
            return self.chunk_size
        extra = self.trajectory_bytes(params)
        if self.clipping is not None:  # per-sample gradients, and their clipped copy, of a Poisson batch (< 2B)
            extra += 2 * 2 * self.batch_size * sum(v.numel() * v.element_size() for v in params.values())
        auto = auto_chunk_size(self.model, params, self.store.x[:1], self.batch_size, self.device, extra_bytes=extra)
        return max(1, min(num_selected, auto))

    def max_local_steps(self) -> int:
        """The most local steps any client takes in a round (epoch mode: its largest client's epochs)."""
        if self.local_epochs is None:
            return int(self.local_steps or 1)
        largest = int(self.store.sizes.max()) if self.store.num_clients else 1
        return self.local_epochs * -(-largest // self.batch_size)

    def trajectory_bytes(self, params: Tree) -> int:
        """Device bytes per client of the regulator's trajectory (0 without a regulator, or when it is kept in
        host memory): the memory plan of :mod:`fedsim.engine.trajectory`."""
        spec = self.algorithm.trajectory
        if spec is None:
            return 0
        units = num_units(spec, self.max_local_steps(), self.batch_size)
        first = next(iter(params.values()))
        per_client = sum(v.numel() for v in params.values())
        model_bytes = per_client * first.element_size()
        transient = 0
        if spec.unit == "sample":  # per-sample gradients of one step
            transient += self.batch_size * model_bytes
        if spec.dtype not in (None, first.dtype) and spec.unit == "step":  # full-precision previous iterate
            transient += model_bytes
        if spec.device not in (None, "same") and torch.device(spec.device) != self.device:
            return 8 * units * units + transient
        return planned_bytes(spec, per_client, first.dtype, units) + transient

    def train(
        self, plan: Plan, params: Tree, round_: int, lr: float, start: Tree | None = None, opt_state: Tree | None = None
    ) -> ClientUpdates:
        """Train the plan's clients from the global ``params`` (or from their own stacked ``start``
        parameters, rows in plan order, with local optimizer state ``opt_state``) and return their updates."""
        ids = np.asarray(plan.client_ids, dtype=np.int64)
        chunk = self.resolve_chunk_size(params, len(ids))
        sizes = torch.as_tensor(self.store.sizes[ids], dtype=torch.float64, device=self.device)
        out = ChunkStacker(len(ids))
        streaming = None
        if plan.reductions is not None:
            host = device_memory(torch.device("cpu"))
            streaming = StreamingRound(plan, params, lr, self.store.num_clients, host)
        for first in range(0, len(ids), chunk):
            rows = slice(first, first + chunk)
            limit = plan.step_limit[rows] if plan.step_limit is not None else None
            keys = plan.round_keys[rows] if plan.round_keys is not None else None
            r = self._train_chunk(
                ids[rows], plan, params, round_, lr, _rows(start, rows), _rows(opt_state, rows), limit, keys
            )
            if plan.encode is not None:  # the uplink: what the server decodes, chunk by chunk
                r.deltas = plan.encode(ids[rows], r.deltas)
            scalars = {"num_steps": r.num_steps, "train_loss": r.train_loss.to(self.device),
                       "samples_processed": r.samples_processed}  # fmt: skip
            if streaming is not None:  # fold the chunk into the declared means and drop its uploads
                streaming.add(chunk_updates(ids[rows], sizes[rows], r, lr, self.store.num_clients))
                out.add(first, stats=r.stats, scalars=scalars)
            else:
                out.add(first, deltas=r.deltas, extras=r.extras, opt_state=r.opt_state, stats=r.stats, scalars=scalars)
            del r
        scalars = out.trees["scalars"]
        if streaming is not None:
            return streaming.finish(ids, scalars, sizes, out.trees["stats"])
        return ClientUpdates(
            client_ids=ids,
            deltas=out.trees["deltas"],
            num_samples=sizes,
            num_steps=scalars["num_steps"],
            train_loss=scalars["train_loss"],
            extras=out.trees["extras"],
            opt_state=out.trees["opt_state"],
            stats=out.trees["stats"],
            lr=lr,
            num_clients=self.store.num_clients,
            samples_processed=scalars["samples_processed"],
        )

    def sample(self, client_ids: np.ndarray, round_: int, round_keys: np.ndarray | None = None) -> Batches:
        """The clients' local batches of round ``round_`` (or of each client's own ``round_keys`` entry),
        advancing the sampler state."""
        keys = np.full(len(client_ids), round_) if round_keys is None else round_keys
        batches, self.sampler_state = sample_by_key(
            self.sampler, self.seed, keys, client_ids, self.store.sizes[client_ids], steps=self.local_steps,
            epochs=self.local_epochs, batch_size=self.batch_size, state=self.sampler_state,
        )  # fmt: skip
        return batches

    def _train_chunk(
        self, chunk_ids, plan, params, round_, lr, start=None, opt_state=None, step_limit=None, round_keys=None
    ):
        batches = limit_steps(self.sample(chunk_ids, round_, round_keys), step_limit)
        index = self.store.global_index(chunk_ids, batches.positions)
        mask = torch.as_tensor(batches.mask, device=self.device)
        rows = self.state_rows(chunk_ids)
        state = {k: v[rows].to(self.device) for k, v in self.client_state.items()}
        args = (params, self.store.x, self.store.y, index, mask, self.optimizer, lr, self.algorithm)
        private = {}
        if self.clipping is not None:
            steps = steps_per_client(self.store.sizes[chunk_ids], self.local_steps, self.local_epochs, self.batch_size)
            private = {"clipping": self.clipping, "keys": (round_, chunk_ids),
                       "planned": torch.as_tensor(steps, device=self.device)}  # fmt: skip
        if self.sequential:
            result = train_sequential(
                self.model, *args, plan.broadcast, state, start, opt_state, self.loss_fn, **private
            )
        else:
            result = self.trainer.train(*args, plan.broadcast, state, start, opt_state, **private)
        for k, v in result.client_state.items():
            self.client_state[k][rows] = v.detach().cpu()
        result.samples_processed = mask.sum(dim=(1, 2))
        return result


def limit_steps(batches: Batches, step_limit: np.ndarray | None) -> Batches:
    """The first ``step_limit[c]`` planned steps of every client (the rest masked off; trailing steps that no
    client takes are cut). Unchanged without a limit."""
    if step_limit is None:
        return batches
    limit = np.asarray(step_limit, dtype=np.int64)
    mask = batches.mask & (np.arange(batches.mask.shape[1])[None, :, None] < limit[:, None, None])
    steps = int(mask.any(axis=2).any(axis=0).nonzero()[0].max(initial=-1)) + 1
    return Batches(batches.positions[:, :steps], mask[:, :steps])


class ChunkStacker:
    """The per-client outputs of consecutive chunks, stacked on the client axis without a concatenation: the
    first chunk's trees are kept as they are when they cover every client, otherwise ``[total, ...]`` tensors
    are allocated once and each chunk is copied into its rows and dropped. The peak is then the result plus one
    chunk, not the chunks plus their concatenation (twice the updates at 100,000 clients). Same values as
    ``torch.cat``."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.trees: dict[str, Tree] = {}

    def add(self, first: int, **trees: Tree) -> None:
        """Put the chunk whose first client is row ``first``: ``name=tree`` for each output tree."""
        for name, tree in trees.items():
            rows = len(next(iter(tree.values()))) if tree else 0
            if name not in self.trees:
                if first == 0 and rows == self.total:  # one chunk holds every client: nothing to copy
                    self.trees[name] = tree
                    continue
                self.trees[name] = {k: v.new_empty((self.total, *v.shape[1:])) for k, v in tree.items()}
            out = self.trees[name]
            for k, v in tree.items():
                out[k][first : first + len(v)] = v


def _rows(tree: Tree | None, rows: slice) -> Tree | None:
    return {k: v[rows] for k, v in tree.items()} if tree is not None else None
