"""Functional local optimizers against ``torch.optim`` (the oracle) and the learning-rate schedules."""

import math

import pytest
import torch

from fedsim.core import components
from fedsim.core.errors import FedsimError
from fedsim.optim import lr_at, make_optimizer

C = 3
STEPS = 20
SHAPES = {"w": (4, 5), "b": (5,), "s": ()}

# (name, make_optimizer kwargs, torch.optim class, torch kwargs)
CONFIGS = {
    "sgd": ("sgd", {}, torch.optim.SGD, {}),
    "sgd_momentum": ("sgd", {"momentum": 0.9}, torch.optim.SGD, {"momentum": 0.9}),
    "sgd_nesterov": ("sgd", {"momentum": 0.9, "nesterov": True}, torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    "sgd_wd": ("sgd", {"weight_decay": 0.1}, torch.optim.SGD, {"weight_decay": 0.1}),
    "sgd_momentum_wd": (
        "sgd",
        {"momentum": 0.8, "weight_decay": 0.05},
        torch.optim.SGD,
        {"momentum": 0.8, "weight_decay": 0.05},
    ),
    "sgd_nesterov_wd": (
        "sgd",
        {"momentum": 0.9, "nesterov": True, "weight_decay": 0.05},
        torch.optim.SGD,
        {"momentum": 0.9, "nesterov": True, "weight_decay": 0.05},
    ),
    "adam": ("adam", {}, torch.optim.Adam, {}),
    "adam_wd": ("adam", {"weight_decay": 0.1}, torch.optim.Adam, {"weight_decay": 0.1}),
    "adam_betas": (
        "adam",
        {"betas": (0.8, 0.95), "eps": 1e-6},
        torch.optim.Adam,
        {"betas": (0.8, 0.95), "eps": 1e-6},
    ),
    "adamw": ("adamw", {"weight_decay": 0.1}, torch.optim.AdamW, {"weight_decay": 0.1}),
    "adamw_default_wd": ("adamw", {}, torch.optim.AdamW, {"weight_decay": 0.0}),
}
ADAM_CONFIGS = [k for k in CONFIGS if CONFIGS[k][0] in ("adam", "adamw")]


def _lrs(name):
    """A varying learning-rate sequence (different every step)."""
    base = 0.1 if name == "sgd" else 0.01
    return [base * (1.0 + 0.5 * math.sin(t)) for t in range(STEPS)]


def _init_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(C, *s, generator=g, dtype=torch.float64) for k, s in SHAPES.items()}


def _grad_seq(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(C, *s, generator=g, dtype=torch.float64) for k, s in SHAPES.items()} for _ in range(STEPS)]


def _clone(tree):
    return {k: v.clone() for k, v in tree.items()}


def _torch_trajectories(torch_cls, torch_kwargs, init, grads, lrs, skip=frozenset()):
    """Per client: parameters after each step with ``torch.optim`` on unstacked copies.

    ``skip`` holds (client, step) pairs at which that client takes no step.
    """
    out = []  # out[c][t] = {name: tensor}
    for c in range(C):
        ps = {k: torch.nn.Parameter(init[k][c].clone()) for k in SHAPES}
        opt = torch_cls(list(ps.values()), lr=lrs[0], foreach=False, **torch_kwargs)
        traj = []
        for t in range(STEPS):
            if (c, t) not in skip:
                for k, p in ps.items():
                    p.grad = grads[t][k][c].clone()
                for group in opt.param_groups:
                    group["lr"] = lrs[t]
                opt.step()
            traj.append({k: p.detach().clone() for k, p in ps.items()})
        out.append(traj)
    return out


def _assert_close(actual, expected, msg=""):
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-12, msg=msg)


def _run_update(opt, init, grads, lrs):
    params, state = _clone(init), opt.init(init)
    traj = []
    for t in range(STEPS):
        updates, state = opt.update(_clone(grads[t]), state, params, lrs[t])
        params = {k: params[k] + updates[k] for k in params}
        traj.append(_clone(params))
    return traj


