import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def cli(capsys):
    """Run ``fedsim`` in-process: ``code, stdout, stderr = cli([...])``."""
    from fedsim.cli import main

    def run(argv):
        code = main(argv)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(autouse=True, scope="session")
def _dataset_cache(tmp_path_factory):
    """Decoded datasets (digits, MNIST, ...) are cached in one temporary folder per session, never the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDSIM_CACHE_DIR", str(tmp_path_factory.mktemp("fedsim-cache")))
        yield


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A test that changes torch's thread count (a Ray ShardWorker built in-process does) must not change
    the float reductions of the tests after it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
