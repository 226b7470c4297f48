"""The memory-efficient optimizers (FOAM, GWT, MoLS-style, SGD-SaI): oracles, brute-force references,
state sizes, dtypes, state_dict round trips, and the functional (client-stacked) form against torch.optim."""

from __future__ import annotations

import io
import math
import shutil

import pytest
import torch
from torch import nn

from fedsim.core.errors import FedsimError
from fedsim.optim import (
    FOAM,
    GWT,
    MoLS,
    SGDSaI,
    compressible_names,
    make_optimizer,
    state_bytes,
    transformer_param_groups,
)
from fedsim.optim.fold import fold, unfold
from fedsim.optim.wavelet import haar_dwt, haar_idwt

STEPS = 20


def _model(dtype=torch.float32, seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(13, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def _train(make_opt, steps=STEPS, dtype=torch.float32, model=None):
    """Parameters after ``steps`` full-batch steps on a fixed problem."""
    model = model or _model(dtype)
    opt = make_opt(model)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(32, 13, generator=g).to(dtype)
    y = torch.randint(0, 3, (32,), generator=g)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x).float(), y).backward()
        opt.step()
    return torch.cat([p.detach().flatten().double() for p in model.parameters()]), opt


@pytest.mark.parametrize("lr", [1e-2, 1e-3])
def test_foam_level0_scale1_is_adam(lr):
    adam, _ = _train(lambda m: torch.optim.Adam(m.parameters(), lr=lr))
    foam, _ = _train(lambda m: FOAM(m.parameters(), lr=lr, level=0, scale=1.0))
    assert (adam - foam).abs().max() < 1e-6


def test_gwt_level0_scale1_without_limiter_is_adam():
    adam, _ = _train(lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, eps=1e-6))
    gwt, _ = _train(lambda m: GWT(m.parameters(), lr=1e-2, level=0, scale=1.0, limiter=1e12))
    assert (adam - gwt).abs().max() < 1e-6


def test_foam_defaults_differ_from_adam():
    adam, _ = _train(lambda m: torch.optim.Adam(m.parameters(), lr=1e-2))
    foam, _ = _train(lambda m: FOAM(m.parameters(), lr=1e-2))
    assert (adam - foam).abs().max() > 1e-3


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 13, 64, 65])
@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_haar_inverse_is_identity(n, level):
    x = torch.randn(3, 2, n, dtype=torch.float64)
    coeffs = haar_dwt(x, level)
    assert len(coeffs) == level + 1
    assert torch.allclose(haar_idwt(coeffs, n), x, atol=1e-12)
    # orthonormal: the energy is preserved (zero padding adds none)
    energy = sum(c.square().sum() for c in coeffs)
    assert torch.allclose(energy, x.square().sum())


def test_haar_one_level_by_hand():
    x = torch.tensor([1.0, 3.0, 4.0, 8.0, 5.0], dtype=torch.float64)
    a, d = haar_dwt(x, 1)
    r = math.sqrt(2)
    assert torch.allclose(a, torch.tensor([4 / r, 12 / r, 5 / r], dtype=torch.float64))
    assert torch.allclose(d, torch.tensor([-2 / r, -4 / r, 5 / r], dtype=torch.float64))


def test_fold_unfold_with_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    assert torch.equal(fold(x, 1), torch.tensor([[1.5, 3.5, 2.5]]))  # the pad zero counts in the last mean
    assert torch.equal(unfold(fold(x, 1), 1, 5), torch.tensor([[1.5, 1.5, 3.5, 3.5, 2.5]]))
    assert torch.equal(fold(x, 0), x)