def _run_step_(opt, init, grads, lrs):
    params = _clone(init)
    state = opt.init(params)
    traj = []
    for t in range(STEPS):
        state = opt.step_(_clone(grads[t]), state, params, lrs[t])
        traj.append(_clone(params))
    return traj


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("mode", ["update", "step_"])
def test_matches_torch_optim(config, mode):
    name, kwargs, torch_cls, torch_kwargs = CONFIGS[config]
    opt = make_optimizer(name, **kwargs)
    init, grads, lrs = _init_params(), _grad_seq(), _lrs(name)
    run = _run_update if mode == "update" else _run_step_
    traj = run(opt, init, grads, lrs)
    ref = _torch_trajectories(torch_cls, torch_kwargs, init, grads, lrs)
    for t in range(STEPS):
        for c in range(C):
            for k in SHAPES:
                _assert_close(traj[t][k][c], ref[c][t][k], msg=f"{config} {mode} step {t} client {c} leaf {k}")


@pytest.mark.parametrize("config", list(CONFIGS))
def test_step_inplace_equals_update(config):
    name, kwargs, _, _ = CONFIGS[config]
    opt = make_optimizer(name, **kwargs)
    init, grads, lrs = _init_params(2), _grad_seq(3), _lrs(name)
    a, b = _run_update(opt, init, grads, lrs), _run_step_(opt, init, grads, lrs)
    for t in range(STEPS):
        for k in SHAPES:
            _assert_close(b[t][k], a[t][k], msg=f"{config} step {t} leaf {k}")


@pytest.mark.parametrize("config", list(CONFIGS))
def test_update_is_pure(config):
    name, kwargs, _, _ = CONFIGS[config]
    opt = make_optimizer(name, **kwargs)
    params, grads = _init_params(4), _grad_seq(5)
    state = opt.init(params)
    # advance once so the state is non-trivial
    _, state = opt.update(grads[0], state, params, 0.1)
    p0, g0, s0 = _clone(params), _clone(grads[1]), _clone(state)
    updates, new_state = opt.update(grads[1], state, params, 0.1)
    for before, after in ((p0, params), (g0, grads[1]), (s0, state)):
        assert before.keys() == after.keys()
        for k in before:
            assert torch.equal(before[k], after[k]), k
    assert set(updates) == set(SHAPES)
    assert new_state.keys() == state.keys()


def test_float32_matches_torch_optim():
    """The usual training dtype; loose tolerance, but the same rule."""
    opt = make_optimizer("adamw", weight_decay=0.01)
    init = {k: v.float() for k, v in _init_params(6).items()}
    grads = [{k: v.float() for k, v in g.items()} for g in _grad_seq(7)]
    lrs = _lrs("adam")
    traj = _run_step_(opt, init, grads, lrs)
    ref = _torch_trajectories(torch.optim.AdamW, {"weight_decay": 0.01}, init, grads, lrs)
    for c in range(C):
        for k in SHAPES:
            assert traj[-1][k].dtype == torch.float32
            torch.testing.assert_close(traj[-1][k][c], ref[c][-1][k], rtol=1e-4, atol=1e-5)


def _select(active, new, old):
    """Independent re-implementation of the trainer's masking: ``new`` where active, else ``old``."""
    out = {}
    for k, v in new.items():
        a = active.reshape(-1, *([1] * (v.dim() - 1)))
        out[k] = torch.where(a, v, old[k])
    return out


@pytest.mark.parametrize("config", ADAM_CONFIGS)
def test_adam_per_client_step_counter_ragged(config):
    """A client that skips steps keeps its own bias correction: it matches torch.optim with fewer steps."""
    name, kwargs, torch_cls, torch_kwargs = CONFIGS[config]
    opt = make_optimizer(name, **kwargs)
    init, grads, lrs = _init_params(8), _grad_seq(9), _lrs(name)
    skip = {(1, 0), (1, 3), (2, 7), (1, 12)}  # client 1 skips its very first step too
    params, state = _clone(init), opt.init(init)
    assert state["step"].shape == (C,)
    traj = []
    for t in range(STEPS):
        active = torch.tensor([(c, t) not in skip for c in range(C)])
        updates, new_state = opt.update(_clone(grads[t]), state, params, lrs[t])
        params = _select(active, {k: params[k] + updates[k] for k in params}, params)
        state = _select(active, new_state, state)
        traj.append(_clone(params))
    expected_steps = [STEPS - sum(1 for s in skip if s[0] == c) for c in range(C)]
    assert state["step"].tolist() == expected_steps
    ref = _torch_trajectories(torch_cls, torch_kwargs, init, grads, lrs, skip=skip)
    for t in range(STEPS):
        for c in range(C):
            for k in SHAPES:
                _assert_close(traj[t][k][c], ref[c][t][k], msg=f"{config} step {t} client {c} leaf {k}")


