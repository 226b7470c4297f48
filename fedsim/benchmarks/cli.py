"""``fedsim bench``: the benchmarks' command line (JSON on stdout, optionally to a file). The benchmark code
itself is imported when a command runs (it needs torch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from fedsim.config import parse_pairs
from fedsim.core.errors import FedsimError

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (JSON on stdout).")
Opt = typer.Option


def _emit_json(result: dict[str, Any], out: Path | None) -> None:
    """Print a benchmark result as JSON (and write it to ``out`` when given)."""
    text = json.dumps(result, indent=2)
    if out:
        out.write_text(text + "\n")
    typer.echo(text)


@bench_app.command("engine")
def bench_engine_cmd(
    dataset: Annotated[str, Opt(help="Data set whose samples are used.")] = "digits",
    model: Annotated[str, Opt(help="Model name.")] = "mlp",
    clients: Annotated[int, Opt(min=1, help="Simulated clients.")] = 1000,
    local_steps: Annotated[int, Opt(min=1, help="Local steps per client.")] = 10,
    batch_size: Annotated[int, Opt(min=1, help="Minibatch size.")] = 32,
    repeats: Annotated[int, Opt(min=1, help="Timed repeats (median reported).")] = 5,
    device: Annotated[str, Opt(help="auto | cpu | cuda")] = "auto",
    chunk_size: Annotated[int | None, Opt(min=1, help="Clients per vectorized call (default: from memory).")] = None,
    grad_mode: Annotated[str, Opt(help="sum | vmap")] = "sum",
    skip_sequential: Annotated[bool, Opt(help="Skip the slow per-client loop.")] = False,
    out: Annotated[Path | None, Opt(help="Also write the JSON here.")] = None,
) -> None:
    """Vectorized vs sequential per-client loop vs one centralized batch of the same samples."""
    from fedsim.benchmarks.engine import bench_engine

    result = bench_engine(
        dataset=dataset, model=model, clients=clients, local_steps=local_steps, batch_size=batch_size,
        repeats=repeats, device=device, chunk_size=chunk_size, grad_mode=grad_mode,
        sequential=not skip_sequential,
    )  # fmt: skip
    _emit_json(result, out)


@bench_app.command("dsgd")
def bench_dsgd_cmd(
    nodes: Annotated[int, Opt(min=2, help="Graph nodes.")] = 64,
    topology: Annotated[str, Opt(help="Graph family (topologies.build).")] = "ring",
    model: Annotated[str, Opt(help="Model name.")] = "mlp",
    steps: Annotated[int, Opt(min=1, help="D-SGD steps per timing.")] = 10,
    repeats: Annotated[int, Opt(min=1, help="Timed repeats (median reported).")] = 5,
    device: Annotated[str, Opt(help="auto | cpu | cuda")] = "auto",
    skip_loop: Annotated[bool, Opt(help="Skip the slow per-node loop.")] = False,
    out: Annotated[Path | None, Opt(help="Also write the JSON here.")] = None,
) -> None:
    """D-SGD step: vectorized + sparse gossip vs a per-node loop with per-node optimizers; gossip share."""
    from fedsim.benchmarks.engine import bench_dsgd

    result = bench_dsgd(nodes=nodes, topology=topology, model=model, steps=steps, repeats=repeats, device=device,
                        loop=not skip_loop)  # fmt: skip
    _emit_json(result, out)


@bench_app.command("regulator")
def bench_regulator_cmd(
    regulator: Annotated[str, Opt(help="ecgr | bherd")] = "ecgr",
    strategy: Annotated[str, Opt(help="Host strategy.")] = "fedavg",
    dataset: Annotated[str, Opt(help="Data set.")] = "digits",
    model: Annotated[str, Opt(help="Model name.")] = "mlp",
    clients: Annotated[int, Opt(min=1, help="Clients (all trained every round).")] = 20,
    local_steps: Annotated[int, Opt(min=1, help="Local steps K per round.")] = 40,
    batch_size: Annotated[int, Opt(min=1, help="Minibatch size.")] = 32,
    repeats: Annotated[int, Opt(min=1, help="Timed rounds per variant (median reported).")] = 5,
    device: Annotated[str, Opt(help="auto | cpu | cuda")] = "auto",
    set_: Annotated[list[str] | None, Opt("--set", help="Regulator option KEY=VALUE (repeatable).")] = None,
    out: Annotated[Path | None, Opt(help="Also write the JSON here.")] = None,
) -> None:
    """Per-round time of a strategy with and without a client regulator (ECGR's overhead)."""
    from fedsim.benchmarks.engine import bench_regulator

    result = bench_regulator(
        regulator=regulator, strategy=strategy, dataset=dataset, model=model, clients=clients,
        local_steps=local_steps, batch_size=batch_size, repeats=repeats, device=device, options=parse_pairs(set_),
    )  # fmt: skip
    _emit_json(result, out)


@bench_app.command("executors")
def bench_executors_cmd(
    clients: Annotated[int, Opt(min=2, help="Clients (all trained every round).")] = 100,
    rounds: Annotated[int, Opt(min=1, help="Rounds per run.")] = 20,
    local_steps: Annotated[int, Opt(min=1, help="Local steps per round.")] = 10,
    batch_size: Annotated[int, Opt(min=1, help="Minibatch size.")] = 16,
    num_actors: Annotated[int | None, Opt(min=1, help="Ray actors (default: as many as CPUs allow).")] = None,
    cpus_per_actor: Annotated[float, Opt(help="CPUs per Ray actor and per Flower client.")] = 1.0,
    repeats: Annotated[int, Opt(min=1, help="Runs of ours per executor (median reported).")] = 3,
    flower: Annotated[bool, Opt(help="Also run Flower's simulation engine (needs the flower extra).")] = True,
    out: Annotated[Path | None, Opt(help="Also write the JSON here.")] = None,
) -> None:
    """Whole-run wall time on the digits MLP: local executor vs Ray executor vs Flower's simulation engine."""
    from fedsim.benchmarks.engine import bench_executors

    result = bench_executors(
        clients=clients, rounds=rounds, local_steps=local_steps, batch_size=batch_size, num_actors=num_actors,
        cpus_per_actor=cpus_per_actor, repeats=repeats, flower=flower,
    )  # fmt: skip
    _emit_json(result, out)


@bench_app.command("contention")
def bench_contention_cmd(
    rounds: Annotated[int, Opt(min=1, help="Rounds per timed run.")] = 10,
    repeats: Annotated[int, Opt(min=1, help="Timed runs per measurement (median reported).")] = 3,
    trials: Annotated[int, Opt(min=1, help="Alternations of idle and busy (median over them).")] = 1,
    threads: Annotated[str, Opt(help="fedsim's thread count: auto or a number (as --threads).")] = "auto",
    out: Annotated[Path | None, Opt(help="Also write the JSON here.")] = None,
) -> None:
    """Round time of the benchmark workload alone and next to one CPU-bound process: fedsim's thread set-up
    against torch's defaults."""
    if threads != "auto" and not (threads.isdigit() and int(threads) >= 1):
        raise FedsimError(f"--threads: expected auto or a positive number, got {threads!r}")
    from fedsim.benchmarks.contention import bench_contention

    _emit_json(bench_contention(rounds=rounds, repeats=repeats, trials=trials, threads=threads), out)


@bench_app.command("flower")
def bench_flower_cmd(
    repeats: Annotated[int, Opt(min=1, help="fedsim's timed calls and processes (median; Flower runs once).")] = 3,
    flower: Annotated[bool, Opt(help="Run Flower's side (needs the flower extra).")] = True,
    cpus_per_client: Annotated[float | None, Opt(min=0.01, help="Flower's client resources (num_cpus) [1].")] = None,
    out: Annotated[Path | None, Opt(help="Also write the JSON here.")] = None,
) -> None:
    """fedsim vs Flower's simulation engine on the benchmark workload: inside the call and as whole processes."""
    if cpus_per_client is not None and not flower:
        raise FedsimError("--cpus-per-client sets Flower's clients' resources; drop it with --no-flower")
    cpus_per_client = 1.0 if cpus_per_client is None else cpus_per_client
    from fedsim.benchmarks.versus_flower import bench_flower

    _emit_json(bench_flower(repeats=repeats, flower=flower, cpus_per_client=cpus_per_client), out)


@bench_app.command("async")
def bench_async_cmd(
    clients: Annotated[int, Opt(min=2, help="Simulated clients.")] = 200,
    concurrency: Annotated[int, Opt(min=1, help="FedBuff's clients in flight; FedAvg's clients per round.")] = 100,
    buffer_size: Annotated[int, Opt(min=1, help="FedBuff's buffer K.")] = 10,
    rounds: Annotated[int, Opt(min=1, help="FedAvg rounds (FedBuff runs the same client updates).")] = 20,
    repeats: Annotated[int, Opt(min=1, help="Timed calls and processes of each (median).")] = 3,
    processes: Annotated[bool, Opt(help="Also time whole fedsim simulate processes.")] = True,
    sigma: Annotated[float, Opt(min=0, help="Log-normal sigma of the clients' speeds.")] = 1.0,
    out: Annotated[Path | None, Opt(help="Also write the JSON here.")] = None,
) -> None:
    """Wall time per client update: asynchronous FedBuff against synchronous FedAvg (same client updates)."""
    from fedsim.benchmarks.asynchronous import bench_async

    result = bench_async(clients=clients, concurrency=concurrency, buffer_size=buffer_size, rounds=rounds,
                         repeats=repeats, processes=processes, sigma=sigma)  # fmt: skip
    _emit_json(result, out)


@bench_app.command("privacy")
def bench_privacy_cmd(
    clients: Annotated[int, Opt(min=2, help="Simulated clients (all train every round).")] = 100,
    rounds: Annotated[int, Opt(min=1, help="Rounds per run.")] = 5,
    repeats: Annotated[int, Opt(min=1, help="Timed calls and processes of each (median).")] = 3,
    processes: Annotated[bool, Opt(help="Also time whole fedsim simulate processes.")] = True,
    out: Annotated[Path | None, Opt(help="Also write the JSON here.")] = None,
) -> None:
    """What privacy costs: DP-SGD against the plain local step, DP-FedAvg against FedAvg."""
    from fedsim.benchmarks.privacy import bench_privacy

    _emit_json(bench_privacy(clients=clients, rounds=rounds, repeats=repeats, processes=processes), out)


@bench_app.command("compression")
def bench_compression_cmd(
    clients: Annotated[int, Opt(min=2, help="Simulated clients (all train every round).")] = 100,
    rounds: Annotated[int, Opt(min=1, help="Timed rounds per compressor (median).")] = 10,
    repeats: Annotated[int, Opt(min=1, help="Whole processes of each (median).")] = 3,
    processes: Annotated[bool, Opt(help="Also time whole fedsim simulate processes.")] = True,
    out: Annotated[Path | None, Opt(help="Also write the JSON here.")] = None,
) -> None:
    """Seconds per round with each uplink compressor against an uncompressed round."""
    from fedsim.benchmarks.compression import bench_compression

    _emit_json(bench_compression(clients=clients, rounds=rounds, repeats=repeats, processes=processes), out)


@bench_app.command("optimizer")
def bench_optimizer_cmd(
    workload: Annotated[str, Opt(help="char_transformer | llama_block")] = "char_transformer",
    optimizers: Annotated[
        str, Opt(help="Comma-separated from adam,foam,foam-fused,gwt,gwt-fused,mols,sgd-sai.")
    ] = "adam,foam,foam-fused,gwt,gwt-fused,mols,sgd-sai",
    steps: Annotated[int, Opt(min=1, help="Steps per timed round.")] = 10,
    rounds: Annotated[int, Opt(min=1, help="Timed rounds per optimizer (median reported).")] = 7,
    device: Annotated[str, Opt(help="cpu | cuda")] = "cpu",
    out: Annotated[Path | None, Opt(help="Also write the JSON here.")] = None,
) -> None:
    """Optimizer step time and state bytes against torch.optim.Adam(foreach=True) on the same parameters."""
    import torch

    from fedsim.benchmarks.optimizers import BENCH_OPTIMIZERS, WORKLOADS, bench_optimizers

    names = tuple(n.strip() for n in optimizers.split(",") if n.strip())
    for name in names:
        if name not in BENCH_OPTIMIZERS:
            choices = ", ".join(BENCH_OPTIMIZERS)
            raise FedsimError(f"unknown optimizer {name!r} for the benchmark; choose from {choices}")
    if workload not in WORKLOADS:
        raise FedsimError(f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}")
    if device not in ("cpu", "cuda"):
        raise FedsimError(f"unknown device {device!r}; choose cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise FedsimError("device cuda requested but CUDA is not available")
    result = bench_optimizers(workload, names, steps=steps, rounds=rounds, device=device)
    _emit_json(result, out)