def test_foam_step_matches_brute_force():
    """Two FOAM steps on one 2x5 matrix at level 1, computed entry by entry from the rule."""
    torch.manual_seed(0)
    w0 = torch.randn(2, 5, dtype=torch.float64)
    grads = [torch.randn(2, 5, dtype=torch.float64) for _ in range(2)]
    lr, b1, b2, eps, alpha, s = 0.1, 0.9, 0.999, 1e-8, 0.25, 0.7
    p = nn.Parameter(w0.clone())
    opt = FOAM([p], lr=lr, level=1, scale=alpha, res_scale=s, eps_mode="authors")
    for g in grads:
        p.grad = g.clone()
        opt.step()
    w = w0.clone()
    m = torch.zeros(2, 3, dtype=torch.float64)
    v = torch.zeros(2, 3, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        padded = torch.cat([g, torch.zeros(2, 1, dtype=torch.float64)], dim=1)
        for i in range(2):
            for j in range(3):
                block = padded[i, 2 * j : 2 * j + 2]
                m[i, j] = b1 * m[i, j] + (1 - b1) * block.mean()
                v[i, j] = b2 * v[i, j] + (1 - b2) * (block * block).mean()
        step = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        for i in range(2):
            for c in range(5):
                j = c // 2
                r = g[i, c] - padded[i, 2 * j : 2 * j + 2].mean()
                u = alpha * (m[i, j] + s * r) / (math.sqrt(v[i, j] + s * s * r * r) + eps)
                w[i, c] -= step * u
    assert torch.allclose(p.detach(), w, atol=1e-12)


def test_gwt_step_matches_brute_force():
    """Three GWT steps on one 1x6 matrix at level 1 (limiter active from step 2), from the rule."""
    torch.manual_seed(0)
    w0 = torch.randn(1, 6, dtype=torch.float64)
    grads = [torch.randn(1, 6, dtype=torch.float64) * (1 + 3 * k) for k in range(3)]
    lr, b1, b2, eps, alpha, gamma = 0.1, 0.9, 0.999, 1e-6, 0.25, 1.01
    p = nn.Parameter(w0.clone())
    opt = GWT([p], lr=lr, level=1, scale=alpha, eps_mode="authors")
    for g in grads:
        p.grad = g.clone()
        opt.step()
    w = w0.clone()[0]
    m, v, prev = [0.0] * 3, [0.0] * 3, None
    r = math.sqrt(2)
    for t, g in enumerate(grads, start=1):
        g = g[0]
        a = [(g[2 * j] + g[2 * j + 1]) / r for j in range(3)]
        d = [(g[2 * j] - g[2 * j + 1]) / r for j in range(3)]
        m = [b1 * m[j] + (1 - b1) * a[j] for j in range(3)]
        v = [b2 * v[j] + (1 - b2) * a[j] ** 2 for j in range(3)]
        den = [math.sqrt(v[j]) + eps for j in range(3)]
        n = [m[j] / den[j] for j in range(3)]
        norm = math.sqrt(sum(x * x for x in n))
        lim = 1.0 if prev is None else max(norm / prev, gamma) / gamma
        n = [x / lim for x in n]
        prev = norm / lim
        d = [d[j] / (den[j] * lim) for j in range(3)]
        step = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        for j in range(3):
            w[2 * j] -= step * alpha * (n[j] + d[j]) / r
            w[2 * j + 1] -= step * alpha * (n[j] - d[j]) / r
    assert torch.allclose(p.detach()[0], w, atol=1e-12)


@pytest.mark.parametrize("opt_cls", [FOAM, GWT])
@pytest.mark.parametrize("level", [1, 2, 3])
def test_compressed_state_is_a_fraction_of_adams(opt_cls, level):
    def run(make):
        p = nn.Parameter(torch.randn(64, 256))
        opt = make([p])
        p.grad = torch.randn_like(p)
        opt.step()
        return state_bytes(opt)

    adam = run(lambda ps: torch.optim.Adam(ps))
    ours = run(lambda ps: opt_cls(ps, level=level))
    assert ours / adam <= 1 / 2**level + 0.001
    assert ours / adam >= 1 / 2**level - 0.001


@pytest.mark.parametrize("opt_cls", [FOAM, GWT])
@pytest.mark.parametrize("n", [1, 3, 5, 6, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_any_last_dimension_and_dtype(opt_cls, n, dtype):
    p = nn.Parameter(torch.randn(4, n, dtype=dtype))
    q = nn.Parameter(torch.randn(2, 3, 3, n, dtype=dtype))  # a conv-like 4-D weight
    opt = opt_cls([p, q], lr=1e-2)
    for _ in range(3):
        for t in (p, q):
            t.grad = torch.randn_like(t)
        opt.step()
    for t in (p, q):
        assert t.dtype == dtype and torch.isfinite(t).all()
        assert opt.state[t]["exp_avg"].dtype == dtype


def test_fold_false_group_is_adam():
    """A param group with ``fold=False`` runs Adam even on a matrix."""
    adam, _ = _train(lambda m: torch.optim.Adam(m.parameters(), lr=1e-2))
    foam, _ = _train(lambda m: FOAM([{"params": list(m.parameters()), "fold": False}], lr=1e-2))
    assert (adam - foam).abs().max() < 1e-6


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: FOAM(ps, lr=1e-2, weight_decay=0.1),
        lambda ps: GWT(ps, lr=1e-2, weight_decay=0.1),
        lambda ps: MoLS(ps, lr=1e-2, weight_decay=0.1, estimator="ema", refresh=3),
        lambda ps: SGDSaI(ps, lr=1e-2),
    ],
    ids=["foam", "gwt", "mols", "sgd-sai"],
)
def test_state_dict_round_trip(make):
    """5 steps, save (weights_only load), a fresh optimizer loads it, 5 more steps == 10 uninterrupted."""
    straight, _ = _train(lambda m: make(m.parameters()), steps=10)
    model = _model()
    _, opt = _train(lambda m: make(m.parameters()), steps=5, model=model)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed, _ = _train(lambda m: _loaded(make(m.parameters()), state), steps=5, model=model)
    assert torch.equal(straight, resumed)


def _loaded(opt, state):
    opt.load_state_dict(state)
    return opt


def test_sgd_sai_rule():
    torch.manual_seed(0)
    w0, b0 = torch.randn(3, 4), torch.randn(1)
    g1, g2 = torch.randn(3, 4), torch.randn(3, 4)
    w, b = nn.Parameter(w0.clone()), nn.Parameter(b0.clone())
    opt = SGDSaI([w, b], lr=0.1, momentum=0.9, weight_decay=0.01)
    gsnr = g1.norm() / (g1.std() + 1e-8)
    w.grad, b.grad = g1.clone(), torch.ones(1)
    opt.step()
    expected = w0 * (1 - 0.1 * 0.01) - 0.1 * gsnr * g1
    assert torch.allclose(w.detach(), expected, atol=1e-6)
    assert torch.allclose(b.detach(), b0 * (1 - 0.001))  # one-element tensor: gsnr 0, only decay
    w.grad = g2.clone()
    opt.step()  # gsnr frozen at the first step's value
    expected = expected * (1 - 0.001) - 0.1 * gsnr * (0.9 * g1 + 0.1 * g2)
    assert torch.allclose(w.detach(), expected, atol=1e-6)


def test_mols_single_tensor_is_adamw():
    """With one tensor the normalized scale is 1: MoLS-style is AdamW exactly."""
    p = nn.Parameter(torch.randn(5, 4))
    q = nn.Parameter(p.detach().clone())
    ours = MoLS([p], lr=1e-2, weight_decay=0.1, estimator="sai", refresh=3)
    ref = torch.optim.AdamW([q], lr=1e-2, weight_decay=0.1)
    for k in range(8):
        g = torch.randn(5, 4) * (k + 1)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.allclose(p, q, atol=1e-6)


def test_mols_scales_follow_snr():
    """Two tensors: the noisier one (lower SNR) gets the smaller scale, and the scales average to 1."""
    clean = nn.Parameter(torch.zeros(50))
    noisy = nn.Parameter(torch.zeros(50))
    opt = MoLS([clean, noisy], lr=1e-3)
    clean.grad = torch.ones(50) + 0.01 * torch.randn(50)
    noisy.grad = torch.randn(50)
    opt.step()
    snr = torch.stack([opt.state[clean]["snr"], opt.state[noisy]["snr"]])
    scales = snr / snr.mean()
    assert scales[0] > 1 > scales[1]
    assert clean.detach().abs().mean() > noisy.detach().abs().mean()


def test_mols_microbatch_estimator():
    p = nn.Parameter(torch.zeros(3, 4))
    q = nn.Parameter(torch.zeros(6))
    opt = MoLS([p, q], lr=1e-2, estimator="microbatch")
    parts = [(torch.randn(3, 4), torch.randn(6)) for _ in range(3)]
    p.grad, q.grad = torch.zeros(3, 4), torch.zeros(6)
    for gp, gq in parts:
        p.grad += gp
        q.grad += gq
        opt.accumulate_microbatch()
    opt.step()
    for t, k in ((p, 0), (q, 1)):
        stack = torch.stack([part[k] for part in parts])
        expected = stack.mean(0).norm() / (stack.std(0, correction=1).norm() + 1e-8)
        assert torch.allclose(opt.state[t]["snr"], expected, rtol=1e-4)
    fresh = MoLS([nn.Parameter(torch.zeros(2))], estimator="microbatch")
    fresh.param_groups[0]["params"][0].grad = torch.ones(2)
    with pytest.raises(RuntimeError, match="accumulate_microbatch"):
        fresh.step()


def test_transformer_param_groups_leave_embeddings_and_head_unfolded():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.block = nn.Linear(8, 8)
            self.norm = nn.LayerNorm(8)
            self.head = nn.Linear(8, 10)

    model = Tiny()
    assert compressible_names(model) == {"block.weight"}
    assert compressible_names(model, include_head_and_embeddings=True) == {
        "embed.weight",
        "block.weight",
        "head.weight",
    }
    groups = transformer_param_groups(model, weight_decay=0.1)
    assert groups[0]["params"] == [model.block.weight] and groups[0]["weight_decay"] == 0.1
    assert groups[1]["fold"] is False and groups[1]["wave"] is False and len(groups[1]["params"]) == 6
    opt = FOAM(groups)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[model.block.weight]["exp_avg"].shape == (8, 2)
    assert opt.state[model.head.weight]["exp_avg"].shape == (10, 8)
    # without a module called head, the last nn.Linear is the head
    assert compressible_names(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))) == {"0.weight"}


