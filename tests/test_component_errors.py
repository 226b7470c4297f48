"""Bad component options from the command line: each exits 2 with one line that names the component and the
option, no traceback, and nothing written."""

from __future__ import annotations

import pytest

BAD = [
    # unknown option
    (["--strategy", "fedavg", "--set", "strategy.damp=0.1"], "strategy 'fedavg' has no option 'damp'"),
    (["--set", "optimizer.levl=2", "--optimizer", "foam"], "optimizer 'foam' has no option 'levl'"),
    (["--set", "model.hiden=[20]"], "model 'mlp' has no option 'hiden'"),
    # misspelled, with a did-you-mean and the accepted options
    (["--strategy", "fedprox", "--set", "strategy.muu=0.1"], "did you mean 'mu'?); accepted options: mu"),
    (["--regulator", "ecgr", "--set", "regulator.roh=0.4"], "did you mean 'rho'"),
    # wrong type
    (["--strategy", "fedadam", "--set", "strategy.tau=abc"], "strategy 'fedadam', option 'tau'"),
    (["--optimizer", "adam", "--set", "optimizer.betas=0.9"], "optimizer 'adam', option 'betas'"),
    (["--set", "sampler=markov-regular", "--set", "sampler.degree=2.5"], "sampler 'markov-regular', option 'degree'"),
    # out of bounds
    (["--strategy", "fedprox", "--set", "strategy.mu=-1"], "greater than or equal to 0"),
    (["--optimizer", "adam", "--set", "optimizer.betas=[0.9, 1.5]"], "option 'betas.1'"),
    (["--partition", "dirichlet", "--alpha", "0"], "partitioner 'dirichlet', option 'alpha'"),
    (["--regulator", "ecgr", "--set", "regulator.rho=1.5"], "regulator 'ecgr', option 'rho'"),
    # belonging to another component
    (["--strategy", "fedavg", "--mu", "0.1"], "'mu' is an option of strategy 'fedprox'"),
    (["--optimizer", "adam", "--momentum", "0.9"], "'momentum' is an option of optimizer 'sgd'"),
    (["--aggregator", "krum", "--set", "aggregator.tau=0.5"], "aggregator 'krum' has no option 'tau'"),
    (["--set", "regulator.rho=0.5"], "regulator 'none' takes no options"),
    # module:Name that does not import, or is not the right kind
    (["--strategy", "no_such_module_xyz:Strategy"], "cannot import module 'no_such_module_xyz'"),
    (["--strategy", "strategies:NoSuchClass"], "module 'strategies' has no attribute 'NoSuchClass'"),
    (["--strategy", "strategies:ECGR"], "'strategies:ECGR' is not a strategy"),
    (["--optimizer", "strategies:FedAvg"], "is not an optimizer"),
    # unknown names and kinds
    (["--optimizer", "adamm"], "unknown optimizer 'adamm' (did you mean 'adam'?)"),
    (["--set", "strategyy.tau=0.1"], "unknown component 'strategyy'"),
    (["--set", "foam_level=2"], "config key 'foam_level' is now 'optimizer.level'"),
    (["--set", "strategy.tau.x=1"], "options are one level deep"),
    (["--set", "context.seed=1"], "unknown component 'context'"),
    (["--dataset", "synthetic", "--set", "dataset.seed=3"], "'seed' is set by fedsim, not an option"),
]


@pytest.mark.parametrize(("flags", "message"), BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_component_option_exits_2_with_one_line(cli, tmp_path, flags, message):
    out = tmp_path / "run"
    code, stdout, err = cli(["simulate", *flags, "--rounds", "1", "--quiet", "--out", str(out)])
    assert code == 2, (stdout, err)
    assert err.startswith("error: ")
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["list", "strategyy"], "unknown component kind 'strategyy'"),
        (["list", "optimizer", "fom"], "unknown optimizer 'fom' (did you mean 'foam'?)"),
    ],
)
def test_bad_list_queries(cli, argv, message):
    code, _, err = cli(argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
