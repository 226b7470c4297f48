"""Hugging Face datasets on disk (fedsim.data.huggingface) and Flower Datasets' partitioners (flwr:NAME), from
files built in the test: save_to_disk folders with an Image column, parquet folders with split names, column
mapping, natural clients, and one-line refusals naming the file."""

from __future__ import annotations

import io

import numpy as np
import pytest

from fedsim.core import components
from fedsim.core.errors import FedsimError
from fedsim.data import load_dataset

datasets = pytest.importorskip("datasets")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
Image = pytest.importorskip("PIL.Image")


def image_split(n, seed, channels=1):
    rng = np.random.default_rng(seed)
    shape = (8, 8) if channels == 1 else (8, 8, channels)
    pixels = rng.integers(0, 255, (n, *shape), dtype=np.uint8)
    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=3), "writer": datasets.Value("string")}
    )
    data = {
        "img": [Image.fromarray(p) for p in pixels],
        "label": rng.integers(0, 3, n).tolist(),
        "writer": [f"w{i % 4}" for i in range(n)],
    }
    return datasets.Dataset.from_dict(data, features=features), pixels


@pytest.fixture
def saved(tmp_path):
    """A DatasetDict (train 40, test 10) with an Image column saved with save_to_disk."""
    train, pixels = image_split(40, 0)
    test, _ = image_split(10, 1)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "saved"))
    return tmp_path / "saved", train, pixels


def test_save_to_disk_with_images_and_natural_clients(saved):
    path, train, pixels = saved
    ds = load_dataset("hf", path=str(path), x="img", client="writer")
    assert ds.name == "hf" and ds.feature_shape == (1, 8, 8) and len(ds.y_train) == 40 and len(ds.y_test) == 10
    assert ds.y_train.tolist() == train["label"] and ds.num_classes == 3
    assert ds.client_train.tolist() == [i % 4 for i in range(40)]  # w0..w3 numbered in sorted order
    # decoded pixels, standardized with one scalar mean and deviation of the training split
    raw = pixels.astype(np.float64)
    expected = (raw - raw.mean()) / raw.std()
    assert np.allclose(ds.x_train[:, 0], expected, atol=1e-4)


def test_colour_images_are_channels_first(tmp_path):
    train, _ = image_split(12, 0, channels=3)
    train.save_to_disk(str(tmp_path / "one"))  # a single Dataset: 20% held out
    ds = load_dataset("hf", path=str(tmp_path / "one"), x="img")
    assert ds.feature_shape == (3, 8, 8) and len(ds.y_train) + len(ds.y_test) == 12


def write_parquet(folder, name, n, seed, label_kind="int"):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    table = {
        "a": rng.normal(size=n),
        "b": rng.normal(size=n),
        "vec": [list(v) for v in rng.normal(size=(n, 5))],
        "label": labels if label_kind == "int" else np.array(["cat", "dog", "eel", "fox"])[labels],
    }
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(table), folder / name)
    return table


def test_parquet_folder_in_the_hub_layout_with_tabular_columns(tmp_path):
    train = write_parquet(tmp_path / "data", "train-00000-of-00002.parquet", 30, 0)
    write_parquet(tmp_path / "data", "train-00001-of-00002.parquet", 20, 1)
    write_parquet(tmp_path / "data", "test-00000-of-00001.parquet", 10, 2)
    ds = load_dataset("hf", path=str(tmp_path), x="a,b")
    assert ds.feature_shape == (2,) and len(ds.y_train) == 50 and len(ds.y_test) == 10
    assert ds.y_train[:30].tolist() == train["label"].tolist()
    vec = load_dataset("hf", path=str(tmp_path), x="vec")
    assert vec.feature_shape == (5,)


def test_parquet_split_folders_and_string_labels(tmp_path):
    write_parquet(tmp_path / "train", "part-0.parquet", 30, 0, label_kind="str")
    write_parquet(tmp_path / "test", "part-0.parquet", 10, 1, label_kind="str")
    ds = load_dataset("hf", path=str(tmp_path), x="vec")
    assert len(ds.y_train) == 30 and len(ds.y_test) == 10 and ds.num_classes <= 4
    assert set(ds.y_train.tolist()) <= {0, 1, 2, 3}