# ---------------------------------------------------------------------------------------------------------
# functional (client-stacked) forms against torch.optim, one client at a time
# ---------------------------------------------------------------------------------------------------------

SHAPES = {"w": (6, 7), "conv": (2, 3, 5), "b": (6,), "s": (1,)}
C = 3

FUNCTIONAL_CASES = {
    "foam": ("foam", {"level": 2}, lambda ps: FOAM(ps, lr=0.01, level=2)),
    "foam_wd_res": (
        "foam",
        {"level": 1, "scale": 0.5, "res_scale": 0.5, "weight_decay": 0.1},
        lambda ps: FOAM(ps, lr=0.01, level=1, scale=0.5, res_scale=0.5, weight_decay=0.1),
    ),
    "foam_authors_eps": (
        "foam",
        {"eps_mode": "authors", "eps": 1e-3},
        lambda ps: FOAM(ps, lr=0.01, eps_mode="authors", eps=1e-3),
    ),
    "gwt": ("gwt", {}, lambda ps: GWT(ps, lr=0.01)),
    "gwt_l3_wd": ("gwt", {"level": 3, "weight_decay": 0.1}, lambda ps: GWT(ps, lr=0.01, level=3, weight_decay=0.1)),
    "mols_sai": ("mols", {"refresh": 4}, lambda ps: MoLS(ps, lr=0.01, refresh=4)),
    "mols_ema": (
        "mols",
        {"estimator": "ema", "refresh": 3, "weight_decay": 0.1},
        lambda ps: MoLS(ps, lr=0.01, estimator="ema", refresh=3, weight_decay=0.1),
    ),
    "sgd_sai": ("sgd-sai", {"weight_decay": 0.01}, lambda ps: SGDSaI(ps, lr=0.01, weight_decay=0.01)),
}


