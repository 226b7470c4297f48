"""FedAdam / FedYogi / FedAdagrad ``variant``: ``"reddi"`` (the paper's Algorithm 2, the default and today's
behaviour) and ``"flower"`` (flwr 1.41's Message-API strategies, checked against the real ones)."""

import inspect
import logging
import math

import numpy as np
import pytest
import torch

from fedsim.core import components
from fedsim.core.errors import FedsimError
from fedsim.core.protocol import ClientUpdates
from strategies import FedAdagrad, FedAdam, FedOpt, FedYogi, build_strategy

OURS = {"fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad}
SHAPES = {"conv.weight": (3, 2, 2), "fc.weight": (4, 3), "fc.bias": (4,)}
NUM_EXAMPLES = [[12, 40, 7, 25], [3, 18, 60, 9], [33, 5, 14, 21]]  # per round, per client (different each)


def _client_models(rng, global_np, round_, dtype):
    """Local models of four clients, spread around the global model (wider every round)."""
    return [
        {
            k: (global_np[k] + rng.normal(loc=0.05 * i, scale=0.2 * round_, size=s)).astype(dtype)
            for k, s in SHAPES.items()
        }
        for i in range(len(NUM_EXAMPLES[0]))
    ]


def _updates(global_params, clients, num_examples) -> ClientUpdates:
    """Our ClientUpdates: ``deltas[k] = w_global - w_k`` stacked on the client axis, sample counts ``n_k``."""
    dtype = next(iter(global_params.values())).dtype
    deltas = {k: torch.stack([global_params[k] - torch.from_numpy(c[k]) for c in clients]) for k in global_params}
    return ClientUpdates(
        client_ids=np.arange(len(clients)),
        deltas=deltas,
        num_samples=torch.tensor(num_examples, dtype=dtype),
        num_steps=torch.ones(len(clients), dtype=torch.int64),
        train_loss=torch.zeros(len(clients)),
    )


def _initial(dtype, seed=3):
    rng = np.random.default_rng(seed)
    return rng, {k: rng.normal(size=s).astype(dtype) for k, s in SHAPES.items()}


# ------------------------------------------------------------------------- flower variant == flwr 1.41


@pytest.fixture
def flwr_messages(monkeypatch):
    """Flower's Message API needs a task identity to build messages outside a running ServerApp."""
    pytest.importorskip("flwr")
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
    logging.getLogger("flwr").setLevel(logging.WARNING)


class _Grid:
    """The part of Flower's Grid that ``configure_train`` uses: the connected node ids."""

    def __init__(self, node_ids):
        self.node_ids = node_ids

    def get_node_ids(self):
        return list(self.node_ids)


def _flower_strategy(kind, hyper, num_nodes):
    from flwr.serverapp import strategy as fl

    nodes = {"fraction_train": 1.0, "min_train_nodes": num_nodes, "min_available_nodes": num_nodes}
    if hyper is None:  # Flower's own defaults
        return {"fedadam": fl.FedAdam, "fedyogi": fl.FedYogi, "fedadagrad": fl.FedAdagrad}[kind](**nodes)
    eta, tau = hyper["server_lr"], hyper["tau"]
    if kind == "fedadagrad":  # Flower's FedAdagrad takes no betas (beta_1 = beta_2 = 0 fixed)
        return fl.FedAdagrad(eta=eta, tau=tau, **nodes)
    cls = fl.FedAdam if kind == "fedadam" else fl.FedYogi
    return cls(eta=eta, beta_1=hyper["beta1"], beta_2=hyper["beta2"], tau=tau, **nodes)


def _our_strategy(kind, hyper):
    if hyper is None:  # our defaults with Flower's Message-API tau: the same numbers as Flower's defaults
        return OURS[kind](variant="flower", tau=1e-3)
    if kind == "fedadagrad":  # no betas: FedAdagrad has no beta2, and its flower variant fixes beta_1 = 0
        hyper = {k: v for k, v in hyper.items() if k not in ("beta1", "beta2")}
    return OURS[kind](variant="flower", **hyper)


@pytest.mark.parametrize("kind", list(OURS))
@pytest.mark.parametrize(
    ("hyper", "dtype"),
    [
        (None, np.float64),  # Flower's defaults (eta 0.1 / FedYogi 0.01, beta_1 0.9, beta_2 0.99, tau 1e-3)
        ({"server_lr": 0.3, "beta1": 0.8, "beta2": 0.95, "tau": 0.05}, np.float64),
        ({"server_lr": 0.05, "beta1": 0.5, "beta2": 0.9, "tau": 1e-2}, np.float32),
    ],
)
def test_flower_variant_matches_flwr_message_api(flwr_messages, kind, hyper, dtype):
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    rng, w0 = _initial(dtype)
    ours = _our_strategy(kind, hyper)
    assert ours.variant == "flower"
    state = ours.init({k: torch.from_numpy(v.copy()) for k, v in w0.items()})

    node_ids = [101, 102, 103, 104]
    theirs = _flower_strategy(kind, hyper, len(node_ids))
    grid = _Grid(node_ids)
    global_record = ArrayRecord({k: Array(v.copy()) for k, v in w0.items()})

    for server_round in range(1, 4):
        n = NUM_EXAMPLES[server_round - 1]
        clients = _client_models(rng, {k: v.numpy() for k, v in state.params.items()}, server_round, dtype)

        # Flower: configure_train (records the current model, as in Flower's ServerApp loop), replies carry each
        # client's local model and its num-examples, aggregate_train returns the new global model
        sent = list(theirs.configure_train(server_round, global_record, ConfigRecord({}), grid))
        assert sorted(m.metadata.dst_node_id for m in sent) == node_ids
        by_node = {node: i for i, node in enumerate(node_ids)}
        replies = []
        for msg in sent:
            i = by_node[msg.metadata.dst_node_id]
            content = RecordDict({
                "arrays": ArrayRecord({k: Array(v) for k, v in clients[i].items()}),
                "metrics": MetricRecord({"num-examples": n[i]}),
            })  # fmt: skip
            replies.append(Message(content, reply_to=msg))
        global_record, _ = theirs.aggregate_train(server_round, replies)

        # ours: the same clients as deltas w_global - w_k
        state = ours.aggregate(server_round, state, _updates(state.params, clients, n))

        flower_params = {k: a.numpy() for k, a in global_record.items()}
        assert set(flower_params) == set(state.params)
        for k, got in state.params.items():
            np.testing.assert_allclose(got.numpy(), flower_params[k], rtol=0, atol=1e-6, err_msg=f"{k} r{server_round}")
            np.testing.assert_allclose(state.extras[f"m.{k}"].numpy(), theirs.m_t[k], rtol=0, atol=1e-6)
            np.testing.assert_allclose(state.extras[f"v.{k}"].numpy(), theirs.v_t[k], rtol=0, atol=1e-6)
            assert got.dtype == torch.from_numpy(w0[k]).dtype


# ------------------------------------------------------------------------------------ reddi (default)


@pytest.mark.parametrize("cls", [FedAdam, FedYogi, FedAdagrad])
def test_default_variant_is_reddi(cls):
    assert cls().variant == "reddi"
    assert inspect.signature(FedOpt).parameters["variant"].default == "reddi"
    # the config layer reads the option from the typed signature
    field = components.get("strategy", cls.name).options()["variant"]
    assert field.default == "reddi"
    assert build_strategy(cls.name).variant == "reddi"
    assert build_strategy(cls.name, variant="flower").variant == "flower"


def _run(strategy, rounds=3, dtype=np.float64):
    rng, w0 = _initial(dtype, seed=11)
    state = strategy.init({k: torch.from_numpy(v.copy()) for k, v in w0.items()})
    states = [state]
    for r in range(1, rounds + 1):
        clients = _client_models(rng, {k: v.numpy() for k, v in state.params.items()}, r, dtype)
        state = strategy.aggregate(r, state, _updates(state.params, clients, NUM_EXAMPLES[r - 1]))
        states.append(state)
    return states


@pytest.mark.parametrize("cls", [FedAdam, FedYogi, FedAdagrad])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_explicit_reddi_is_bit_identical_to_the_default(cls, dtype):
    for a, b in zip(_run(cls(), dtype=dtype), _run(cls(variant="reddi"), dtype=dtype), strict=True):
        for tree_a, tree_b in ((a.params, b.params), (a.extras, b.extras)):
            assert tree_a.keys() == tree_b.keys()
            assert all(torch.equal(tree_a[k], tree_b[k]) for k in tree_a)


def test_fedadam_reddi_two_rounds_by_hand():
    """FedAdam (default variant) on one coordinate pair, two rounds, against the equations worked by hand:
    m_0 = 0, v_0 = tau^2, m = b1 m + (1-b1) D, v = b2 v + (1-b2) D^2, w = w + eta m / (sqrt(v) + tau)."""
    eta, b1, b2, tau = 0.5, 0.5, 0.75, 0.5
    s = FedAdam(server_lr=eta, beta1=b1, beta2=b2, tau=tau)
    state = s.init({"w": torch.tensor([1.0, -1.0], dtype=torch.float64)})
    assert state.extras["v.w"].tolist() == [0.25, 0.25]

    def step(strategy, state, round_, client_models, n):
        up = ClientUpdates(
            client_ids=np.arange(len(n)),
            deltas={
                "w": torch.stack([state.params["w"] - torch.tensor(c, dtype=torch.float64) for c in client_models])
            },
            num_samples=torch.tensor(n, dtype=torch.float64),
            num_steps=torch.ones(len(n), dtype=torch.int64),
            train_loss=torch.zeros(len(n)),
        )
        return strategy.aggregate(round_, state, up)

    # round 1: clients at [3, -1] (n=1) and [1, 1] (n=3): mean model [1.5, 0.5], D = [0.5, 1.5]
    state = step(s, state, 1, [[3.0, -1.0], [1.0, 1.0]], [1, 3])
    m1 = [0.25, 0.75]  # 0.5 * D
    v1 = [0.75 * 0.25 + 0.25 * 0.25, 0.75 * 0.25 + 0.25 * 2.25]  # [0.25, 0.75]
    w1 = [1.0 + 0.5 * 0.25 / (0.5 + 0.5), -1.0 + 0.5 * 0.75 / (math.sqrt(0.75) + 0.5)]
    assert v1 == [0.25, 0.75]
    np.testing.assert_allclose(state.extras["m.w"].numpy(), m1, rtol=1e-15)
    np.testing.assert_allclose(state.extras["v.w"].numpy(), v1, rtol=1e-15)
    np.testing.assert_allclose(state.params["w"].numpy(), w1, rtol=1e-15)
    assert w1[0] == 1.125

    # round 2: one client at w1 + [-1, 2]: D = [-1, 2]
    state = step(s, state, 2, [[w1[0] - 1.0, w1[1] + 2.0]], [5])
    m2 = [0.5 * 0.25 + 0.5 * -1.0, 0.5 * 0.75 + 0.5 * 2.0]  # [-0.375, 1.375]
    v2 = [0.75 * 0.25 + 0.25 * 1.0, 0.75 * 0.75 + 0.25 * 4.0]  # [0.4375, 1.5625]
    w2 = [w1[0] + 0.5 * -0.375 / (math.sqrt(0.4375) + 0.5), w1[1] + 0.5 * 1.375 / (1.25 + 0.5)]
    np.testing.assert_allclose(state.extras["m.w"].numpy(), m2, rtol=1e-14)
    np.testing.assert_allclose(state.extras["v.w"].numpy(), v2, rtol=1e-14)
    np.testing.assert_allclose(state.params["w"].numpy(), w2, rtol=1e-14)

    # the flower variant of the same two rounds: v_0 = 0 and eta_t = eta sqrt(1 - b2^(t+1)) / (1 - b1^(t+1))
    f = FedAdam(server_lr=eta, beta1=b1, beta2=b2, tau=tau, variant="flower")
    fs = f.init({"w": torch.tensor([1.0, -1.0], dtype=torch.float64)})
    assert fs.extras["v.w"].tolist() == [0.0, 0.0]
    fs = step(f, fs, 1, [[3.0, -1.0], [1.0, 1.0]], [1, 3])
    eta1 = eta * math.sqrt(1 - b2**2) / (1 - b1**2)
    fv1 = [0.25 * 0.25, 0.25 * 2.25]
    fw1 = [1.0 + eta1 * 0.25 / (math.sqrt(fv1[0]) + tau), -1.0 + eta1 * 0.75 / (math.sqrt(fv1[1]) + tau)]
    np.testing.assert_allclose(fs.extras["v.w"].numpy(), fv1, rtol=1e-15)
    np.testing.assert_allclose(fs.params["w"].numpy(), fw1, rtol=1e-14)


@pytest.mark.parametrize("cls", [FedAdam, FedYogi, FedAdagrad])
def test_flower_variant_differs_from_reddi(cls):
    hyper = {"server_lr": 0.1, "tau": 0.1}
    reddi, flower = _run(cls(**hyper)), _run(cls(variant="flower", **hyper))
    for k in SHAPES:
        assert torch.equal(reddi[0].extras[f"v.{k}"], torch.full(SHAPES[k], 0.1**2, dtype=torch.float64))
        assert torch.equal(flower[0].extras[f"v.{k}"], torch.zeros(SHAPES[k], dtype=torch.float64))
    for r in (1, 2, 3):
        gap = max(float((reddi[r].params[k] - flower[r].params[k]).abs().max()) for k in SHAPES)
        assert gap > 1e-4, (cls.name, r, gap)


def test_fedadagrad_flower_has_no_server_momentum():
    """Flower's FedAdagrad fixes beta_1 = 0: the flower variant's m is the pseudo-gradient, and a beta1 the user
    sets would be unused, so it is refused (FedAdagrad has no beta2 at all)."""
    assert FedAdagrad(variant="flower").momentum() == 0.0
    assert FedAdagrad(variant="reddi").momentum() == 0.9
    with pytest.raises(FedsimError, match="beta1 is unused"):
        FedAdagrad(variant="flower", beta1=0.3)
    with pytest.raises(TypeError):
        FedAdagrad(beta2=0.5)
    from fedsim.core import components

    assert "beta2" not in components.get("strategy", "fedadagrad").options()
    # with reddi, beta1 matters
    c, d = _run(FedAdagrad(beta1=0.9)), _run(FedAdagrad(beta1=0.3))
    assert not torch.equal(c[2].params["fc.weight"], d[2].params["fc.weight"])


def test_variant_keeps_the_defaults():
    for kind, cls in OURS.items():
        r, f = cls(), cls(variant="flower")
        assert (r.server_lr, r.beta1, r.tau) == (f.server_lr, f.beta1, f.tau), kind
        assert getattr(r, "beta2", None) == getattr(f, "beta2", None), kind


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("cls", [FedAdam, FedYogi, FedAdagrad])
@pytest.mark.parametrize("bad", ["Flower", "adam", "", "kingma"])
def test_unknown_variant_raises(cls, bad):
    with pytest.raises(FedsimError) as raised:
        cls(variant=bad)
    message = str(raised.value)
    assert "\n" not in message
    assert "variant" in message and "'reddi'" in message and "'flower'" in message and repr(bad) in message


def test_unknown_variant_through_build_strategy():
    with pytest.raises(FedsimError, match="variant") as raised:
        build_strategy("fedadam", variant="kingma")
    assert "\n" not in str(raised.value)
    assert "reddi" in str(raised.value) and "flower" in str(raised.value)
