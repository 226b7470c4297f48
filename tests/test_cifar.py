"""CIFAR-10/100 binary files built in the test (fedsim.data.cifar): records against the bytes written, the
archive and the folder, fine and coarse labels, one-line refusals; the GroupNorm ResNet in a run."""

from __future__ import annotations

import io
import pickle
import tarfile

import numpy as np
import pytest
import torch

from fedsim.core.errors import FedsimError
from fedsim.data import load_dataset
from fedsim.data.cifar import load_cifar
from fedsim.models.zoo import resnet
from fedsim.simulation import simulate

CIFAR10 = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]


def records(n, labels, seed):
    """``n`` records with ``labels`` label bytes each; returns the bytes, the label rows and the pixels."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, (n, labels), dtype=np.uint8)
    x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    return np.concatenate([y, x], axis=1).tobytes(), y, x


def write_cifar10(folder, n=4):
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for i, name in enumerate(CIFAR10):
        data, y, x = records(n, 1, i)
        (folder / name).write_bytes(data)
        written[name] = (y[:, 0], x)
    return written


def test_cifar10_records_match_the_bytes_in_a_folder_and_an_archive(tmp_path):
    written = write_cifar10(tmp_path / "cifar-10-batches-bin")
    ds = load_dataset("cifar10", path=str(tmp_path / "cifar-10-batches-bin"))
    assert ds.feature_shape == (3, 32, 32) and ds.num_classes == 10 and len(ds.y_train) == 20 and len(ds.y_test) == 4
    train_y = np.concatenate([written[n][0] for n in CIFAR10[:5]])
    assert ds.y_train.tolist() == train_y.tolist()
    # standardization is one affine map: the pixel order is the written planes' (red, green, blue; row-major)
    raw = np.concatenate([written[n][1] for n in CIFAR10[:5]]).astype(np.float64)
    mean, std = raw.mean(), raw.std()
    np.testing.assert_allclose(ds.x_train.reshape(20, -1), (raw - mean) / std, rtol=1e-5, atol=1e-5)
    archive = tmp_path / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-bin", arcname="cifar-10-batches-bin")
    packed = load_cifar("cifar10", archive)
    assert np.array_equal(packed.x_train, ds.x_train) and np.array_equal(packed.y_test, ds.y_test)


def test_cifar100_fine_and_coarse_labels(tmp_path):
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    train, y_train, _ = records(6, 2, 0)
    test, _, _ = records(2, 2, 1)
    (folder / "train.bin").write_bytes(train)
    (folder / "test.bin").write_bytes(test)
    fine = load_cifar("cifar100", folder)
    coarse = load_dataset({"name": "cifar100", "path": str(folder), "label": "coarse"})
    assert fine.num_classes == 100 and coarse.num_classes == 20
    assert fine.y_train.tolist() == y_train[:, 1].tolist() and coarse.y_train.tolist() == y_train[:, 0].tolist()


def test_bad_cifar_input_is_one_line(tmp_path, cli):
    write_cifar10(tmp_path / "ok")
    (tmp_path / "ok" / "test_batch.bin").unlink()
    with pytest.raises(FedsimError, match="missing test_batch.bin \\(the binary version of cifar10\\)"):
        load_cifar("cifar10", tmp_path / "ok")
    write_cifar10(tmp_path / "short")
    (tmp_path / "short" / "data_batch_2.bin").write_bytes(b"\x01" * 100)
    with pytest.raises(FedsimError, match="data_batch_2.bin has 100 bytes"):
        load_cifar("cifar10", tmp_path / "short")
    write_cifar10(tmp_path / "label")
    data = bytearray((tmp_path / "label" / "test_batch.bin").read_bytes())
    data[0] = 12
    (tmp_path / "label" / "test_batch.bin").write_bytes(bytes(data))
    with pytest.raises(FedsimError, match="label 12, but this data set has 10 classes"):
        load_cifar("cifar10", tmp_path / "label")
    (tmp_path / "junk.tar.gz").write_bytes(io.BytesIO(b"not a tar").getvalue())
    with pytest.raises(FedsimError, match="not a readable tar archive"):
        load_cifar("cifar10", tmp_path / "junk.tar.gz")
    code, _, err = cli(["simulate", "--dataset", "cifar10", "--data-path", str(tmp_path / "none"), "--rounds", "1",
                        "--quiet", "--no-plots", "--out", str(tmp_path / "x")])  # fmt: skip
    assert code == 2 and "no such file or folder" in err and len(err.strip().splitlines()) == 1


def test_resnet_shapes_sizes_and_a_federated_round(tmp_path):
    for depth, size in ((20, 272_474), (18, 11_173_962)):
        model = resnet((3, 32, 32), 10, depth=depth)
        assert sum(p.numel() for p in model.parameters()) == size
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(FedsimError, match="depth must be one of 18, 20"):
        resnet((3, 32, 32), 10, depth=34)
    with pytest.raises(FedsimError, match="must divide every stage width"):
        resnet((3, 32, 32), 10, groups=5)
    write_cifar10(tmp_path / "c", n=8)
    config = {"dataset": {"name": "cifar10", "path": str(tmp_path / "c")}, "model": "resnet", "clients": 2,
              "partition": "iid", "rounds": 1, "local_steps": 1, "batch_size": 4, "checkpoint_every": 0}  # fmt: skip
    summary = simulate(config, tmp_path / "run", plots=False)
    assert summary["num_params"] == 272_474 and summary["final_test_accuracy"] is not None


def write_pickled(folder, names, key, n=4, seed=0):
    """The Python version: one pickled dict per batch, as the CIFAR authors wrote it (bytes keys)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name in names:
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, n).tolist()
        (folder / name).write_bytes(pickle.dumps({b"batch_label": b"x", b"data": x, key: y}, protocol=3))
        written[name] = (x, y)
    return written


