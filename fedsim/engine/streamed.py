"""A round's client updates folded chunk by chunk: the declared means, the per-client scalars and the drift
metric, without the stacked uploads.

When a plan declares its reductions (:attr:`fedsim.core.protocol.Plan.reductions`), the local executor hands
every trained chunk to a :class:`StreamingRound`, which folds it into each declared mean
(:class:`~fedsim.core.reduction.MeanAccumulator`), into ``sum_k Delta_k`` for the drift metric, and writes its
flattened deltas to a :class:`RowSpool` for the drift's second pass (``sum_k ||Delta_k - mean||`` needs the
mean first). The spool lives in memory while the round's deltas take at most a small share of the host's RAM
(:data:`SPOOL_MEMORY_FRACTION`), and in an unnamed temporary file (deleted when closed) beyond, so memory is
bounded by the chunk. Every value has the
same bits as the same rule computed over the stacked updates.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedsim.core.errors import FedsimError
from fedsim.core.protocol import ClientUpdates, Plan
from fedsim.core.pytree import STAT_BLOCK_BYTES, Tree, flatten
from fedsim.core.reduction import FOLD_BLOCK, MeanAccumulator, RowFold

SPOOL_MEMORY_BYTES = 256 * 2**20
SPOOL_MEMORY_FRACTION = 0.05
"""The drift's second pass keeps a round's deltas in memory up to ``max(SPOOL_MEMORY_BYTES, SPOOL_MEMORY_FRACTION
* host RAM)`` (1.2 GB on a 23 GB machine), and in a temporary file beyond: writing and reading them back costs
about 1 s per GB here, so moderate runs skip it; the values are the same either way."""


class RowSpool:
    """Rows ``[n, D]`` appended chunk by chunk and read back once in blocks: in host memory, or in an unnamed
    temporary file when the planned total passes ``memory_bytes``."""

    def __init__(self, width: int, dtype: torch.dtype, planned_rows: int, memory_bytes: int = SPOOL_MEMORY_BYTES):
        self.width, self.dtype = width, dtype
        self.row_bytes = width * torch.tensor([], dtype=dtype).element_size()
        spill = planned_rows * self.row_bytes > memory_bytes
        self.file = tempfile.TemporaryFile() if spill else None  # noqa: SIM115 (closed by close())
        self.parts: list[Tensor] = []
        self.rows = 0

    def append(self, rows: Tensor) -> None:
        rows = rows.detach().to("cpu", self.dtype).contiguous()
        if self.file is None:
            self.parts.append(rows)
        else:
            self.file.write(memoryview(rows.view(torch.uint8).numpy()))
        self.rows += len(rows)

    def blocks(self, rows_per_block: int) -> Iterator[Tensor]:
        """The rows in consecutive blocks of ``rows_per_block`` (the last may be shorter)."""
        if self.file is None:
            yield from _regroup(self.parts, rows_per_block)
            return
        self.file.seek(0)
        for start in range(0, self.rows, rows_per_block):
            count = min(rows_per_block, self.rows - start)
            raw = bytearray(self.file.read(count * self.row_bytes))
            yield torch.frombuffer(raw, dtype=torch.uint8).view(self.dtype).view(count, self.width)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.parts = []


def _regroup(parts: list[Tensor], rows: int) -> Iterator[Tensor]:
    """The rows of consecutive ``parts`` in blocks of ``rows`` (the last may be shorter), copying only the
    blocks that straddle two parts."""
    carry: list[Tensor] = []
    carried = 0
    for part in parts:
        start = 0
        if carried:
            start = min(rows - carried, len(part))
            carry.append(part[:start])
            carried += start
            if carried < rows:
                continue
            yield torch.cat(carry)
            carry, carried = [], 0
        while start + rows <= len(part):
            yield part[start : start + rows]
            start += rows
        if start < len(part):
            carry, carried = [part[start:]], len(part) - start
    if carried:
        yield torch.cat(carry)


class StreamingRound:
    """Folds a round's chunks, in client order, into the plan's declared means and the drift's sums."""

    def __init__(self, plan: Plan, params: Tree, lr: float, num_clients: int, host_memory: int = 0) -> None:
        self.reductions = plan.reductions or {}
        self.accumulators = {name: MeanAccumulator(r) for name, r in self.reductions.items()}
        self.lr, self.num_clients = lr, num_clients
        width = sum(v.numel() for v in params.values())
        spool_bytes = max(SPOOL_MEMORY_BYTES, int(SPOOL_MEMORY_FRACTION * host_memory))
        self.spool = RowSpool(width, next(iter(params.values())).dtype, len(plan.client_ids), spool_bytes)
        self.delta_fold = RowFold()
        self.block_rows = max(1, STAT_BLOCK_BYTES // (8 * max(1, width)) // FOLD_BLOCK) * FOLD_BLOCK
        self.extras_bytes = 0
        self.rows_seen = 0

    def add(self, chunk: ClientUpdates) -> None:
        """Fold one trained chunk (its uploads are not kept). Each upload is flattened once and read in float64
        blocks of whole :data:`~fedsim.core.reduction.FOLD_BLOCK` rows."""
        sources: dict[str, list[str]] = {"deltas": []}
        for name, reduction in self.reductions.items():
            sources.setdefault(reduction.source, []).append(name)
        for source, names in sources.items():
            upload = chunk.upload(source)
            if not upload:
                continue
            coefficients = {name: self.accumulators[name].begin(chunk, upload) for name in names}
            flat = flatten(upload)
            if source == "deltas":
                self.spool.append(flat)
            for start, stop in self._blocks(len(flat)):
                block = flat[start:stop].to(torch.float64, copy=True)
                for name in names:
                    self.accumulators[name].add_rows(block, coefficients[name][start : start + len(block)])
                if source == "deltas":  # last: it folds in place
                    self.delta_fold.add(block, owned=True)
        self.rows_seen += len(chunk.client_ids)
        self.extras_bytes = chunk.extras_bytes()

    def _blocks(self, rows: int) -> list[tuple[int, int]]:
        """Row ranges of a chunk, cut where the folds' aligned blocks end (the first range completes the block
        the previous chunk left open), so no rows wait to be joined with the next range."""
        head = min(rows, -self.rows_seen % FOLD_BLOCK)
        cuts = sorted({0, head, *range(head + self.block_rows, rows, self.block_rows), rows})
        return list(zip(cuts[:-1], cuts[1:], strict=True))

    def finish(self, client_ids: np.ndarray, scalars: Tree, num_samples: Tensor, stats: Tree) -> StreamedUpdates:
        means = {name: acc.result() for name, acc in self.accumulators.items()}
        updates = StreamedUpdates(
            client_ids, num_samples, scalars["num_steps"], scalars["train_loss"], stats, self.lr, self.num_clients,
            means, self.delta_fold.result(), self.spool, self.extras_bytes,
        )  # fmt: skip
        updates.samples_processed = scalars.get("samples_processed")
        return updates


class StreamedUpdates:
    """The round's :class:`~fedsim.core.protocol.ClientUpdates` after chunk-by-chunk folding: per-client
    scalars, the declared means (:meth:`mean`) and the drift metric; the stacked uploads are not kept."""

    def __init__(self, client_ids: np.ndarray, num_samples: Tensor, num_steps: Tensor, train_loss: Tensor,
                 stats: Tree, lr: float, num_clients: int, means: dict[str, Tree | None], delta_total: Tensor | None,
                 spool: RowSpool, extras_bytes: int):  # fmt: skip
        self.client_ids, self.num_samples, self.num_steps = client_ids, num_samples, num_steps
        self.train_loss = train_loss
        self.stats, self.lr, self.num_clients = stats, lr, num_clients
        self.samples_processed: Tensor | None = None
        self.means, self.delta_total, self.spool, self._extras_bytes = means, delta_total, spool, extras_bytes

    @property
    def weights(self) -> Tensor:
        return self.num_samples / self.num_samples.sum()

    def mean(self, name: str, reduction: Any = None) -> Tree | None:
        if name not in self.means:
            raise FedsimError(f"the strategy asked for the mean {name!r}, which its reductions() did not declare")
        return self.means[name]

    def _not_kept(self, what: str) -> FedsimError:
        return FedsimError(
            f"the round's {what} were folded chunk by chunk and not kept (the strategy declares reductions()); "
            "a strategy that reads the stacked uploads returns None from reductions()"
        )

    @property
    def deltas(self) -> Tree:
        raise self._not_kept("deltas")

    @property
    def extras(self) -> Tree:
        raise self._not_kept("extra uploads")

    @property
    def opt_state(self) -> Tree:
        raise self._not_kept("local optimizer states")

    def upload(self, source: str = "deltas") -> Tree:
        raise self._not_kept(f"uploads ({source})")

    def reduce(self, *args: Any, **kwargs: Any) -> Tree:
        raise self._not_kept("uploads")

    def drift(self) -> float | None:
        """:func:`~fedsim.core.protocol.client_drift` from the folded ``sum_k Delta_k`` and a second pass over
        the spooled deltas, in the blocks the stacked computation uses (the same bits)."""
        try:
            clients = len(self.client_ids)
            if self.delta_total is None or clients == 0:
                return None
            mean = self.delta_total / clients
            norm = float(mean.norm())
            if norm == 0.0 or not math.isfinite(norm):
                return None
            rows = max(1, STAT_BLOCK_BYTES // (8 * max(1, self.spool.width)))
            mean = mean.cpu()
            total = 0.0
            for block in self.spool.blocks(rows):
                total += float((block.double() - mean).norm(dim=1).sum())
            return total / clients / norm
        finally:
            self.spool.close()

    def extras_bytes(self) -> int:
        return self._extras_bytes


def chunk_updates(ids: np.ndarray, sizes: Tensor, result: Any, lr: float, num_clients: int) -> ClientUpdates:
    """One trained chunk as :class:`~fedsim.core.protocol.ClientUpdates` (what the declared rules read)."""
    return ClientUpdates(
        client_ids=ids, deltas=result.deltas, num_samples=sizes, num_steps=result.num_steps,
        train_loss=result.train_loss, extras=result.extras, stats=result.stats, lr=lr, num_clients=num_clients,
    )  # fmt: skip