@pytest.mark.parametrize("case", list(FUNCTIONAL_CASES))
def test_functional_matches_torch_optim(case):
    name, kwargs, make_torch = FUNCTIONAL_CASES[case]
    g = torch.Generator().manual_seed(0)
    params = {k: torch.randn(C, *s, generator=g, dtype=torch.float64) for k, s in SHAPES.items()}
    grads = [
        {k: torch.randn(C, *s, generator=g, dtype=torch.float64) * (1 + t % 3) for k, s in SHAPES.items()}
        for t in range(12)
    ]
    opt = make_optimizer(name, **kwargs)
    state = opt.init(params)
    stacked = {k: v.clone() for k, v in params.items()}
    for t, gr in enumerate(grads):
        if t % 2:
            upd, state = opt.update(gr, state, stacked, 0.01)
            stacked = {k: stacked[k] + upd[k] for k in stacked}
        else:
            state = opt.step_({k: v.clone() for k, v in gr.items()}, state, stacked, 0.01)
    for c in range(C):
        ps = {k: nn.Parameter(v[c].clone()) for k, v in params.items()}
        ref = make_torch(list(ps.values()))
        for gr in grads:
            for k, p in ps.items():
                p.grad = gr[k][c].clone()
            ref.step()
        for k, p in ps.items():
            assert torch.allclose(stacked[k][c], p.detach(), atol=1e-10, rtol=1e-9), (case, k, c)


