"""Composing client-side algorithms: a host's local rule, an optional microbatch gradient filter (GAF) and
an optional regulator (ECGR, BHerd) that turns the recorded local trajectory into the upload.

The host owns local training's direction and state (FedProx's proximal term, SCAFFOLD's correction and
control variates, FedDyn's linear term, FedCM's momentum mixing); the filter only decides how a step's
microbatch gradients become its gradient; the regulator only rewrites the upload, after the host's
``finish`` has updated its state from the actual final local model (as ECGR's SCAFFOLD host does).
"""

from __future__ import annotations

from torch import Tensor

from fedsim.core import components
from fedsim.core.errors import FedsimError
from fedsim.core.protocol import ClientAlgorithm, LocalContext
from fedsim.core.pytree import Tree


class ComposedClient(ClientAlgorithm):
    """``host`` with an optional ``gradient_filter`` (``combine_microbatches``) and ``regulator``
    (``trajectory`` spec and ``regulate``)."""

    def __init__(self, host: ClientAlgorithm, regulator=None, gradient_filter=None):
        self.host, self.regulator, self.gradient_filter = host, regulator, gradient_filter
        self.name = "+".join(_label(a) for a in (host, gradient_filter, regulator) if a is not None)
        self.trajectory = regulator.trajectory if regulator is not None else host.trajectory
        counts = {getattr(a, "microbatches", 1) for a in (host, regulator, gradient_filter) if a is not None} - {1}
        if len(counts) > 1:
            raise FedsimError(f"the client filter and the regulator use different microbatch counts: {sorted(counts)}")
        self.microbatches = counts.pop() if counts else 1

    def init_client_state(self, params: Tree) -> Tree:
        return self.host.init_client_state(params)

    def grad_transform(self, grads: Tree, params: Tree, ctx: LocalContext) -> Tree:
        return self.host.grad_transform(grads, params, ctx)

    def after_step(self, params: Tree, ctx: LocalContext) -> Tree:
        return self.host.after_step(params, ctx)

    def project(self, params: Tree) -> Tree:
        return self.host.project(params)

    def combine_microbatches(self, grads: Tree, counts: Tensor) -> tuple[Tree, Tensor | None]:
        if self.gradient_filter is not None:
            return self.gradient_filter.combine_microbatches(grads, counts)
        return self.host.combine_microbatches(grads, counts)

    def finish(self, deltas: Tree, num_steps: Tensor, ctx: LocalContext) -> tuple[Tree, Tree, Tree]:
        return self.host.finish(deltas, num_steps, ctx)

    def extra_uploads(self, params: Tree) -> Tree:
        return self.host.extra_uploads(params)

    def regulate(self, deltas: Tree, trajectory, num_steps: Tensor) -> tuple[Tree, Tree]:
        if self.regulator is None:
            return self.host.regulate(deltas, trajectory, num_steps)
        return self.regulator.regulate(deltas, trajectory, num_steps)


def _label(part) -> str:
    """A part's ``name`` (built-ins set one), else its class name in lower case (a plugin need not)."""
    return getattr(part, "name", None) or type(part).__name__.lower()


def compose(host: ClientAlgorithm, regulator=None, gradient_filter=None) -> ClientAlgorithm:
    """The host alone when nothing is added, else a :class:`ComposedClient`."""
    if regulator is None and gradient_filter is None:
        return host
    return ComposedClient(host, regulator, gradient_filter)


def make_regulator(spec=None, **options):
    """A regulator from a name or ``{name: ..., option: ...}`` spec plus ``options`` (``none``/None gives
    None; an object is returned as it is): ``make_regulator("ecgr", rho=0.5)``."""
    return components.make("regulator", spec, **options)


def make_client_filter(spec=None, **options):
    """A microbatch gradient filter (``gaf`` with ``tau``, ``microbatches``); ``none``/None gives None."""
    return components.make("client_filter", spec, **options)
