"""The shared contract of fedsim: what the engine, the strategies, the topologies and the optimizers all
speak, and nothing else.

- :mod:`fedsim.core.pytree`: stacked parameter trees ``{name: Tensor[C, ...]}`` and their helpers;
- :mod:`fedsim.core.protocol`: ``Plan``, ``ServerState``, ``ClientUpdates``, ``ClientAlgorithm``,
  ``LocalContext`` and the ``Executor`` protocol;
- :mod:`fedsim.core.components`: the component registry (kinds, names, ``module:Name`` references, entry
  points) and option schemas derived from signatures;
- :mod:`fedsim.core.errors`: ``FedsimError`` and friends;
- :mod:`fedsim.core.rng`: counter-based randomness keyed by (seed, stream, round, client, step).

``fedsim.engine``, ``strategies``, ``topologies`` and ``fedsim.optim`` import this package; it imports none
of them. Its ``__init__`` imports nothing, so ``from fedsim.core.errors import FedsimError`` stays light.
"""
