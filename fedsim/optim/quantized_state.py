"""8-bit optimizer state: blockwise dynamic quantization (Dettmers, Lewis, Shleifer and Zettlemoyer, ICLR 2022,
"8-bit optimizers via block-wise quantization").

A state tensor is cut into blocks of ``block`` entries (2048, the paper's), each normalized by its largest
magnitude ``N_b`` to [-1, 1] and stored as the 8-bit index of the nearest value of a *dynamic* quantization map
``Q`` (256 sorted values): ``code = argmin_j |x / N_b - Q_j|``, decoded as ``Q[code] N_b``. The map is the
paper's dynamic tree: a value is ``(-1)^s 10^(-E) F``, where the exponent ``E`` (0..6) is the number of leading
zero bits after the sign, one indicator bit follows, and the remaining bits place ``F`` linearly in [0.1, 1]
(bin midpoints); the map also holds 0 and 1. The unsigned map (second moments, never negative) spends the
sign bit on one more fraction bit. Small values thus keep relative precision across seven orders of magnitude,
which is what Adam's second moment needs. Our construction follows the paper's definition; the exact bin
placement of bitsandbytes may differ.

Storage per tensor of n entries: n bytes of codes plus one float32 ``N_b`` per block.
"""

from __future__ import annotations

import math
from functools import cache

import torch
from torch import Tensor

BLOCK = 2048
EXPONENTS = 7


@cache
def dynamic_map(signed: bool) -> tuple[float, ...]:
    """The 256 sorted values of the dynamic tree map (see the module docstring)."""
    fraction_bits_at_zero = 6 if signed else 7  # bits left after the sign and the indicator, at exponent 0
    values = {0.0, 1.0}
    for e in range(EXPONENTS):
        bits = fraction_bits_at_zero - e
        edges = [0.1 + 0.9 * i / 2**bits for i in range(2**bits + 1)]
        for lo, hi in zip(edges, edges[1:], strict=False):
            value = 10.0**-e * (lo + hi) / 2
            values.add(value)
            if signed:
                values.add(-value)
    ordered = sorted(values)
    if len(ordered) != 256:  # pragma: no cover (a construction error)
        raise AssertionError(f"dynamic map has {len(ordered)} values")
    return tuple(ordered)


def _map(signed: bool, device: torch.device) -> Tensor:
    return torch.tensor(dynamic_map(signed), dtype=torch.float32, device=device)


def _blocks(x: Tensor, block: int) -> Tensor:
    """``x`` ``[..., n]`` padded with zeros to whole blocks, as ``[..., nblocks, block]``."""
    pad = (-x.shape[-1]) % block
    return torch.nn.functional.pad(x, (0, pad)).reshape(*x.shape[:-1], -1, block)


def quantize(x: Tensor, signed: bool = True, block: int = BLOCK) -> tuple[Tensor, Tensor]:
    """Codes (``uint8``, ``x``'s shape) and per-block scales (float32 ``[..., ceil(n / block)]`` over the last
    dimension of ``x`` flattened per leading row: ``x`` is ``[rows, n]`` or ``[n]``)."""
    blocks = _blocks(x.float(), block)
    scale = blocks.abs().amax(dim=-1, keepdim=True)
    normalized = blocks / torch.where(scale > 0, scale, torch.ones_like(scale))
    q = _map(signed, x.device)
    upper = torch.searchsorted(q, normalized.contiguous()).clamp(1, len(q) - 1)
    lower = upper - 1
    nearer_lower = (normalized - q[lower]) <= (q[upper] - normalized)
    codes = torch.where(nearer_lower, lower, upper).to(torch.uint8)
    n = x.shape[-1]
    return codes.reshape(*x.shape[:-1], -1)[..., :n], scale.squeeze(-1)


def dequantize(codes: Tensor, scale: Tensor, signed: bool = True, block: int = BLOCK) -> Tensor:
    """float32 values of ``codes`` with per-block ``scale`` (the inverse of :func:`quantize` up to the map)."""
    n = codes.shape[-1]
    values = _map(signed, codes.device)[codes.long()]
    blocks = _blocks(values, block) * scale.unsqueeze(-1)
    return blocks.reshape(*codes.shape[:-1], -1)[..., :n]


def state_nbytes(n: int, block: int = BLOCK) -> int:
    """Bytes of one quantized state tensor of n entries: n codes and ``ceil(n / block)`` float32 scales."""
    return n + 4 * math.ceil(n / block)


MOMENTS = {"m": True, "v": False}
"""State key prefixes of the Adam-family moments and whether they are signed (``v``, squared gradients, is not)."""


def _moment(key: str) -> str | None:
    prefix = key.split(".", 1)[0]
    return prefix if prefix in MOMENTS and "." in key else None


def quantize_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every client-stacked moment ``m.K``/``v.K`` (``[C, ...]``) as 8-bit codes of its shape, quantized per client
    in blocks, with the scales ``[C, nblocks]`` under ``m_scale.K``/``v_scale.K``; other entries unchanged."""
    out = {}
    for key, value in state.items():
        moment = _moment(key)
        if moment is None:
            out[key] = value
            continue
        codes, scale = quantize(value.reshape(len(value), -1), signed=MOMENTS[moment])
        out[key] = codes.reshape(value.shape)
        out[f"{moment}_scale.{key.split('.', 1)[1]}"] = scale
    return out


def dequantize_state(state: dict[str, Tensor], dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """The inverse of :func:`quantize_state`: float moments of their shapes, the scales dropped."""
    out = {}
    for key, value in state.items():
        moment = _moment(key)
        if key.split(".", 1)[0] in ("m_scale", "v_scale"):
            continue
        if moment is None:
            out[key] = value
            continue
        scale = state[f"{moment}_scale.{key.split('.', 1)[1]}"]
        values = dequantize(value.reshape(len(value), -1), scale, signed=MOMENTS[moment])
        out[key] = values.reshape(value.shape).to(dtype)
    return out


TORCH_MOMENTS = {"exp_avg": True, "exp_avg_sq": False}
"""``torch.optim`` state keys of the Adam moments and whether they are signed."""


def check_state_bits(bits: int) -> None:
    if bits not in (8, 32):
        raise ValueError(f"state_bits must be 8 or 32, got {bits!r}")


def expand_(state: dict) -> None:
    """A ``torch.optim`` parameter state with 8-bit moments, in place: float32 moments for a step."""
    for key, signed in TORCH_MOMENTS.items():
        if key in state and state[key].dtype == torch.uint8:
            codes, scale = state[key], state.pop(f"{key}_scale")
            state[key] = dequantize(codes.reshape(1, -1), scale, signed=signed).reshape(codes.shape)


def shrink_(state: dict) -> None:
    """The inverse of :func:`expand_`: the moments back to 8-bit codes and block scales, in place."""
    for key, signed in TORCH_MOMENTS.items():
        if key in state and state[key].dtype != torch.uint8:
            value = state[key]
            codes, scale = quantize(value.reshape(1, -1), signed=signed)
            state[key], state[f"{key}_scale"] = codes.reshape(value.shape), scale
