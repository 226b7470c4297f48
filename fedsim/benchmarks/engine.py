"""Engine benchmark: the same clients, batches and local steps trained three ways in one process.

- ``vectorized``: the engine's chunked, client-stacked trainer;
- ``sequential``: the per-client reference loop (one model at a time);
- ``centralized``: one model trained on one big batch holding all clients' samples of each step, the
  physical limit a client-stacked trainer can approach.

Throughput is samples per second (``clients * steps * batch / seconds``); each path is warmed up once
and the median of ``repeats`` timings is reported.
"""

from __future__ import annotations

import copy
import platform
import statistics
import time
from typing import Any

import numpy as np
import torch
from torch.func import functional_call

import topologies
from fedsim.benchmarks.flower_baseline import run_flower
from fedsim.config import make_config
from fedsim.core.protocol import ClientAlgorithm, Plan
from fedsim.data import load_dataset, partition
from fedsim.data.samplers import IIDSampler
from fedsim.engine.executor import LocalExecutor, auto_chunk_size
from fedsim.engine.store import ClientStore
from fedsim.models import build_model
from fedsim.optim import SGD
from fedsim.simulation import init_seed, make_simulation, parameters_of, resolve_device, simulate
from strategies import DSGD, gossip, gossip_matrix


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    """Peak GPU memory (bytes) since :func:`_reset_peak`; None on the CPU."""
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


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
    _reset_peak(dev)
    t_vec = _timed(lambda: executor.train(plan, params, 1, lr), repeats, dev)
    result["vectorized"] = {"seconds": t_vec, "samples_per_s": samples / t_vec, "peak_memory_bytes": _peak(dev)}

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

    _reset_peak(dev)
    t_cen = _timed(centralized, repeats, dev)
    result["centralized"] = {"seconds": t_cen, "samples_per_s": samples / t_cen, "peak_memory_bytes": _peak(dev)}
    result["vectorized_over_centralized"] = t_cen / t_vec
    if sequential:
        executor.sequential = True
        seq_repeats = max(1, min(repeats, 3))
        t_seq = _timed(lambda: executor.train(plan, params, 1, lr), seq_repeats, dev)
        executor.sequential = False
        result["sequential"] = {"seconds": t_seq, "samples_per_s": samples / t_seq, "repeats": seq_repeats}
        result["vectorized_over_sequential"] = t_seq / t_vec
    return result