def test_adam_ragged_client_differs_from_global_counter():
    """Guard that the ragged test is sensitive: a shared step counter would give a different result."""
    opt = make_optimizer("adam")
    init, grads = _init_params(10), _grad_seq(11)
    state = opt.init(init)
    params = _clone(init)
    active = torch.tensor([True, False, True])
    updates, new_state = opt.update(grads[0], state, params, 0.01)
    params = _select(active, {k: params[k] + updates[k] for k in params}, params)
    state = _select(active, new_state, state)
    assert state["step"].tolist() == [1, 0, 1]
    # client 1's next step is its first: |update| == lr elementwise (bias-corrected Adam's first step)
    updates, _ = opt.update(grads[1], state, params, 0.01)
    for k in SHAPES:
        torch.testing.assert_close(updates[k][1].abs(), torch.full_like(updates[k][1], 0.01), rtol=1e-5, atol=0)


def test_sgd_without_momentum_is_stateless():
    assert make_optimizer("sgd").init(_init_params()) == {}


def test_optimizer_registry():
    assert set(components.names("optimizer")) >= {"sgd", "adam", "adamw", "foam", "gwt", "mols", "sgd-sai"}
    assert make_optimizer("adam").decoupled is False
    assert make_optimizer("adamw").decoupled is True


@pytest.mark.parametrize(("typo", "suggestion"), [("adm", "adam"), ("sdg", "sgd"), ("adamww", "adamw")])
def test_make_optimizer_unknown_name(typo, suggestion):
    with pytest.raises(FedsimError) as info:
        make_optimizer(typo)
    msg = str(info.value)
    assert f"'{typo}'" in msg
    assert f"did you mean '{suggestion}'" in msg
    assert "\n" not in msg


# ----------------------------------------------------------------------------------------- schedules


def test_lr_constant():
    assert components.names("lr_schedule")[:3] == ["constant", "step", "cosine"]
    for r in (1, 2, 50, 1000):
        assert lr_at(r, 0.05) == 0.05
        assert lr_at(r, 0.05, "constant", total_rounds=10) == 0.05


def test_lr_step_halving_every_10_rounds():
    lr = 0.2
    for r in range(1, 11):
        assert lr_at(r, lr, "step", decay=0.5, step=10) == pytest.approx(lr)
    for r in range(11, 21):
        assert lr_at(r, lr, "step", decay=0.5, step=10) == pytest.approx(lr / 2)
    assert lr_at(21, lr, "step", decay=0.5, step=10) == pytest.approx(lr / 4)
    assert lr_at(31, lr, "step", decay=0.5, step=10) == pytest.approx(lr / 8)
    # defaults are decay 0.5 every 10 rounds
    assert lr_at(11, lr, "step") == pytest.approx(lr / 2)
    assert lr_at(10, lr, "step") == pytest.approx(lr)
    # other decay / step
    assert lr_at(4, 1.0, "step", decay=0.1, step=3) == pytest.approx(0.1)
    assert lr_at(3, 1.0, "step", decay=0.1, step=3) == pytest.approx(1.0)


def test_lr_cosine():
    lr, min_lr, total = 0.1, 0.01, 10
    assert lr_at(1, lr, "cosine", total_rounds=total, min_lr=min_lr) == pytest.approx(lr)
    assert lr_at(total + 1, lr, "cosine", total_rounds=total, min_lr=min_lr) == pytest.approx(min_lr)
    assert lr_at(total // 2 + 1, lr, "cosine", total_rounds=total, min_lr=min_lr) == pytest.approx((lr + min_lr) / 2)
    # a quarter of the way: min + (lr - min) * (1 + cos(pi/4)) / 2
    q = min_lr + (lr - min_lr) * (1 + math.sqrt(0.5)) / 2
    lr_q = lr_at(1 + 5, lr, "cosine", total_rounds=20, min_lr=min_lr)
    assert lr_q == pytest.approx(q)
    values = [lr_at(r, lr, "cosine", total_rounds=total, min_lr=min_lr) for r in range(1, total + 2)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))
    assert lr_at(1, lr, "cosine", total_rounds=total) == pytest.approx(lr)
    assert lr_at(total + 1, lr, "cosine", total_rounds=total) == pytest.approx(0.0, abs=1e-15)


def test_lr_unknown_schedule():
    with pytest.raises(FedsimError) as info:
        lr_at(1, 0.1, "cosin")
    assert "did you mean 'cosine'" in str(info.value)
    with pytest.raises(FedsimError):
        lr_at(1, 0.1, "linear")