def test_functional_compress_names_match_param_groups():
    """``compress`` in the functional form == ``fold=False`` groups in torch.optim."""
    g = torch.Generator().manual_seed(0)
    params = {k: torch.randn(C, *s, generator=g, dtype=torch.float64) for k, s in SHAPES.items()}
    opt = make_optimizer("foam", compress=frozenset({"conv"}))
    state = opt.init(params)
    assert state["m.w"].shape == (C, 6, 7) and state["m.conv"].shape == (C, 2, 3, 2)
    grads = {k: torch.randn(C, *s, generator=g, dtype=torch.float64) for k, s in SHAPES.items()}
    stacked = {k: v.clone() for k, v in params.items()}
    opt.step_({k: v.clone() for k, v in grads.items()}, state, stacked, 0.01)
    ps = {k: nn.Parameter(v[0].clone()) for k, v in params.items()}
    ref = FOAM([{"params": [ps["conv"]]}, {"params": [ps["w"], ps["b"], ps["s"]], "fold": False}], lr=0.01)
    for k, p in ps.items():
        p.grad = grads[k][0].clone()
    ref.step()
    for k, p in ps.items():
        assert torch.allclose(stacked[k][0], p.detach(), atol=1e-12)


def test_make_optimizer_refuses_bad_options():
    no_level = r"optimizer 'mols' has no option 'level' \('level' is an option of optimizer"
    with pytest.raises(FedsimError, match=no_level):
        make_optimizer("mols", level=2)
    with pytest.raises(FedsimError, match="optimizer 'mols', option 'estimator'"):
        make_optimizer("mols", estimator="microbatch")
    with pytest.raises(FedsimError, match="refresh > 0"):
        make_optimizer("mols", estimator="ema")
    with pytest.raises(FedsimError, match="optimizer 'gwt', option 'wavelet'"):
        make_optimizer("gwt", wavelet="db4")
    with pytest.raises(ValueError, match="eps_mode"):
        FOAM([nn.Parameter(torch.zeros(2, 2))], eps_mode="fast")


# ---------------------------------------------------------------------------------------------------------
# inside the engine, from the command line
# ---------------------------------------------------------------------------------------------------------

FAST = ["--clients", "6", "--rounds", "2", "--local-steps", "3", "--lr", "0.01", "--quiet"]


