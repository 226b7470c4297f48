"""Server strategies against hand-computed / independent numpy oracles; client selection; the registry."""

import io
import math

import numpy as np
import pytest
import torch

from fedsim.core.errors import FedsimError
from fedsim.core.protocol import ClientUpdates, LocalContext, ServerState
from strategies import (
    STRATEGIES,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    build_strategy,
    select_clients,
)

SHAPES = {"w": (3, 2), "b": (2,)}


def _np_params(rng):
    return {k: rng.normal(size=s) for k, s in SHAPES.items()}


def _to_torch(tree):
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in tree.items()}


def _updates(global_np, client_params_np, num_samples):
    """ClientUpdates from numpy client models: deltas = w_global - w_k."""
    deltas = {k: torch.tensor(np.stack([global_np[k] - w[k] for w in client_params_np])) for k in SHAPES}
    s = len(client_params_np)
    return ClientUpdates(
        client_ids=np.arange(s),
        deltas=deltas,
        num_samples=torch.tensor(num_samples, dtype=torch.float64),
        num_steps=torch.full((s,), 5),
        train_loss=torch.ones(s),
        extras={f"dc.{k}": 0.5 * v for k, v in deltas.items()},  # SCAFFOLD's control-variate uploads
        lr=0.1,
        num_clients=2 * s,
    )


def _assert_tree(actual, expected_np, rtol=1e-12, atol=1e-12):
    assert set(actual) == set(expected_np)
    for k, v in expected_np.items():
        np.testing.assert_allclose(actual[k].numpy(), v, rtol=rtol, atol=atol, err_msg=k)


# ------------------------------------------------------------------------------------------ FedAvg


def test_fedavg_hand_computed_scalar():
    """Scalar model, three clients with 1, 2 and 7 samples: w = 0.1*1 + 0.2*4 + 0.7*10 = 7.9."""
    strategy = FedAvg()
    state = strategy.init({"w": torch.tensor([0.0], dtype=torch.float64)})
    updates = ClientUpdates(
        client_ids=np.array([0, 3, 5]),
        deltas={"w": torch.tensor([[-1.0], [-4.0], [-10.0]], dtype=torch.float64)},
        num_samples=torch.tensor([1.0, 2.0, 7.0], dtype=torch.float64),
        num_steps=torch.tensor([1, 1, 1]),
        train_loss=torch.zeros(3),
    )
    new = strategy.aggregate(1, state, updates)
    assert new.params["w"].tolist() == pytest.approx([7.9])


def test_fedavg_weighted_mean_of_client_models():
    rng = np.random.default_rng(0)
    w0 = _np_params(rng)
    clients = [_np_params(rng) for _ in range(3)]
    n = [10.0, 30.0, 60.0]
    p = np.array(n) / sum(n)
    strategy = build_strategy("fedavg")
    state = strategy.init(_to_torch(w0))
    new = strategy.aggregate(1, state, _updates(w0, clients, n))
    expected = {k: sum(p[i] * clients[i][k] for i in range(3)) for k in SHAPES}
    _assert_tree(new.params, expected)
    # the global state was not modified in place
    _assert_tree(state.params, w0)


def test_fedavg_equal_weights_is_plain_mean():
    rng = np.random.default_rng(1)
    w0 = _np_params(rng)
    clients = [_np_params(rng) for _ in range(4)]
    strategy = FedAvg()
    new = strategy.aggregate(1, strategy.init(_to_torch(w0)), _updates(w0, clients, [5.0] * 4))
    _assert_tree(new.params, {k: np.mean([c[k] for c in clients], axis=0) for k in SHAPES})