@pytest.mark.parametrize(
    ("setup", "options", "message"),
    [
        ("parquet", {"x": "pixels"}, "no column 'pixels' (columns: a, b, vec, label)"),
        ("parquet", {"x": "vec", "y": "target"}, "no column 'target'"),
        ("parquet", {"x": "a", "client": "user"}, "no column 'user'"),
        ("empty", {}, "no .parquet files and no save_to_disk dataset"),
        ("garbage", {}, "not a readable parquet file"),
        ("missing", {}, "no such file or folder"),
        ("saved", {"x": "img", "train_split": "training"}, "no split 'training' (splits: train, test)"),
        ("saved", {"x": "writer"}, "column 'writer' holds text"),
    ],
)
def test_bad_input_names_the_file_and_the_problem(tmp_path, saved, setup, options, message):
    path = tmp_path / "p"
    if setup == "parquet":
        write_parquet(path, "train.parquet", 10, 0)
    elif setup == "empty":
        path.mkdir()
    elif setup == "garbage":
        path.mkdir()
        (path / "train.parquet").write_bytes(b"not parquet")
    elif setup == "saved":
        path = saved[0]
    with pytest.raises(FedsimError, match="Hugging Face data '") as err:
        load_dataset("hf", path=str(path), **options)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_flower_partitioners_split_every_sample_once():
    y = np.random.default_rng(0).integers(0, 5, 400)
    for spec in (
        "flwr:IidPartitioner",
        {"name": "flwr:DirichletPartitioner", "alpha": 0.3, "min_partition_size": 2},
        {"name": "flwr:PathologicalPartitioner", "num_classes_per_partition": 2},
    ):
        parts = components.build("partitioner", spec, y=y, num_clients=8, seed=3, min_size=1, natural=None)
        assert len(parts) == 8
        assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(400))
        again = components.build("partitioner", spec, y=y, num_clients=8, seed=3, min_size=1, natural=None)
        assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))  # the run seed decides
    spec = {"name": "flwr:PathologicalPartitioner", "num_classes_per_partition": 2}
    pathological = components.build("partitioner", spec, y=y, num_clients=8, seed=3)
    assert all(len(np.unique(y[p])) <= 2 for p in pathological)


def test_flower_natural_id_partitioner_uses_the_natural_clients():
    y = np.zeros(60, dtype=np.int64)
    natural = np.repeat([2, 0, 1], 20)
    parts = components.build("partitioner", "flwr:NaturalIdPartitioner", y=y, num_clients=3, natural=natural)
    assert sorted(tuple(np.unique(natural[p])) for p in parts) == [(0,), (1,), (2,)]
    with pytest.raises(FedsimError, match="makes 3 partitions but --clients is 4"):
        components.build("partitioner", "flwr:NaturalIdPartitioner", y=y, num_clients=4, natural=natural)


def test_flower_partitioner_that_drops_samples_says_so():
    y = np.arange(50) % 5
    spec = {"name": "flwr:ShardPartitioner", "shard_size": 6, "num_shards_per_partition": 2}
    with pytest.warns(UserWarning, match="left 2 of 50 training samples on no client"):
        parts = components.build("partitioner", spec, y=y, num_clients=4, seed=0)
    assert sum(len(p) for p in parts) == 48


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "flwr:DirichletPartitioner"}, "option 'alpha': Field required"),
        ({"name": "flwr:IidPartitioner", "seed": 1}, "'seed' is set by fedsim"),
        ({"name": "flwr:IidPartitioner", "num_partitions": 3}, "has no option 'num_partitions'"),
        ("flwr:NoSuchPartitioner", "unknown Flower partitioner 'NoSuchPartitioner'"),
        ({"name": "flwr:VerticalEvenPartitioner"}, "unknown Flower partitioner"),
        ({"name": "flwr:DirichletPartitioner", "alpha": 1.0, "partition_by": "client"}, "needs a dataset with a"),
    ],
)
def test_flower_partitioner_refusals(spec, message):
    with pytest.raises(FedsimError, match=message):
        components.build("partitioner", spec, y=np.arange(40) % 4, num_clients=4, seed=0)


def test_simulate_from_a_saved_dataset_with_a_flower_partitioner(saved, tmp_path, cli):
    code, _, err = cli(["simulate", "--dataset", "hf", "--data-path", str(saved[0]), "--set", "dataset.x=img",
                        "--set", "dataset.y=label", "--partition", "flwr:DirichletPartitioner",
                        "--set", "partition.alpha=1.0", "--set", "partition.min_partition_size=1",
                        "--clients", "4", "--rounds", "2", "--batch-size", "4", "--quiet", "--no-plots",
                        "--out", str(tmp_path / "run")])  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") >= 2


def test_simulate_names_a_missing_mapped_column_in_one_line(tmp_path, cli):
    write_parquet(tmp_path / "pq", "train.parquet", 20, 0)
    code, out, err = cli(["simulate", "--dataset", "hf", "--data-path", str(tmp_path / "pq"), "--set",
                          "dataset.x=pixels", "--rounds", "1", "--quiet", "--out", str(tmp_path / "run")])  # fmt: skip
    assert code == 2 and "no column 'pixels'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def _png_bytes(pixels):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_images_in_a_parquet_file(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (10, 6, 6), dtype=np.uint8)
    images = [{"bytes": _png_bytes(p), "path": None} for p in pixels]
    pq.write_table(pa.table({"image": images, "label": np.arange(10) % 2}), tmp_path / "train.parquet")
    ds = load_dataset("hf", path=str(tmp_path / "train.parquet"))
    assert ds.feature_shape == (1, 6, 6) and len(ds.y_train) + len(ds.y_test) == 10


def test_list_names_the_flower_partitioners(cli):
    code, out, err = cli(["list", "partitioner"])
    assert code == 0 and "flwr:DirichletPartitioner" in out and "flwr:VerticalEvenPartitioner" not in out, err
    code, out, err = cli(["list", "partitioner", "flwr:ShardPartitioner"])
    assert code == 0 and "num_shards_per_partition" in out and "num_partitions" not in out, err