def bench_dsgd(
    *,
    nodes: int = 64,
    topology: str = "ring",
    dataset: str = "digits",
    model: str = "mlp",
    batch_size: int = 32,
    steps: int = 10,
    repeats: int = 5,
    device: str = "auto",
    lr: float = 0.05,
    loop: bool = True,
) -> dict[str, Any]:
    """D-SGD steps (one local SGD step on every node, then gossip ``X <- W X``), three ways in one process:
    the engine (vectorized step + sparse gossip), a per-node loop (one ``nn.Module`` and one
    ``torch.optim.SGD`` per node, gossip as per-node weighted sums over neighbours), and the engine's gossip
    alone (its share of a step)."""

    dev = resolve_device(device)
    ds = load_dataset(dataset, num_clients=nodes)
    rows = np.arange(nodes * batch_size) % len(ds.y_train)
    parts = np.array_split(rows, nodes)
    net = build_model(model, ds.feature_shape, ds.num_classes, seed=init_seed(0)).to(dev)
    params = parameters_of(net)
    store = ClientStore.build(ds.x_train, ds.y_train, parts, [np.zeros(0, np.int64)] * nodes, dev)
    w_np = topologies.mixing_matrix(topologies.build(topology, nodes))
    w = gossip_matrix(w_np, dev)
    ids = np.arange(nodes)
    batches, _ = IIDSampler().sample(0, 1, ids, store.sizes, steps=steps, epochs=None, batch_size=batch_size)
    index = store.global_index(ids, batches.positions)
    mask = torch.ones(index.shape, dtype=torch.bool, device=dev)
    executor = LocalExecutor(
        net, store, IIDSampler(), SGD(), ClientAlgorithm(), seed=0, local_steps=1, local_epochs=None,
        batch_size=batch_size, chunk_size=nodes,
    )  # fmt: skip
    start = {k: v.unsqueeze(0).repeat(nodes, *([1] * v.dim())) for k, v in params.items()}
    algorithm = DSGD()

    def vectorized() -> None:
        x = start
        for k in range(steps):
            r = executor.trainer.train(params, store.x, store.y, index[:, k : k + 1], mask[:, k : k + 1], SGD(), lr,
                                       ClientAlgorithm(), start=x)  # fmt: skip
            x = algorithm.step(w, x, r.deltas)

    def gossip_only() -> None:
        x = start
        for _ in range(steps):
            x = gossip(w, x)

    result: dict[str, Any] = {
        "nodes": nodes, "topology": topology, "model": model, "dataset": dataset, "batch_size": batch_size,
        "steps": steps, "repeats": repeats, "device": str(dev), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "num_params": sum(v.numel() for v in params.values()),
    }  # fmt: skip
    t_vec = _timed(vectorized, repeats, dev)
    t_gossip = _timed(gossip_only, repeats, dev)
    result["vectorized"] = {"seconds_per_step": t_vec / steps}
    result["gossip"] = {"seconds_per_step": t_gossip / steps, "share_of_step": t_gossip / t_vec}
    if loop:
        neighbours = [np.nonzero(w_np[i])[0] for i in range(nodes)]
        models = [copy.deepcopy(net) for _ in range(nodes)]
        optims = [torch.optim.SGD(m.parameters(), lr=lr) for m in models]

        def per_node() -> None:
            for m in models:
                m.load_state_dict(params, strict=False)
            for k in range(steps):
                for i, (m, opt) in enumerate(zip(models, optims, strict=True)):
                    rows_i = index[i, k]
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(m(store.x[rows_i]), store.y[rows_i]).backward()
                    opt.step()
                with torch.no_grad():
                    current = [[p.detach().clone() for p in m.parameters()] for m in models]
                    for i, m in enumerate(models):
                        for pi, p in enumerate(m.parameters()):
                            p.copy_(sum(float(w_np[i, j]) * current[j][pi] for j in neighbours[i]))

        loop_repeats = max(1, min(repeats, 3))
        t_loop = _timed(per_node, loop_repeats, dev)
        result["per_node_loop"] = {"seconds_per_step": t_loop / steps, "repeats": loop_repeats}
        result["vectorized_over_loop"] = t_loop / t_vec
    return result