def test_fedavg_float32_params():
    strategy = FedAvg()
    state = strategy.init({"w": torch.zeros(2)})
    updates = ClientUpdates(
        client_ids=np.array([0, 1]),
        deltas={"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]])},
        num_samples=torch.tensor([1.0, 3.0], dtype=torch.float64),
        num_steps=torch.tensor([1, 1]),
        train_loss=torch.zeros(2),
    )
    new = strategy.aggregate(1, state, updates)
    assert new.params["w"].dtype == torch.float32
    torch.testing.assert_close(new.params["w"], torch.tensor([-2.5, -3.5]))


# ------------------------------------------------------------------------------------------ FedProx


def test_fedprox_aggregation_equals_fedavg():
    rng = np.random.default_rng(2)
    w0 = _np_params(rng)
    clients = [_np_params(rng) for _ in range(3)]
    n = [3.0, 9.0, 1.0]
    a = FedAvg()
    b = FedProx(mu=0.5)
    ua, ub = _updates(w0, clients, n), _updates(w0, clients, n)
    sa = a.aggregate(1, a.init(_to_torch(w0)), ua)
    sb = b.aggregate(1, b.init(_to_torch(w0)), ub)
    for k in SHAPES:
        torch.testing.assert_close(sb.params[k], sa.params[k], rtol=0, atol=0)


@pytest.mark.parametrize("mu", [0.0, 0.01, 0.7])
def test_fedprox_grad_transform(mu):
    rng = np.random.default_rng(3)
    global_np = _np_params(rng)
    c = 4
    params_np = {k: rng.normal(size=(c, *s)) for k, s in SHAPES.items()}
    grads_np = {k: rng.normal(size=(c, *s)) for k, s in SHAPES.items()}
    ctx = LocalContext(_to_torch(global_np), {}, {}, 0.1)
    algo = FedProx(mu=mu).client_algorithm
    out = algo.grad_transform(_to_torch(grads_np), _to_torch(params_np), ctx)
    expected = {k: grads_np[k] + mu * (params_np[k] - global_np[k][None]) for k in SHAPES}
    _assert_tree(out, expected)
    if mu == 0.0:
        _assert_tree(out, grads_np, rtol=0, atol=0)


def test_fedavg_client_leaves_grads_unchanged():
    g = {"w": torch.randn(2, 3)}
    ctx = LocalContext({"w": torch.zeros(3)}, {}, {}, 0.1)
    out = FedAvg().client_algorithm.grad_transform(g, {"w": torch.randn(2, 3)}, ctx)
    torch.testing.assert_close(out["w"], g["w"], rtol=0, atol=0)


def test_fedprox_default_mu_and_negative_mu():
    assert FedProx().mu == 0.01
    with pytest.raises(FedsimError, match="mu"):
        FedProx(mu=-0.1)


# ------------------------------------------------------------------------------------------ FedAvgM


def _two_rounds(strategy, w0, rounds):
    state = strategy.init(_to_torch(w0))
    states = []
    for r, (clients, n) in enumerate(rounds, start=1):
        state = strategy.aggregate(r, state, _updates(w0_of(state), clients, n))
        states.append(state)
    return states


def w0_of(state):
    return {k: v.numpy().copy() for k, v in state.params.items()}


def test_fedavgm_two_rounds_by_hand():
    beta, eta = 0.7, 0.5
    rng = np.random.default_rng(4)
    w0 = _np_params(rng)
    n1, n2 = [2.0, 6.0], [5.0, 1.0, 4.0]
    c1 = [_np_params(rng) for _ in n1]
    c2 = [_np_params(rng) for _ in n2]
    strategy = FedAvgM(server_lr=eta, server_momentum=beta)
    s1, s2 = _two_rounds(strategy, w0, [(c1, n1), (c2, n2)])
    p1, p2 = np.array(n1) / sum(n1), np.array(n2) / sum(n2)
    d1 = {k: sum(p1[i] * (w0[k] - c1[i][k]) for i in range(len(n1))) for k in SHAPES}
    v1 = d1
    w1 = {k: w0[k] - eta * v1[k] for k in SHAPES}
    d2 = {k: sum(p2[i] * (w1[k] - c2[i][k]) for i in range(len(n2))) for k in SHAPES}
    v2 = {k: beta * v1[k] + d2[k] for k in SHAPES}
    w2 = {k: w1[k] - eta * v2[k] for k in SHAPES}
    _assert_tree(s1.params, w1)
    _assert_tree(s2.params, w2)
    # the momentum buffer is the only extra and holds v
    _assert_tree({k[len("momentum.") :]: v for k, v in s2.extras.items()}, v2)


def test_fedavgm_beta0_eta1_is_fedavg():
    rng = np.random.default_rng(5)
    w0 = _np_params(rng)
    rounds = [([_np_params(rng) for _ in range(3)], [1.0, 2.0, 3.0]) for _ in range(3)]
    a = _two_rounds(FedAvg(), w0, rounds)
    m = _two_rounds(FedAvgM(server_lr=1.0, server_momentum=0.0), w0, rounds)
    for sa, sm in zip(a, m, strict=True):
        for k in SHAPES:
            torch.testing.assert_close(sm.params[k], sa.params[k], rtol=1e-12, atol=1e-12)


def test_fedavgm_defaults():
    s = FedAvgM()
    assert (s.server_lr, s.server_momentum) == (1.0, 0.9)


# ------------------------------------------------------------------------------------------ FedOpt


def _reddi_oracle(kind, w0, round_deltas, eta, b1, b2, tau):
    """Reddi et al. 2021, Algorithm 2, in plain numpy. ``round_deltas``: weighted mean of w - w_k per round."""
    w = {k: v.copy() for k, v in w0.items()}
    m = {k: np.zeros_like(v) for k, v in w0.items()}
    v = {k: np.full_like(x, tau**2) for k, x in w0.items()}
    out = []
    for mean_delta in round_deltas:
        for k in w:
            d = -mean_delta[k]
            m[k] = b1 * m[k] + (1 - b1) * d
            if kind == "fedadagrad":
                v[k] = v[k] + d**2
            elif kind == "fedyogi":
                v[k] = v[k] - (1 - b2) * d**2 * np.sign(v[k] - d**2)
            else:
                v[k] = b2 * v[k] + (1 - b2) * d**2
            w[k] = w[k] + eta * m[k] / (np.sqrt(v[k]) + tau)
        out.append(({k: x.copy() for k, x in w.items()}, {k: x.copy() for k, x in m.items()}, dict(v)))
    return out


FEDOPT = {"fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad}


@pytest.mark.parametrize("kind", list(FEDOPT))
@pytest.mark.parametrize(
    "hyper",
    [
        {"server_lr": 0.3, "beta1": 0.8, "beta2": 0.95, "tau": 0.05},
        {"server_lr": 0.05, "beta1": 0.0, "beta2": 0.5, "tau": 1e-3},
        None,  # the class defaults
    ],
)
def test_fedopt_three_rounds_against_numpy_oracle(kind, hyper):
    rng = np.random.default_rng(6)
    w0 = _np_params(rng)
    # FedAdagrad has no beta2 (its second moment is a plain sum): the oracle ignores b2 for it too
    given = {k: v for k, v in (hyper or {}).items() if not (kind == "fedadagrad" and k == "beta2")}
    strategy = FEDOPT[kind](**given) if hyper else FEDOPT[kind]()
    # with no hyper-parameters given, the oracle uses the documented defaults (not the object's attributes)
    documented = {"server_lr": 0.01 if kind == "fedyogi" else 0.1, "beta1": 0.9, "beta2": 0.99}
    h = hyper or {**documented, "tau": 1e-3 if kind == "fedyogi" else 1e-9}
    state = strategy.init(_to_torch(w0))
    w_np, mean_deltas, got = w0, [], []
    for r in range(1, 4):
        n = [float(x) for x in rng.integers(1, 50, size=3)]
        clients = [{k: w_np[k] + rng.normal(scale=0.3 * r, size=s) for k, s in SHAPES.items()} for _ in n]
        p = np.array(n) / sum(n)
        mean_deltas.append({k: sum(p[i] * (w_np[k] - clients[i][k]) for i in range(3)) for k in SHAPES})
        state = strategy.aggregate(r, state, _updates(w_np, clients, n))
        got.append(state)
        w_np = w0_of(state)
    expected = _reddi_oracle(kind, w0, mean_deltas, h["server_lr"], h["beta1"], h["beta2"], h["tau"])
    for r, (s, (w, m, v)) in enumerate(zip(got, expected, strict=True), start=1):
        _assert_tree(s.params, w, rtol=1e-9, atol=1e-12)
        _assert_tree({k[2:]: x for k, x in s.extras.items() if k.startswith("m.")}, m, rtol=1e-9, atol=1e-15)
        _assert_tree({k[2:]: x for k, x in s.extras.items() if k.startswith("v.")}, v, rtol=1e-9, atol=1e-20)
        assert set(s.extras) == {f"{p}.{k}" for p in ("m", "v") for k in SHAPES}, r


def test_fedyogi_sign_branch_both_ways():
    """One coordinate with v > D^2 (v shrinks) and one with v < D^2 (v grows)."""
    s = FedYogi(server_lr=1.0, beta1=0.0, beta2=0.5, tau=1.0)  # v0 = 1
    state = s.init({"w": torch.zeros(2, dtype=torch.float64)})
    up = ClientUpdates(
        client_ids=np.array([0]),
        deltas={"w": torch.tensor([[0.5, -2.0]], dtype=torch.float64)},  # D = [-0.5, 2], D^2 = [0.25, 4]
        num_samples=torch.tensor([1.0], dtype=torch.float64),
        num_steps=torch.tensor([1]),
        train_loss=torch.zeros(1),
    )
    new = s.aggregate(1, state, up)
    # v = 1 - 0.5 * D^2 * sign(1 - D^2) = [1 - 0.125, 1 + 2]
    np.testing.assert_allclose(new.extras["v.w"].numpy(), [0.875, 3.0])
    np.testing.assert_allclose(new.params["w"].numpy(), [-0.5 / (math.sqrt(0.875) + 1), 2 / (math.sqrt(3.0) + 1)])


def test_fedopt_defaults():
    s = FedAdam()
    assert (s.server_lr, s.beta1, s.beta2, s.tau) == (0.1, 0.9, 0.99, 1e-9)
    g = FedAdagrad()
    assert (g.server_lr, g.beta1, g.tau) == (0.1, 0.9, 1e-9)
    with pytest.raises(FedsimError, match=r"strategy 'fedadagrad' has no option 'beta2'"):
        build_strategy("fedadagrad", beta2=0.99)  # FedAdagrad's v is a plain sum: no beta2
    y = FedYogi()
    assert (y.server_lr, y.beta1, y.beta2, y.tau) == (0.01, 0.9, 0.99, 1e-3)
    # build_strategy without server_lr/tau keeps each class's defaults; given values win
    assert build_strategy("fedyogi").server_lr == 0.01
    assert build_strategy("fedyogi", server_lr=0.2, tau=0.5).server_lr == 0.2
    assert build_strategy("fedyogi", server_lr=0.2, tau=0.5).tau == 0.5
    assert build_strategy("fedadam", beta1=0.5).beta1 == 0.5


@pytest.mark.parametrize("kind", list(FEDOPT))
def test_fedopt_init_state(kind):
    s = FEDOPT[kind](tau=0.01)
    state = s.init({"w": torch.ones(2, 3)})
    assert torch.equal(state.extras["m.w"], torch.zeros(2, 3))
    torch.testing.assert_close(state.extras["v.w"], torch.full((2, 3), 1e-4))


# ------------------------------------------------------------------------------------ select_clients


@pytest.mark.parametrize(
    ("n", "fraction", "min_clients", "expected"),
    [
        (10, 0.3, 1, 3),
        (10, 0.1, 1, 1),
        (10, 0.01, 1, 1),
        (10, 0.01, 4, 4),
        (10, 0.3, 5, 5),
        (10, 1.0, 1, 10),
        (10, 0.5, 20, 10),
        (100, 0.1, 2, 10),
        (7, 0.5, 1, 4),  # 3.5 -> 4
        (9, 0.33, 1, 3),  # 2.97 -> 3
        (30, 0.1, 1, 3),
        (1, 0.5, 1, 1),
    ],
)
def test_select_clients_count(n, fraction, min_clients, expected):
    for seed, r in ((0, 1), (3, 17)):
        ids = select_clients(n, fraction, min_clients, seed, r)
        assert len(ids) == expected
        assert list(ids) == sorted(set(ids.tolist()))
        assert ids.min() >= 0 and ids.max() < n


def test_select_clients_deterministic_and_varies():
    a = [tuple(select_clients(50, 0.2, 1, 7, r)) for r in range(1, 41)]
    b = [tuple(select_clients(50, 0.2, 1, 7, r)) for r in range(1, 41)]
    assert a == b
    # a draw does not depend on earlier draws (resume): asking round 30 directly gives the same set
    assert tuple(select_clients(50, 0.2, 1, 7, 30)) == a[29]
    assert len(set(a)) >= 38  # C(50, 10) is huge: practically all rounds differ
    assert a != [tuple(select_clients(50, 0.2, 1, 8, r)) for r in range(1, 41)]


def test_select_clients_full_participation():
    for r in range(1, 5):
        np.testing.assert_array_equal(select_clients(13, 1.0, 1, 0, r), np.arange(13))


def test_select_clients_uniform_frequency():
    n, fraction, rounds = 20, 0.25, 2000
    counts = np.zeros(n)
    pair = np.zeros((n, n))
    for r in range(1, rounds + 1):
        ids = select_clients(n, fraction, 1, 123, r)
        counts[ids] += 1
        pair[np.ix_(ids, ids)] += 1
    freq = counts / rounds
    # expected 0.25, std ~0.0097 per client
    assert np.abs(freq - fraction).max() < 0.05
    # pairs: P(i and j) = 5/20 * 4/19 ~ 0.0526
    off = pair[~np.eye(n, dtype=bool)] / rounds
    assert np.abs(off - 5 / 20 * 4 / 19).max() < 0.03


# --------------------------------------------------------------------------------------- registry


def test_registry_names():
    assert set(STRATEGIES) == {
        "fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad",
        "scaffold", "scaffold-m", "fednova", "feddyn", "fedcm",
    }  # fmt: skip
    for name, cls in STRATEGIES.items():
        s = build_strategy(name)
        assert type(s) is cls and s.name == name


@pytest.mark.parametrize(("typo", "suggestion"), [("fedavgg", "fedavg"), ("fedprx", "fedprox"), ("fedyogy", "fedyogi")])
def test_build_strategy_unknown(typo, suggestion):
    with pytest.raises(FedsimError) as info:
        build_strategy(typo)
    assert f"did you mean '{suggestion}'" in str(info.value)
    assert "\n" not in str(info.value)


def test_build_strategy_refuses_foreign_options():
    """An option the strategy does not take is refused (one line naming it), never dropped silently."""
    opts = {"mu": 0.3, "server_lr": 0.5, "server_momentum": 0.5, "beta1": 0.1, "beta2": 0.2, "tau": 0.01}
    own = {"fedavg": (), "fedprox": ("mu",), "fedavgm": ("server_lr", "server_momentum"),
           "fedadam": ("server_lr", "beta1", "beta2", "tau")}  # fmt: skip
    for name, keys in own.items():
        mine = {k: opts[k] for k in keys}
        for foreign in sorted(set(opts) - set(keys)):
            with pytest.raises(FedsimError, match=rf"strategy '{name}' has no option '{foreign}'") as info:
                build_strategy(name, fraction=0.5, min_clients=2, **mine, **{foreign: opts[foreign]})
            assert "\n" not in str(info.value)
    with pytest.raises(FedsimError, match=r"strategy 'fedavg' has no option 'tau' .*; it takes no options"):
        build_strategy("fedavg", tau=0.01)
    s = build_strategy("fedavg", fraction=0.5, min_clients=2)
    assert type(s) is FedAvg and (s.fraction, s.min_clients) == (0.5, 2)
    assert not hasattr(s, "mu") and not hasattr(s, "server_lr")
    p = build_strategy("fedprox", mu=0.3)
    assert p.mu == 0.3 and p.client_algorithm.mu == 0.3
    m = build_strategy("fedavgm", server_lr=0.5, server_momentum=0.5)
    assert (m.server_lr, m.server_momentum) == (0.5, 0.5)
    a = build_strategy("fedadam", server_lr=0.5, beta1=0.1, beta2=0.2, tau=0.01)
    assert (a.server_lr, a.beta1, a.beta2, a.tau) == (0.5, 0.1, 0.2, 0.01)


@pytest.mark.parametrize(
    ("name", "options", "field"),
    [
        ("fedavg", {"fraction": 0.0}, "fraction"),
        ("fedavg", {"fraction": 1.5}, "fraction"),
        ("fedavg", {"fraction": -0.2}, "fraction"),
        ("fedavgm", {"fraction": 0.0}, "fraction"),
        ("fedadam", {"fraction": 2.0}, "fraction"),
        ("fedavg", {"min_clients": 0}, "min_clients"),
        ("fedavgm", {"server_lr": 0.0}, "server_lr"),
        ("fedavgm", {"server_lr": -1.0}, "server_lr"),
        ("fedadam", {"server_lr": 0.0}, "server_lr"),
        ("fedyogi", {"server_lr": -0.1}, "server_lr"),
        ("fedadagrad", {"server_lr": float("nan")}, "server_lr"),
        ("fedadam", {"tau": 0.0}, "tau"),
        ("fedprox", {"mu": -1.0}, "mu"),
    ],
)
def test_build_strategy_bad_values(name, options, field):
    with pytest.raises(FedsimError, match=field):
        build_strategy(name, **options)


# ---------------------------------------------------------------------------------- state as plain data


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_server_state_round_trips_weights_only(name):
    rng = np.random.default_rng(9)
    w0 = _np_params(rng)
    strategy = build_strategy(name)
    state = strategy.init(_to_torch(w0))
    state = strategy.aggregate(1, state, _updates(w0, [_np_params(rng) for _ in range(2)], [1.0, 2.0]))
    for tree in (state.params, state.extras):
        assert all(type(v) is torch.Tensor for v in tree.values())
    buf = io.BytesIO()
    torch.save({"params": state.params, "extras": state.extras}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    restored = ServerState(loaded["params"], loaded["extras"])
    for a, b in ((state.params, restored.params), (state.extras, restored.extras)):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k])
    # training continues identically from the restored state
    up = _updates(w0_of(state), [_np_params(rng) for _ in range(2)], [3.0, 1.0])
    up2 = ClientUpdates(
        up.client_ids, {k: v.clone() for k, v in up.deltas.items()}, up.num_samples, up.num_steps, up.train_loss,
        up.extras, lr=up.lr, num_clients=up.num_clients,
    )  # fmt: skip
    s1 = strategy.aggregate(2, state, up)
    s2 = strategy.aggregate(2, restored, up2)
    for k in s1.params:
        assert torch.equal(s1.params[k], s2.params[k])


def test_selection_rounds_halves_up():
    assert len(select_clients(5, 0.5, 1, seed=0, round_=1)) == 3
    assert len(select_clients(100, 0.29, 1, seed=0, round_=1)) == 29