def _summary(out):
    import json

    return json.loads((out / "summary.json").read_text())


def test_cli_optimizers_report_state_bytes(tmp_path, cli):
    sizes = {}
    for name, flags in {
        "adam": [],
        "foam": ["--set", "optimizer.level=2", "--set", "optimizer.scale=0.25"],
        "gwt": ["--set", "optimizer.level=2", "--set", "optimizer.scale=0.25"],
        "mols": ["--set", "optimizer.estimator=ema", "--set", "optimizer.refresh=2"],
        "sgd-sai": [],
    }.items():
        out = tmp_path / name
        code, _, err = cli(["simulate", *FAST, "--optimizer", name, *flags, "--out", str(out)])
        assert code == 0, err
        summary = _summary(out)
        assert summary["optimizer"] == name and summary["final_test_accuracy"] is not None
        sizes[name] = summary["optimizer_state_bytes_per_client"]
        assert summary["optimizer_state_bytes_all_clients"] == 6 * sizes[name]
    # digits MLP 64-100-10: the hidden matrix is folded (head and vectors stay Adam)
    hidden = 100 * 64 * 4 * 2
    assert sizes["adam"] - sizes["foam"] == hidden - hidden // 4
    assert sizes["gwt"] - sizes["foam"] == 4  # GWT's limiter norm, one float32
    assert sizes["sgd-sai"] < sizes["adam"] / 1.9


def test_cli_compress_all_folds_the_head_too(tmp_path, cli):
    body, every = tmp_path / "body", tmp_path / "all"
    assert cli(["simulate", *FAST, "--optimizer", "foam", "--out", str(body)])[0] == 0
    compress_all = ["--set", "optimizer.compress_params=all"]
    assert cli(["simulate", *FAST, "--optimizer", "foam", *compress_all, "--out", str(every)])[0] == 0
    head = 10 * 100 * 4 * 2
    assert _summary(body)["optimizer_state_bytes_per_client"] - _summary(every)["optimizer_state_bytes_per_client"] == (
        head - head // 4
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--set", "optimizer.level=3"], "optimizer 'sgd' has no option 'level' ('level' is an option of optimizer"),
        (
            ["--optimizer", "gwt", "--set", "optimizer.res_scale=0.5"],
            "optimizer 'gwt' has no option 'res_scale' (did you mean 'scale'?) "
            "('res_scale' is an option of optimizer 'foam')",
        ),
        (["--optimizer", "mols", "--set", "optimizer.estimator=ema"], "needs refresh > 0"),
        (["--optimizer", "mols", "--set", "optimizer.estimator=microbatch"], "optimizer 'mols', option 'estimator'"),
        (
            ["--optimizer", "sgd-sai", "--set", "optimizer.betas=[0.9, 0.99]"],
            "optimizer 'sgd-sai' has no option 'betas'",
        ),
        (["--optimizer", "sgd-sai", "--set", "adam_eps=1e-6"], "config key 'adam_eps' is now 'optimizer.eps'"),
        (["--optimizer", "foam", "--set", "optimizer.eps_mode=fast"], "optimizer 'foam', option 'eps_mode'"),
        (["--optimizer", "foam", "--foam-level", "3"], "No such option '--foam-level'"),
        (["--optimizer", "lionn"], "unknown optimizer 'lionn' (did you mean 'lion'?)"),
    ],
)
def test_cli_optimizer_misuse_exits_2(tmp_path, cli, argv, message):
    code, _, err = cli(["simulate", *FAST, *argv, "--out", str(tmp_path / "bad")])
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


