"""Device-resident client data: one tensor store, clients as index lists into it.

Client ``c``'s training samples are ``order[offsets[c] : offsets[c + 1]]`` (global row ids of ``x``/``y``);
its local test samples (for per-client evaluation) likewise in ``test_order``/``test_offsets``.
"""

from __future__ import annotations

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
