"""Device-resident client data: one tensor store, clients as index lists into it.

Client ``c``'s training samples are ``order[offsets[c] : offsets[c + 1]]`` (global row ids of ``x``/``y``);
its local test samples (for per-client evaluation) likewise in ``test_order``/``test_offsets``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def _flatten_parts(parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    sizes = np.array([len(p) for p in parts], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    order = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
    return order, offsets


@dataclass
class ClientStore:
    """Training data of all clients on one device."""

    x: Tensor
    y: Tensor
    order: Tensor
    offsets: np.ndarray
    test_order: Tensor
    test_offsets: np.ndarray

    @classmethod
    def build(
        cls,
        x: np.ndarray,
        y: np.ndarray,
        train_parts: list[np.ndarray],
        test_parts: list[np.ndarray],
        device: torch.device,
    ) -> ClientStore:
        order, offsets = _flatten_parts(train_parts)
        test_order, test_offsets = _flatten_parts(test_parts)
        return cls(
            x=torch.as_tensor(x, device=device),
            y=torch.as_tensor(y, dtype=torch.int64, device=device),
            order=torch.as_tensor(order, device=device),
            offsets=offsets,
            test_order=torch.as_tensor(test_order, device=device),
            test_offsets=test_offsets,
        )

    @classmethod
    def from_shard(cls, data: dict[str, np.ndarray], device: torch.device) -> ClientStore:
        """A store over the samples of a shard of clients (:func:`shard_arrays`), indexed by global client id;
        no local test data (evaluation happens where the whole store lives)."""
        with warnings.catch_warnings():  # object-store arrays are read-only; training only indexes them
            warnings.simplefilter("ignore", UserWarning)
            x, y = torch.as_tensor(data["x"], device=device), torch.as_tensor(data["y"], device=device)
        offsets = np.asarray(data["offsets"], dtype=np.int64)
        return cls(
            x=x, y=y.long(), order=torch.arange(len(x), device=device), offsets=offsets,
            test_order=torch.zeros(0, dtype=torch.int64, device=device), test_offsets=np.zeros_like(offsets),
        )  # fmt: skip

    @property
    def num_clients(self) -> int:
        return len(self.offsets) - 1

    @property
    def sizes(self) -> np.ndarray:
        """Training samples per client."""
        return np.diff(self.offsets)

    def global_index(self, client_ids: np.ndarray, positions: np.ndarray) -> Tensor:
        """Map per-client positions ``[C, ...]`` to global row ids of ``x`` (on the store's device)."""
        start = self.offsets[np.asarray(client_ids)].reshape(-1, *([1] * (positions.ndim - 1)))
        flat = torch.as_tensor(start + positions, device=self.order.device)
        return self.order[flat]


def shard_arrays(store: ClientStore, clients: np.ndarray) -> dict[str, np.ndarray]:
    """The training samples of ``clients`` as numpy arrays (for Ray's object store or a Flower node), with
    per-client ``offsets`` over all ``N`` ids (zero samples for the other clients), so that global ids index
    :meth:`ClientStore.from_shard` directly; ``clients``: the ids, sorted."""
    sizes = np.zeros(store.num_clients, dtype=np.int64)
    sizes[clients] = store.sizes[clients]
    order = store.order.cpu().numpy()
    rows = np.concatenate([order[store.offsets[c] : store.offsets[c + 1]] for c in clients]).astype(np.int64)
    index = torch.as_tensor(rows, device=store.x.device)
    return {
        "x": store.x[index].cpu().numpy(),
        "y": store.y[index].cpu().numpy(),
        "offsets": np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        "clients": np.asarray(clients, dtype=np.int64),
    }
