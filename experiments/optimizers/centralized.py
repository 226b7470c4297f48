"""Centralized comparison of the memory-efficient optimizers on the character transformer (Shakespeare).

Adam, FOAM, GWT, MoLS-style and SGD-SaI train the registry's ``char_transformer`` (2 layers, width 128)
from the same initialization on the same sequence of minibatches (the pooled training windows of
``--speakers`` speakers), for the same number of steps. Every ``--eval-every`` steps the validation loss is
measured on a fixed sample of the speakers' test windows. FOAM and GWT use the transformer param groups
(embeddings and the output head in Adam) and their defaults (level 2, scale 0.25); each is run at the
Adam learning rate and, as the authors' recipe sets it, at ``lr / scale`` (the scale then cancels on the
compressed matrices).

Writes ``experiments/results/optimizers/centralized.{json,md,png}``: validation-loss curves, final
validation loss (mean of the last 3 evaluations) and its ratio to Adam's, optimizer state bytes (all
parameters and the compressed matrices only), and the median optimizer step time.

    python experiments/optimizers/centralized.py                 # about 15-25 minutes on 2 CPU cores
    python experiments/optimizers/centralized.py --steps 50      # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedsim.core import components
from fedsim.models import build_model
from fedsim.optim import FOAM, GWT, MoLS, SGDSaI, state_bytes, transformer_param_groups

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "experiments" / "results" / "optimizers"


def make_optimizers(lr: float, sai_lr: float) -> dict[str, callable]:
    """Name -> factory(model) for every compared optimizer."""
    return {
        "Adam": lambda m: torch.optim.Adam(m.parameters(), lr=lr),
        "FOAM": lambda m: FOAM(transformer_param_groups(m), lr=lr),
        "FOAM (lr/scale)": lambda m: FOAM(transformer_param_groups(m), lr=lr / 0.25),
        "GWT": lambda m: GWT(transformer_param_groups(m), lr=lr),
        "GWT (lr/scale)": lambda m: GWT(transformer_param_groups(m), lr=lr / 0.25),
        "MoLS-style": lambda m: MoLS(m.parameters(), lr=lr),
        "SGD-SaI": lambda m: SGDSaI(m.parameters(), lr=sai_lr),
    }


def compressed_state_bytes(opt: torch.optim.Optimizer, model: nn.Module) -> int:
    """State bytes on the parameters FOAM/GWT compress (the transformer groups' matrices)."""
    matrices = {id(p) for p in transformer_param_groups(model)[0]["params"]}
    return sum(
        t.numel() * t.element_size()
        for p, s in opt.state.items()
        if id(p) in matrices
        for t in s.values()
        if isinstance(t, torch.Tensor) and t.dim() > 0
    )


def train(name, factory, data, args) -> dict:
    x_train, y_train, x_val, y_val = data
    model = build_model("char_transformer", (80,), 81, seed=args.seed)
    opt = factory(model)
    order = np.random.default_rng(args.seed).integers(0, len(x_train), size=(args.steps, args.batch_size))
    curve, step_times = [], []
    loss_fn = nn.functional.cross_entropy

    def validate() -> float:
        model.eval()
        with torch.no_grad():
            losses = [
                loss_fn(model(x_val[i : i + 512]), y_val[i : i + 512], reduction="sum")
                for i in range(0, len(x_val), 512)
            ]
        model.train()
        return float(sum(losses) / len(x_val))

    curve.append((0, validate()))
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.as_tensor(order[step - 1])
        loss = loss_fn(model(x_train[idx]), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t0 = time.perf_counter()
        opt.step()
        step_times.append(time.perf_counter() - t0)
        if not torch.isfinite(loss):
            break
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, validate()))
    print(f"{name}: val loss {curve[-1][1]:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return {
        "curve": curve,
        "final_val_loss": statistics.mean(v for _, v in curve[-3:]),
        "state_bytes": state_bytes(opt),
        "compressed_state_bytes": compressed_state_bytes(opt, model),
        "step_seconds_median": statistics.median(step_times[len(step_times) // 5 :]),  # past the warm-up
    }


def write(results: dict, args, data_sizes, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    adam = results["Adam"]
    for r in results.values():
        r["val_loss_vs_adam"] = r["final_val_loss"] / adam["final_val_loss"]
        r["state_vs_adam"] = r["state_bytes"] / adam["state_bytes"]
        r["compressed_state_vs_adam"] = r["compressed_state_bytes"] / adam["compressed_state_bytes"]
        r["step_time_vs_adam"] = r["step_seconds_median"] / adam["step_seconds_median"]
    protocol = {k: v for k, v in vars(args).items() if k != "out"} | data_sizes | {"torch": torch.__version__}
    (out / "centralized.json").write_text(json.dumps({"protocol": protocol, "results": results}, indent=1))
    lines = [
        "# Memory-efficient optimizers, centralized: char transformer on Shakespeare",
        "",
        f"Protocol: {json.dumps(protocol)}. Final val loss = mean of the last 3 evaluations; state = optimizer "
        "state bytes (all parameters / the matrices FOAM and GWT compress); step = median `optimizer.step()` "
        "time (eager, after the first 20% of steps, timed inside training on a shared machine: "
        "`fedsim bench optimizer` is the controlled measurement).",
        "",
        "| optimizer | lr | final val loss | vs Adam | state (MB) | vs Adam | matrix state vs Adam | step (ms) "
        "| vs Adam |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['lr']:g} | {r['final_val_loss']:.4f} | {r['val_loss_vs_adam']:.3f} | "
            f"{r['state_bytes'] / 1e6:.2f} | {r['state_vs_adam']:.3f} | {r['compressed_state_vs_adam']:.3f} | "
            f"{r['step_seconds_median'] * 1e3:.2f} | {r['step_time_vs_adam']:.2f} |"
        )
    (out / "centralized.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, r in results.items():
        steps, losses = zip(*r["curve"], strict=True)
        ax.plot(steps, losses, label=name, linestyle="--" if "lr/scale" in name else "-")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title("char transformer on Shakespeare, equal steps")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "centralized.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam's (and FOAM/GWT/MoLS's) learning rate")
    parser.add_argument("--sai-lr", type=float, default=1e-2, help="SGD-SaI's learning rate (its authors' default)")
    parser.add_argument("--speakers", type=int, default=100)
    parser.add_argument("--max-samples", type=int, default=500, help="windows per speaker (train + test)")
    parser.add_argument("--val-size", type=int, default=1024)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--optimizers", default=None, help="comma-separated subset of the names (Adam always runs)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = components.build(
        "dataset", {"name": "shakespeare", "max_samples": args.max_samples}, num_clients=args.speakers
    )
    val = np.random.default_rng(0).choice(len(ds.x_test), size=min(args.val_size, len(ds.x_test)), replace=False)
    data = (
        torch.as_tensor(ds.x_train),
        torch.as_tensor(ds.y_train),
        torch.as_tensor(ds.x_test[val]),
        torch.as_tensor(ds.y_test[val]),
    )
    sizes = {"train_windows": len(ds.x_train), "val_windows": len(val)}
    results = {}
    chosen = None if args.optimizers is None else {"Adam", *(n.strip() for n in args.optimizers.split(","))}
    for name, factory in make_optimizers(args.lr, args.sai_lr).items():
        if chosen is not None and name not in chosen:
            continue
        results[name] = train(name, factory, data, args)
        results[name]["lr"] = args.sai_lr if name == "SGD-SaI" else args.lr / (0.25 if "lr/scale" in name else 1)
    write(results, args, sizes, args.out)


if __name__ == "__main__":
    main()
