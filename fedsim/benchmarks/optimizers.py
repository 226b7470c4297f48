"""Step time and state size of the memory-efficient optimizers against ``torch.optim.Adam(foreach=True)``
on the same parameters (``fedsim bench optimizer``).

Every optimizer steps the same parameters with the same fixed gradients. Rounds alternate between the
optimizers (so drifting machine load hits all of them alike); each round times ``steps`` consecutive steps
after a warm-up, and the reported figure is the median over rounds of the per-step time.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fedsim.core.errors import unknown
from fedsim.models import build_model
from fedsim.optim.foam import FOAM
from fedsim.optim.groups import transformer_param_groups
from fedsim.optim.gwt import GWT
from fedsim.optim.memory import state_bytes
from fedsim.optim.mols import MoLS
from fedsim.optim.sgd_sai import SGDSaI

WORKLOADS = ("char_transformer", "llama_block")
BENCH_OPTIMIZERS: dict[str, Callable[[list[dict]], torch.optim.Optimizer]] = {
    "adam": lambda groups: torch.optim.Adam(_flat(groups), lr=1e-3, foreach=True),
    "foam": lambda groups: FOAM(groups, lr=1e-3),
    "foam-fused": lambda groups: FOAM(groups, lr=1e-3, fused=True),
    "gwt": lambda groups: GWT(groups, lr=1e-3),
    "gwt-fused": lambda groups: GWT(groups, lr=1e-3, fused=True),
    "mols": lambda groups: MoLS(_flat(groups), lr=1e-3),
    "sgd-sai": lambda groups: SGDSaI(_flat(groups), lr=1e-3),
}


def _flat(groups: list[dict]) -> list[nn.Parameter]:
    return [p for g in groups for p in g["params"]]


class LlamaBlock(nn.Module):
    """The weight shapes of one LLaMA-style decoder block (no forward pass is needed to time a step):
    attention q, k, v, o ``[d, d]``, SwiGLU MLP gate/up ``[h, d]`` and down ``[d, h]``, two RMSNorm gains."""

    def __init__(self, width: int = 1024, hidden: int = 2752) -> None:
        super().__init__()
        for name in ("q", "k", "v", "o"):
            self.register_parameter(name, nn.Parameter(torch.empty(width, width)))
        self.gate = nn.Parameter(torch.empty(hidden, width))
        self.up = nn.Parameter(torch.empty(hidden, width))
        self.down = nn.Parameter(torch.empty(width, hidden))
        self.norm_1 = nn.Parameter(torch.ones(width))
        self.norm_2 = nn.Parameter(torch.ones(width))


def workload(name: str) -> nn.Module:
    """The parameters to step: the registry's ``char_transformer`` (Shakespeare vocabulary) or a LLaMA block."""
    if name == "char_transformer":
        return build_model("char_transformer", (80,), 81, seed=0)
    if name == "llama_block":
        return LlamaBlock()
    raise unknown("workload", name, WORKLOADS)


def bench_optimizers(
    workload_name: str = "char_transformer",
    optimizers: tuple[str, ...] = tuple(BENCH_OPTIMIZERS),
    steps: int = 10,
    rounds: int = 7,
    device: str = "cpu",
) -> dict[str, Any]:
    """Median seconds per step of each optimizer, its ratio to Adam's, and state bytes (also on the folded
    matrices alone, where FOAM/GWT compress)."""
    dev = torch.device(device)
    model = workload(workload_name).to(dev)
    generator = torch.Generator(device="cpu").manual_seed(0)
    for p in model.parameters():
        p.data = torch.randn(p.shape, generator=generator).to(dev) * 0.02
        p.grad = torch.randn(p.shape, generator=generator).to(dev)
    groups = transformer_param_groups(model)
    matrices = {id(p) for p in groups[0]["params"]} if groups and groups[0].get("fold", True) else set()
    # torch.optim writes its defaults into the group dicts it is given: each optimizer gets its own copies
    built = {name: BENCH_OPTIMIZERS[name]([dict(g) for g in groups]) for name in optimizers}
    times: dict[str, list[float]] = {name: [] for name in optimizers}

    def run(opt: torch.optim.Optimizer) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return (time.perf_counter() - t0) / steps

    for opt in built.values():  # warm-up: allocates state and, for the fused variants, compiles
        run(opt)
        run(opt)
    for _ in range(rounds):
        for name, opt in built.items():
            times[name].append(run(opt))
    base = statistics.median(times["adam"]) if "adam" in times else None
    results = {}
    for name, opt in built.items():
        median = statistics.median(times[name])
        on_matrices = sum(
            t.numel() * t.element_size()
            for p, s in opt.state.items()
            if id(p) in matrices
            for t in s.values()
            if isinstance(t, torch.Tensor) and t.dim() > 0
        )
        results[name] = {
            "seconds_per_step": median,
            "all": times[name],
            "vs_adam": median / base if base else None,
            "state_bytes": state_bytes(opt),
            "state_bytes_on_compressed_matrices": on_matrices,
        }
    if "adam" in results:
        adam_matrices = results["adam"]["state_bytes_on_compressed_matrices"]
        for r in results.values():
            r["matrix_state_vs_adam"] = (
                r["state_bytes_on_compressed_matrices"] / adam_matrices if adam_matrices else None
            )
    return {
        "workload": workload_name,
        "num_params": sum(p.numel() for p in model.parameters()),
        "compressed_params": sum(p.numel() for p in groups[0]["params"]) if matrices else 0,
        "steps_per_round": steps,
        "rounds": rounds,
        "device": str(dev),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "optimizers": results,
    }
