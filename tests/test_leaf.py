"""LEAF JSON datasets (fedsim.data.leaf), from files built in the test: users as natural clients, the train/test
folders or a held-out split, images from square feature rows, and one-line refusals naming the file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedsim.core.errors import FedsimError
from fedsim.data import load_dataset
from fedsim.data.leaf import load_leaf


def write_split(folder, files=2, users=3, samples=6, width=784, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    expected = {}
    for f in range(files):
        names = [f"f{f}_{u}" for u in range(users)]
        data = {}
        for name in names:
            y = rng.integers(0, 5, samples)
            x = rng.random((samples, width)).round(3)
            data[name] = {"x": x.tolist(), "y": y.tolist()}
            expected[name] = (x, y)
        doc = {"users": names, "num_samples": [samples] * users, "user_data": data}
        (folder / f"all_data_{f}.json").write_text(json.dumps(doc))
    return expected


def test_train_and_test_folders_give_one_natural_client_per_user(tmp_path):
    train = write_split(tmp_path / "data" / "train")
    write_split(tmp_path / "data" / "test", samples=2, seed=1)
    ds = load_dataset("leaf", path=str(tmp_path / "data"))
    assert ds.name == "leaf" and ds.feature_shape == (1, 28, 28)
    assert len(ds.y_train) == 6 * 6 and len(ds.y_test) == 6 * 2
    # users in order of appearance (files in name order): f0_0, f0_1, f0_2, f1_0, ...
    assert ds.client_train.tolist() == np.repeat(np.arange(6), 6).tolist()
    assert ds.y_train.tolist() == np.concatenate([train[n][1] for n in sorted(train)]).tolist()
    assert ds.num_classes == max(ds.y_train.max(), ds.y_test.max()) + 1
    # standardized with the training statistics (one scalar for images)
    assert abs(float(ds.x_train.mean())) < 1e-5 and abs(float(ds.x_train.std()) - 1) < 1e-4


def test_one_file_holds_out_a_fifth(tmp_path):
    write_split(tmp_path, files=1, users=4, samples=10, width=60)
    ds = load_leaf(tmp_path / "all_data_0.json")
    assert ds.feature_shape == (60,) and len(ds.y_train) + len(ds.y_test) == 40 and len(ds.y_test) == 8
    assert len(np.unique(ds.client_train)) == 4 and ds.client_train.max() == 3


def test_simulate_with_the_natural_partition(tmp_path, cli):
    write_split(tmp_path / "leaf" / "train", width=64)
    write_split(tmp_path / "leaf" / "test", samples=2, width=64, seed=1)
    code, _, err = cli(["simulate", "--dataset", "leaf", "--data-path", str(tmp_path / "leaf"), "--partition",
                        "natural", "--clients", "6", "--rounds", "2", "--batch-size", "4", "--quiet", "--no-plots",
                        "--out", str(tmp_path / "run")])  # fmt: skip
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["num_clients"] == 6 and summary["dataset"] == "leaf"


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not readable as JSON"),
        (json.dumps({"users": ["a"]}), "expected an object with 'users'"),
        (json.dumps({"users": ["a"], "user_data": {"a": {"x": ["to be or not"], "y": ["t"]}}}), "text or file names"),
        (json.dumps({"users": ["a"], "user_data": {"a": {"x": [[1.0], [2.0]], "y": [1]}}}), "2 samples in 'x'"),
        (json.dumps({"users": ["a"], "user_data": {"a": {"x": [[1.0]], "y": [-1]}}}), "non-negative integers"),
        (json.dumps({"users": ["a"], "user_data": {}}), "no 'x' and 'y'"),
        (
            json.dumps({"users": ["a"], "num_samples": [3], "user_data": {"a": {"x": [[1.0]], "y": [1]}}}),
            "user 'a' has 1 samples but 'num_samples' says 3",
        ),
        (
            json.dumps({"users": ["a", "b"], "num_samples": [1], "user_data": {}}),
            "'num_samples' has 1 entries but 'users' has 2",
        ),
    ],
    ids=["json", "shape", "text", "lengths", "labels", "user", "count", "counts"],
)
def test_bad_files_are_refused_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(FedsimError, match=message) as err:
        load_leaf(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_path_and_empty_folder(tmp_path, cli):
    with pytest.raises(FedsimError, match="no .json files"):
        load_leaf(tmp_path)
    code, _, err = cli(["simulate", "--dataset", "leaf", "--data-path", str(tmp_path / "nope"), "--rounds", "1",
                        "--quiet", "--no-plots", "--out", str(tmp_path / "x")])  # fmt: skip
    assert code == 2 and "no such file or folder" in err and len(err.strip().splitlines()) == 1