def test_pickled_python_version_needs_allow_pickle(tmp_path, cli):
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    written = write_pickled(tmp_path / "py" / "cifar-10-batches-py", names, b"labels")
    with pytest.raises(FedsimError, match="pickled Python version, which is refused .*allow_pickle: true"):
        load_cifar("cifar10", tmp_path / "py")
    ds = load_dataset({"name": "cifar10", "path": str(tmp_path / "py"), "allow_pickle": True})
    assert ds.y_train.tolist() == sum((written[n][1] for n in names[:5]), []) and len(ds.y_test) == 4
    binary = tmp_path / "bin"
    binary.mkdir()
    for name in names:  # the same records in the binary layout give the same data set
        x, y = written[name]
        rows = np.concatenate([np.asarray(y, dtype=np.uint8)[:, None], x], axis=1)
        (binary / f"{name}.bin").write_bytes(rows.tobytes())
    np.testing.assert_array_equal(load_cifar("cifar10", binary).x_train, ds.x_train)
    code, _, err = cli(["simulate", "--dataset", "cifar10", "--data-path", str(tmp_path / "py"), "--clients", "2",
                        "--rounds", "1", "--quiet", "--no-plots", "--out", str(tmp_path / "x")])  # fmt: skip
    assert code == 2 and "allow_pickle: true" in err and len(err.strip().splitlines()) == 1


def test_pickled_cifar100_fine_and_coarse_and_no_code_runs(tmp_path):
    folder = tmp_path / "cifar-100-python"
    write_pickled(folder, ["train", "test"], b"fine_labels")
    for name in ("train", "test"):
        batch = pickle.loads((folder / name).read_bytes())
        batch[b"coarse_labels"] = [v % 20 for v in batch[b"fine_labels"]]
        (folder / name).write_bytes(pickle.dumps(batch, protocol=3))
    fine = load_cifar("cifar100", tmp_path, "fine", allow_pickle=True)
    coarse = load_cifar("cifar100", tmp_path, "coarse", allow_pickle=True)
    assert fine.num_classes == 100 and coarse.num_classes == 20 and fine.y_train.tolist() == coarse.y_train.tolist()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (folder / "train").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(FedsimError, match="refusing to unpickle 'builtins.print'"):
        load_cifar("cifar100", tmp_path, allow_pickle=True)