def _gwt_reference(g, m, v, prev, eps, level, scale, limiter, b1=0.9, b2=0.999):
    """GWT's rule written with the plain transform pair (ALGORITHMS.md), for one parameter."""
    coeffs = haar_dwt(g, level)
    m = b1 * m + (1 - b1) * coeffs[0]
    v = b2 * v + (1 - b2) * coeffs[0] ** 2
    den = v.sqrt() + eps
    n = m / den
    lim = 1.0 if prev == 0 else max(float(n.norm()) / prev, limiter) / limiter
    n = n / lim
    details = []
    for d in coeffs[1:]:
        details.append(d / (den[..., : d.shape[-1]] * lim))
        den = den.repeat_interleave(2, dim=-1)
    return scale * haar_idwt([n, *details], g.shape[-1]), m, v, float(n.norm())


@pytest.mark.parametrize("n", [1, 5, 6, 7, 12, 13])
@pytest.mark.parametrize("level", [1, 2, 3])
def test_gwt_kernel_matches_the_plain_transform_rule(n, level):
    from fedsim.optim.kernels import GwtRule

    rule = GwtRule(level=level, scale=0.3, limiter=1.01)
    g = torch.Generator().manual_seed(n * 10 + level)
    shape = rule.state_shape((3, n))
    m, v, prev = torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64), 0.0
    m_ref, v_ref = m.clone(), v.clone()
    prev_t = torch.zeros((), dtype=torch.float64)
    for t in range(3):
        grad = torch.randn(3, n, generator=g, dtype=torch.float64) * (1 + 2 * t)
        direction, m, v, prev_t = rule.direction(grad, m, v, prev_t, 1e-6, batch_dims=0)
        expected, m_ref, v_ref, prev = _gwt_reference(grad, m_ref, v_ref, prev, 1e-6, level, 0.3, 1.01)
        assert torch.allclose(direction.materialize(), expected, atol=1e-12)
        assert abs(float(prev_t) - prev) < 1e-9


@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "clang++")), reason="torch.compile on CPU needs a C++ compiler"
)
@pytest.mark.parametrize("opt_cls", [FOAM, GWT])
def test_fused_step_matches_eager(opt_cls):
    """The torch.compile'd step equals the eager one to rounding (a divisible matrix, plus an odd-width
    matrix and a vector that take the eager path inside the fused optimizer)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(8, 16), (3, 5), (7,)]
    start = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=g, dtype=torch.float64) * (1 + k) for s in shapes] for k in range(4)]
    finals = []
    for fused in (False, True):
        ps = [nn.Parameter(t.clone()) for t in start]
        opt = opt_cls(ps, lr=1e-2, weight_decay=0.1, fused=fused)
        for step in grads:
            for p, gr in zip(ps, step, strict=True):
                p.grad = gr.clone()
            opt.step()
        finals.append([p.detach() for p in ps])
    for eager, fused in zip(*finals, strict=True):
        torch.testing.assert_close(fused, eager, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "make",
    [lambda ps: FOAM(ps), lambda ps: GWT(ps), lambda ps: MoLS(ps), lambda ps: SGDSaI(ps)],
    ids=["foam", "gwt", "mols", "sgd-sai"],
)
def test_step_closure_returns_the_loss_and_computes_gradients(make):
    model = _model()
    opt = make(model.parameters())
    x, y = torch.randn(8, 13), torch.randint(0, 3, (8,))
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with torch.no_grad():  # the closure re-enables gradients, as torch.optim's do
        loss = opt.step(closure)
    assert loss is not None and torch.isfinite(loss)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_cli_levels_reach_the_optimizer(tmp_path, cli):
    """--set optimizer.level sets the folded width: the hidden 100x64 matrix's state is 64 / 2^level wide."""
    sizes = {}
    for name, level in (("foam", 1), ("foam", 3), ("gwt", 1)):
        out = tmp_path / f"{name}{level}"
        argv = ["simulate", *FAST, "--optimizer", name, "--set", f"optimizer.level={level}", "--out", str(out)]
        assert cli(argv)[0] == 0
        sizes[name, level] = _summary(out)["optimizer_state_bytes_per_client"]
    assert sizes["foam", 1] - sizes["foam", 3] == 100 * (32 - 8) * 4 * 2
    assert sizes["gwt", 1] - sizes["foam", 1] == 4
