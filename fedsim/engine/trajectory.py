"""Recorded local trajectories: per-unit parameter deltas of a chunk of clients, stacked ``[C, U, D]``.

A regulator (ECGR, BHerd) needs every local step's delta ``D_i = w_before - w_after`` of every client, not
only their sum. Local training writes them into one buffer with the client axis first, all clients at
once (no Python loop over clients), each unit flattened over all trainable tensors (keys in parameter
order, as :func:`fedsim.core.pytree.flatten`).

Memory plan. The buffer holds ``C * U * D`` numbers, so for many steps ``U`` and large models it dominates.
Three levers, all exact in what the greedy sees up to the storage rounding:

- the greedy needs only the ``U x U`` Gram matrix ``G = D D^T`` per client (:meth:`gram`, computed once
  after training with batched matrix products) plus one weighted sum of units (:meth:`combine`);
- ``dtype``: store units in ``float16``/``bfloat16`` (half the bytes), divided by the learning rate so that
  the small steps of a decayed schedule stay far above float16's smallest number; the Gram matrix and the
  weighted sum are computed in float32 from column blocks and rescaled, and regulators add the *exact*
  float32 plain delta ``T`` rather than re-summing stored units, so a regulator that keeps every unit uploads
  ``T`` bit for bit;
- ``device="cpu"``: keep the buffer in host memory (only the ``[C, D]`` current unit travels per step); the
  Gram matrix and the weighted sum then stream column blocks of at most :data:`BLOCK_BYTES` to the device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedsim.core.errors import unknown
from fedsim.core.protocol import TrajectorySpec
from fedsim.core.pytree import Tree

BLOCK_BYTES = 64 << 20
"""Largest float32 column block (all clients and units) materialized on the compute device at once."""

UNITS = ("step", "microbatch", "sample")


def num_units(spec: TrajectorySpec, num_steps: int, batch_size: int) -> int:
    """Units ``U`` recorded over ``num_steps`` local steps: steps, steps x microbatches, or steps x batch."""
    if spec.unit == "step":
        return num_steps
    if spec.unit == "microbatch":
        return num_steps * spec.microbatches
    if spec.unit == "sample":
        return num_steps * batch_size

    raise unknown("trajectory unit", spec.unit, UNITS)


def unit_bytes(spec: TrajectorySpec, params_per_client: int, param_dtype: torch.dtype) -> int:
    """Bytes one recorded unit of one client takes in the trajectory buffer."""
    dtype = spec.dtype or param_dtype
    return params_per_client * torch.empty((), dtype=dtype).element_size()


class Trajectory:
    """The recorded units of a chunk: ``units[C, U, D]`` and ``mask[C, U]`` (True where a unit was recorded;
    masked units, e.g. steps a ragged client did not take, are zero and never selected)."""

    def __init__(
        self, params: Tree, count: int, spec: TrajectorySpec | None = None, buffer: Tensor | None = None,
        zero: bool = True, scale: float = 1.0,
    ):  # fmt: skip
        spec = spec or TrajectorySpec()
        first = next(iter(params.values()))
        self.spec, self.scale = spec, float(scale)  # stored = unit * scale
        self.num_clients = first.shape[0]
        self.compute_device, self.compute_dtype = first.device, first.dtype
        self.layout = [(k, tuple(v.shape[1:]), v[0].numel()) for k, v in params.items()]
        self.dim = sum(n for _, _, n in self.layout)
        storage_device = torch.device(spec.device) if spec.device not in (None, "same") else first.device
        shape, dtype = (self.num_clients, count, self.dim), spec.dtype or first.dtype
        if buffer is not None and buffer.shape == shape and buffer.dtype == dtype and buffer.device == storage_device:
            self.units = buffer  # reused: no allocation and no first-touch page faults per round
        else:
            self.units = torch.empty(shape, dtype=dtype, device=storage_device)
        if zero:
            self.units.zero_()
        self.mask = torch.zeros(self.num_clients, count, dtype=torch.bool, device=first.device)

    @property
    def num_units(self) -> int:
        return self.units.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the unit buffer (all clients of the chunk)."""
        return self.units.numel() * self.units.element_size()

    def write(self, start: int, tree: Tree, active: Tensor | None = None, per_unit: bool = False) -> None:
        """Store units ``start, start+1, ...``: ``tree`` leaves are ``[C, *shape]`` (one unit) or, with
        ``per_unit``, ``[C, n, *shape]`` (n units). ``active[C]`` or ``[C, n]`` marks recorded units (all by
        default); values of inactive units must already be zero."""
        n = None
        offset = 0
        for key, shape, numel in self.layout:
            value = tree[key]
            n = value.shape[1] if per_unit else 1
            target = self.units[:, start : start + n, offset : offset + numel]
            target.view(self.num_clients, n, *shape).copy_(value if per_unit else value.unsqueeze(1))
            offset += numel
        flags = torch.ones(self.num_clients, n, dtype=torch.bool, device=self.mask.device) if active is None else active
        self.mask[:, start : start + n] = flags.reshape(self.num_clients, n)

    def differences_(self, origin: Tensor) -> None:
        """Turn stored iterates ``W_0..W_{U-1}`` (the parameters after each step) into step deltas in place:
        ``D_k = W_{k-1} - W_k`` with ``W_{-1} = origin`` (``[C, D]`` or ``[1, D]``). The subtraction is the
        same float operation as differencing during training, so both give identical deltas."""
        for k in range(self.num_units - 1, 0, -1):
            torch.sub(self.units[:, k - 1], self.units[:, k], out=self.units[:, k])
        if self.num_units:
            first = self.units[:, 0]
            torch.sub(origin.to(first.device, first.dtype).expand_as(first), first, out=first)

    def _blocks(self):
        """Column blocks of the buffer as float32 (or the parameters' dtype) on the compute device."""
        dtype = torch.promote_types(self.compute_dtype, torch.float32)
        direct = self.units.device == self.compute_device and self.units.dtype == dtype
        if direct:
            yield self.units
            return
        rows = self.num_clients * self.num_units
        width = max(1, BLOCK_BYTES // max(1, rows * torch.empty((), dtype=dtype).element_size()))
        for s in range(0, self.dim, width):
            yield self.units[:, :, s : s + width].to(self.compute_device, dtype, non_blocking=False)

    def gram(self) -> Tensor:
        """Per-client Gram matrices ``G[c] = D_c D_c^T`` (``[C, U, U]``, float64 for the greedy's arithmetic)."""
        g = None
        for block in self._blocks():
            part = torch.bmm(block, block.transpose(1, 2))
            g = part if g is None else g + part
        return g.double() / self.scale**2

    def combine(self, coeffs: Tensor) -> Tensor:
        """``sum_u coeffs[c, u] * units[c, u]`` for every client: ``[C, D]`` on the compute device."""
        parts = []
        for block in self._blocks():
            parts.append(torch.bmm(coeffs.to(block.dtype).unsqueeze(1), block).squeeze(1))
        out = torch.cat(parts, dim=1)
        return (out / self.scale if self.scale != 1.0 else out).to(self.compute_dtype)

    def unflatten(self, flat: Tensor) -> Tree:
        """``[C, D]`` back to a stacked tree in parameter order."""
        out, offset = {}, 0
        for key, shape, numel in self.layout:
            out[key] = flat[:, offset : offset + numel].reshape(flat.shape[0], *shape)
            offset += numel
        return out


def planned_bytes(spec: TrajectorySpec, params_per_client: int, param_dtype: torch.dtype, units: int) -> int:
    """Bytes of one client's trajectory buffer plus its Gram matrix (the memory plan of a chunk)."""
    return units * unit_bytes(spec, params_per_client, param_dtype) + 8 * units * units


__all__ = ["BLOCK_BYTES", "Trajectory", "TrajectorySpec", "UNITS", "num_units", "planned_bytes"]
