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


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A test that changes torch's thread count (a Ray ShardWorker built in-process does) must not change
    the float reductions of the tests after it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
