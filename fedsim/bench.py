"""Engine benchmark: the same clients, batches and local steps trained three ways in one process.

- ``vectorized``: the engine's chunked, client-stacked trainer;
- ``sequential``: the per-client reference loop (one model at a time);
- ``centralized``: one model trained on one big batch holding all clients' samples of each step, the
  physical limit a client-stacked trainer can approach.

Throughput is samples per second (``clients * steps * batch / seconds``); each path is warmed up once
and the median of ``repeats`` timings is reported.
"""

from __future__ import annotations

import platform
import statistics
import time
from typing import Any

import numpy as np
import torch
from torch.func import functional_call

from fedsim.data import load_dataset, partition
from fedsim.data.samplers import IIDSampler
from fedsim.engine.executor import LocalExecutor, auto_chunk_size
from fedsim.engine.protocol import ClientAlgorithm, Plan
from fedsim.engine.store import ClientStore
from fedsim.models import build_model
from fedsim.optim import SGD
from fedsim.simulation import init_seed, parameters_of, resolve_device


def _timed(fn, repeats: int, device: torch.device) -> float:
    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    once()  # warm-up
    return statistics.median(once() for _ in range(repeats))


def bench_engine(
    *,
    dataset: str = "digits",
    model: str = "mlp",
    clients: int = 1000,
    local_steps: int = 10,
    batch_size: int = 32,
    repeats: int = 5,
    device: str = "auto",
    chunk_size: int | None = None,
    grad_mode: str = "sum",
    sequential: bool = True,
    lr: float = 0.05,
    model_args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Time the three training paths on identical work; returns a JSON-ready dict."""
    dev = resolve_device(device)
    ds = load_dataset(dataset, num_clients=clients)
    parts = partition("iid", ds.y_train, clients, seed=0) if len(ds.y_train) >= clients else None
    if parts is None:  # more clients than samples: clients share samples (sampling is with replacement)
        rows = np.arange(clients * max(1, batch_size)) % len(ds.y_train)
        parts = np.array_split(rows, clients)
    net = build_model(model, ds.feature_shape, ds.num_classes, seed=init_seed(0), **(model_args or {})).to(dev)
    params = parameters_of(net)
    store = ClientStore.build(ds.x_train, ds.y_train, parts, [np.zeros(0, np.int64)] * clients, dev)
    opt = SGD()
    ids = np.arange(clients)
    chunk = chunk_size or min(clients, auto_chunk_size(net, params, store.x[:1], batch_size, dev))
    executor = LocalExecutor(
        net, store, IIDSampler(), opt, ClientAlgorithm(), seed=0, local_steps=local_steps,
        local_epochs=None, batch_size=batch_size, chunk_size=chunk, grad_mode=grad_mode,
    )  # fmt: skip
    samples = clients * local_steps * batch_size
    result: dict[str, Any] = {
        "dataset": dataset, "model": model, "clients": clients, "local_steps": local_steps,
        "batch_size": batch_size, "repeats": repeats, "device": str(dev), "chunk_size": chunk,
        "grad_mode": grad_mode, "model_args": model_args or {}, "num_params": sum(v.numel() for v in params.values()),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor()
        or platform.machine(),
    }  # fmt: skip
    plan = Plan(ids)
    t_vec = _timed(lambda: executor.train(plan, params, 1, lr), repeats, dev)
    result["vectorized"] = {"seconds": t_vec, "samples_per_s": samples / t_vec}

    batches, _ = IIDSampler().sample(0, 1, ids, store.sizes, steps=local_steps, epochs=None, batch_size=batch_size)
    index = store.global_index(ids, batches.positions)  # [C, K, B]

    def centralized() -> None:
        p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        for k in range(local_steps):
            idx = index[:, k].reshape(-1)
            loss = torch.nn.functional.cross_entropy(functional_call(net, p, (store.x[idx],)), store.y[idx])
            grads = torch.autograd.grad(loss, list(p.values()))
            with torch.no_grad():
                for v, g in zip(p.values(), grads, strict=True):
                    v -= lr * g

    t_cen = _timed(centralized, repeats, dev)
    result["centralized"] = {"seconds": t_cen, "samples_per_s": samples / t_cen}
    result["vectorized_over_centralized"] = t_cen / t_vec
    if sequential:
        executor.sequential = True
        seq_repeats = max(1, min(repeats, 3))
        t_seq = _timed(lambda: executor.train(plan, params, 1, lr), seq_repeats, dev)
        executor.sequential = False
        result["sequential"] = {"seconds": t_seq, "samples_per_s": samples / t_seq, "repeats": seq_repeats}
        result["vectorized_over_sequential"] = t_seq / t_vec
    return result
