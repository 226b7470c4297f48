"""The vectorized trainer against the sequential per-client reference, chunking and gradient modes."""

import numpy as np
import pytest
import torch

from fedsim.core.protocol import ClientAlgorithm, Plan
from fedsim.core.pytree import flatten
from fedsim.data.samplers import IIDSampler, ShuffleSampler
from fedsim.engine.executor import LocalExecutor, auto_chunk_size
from fedsim.engine.store import ClientStore
from fedsim.models import MODELS, SEQUENCE_MODELS, build_model
from fedsim.optim import make_optimizer
from fedsim.simulation import parameters_of
from strategies import ProximalClient

NUM_CLIENTS = 9
IMAGE_MODELS = sorted(set(MODELS) - set(SEQUENCE_MODELS))  # sequence models: tests/test_shakespeare.py


def make_setup(model_name, sizes, image=(1, 8, 8), classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = int(sum(sizes))
    x = torch.randn(n, *image, generator=g).numpy()
    y = torch.randint(0, classes, (n,), generator=g).numpy()
    bounds = np.cumsum([0, *sizes])
    parts = [np.arange(bounds[i], bounds[i + 1]) for i in range(len(sizes))]
    store = ClientStore.build(x, y, parts, [np.zeros(0, np.int64)] * len(sizes), torch.device("cpu"))
    model = build_model(model_name, image, classes, seed=seed)
    return model, store, parameters_of(model)


def make_executor(
    model,
    store,
    *,
    sequential=False,
    chunk_size=None,
    sampler=None,
    optimizer=None,
    algorithm=None,
    local_steps=3,
    local_epochs=None,
    batch_size=4,
    grad_mode="sum",
):
    return LocalExecutor(
        model,
        store,
        sampler or ShuffleSampler(),
        optimizer or make_optimizer("sgd", momentum=0.9),
        algorithm or ClientAlgorithm(),
        seed=7,
        local_steps=None if local_epochs else local_steps,
        local_epochs=local_epochs,
        batch_size=batch_size,
        chunk_size=chunk_size,
        sequential=sequential,
        grad_mode=grad_mode,
    )


def assert_close_updates(a, b, rtol=1e-5):
    fa, fb = flatten(a.deltas).double(), flatten(b.deltas).double()
    scale = fb.norm(dim=1, keepdim=True).clamp_min(1e-12)
    err = ((fa - fb).norm(dim=1, keepdim=True) / scale).max()
    assert float(err) < rtol, f"relative error {float(err)}"
    assert torch.equal(a.num_steps.cpu(), b.num_steps.cpu())
    torch.testing.assert_close(a.train_loss.double().cpu(), b.train_loss.double().cpu(), rtol=rtol, atol=1e-6)


RAGGED = [1, 3, 4, 5, 7, 9, 12, 17, 30]


@pytest.mark.parametrize("model_name", IMAGE_MODELS)
@pytest.mark.parametrize("participation", ["full", "partial"])
def test_vectorized_equals_sequential_every_model(model_name, participation):
    model, store, params = make_setup(model_name, RAGGED)
    ids = np.arange(NUM_CLIENTS) if participation == "full" else np.array([0, 2, 3, 7, 8])
    plan = Plan(ids)
    vec = make_executor(model, store).train(plan, params, 1, 0.05)
    seq = make_executor(model, store, sequential=True).train(plan, params, 1, 0.05)
    assert_close_updates(vec, seq)
    assert flatten(vec.deltas).abs().sum() > 0  # training really moved the parameters


@pytest.mark.parametrize(
    "optimizer",
    [
        make_optimizer("sgd"),
        make_optimizer("sgd", momentum=0.9, nesterov=True, weight_decay=1e-3),
        make_optimizer("adam", weight_decay=1e-4),
        make_optimizer("adamw", weight_decay=1e-2),
        make_optimizer("foam", level=1, weight_decay=1e-2),
        make_optimizer("gwt", level=2),
        make_optimizer("mols", estimator="ema", refresh=2),
        make_optimizer("sgd-sai"),
    ],
    ids=["sgd", "nesterov", "adam", "adamw", "foam", "gwt", "mols", "sgd-sai"],
)
def test_ragged_epochs_match_sequential(optimizer):
    """Epoch mode: clients take different numbers of steps (masked), partial last batches."""
    model, store, params = make_setup("mlp", RAGGED)
    kw = dict(optimizer=optimizer, local_epochs=2, batch_size=5)
    vec = make_executor(model, store, **kw).train(Plan(np.arange(NUM_CLIENTS)), params, 1, 0.03)
    seq = make_executor(model, store, sequential=True, **kw).train(Plan(np.arange(NUM_CLIENTS)), params, 1, 0.03)
    # GWT divides detail bands by sqrt(v) + 1e-6: float32 rounding of the batched gradients shows a little more
    assert_close_updates(vec, seq, rtol=5e-5 if type(optimizer).__name__ == "FunctionalGWT" else 1e-5)
    expected_steps = 2 * -(-np.array(RAGGED) // 5)
    assert vec.num_steps.tolist() == expected_steps.tolist()


def test_fedprox_client_matches_sequential():
    model, store, params = make_setup("logreg", RAGGED)
    kw = dict(algorithm=ProximalClient(mu=0.5))
    vec = make_executor(model, store, **kw).train(Plan(np.arange(NUM_CLIENTS)), params, 1, 0.1)
    seq = make_executor(model, store, sequential=True, **kw).train(Plan(np.arange(NUM_CLIENTS)), params, 1, 0.1)
    assert_close_updates(vec, seq)
    plain = make_executor(model, store).train(Plan(np.arange(NUM_CLIENTS)), params, 1, 0.1)
    # the proximal pull shrinks every client's update
    assert (flatten(vec.deltas).norm(dim=1) < flatten(plain.deltas).norm(dim=1)).all()


@pytest.mark.parametrize("model_name", ["logreg", "mlp"])
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("local_epochs", [None, 2], ids=["steps", "ragged-epochs"])
def test_dense_models_bitwise_independent_of_chunk_size(model_name, optimizer, local_epochs):
    """Also in epoch mode, where clients finish at different steps: a step some clients of the chunk skip
    must round like a step all of them take."""
    model, store, params = make_setup(model_name, RAGGED)
    plan = Plan(np.arange(NUM_CLIENTS))
    opt = make_optimizer("adam") if optimizer == "adam" else make_optimizer("sgd", momentum=0.9, nesterov=True)
    kw = dict(optimizer=opt, local_epochs=local_epochs)
    runs = [make_executor(model, store, chunk_size=cs, **kw).train(plan, params, 2, 0.05) for cs in (1, 4, 9)]
    for other in runs[1:]:
        assert torch.equal(flatten(other.deltas), flatten(runs[0].deltas))


@pytest.mark.parametrize("model_name", ["lenet5", "cnn"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_conv_models_independent_of_chunk_size_to_float32_rounding(model_name, optimizer):
    """Batched (grouped) convolutions round differently for different chunk sizes; the updates agree to
    float32 rounding (1e-5 relative per client with SGD; Adam's normalization magnifies it to ~1e-4)."""
    model, store, params = make_setup(model_name, RAGGED)
    plan = Plan(np.arange(NUM_CLIENTS))
    opt = make_optimizer(optimizer, momentum=0.9) if optimizer == "sgd" else make_optimizer("adam")
    runs = [make_executor(model, store, chunk_size=cs, optimizer=opt).train(plan, params, 2, 0.01) for cs in (1, 4, 9)]
    for other in runs[1:]:
        assert_close_updates(other, runs[0], rtol=1e-5 if optimizer == "sgd" else 1e-3)


@pytest.mark.parametrize("model_name", ["lenet5", "cnn"])
def test_conv_models_with_adam_match_sequential(model_name):
    model, store, params = make_setup(model_name, RAGGED)
    kw = dict(optimizer=make_optimizer("adam"))
    plan = Plan(np.arange(NUM_CLIENTS))
    vec = make_executor(model, store, **kw).train(plan, params, 1, 0.01)
    seq = make_executor(model, store, sequential=True, **kw).train(plan, params, 1, 0.01)
    assert_close_updates(vec, seq, rtol=1e-3)


def test_training_leaves_inputs_untouched():
    """The in-place optimizer path must not write into the global params, broadcast or client state."""
    model, store, params = make_setup("mlp", RAGGED)
    before = {k: v.clone() for k, v in params.items()}
    broadcast = {"c": torch.ones(3)}
    ex = make_executor(model, store, optimizer=make_optimizer("adam"))
    ex.trainer.train(
        params,
        store.x,
        store.y,
        *_batches(store),
        ex.optimizer,
        0.1,
        ClientAlgorithm(),
        broadcast,
        {"s": torch.zeros(NUM_CLIENTS, 2)},
    )
    for k in params:
        assert torch.equal(params[k], before[k])
    assert torch.equal(broadcast["c"], torch.ones(3))


def _batches(store):
    b, _ = ShuffleSampler().sample(0, 1, np.arange(NUM_CLIENTS), store.sizes, steps=3, epochs=None, batch_size=4)
    return store.global_index(np.arange(NUM_CLIENTS), b.positions), torch.as_tensor(b.mask)


def test_one_client_matches_plain_torch_loop():
    """Whole local-training path against an ordinary torch loop: nn.Module + torch.optim.SGD(momentum)."""
    model, store, params = make_setup("mlp", RAGGED)
    ex = make_executor(model, store, optimizer=make_optimizer("sgd", momentum=0.9, weight_decay=1e-3))
    client = 8
    result = ex.train(Plan(np.array([client])), params, 5, 0.05)
    index, mask = _batches_for(store, client, round_=5)
    net = build_model("mlp", (1, 8, 8), 5)
    net.load_state_dict(params)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    for k in range(index.shape[0]):
        rows = index[k][mask[k]]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(store.x[rows]), store.y[rows]).backward()
        opt.step()
    expected = {n: params[n] - p.detach() for n, p in net.named_parameters()}
    torch.testing.assert_close(flatten(result.deltas)[0], flatten(expected, stacked=False), rtol=1e-5, atol=1e-6)


def _batches_for(store, client, round_):
    b, _ = ShuffleSampler().sample(
        7, round_, np.array([client]), store.sizes[[client]], steps=3, epochs=None, batch_size=4
    )
    return store.global_index(np.array([client]), b.positions)[0], torch.as_tensor(b.mask)[0]


def test_client_order_does_not_matter():
    """A client's update depends on (seed, round, client) only, not on who else is in its chunk."""
    model, store, params = make_setup("mlp", RAGGED)
    ex = make_executor(model, store, chunk_size=3)
    alone = ex.train(Plan(np.array([4])), params, 3, 0.05)
    together = ex.train(Plan(np.arange(NUM_CLIENTS)), params, 3, 0.05)
    torch.testing.assert_close(flatten(alone.deltas)[0], flatten(together.deltas)[4], rtol=1e-6, atol=1e-7)


def test_grad_modes_agree():
    model, store, params = make_setup("lenet5", RAGGED)
    plan = Plan(np.arange(NUM_CLIENTS))
    a = make_executor(model, store, grad_mode="sum").train(plan, params, 1, 0.05)
    b = make_executor(model, store, grad_mode="vmap").train(plan, params, 1, 0.05)
    assert_close_updates(a, b)


def test_iid_sampler_full_batches_match_sequential():
    model, store, params = make_setup("mlp", RAGGED)
    kw = dict(sampler=IIDSampler(), batch_size=8)
    vec = make_executor(model, store, **kw).train(Plan(np.arange(NUM_CLIENTS)), params, 1, 0.05)
    seq = make_executor(model, store, sequential=True, **kw).train(Plan(np.arange(NUM_CLIENTS)), params, 1, 0.05)
    assert_close_updates(vec, seq)


def test_rounds_draw_different_batches():
    model, store, params = make_setup("mlp", RAGGED)
    ex = make_executor(model, store)
    r1 = ex.train(Plan(np.arange(NUM_CLIENTS)), params, 1, 0.05)
    r2 = ex.train(Plan(np.arange(NUM_CLIENTS)), params, 2, 0.05)
    assert not torch.allclose(flatten(r1.deltas), flatten(r2.deltas))


def test_auto_chunk_size_respects_memory(monkeypatch):
    import fedsim.engine.executor as ex

    model, store, params = make_setup("mlp", RAGGED)
    monkeypatch.setattr(ex, "device_memory", lambda device: 10 << 20)
    small = auto_chunk_size(model, params, store.x[:1], 32, torch.device("cpu"))
    monkeypatch.setattr(ex, "device_memory", lambda device: 10 << 30)
    large = auto_chunk_size(model, params, store.x[:1], 32, torch.device("cpu"))
    assert 1 <= small < large
    model_bytes = sum(v.numel() * 4 for v in params.values())
    assert large <= max(16, ex.CPU_CHUNK_BYTES // model_bytes)


def test_build_model_refuses_batchnorm(tmp_path, monkeypatch):
    from fedsim.core.errors import FedsimError

    (tmp_path / "bn_model.py").write_text(
        "from torch import nn\n"
        "def make(shape, classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, classes))\n"
        "def good(shape, classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, classes))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(FedsimError, match="BatchNorm"):
        build_model("bn_model:make", (1, 8, 8), 10)
    assert isinstance(build_model("bn_model:good", (1, 8, 8), 10), torch.nn.Module)
    with pytest.raises(FedsimError, match="model 'bn_model:missing': module 'bn_model' has no attribute 'missing'"):
        build_model("bn_model:missing", (1, 8, 8), 10)
    with pytest.raises(FedsimError, match="cannot import"):
        build_model("no_such_module_xyz:make", (1, 8, 8), 10)
    with pytest.raises(FedsimError, match="did you mean 'lenet5'"):
        build_model("lenet", (1, 8, 8), 10)


@pytest.mark.parametrize("name", IMAGE_MODELS)
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28)])
def test_models_shapes(name, shape):
    model = build_model(name, shape, 10)
    assert model(torch.zeros(2, *shape)).shape == (2, 10)


def _node_params(params, count, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {k: v.unsqueeze(0) + 0.1 * torch.randn(count, *v.shape, generator=g) for k, v in params.items()}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_training_from_per_node_parameters_matches_sequential(optimizer):
    """Decentralized nodes start from their own parameters; deltas are start - final."""
    from fedsim.engine.trainer import train_sequential

    model, store, params = make_setup("mlp", RAGGED)
    opt = make_optimizer(optimizer, momentum=0.9) if optimizer == "sgd" else make_optimizer("adam")
    start = _node_params(params, NUM_CLIENTS)
    index, mask = _batches(store)
    ex = make_executor(model, store, optimizer=opt)
    vec = ex.trainer.train(params, store.x, store.y, index, mask, opt, 0.05, ClientAlgorithm(), start=start)
    seq = train_sequential(model, params, store.x, store.y, index, mask, opt, 0.05, ClientAlgorithm(), start=start)
    assert_close_updates(vec, seq)
    for k in start:  # the caller's start tensors are not modified
        assert torch.equal(start[k], _node_params(params, NUM_CLIENTS)[k])


@pytest.mark.parametrize("sequential", [False, True])
def test_optimizer_state_carries_across_calls(sequential):
    """K steps in one call equal K/2 + K/2 steps with the returned parameters and optimizer state carried."""
    from fedsim.engine.trainer import train_sequential

    model, store, params = make_setup("mlp", RAGGED)
    opt = make_optimizer("adam")
    b, _ = ShuffleSampler().sample(0, 1, np.arange(NUM_CLIENTS), store.sizes, steps=4, epochs=None, batch_size=4)
    index, mask = store.global_index(np.arange(NUM_CLIENTS), b.positions), torch.as_tensor(b.mask)
    ex = make_executor(model, store, optimizer=opt)

    def train(i, m, **kw):
        if sequential:
            return train_sequential(model, params, store.x, store.y, i, m, opt, 0.05, ClientAlgorithm(), **kw)
        return ex.trainer.train(params, store.x, store.y, i, m, opt, 0.05, ClientAlgorithm(), **kw)

    full = train(index, mask)
    first = train(index[:, :2], mask[:, :2])
    middle = {k: params[k].unsqueeze(0) - d for k, d in first.deltas.items()}
    second = train(index[:, 2:], mask[:, 2:], start=middle, opt_state=first.opt_state)
    final_split = {k: middle[k] - d for k, d in second.deltas.items()}
    final_full = {k: params[k].unsqueeze(0) - d for k, d in full.deltas.items()}
    torch.testing.assert_close(flatten(final_split), flatten(final_full), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(second.opt_state["step"], full.opt_state["step"])