def bench_regulator(
    *,
    regulator: str = "ecgr",
    strategy: str = "fedavg",
    dataset: str = "digits",
    model: str = "mlp",
    clients: int = 20,
    local_steps: int = 40,
    batch_size: int = 32,
    repeats: int = 5,
    device: str = "auto",
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Per-round time of ``strategy`` with and without a client regulator (vectorized engine, full
    participation, ``local_steps`` steps of ``batch_size``), timed alternately in one process after a warm-up
    round each; returns the medians and the overhead ``t_regulated / t_plain - 1``."""

    base = dict(
        dataset=dataset, model=model, clients=clients, local_steps=local_steps, batch_size=batch_size, device=device,
        strategy=strategy, rounds=1, checkpoint_every=0, sampler="iid", partition="iid", client_test_fraction=0.0,
    )  # fmt: skip
    plain = make_simulation(make_config(base))
    regulated = make_simulation(make_config({**base, "regulator": {"name": regulator, **(options or {})}}))
    dev = plain.device
    states = {"plain": plain.initial_state(), "regulated": regulated.initial_state()}
    sims = {"plain": plain, "regulated": regulated}
    times: dict[str, list[float]] = {"plain": [], "regulated": []}

    def once(name: str) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        sims[name].round(1, states[name])
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    for name in sims:  # warm-up
        once(name)
    for _ in range(repeats):
        for name in sims:
            times[name].append(once(name))
    t_plain, t_reg = statistics.median(times["plain"]), statistics.median(times["regulated"])
    spec = regulated.executor.algorithm.trajectory
    return {
        "regulator": regulator, "strategy": strategy, "dataset": dataset, "model": model, "clients": clients,
        "local_steps": local_steps, "batch_size": batch_size, "repeats": repeats, "device": str(dev),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "num_params": plain.num_params,
        "chunk_size": regulated.executor.chunk_size, "options": options or {},
        "trajectory_bytes_per_client": regulated.executor.trajectory_bytes(regulated.init_params) if spec else 0,
        "plain": {"seconds_per_round": t_plain, "all": times["plain"]},
        "regulated": {"seconds_per_round": t_reg, "all": times["regulated"]},
        "overhead": t_reg / t_plain - 1.0,
    }  # fmt: skip


def bench_executors(
    *,
    clients: int = 100,
    rounds: int = 20,
    local_steps: int = 10,
    batch_size: int = 16,
    lr: float = 0.05,
    num_actors: int | None = None,
    cpus_per_actor: float = 1.0,
    repeats: int = 3,
    flower: bool = True,
) -> dict[str, Any]:
    """Wall time of one whole run (startup, data, ``rounds`` rounds with evaluation every round) of the same
    workload (digits, MLP, ``clients`` clients all trained every round) on our local executor, our Ray
    executor (Ray started and shut down by the run) and Flower's simulation engine (one ClientApp call per
    client, ``cpus_per_actor`` CPUs each; :mod:`fedsim.benchmarks.flower_baseline`). Ours are the median of ``repeats``
    runs, alternated; Flower runs once. ``ray_running``: the Ray executor joining a Ray started before the
    timed run (as on a cluster: the run starts its actors, not Ray). Ratios are Flower's time over ours and
    the Ray executor's over the local one's (``ray_overhead``); ``*_round_s`` is the median per-round time
    after the first round. ``fedsim_backend_flower``: the same run with ``--backend flower`` (our clients as
    Flower ClientApps on Flower's simulation engine, once)."""
    config = dict(
        dataset="digits", model="mlp", clients=clients, rounds=rounds, local_steps=local_steps,
        batch_size=batch_size, lr=lr, fraction=1.0, device="cpu", checkpoint_every=0, seed=0,
    )  # fmt: skip
    variants = {
        "local": config,
        "ray": {**config, "executor": {"name": "ray", "cpus_per_actor": cpus_per_actor, "num_actors": num_actors}},
    }

    variants["ray_running"] = variants["ray"]  # joins a Ray already running (a cluster): no Ray start/stop

    def once(name: str) -> tuple[float, float, float]:
        records: list[dict[str, Any]] = []
        if name == "ray_running":
            import ray

            ray.init(include_dashboard=False, logging_level="error")
        try:
            t0 = time.perf_counter()
            summary = simulate(variants[name], None, plots=False, on_round=records.append)
            wall = time.perf_counter() - t0
        finally:
            if name == "ray_running":
                ray.shutdown()
        return wall, statistics.median(r["time_s"] for r in records[1:] or records), summary["final_test_accuracy"]

    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name in variants:
            runs[name].append(once(name))
    result: dict[str, Any] = {
        "workload": {k: v for k, v in config.items() if k not in ("device", "checkpoint_every")},
        "torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": repeats,
        "num_actors": num_actors, "cpus_per_actor": cpus_per_actor,
    }  # fmt: skip
    for name, values in runs.items():
        result[name] = {
            "wall_s": statistics.median(v[0] for v in values), "round_s": statistics.median(v[1] for v in values),
            "all_wall_s": [v[0] for v in values], "final_test_accuracy": values[0][2],
        }  # fmt: skip
    result["ray_overhead"] = result["ray"]["wall_s"] / result["local"]["wall_s"] - 1.0
    result["ray_round_overhead"] = result["ray"]["round_s"] / result["local"]["round_s"] - 1.0
    result["ray_running_overhead"] = result["ray_running"]["wall_s"] / result["local"]["wall_s"] - 1.0
    if flower:
        result["flower"] = run_flower(config, cpus_per_client=cpus_per_actor)
        records: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        summary = simulate({**config, "backend": {"name": "flower", "cpus_per_client": cpus_per_actor}}, None,
                           plots=False, on_round=records.append)  # fmt: skip
        result["fedsim_backend_flower"] = {
            "wall_s": time.perf_counter() - t0, "round_s": statistics.median(r["time_s"] for r in records[1:]),
            "final_test_accuracy": summary["final_test_accuracy"],
        }  # fmt: skip
        for name in variants:
            result[f"flower_over_{name}"] = result["flower"]["wall_s"] / result[name]["wall_s"]
            result[f"backend_flower_over_{name}"] = result["fedsim_backend_flower"]["wall_s"] / result[name]["wall_s"]
    return result
