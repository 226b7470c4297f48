"""Min-max problems for decentralized SGDA (``--strategy dsgda``): ``min_x max_y f(x, y)``.

A problem wraps the run's model into a module whose parameters hold both the primal block ``x`` and the dual
block ``y`` (``dual_keys``), and whose forward packs per-sample outputs so that the engine's per-sample loss
``loss(outputs, targets)`` is the stochastic objective ``f(x, y; z)``. Descent on ``x`` and ascent on ``y`` come
from :class:`DescentAscentClient`, which flips (and rescales by ``eta_y / eta_x``) the dual gradient before the
local optimizer step and projects the dual onto its feasible set after it.

Problems:

- :class:`AUCMaximization` (Ying, Wen & Lyu, NeurIPS 2016, "Stochastic online AUC maximization"): the square
  loss AUC surrogate as a min-max problem over a scorer ``h_w``, scalars ``a, b`` (primal) and ``alpha`` (dual),
  with ``p = P(y = 1)`` on the training data::

      F(w, a, b, alpha; z) = (1-p)(h(x) - a)^2 [y=1] + p(h(x) - b)^2 [y=-1]
                             + 2(1 + alpha)(p h(x) [y=-1] - (1-p) h(x) [y=1]) - p(1-p) alpha^2

  convex in (w, a, b) for a linear scorer, concave (quadratic) in ``alpha``; ``alpha`` is unconstrained.
  The binary task is "label in ``positive_classes``" (default: the upper half of the classes).
- :class:`RobustLogisticRegression`: distributionally robust (group-DRO over the classes) multinomial logistic
  regression, with the dual ``q`` on the probability simplex and a chi-square-style regularizer (our choice of
  the uncertainty set; the seed paper's abstract names only "distributionally robust logistic regression")::

      f(theta, q) = sum_k q_k L_k(theta) - (lambda / 2) ||q - 1/K||^2,     L_k = E[ce(theta; z) | y = k]

  stochastic form ``ce(theta; z) q_y / pi_y - (lambda/2)||q - 1/K||^2`` with ``pi`` the training class
  frequencies (unbiased for ``f``).

Both report the primal-dual gap ``max_y f(x_bar, y) - min_x f(x, y_bar)`` on the training data of all nodes:
the inner max has a closed form; the inner min is solved with L-BFGS from ``x_bar`` (exact up to solver
tolerance for the convex cases, the linear scorer / logreg model; a local estimate for non-convex models).
"""

from __future__ import annotations

from typing import Annotated, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from fedsim.core import components
from fedsim.core.components import option
from fedsim.core.errors import FedsimError
from fedsim.core.protocol import ClientAlgorithm, LocalContext
from fedsim.core.pytree import Tree
from fedsim.decentralized import node_scores, node_spread, own_data_loss, train_data


def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of each row ``v[..., :]`` onto the probability simplex (Duchi et al., 2008):
    ``max(v - theta, 0)`` with ``theta`` from the sorted cumulative sums."""
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(-1) - 1.0
    k = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    rho = ((u - css / k) > 0).sum(-1, keepdim=True).clamp_min(1)
    theta = css.gather(-1, rho - 1) / rho.to(v.dtype)
    return (v - theta).clamp_min(0.0)


def auc_score(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve = P(score of a random positive > a random negative), ties counting 1/2
    (the Mann-Whitney statistic, from average ranks). ``None`` when one class is absent."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    avg = (starts + ends + 1) / 2.0  # 1-based average rank of each tie block
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


class MinimaxProblem:
    """Base class: a wrapped model, the per-sample objective, the dual block and its projection."""

    name: ClassVar[str] = "base"
    dual_keys: ClassVar[tuple[str, ...]] = ()

    def output_classes(self, num_classes: int) -> int:
        """Outputs of the underlying model (the scorer or classifier)."""
        return num_classes

    def fit(self, y_train: Tensor, num_classes: int) -> None:
        """Set the data constants of the objective from the training labels of all nodes."""

    def wrap(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-sample stochastic objective ``f(x, y; z)`` from the packed outputs."""
        raise NotImplementedError

    def correct(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-sample 0/1 correctness of the model's prediction."""
        raise NotImplementedError

    def project(self, params: Tree) -> Tree:
        """Project the dual block onto its feasible set (identity for an unconstrained dual)."""
        return params

    def max_dual(self, model: nn.Module, params: Tree, x: Tensor, y: Tensor) -> float:
        """``max_y f(x, y)`` at the primal part of ``params`` on the data ``(x, y)``."""
        raise NotImplementedError

    def metrics(self, model: nn.Module, params: Tree, x: Tensor, y: Tensor) -> dict[str, float | None]:
        """Problem-specific test metrics of one model."""
        return {}

    @torch.no_grad()
    def objective(self, model: nn.Module, params: Tree, x: Tensor, y: Tensor) -> float:
        """``f`` at ``params`` on the data set ``(x, y)``: the mean per-sample objective."""
        return float(self.loss(functional_call(model, params, (x,)), y).double().mean())

    def min_primal(self, model: nn.Module, params: Tree, x: Tensor, y: Tensor, iterations: int = 100) -> float:
        """``min_x f(x, y)`` at the dual part of ``params``: L-BFGS over the primal block from ``params``."""
        primal = {k: v.detach().clone().requires_grad_(True) for k, v in params.items() if k not in self.dual_keys}
        fixed = {k: v.detach() for k, v in params.items() if k in self.dual_keys}
        opt = torch.optim.LBFGS(
            list(primal.values()), lr=1.0, max_iter=iterations, history_size=20, line_search_fn="strong_wolfe"
        )

        def closure():
            opt.zero_grad()
            value = self.loss(functional_call(model, {**primal, **fixed}, (x,)), y).mean()
            value.backward()
            return value

        with torch.enable_grad():
            opt.step(closure)
        value = self.objective(model, {**primal, **fixed}, x, y)
        return min(value, self.objective(model, params, x, y))

    def primal_dual_gap(self, model: nn.Module, params: Tree, x: Tensor, y: Tensor) -> float:
        """``max_y f(x_bar, y) - min_x f(x, y_bar)`` (>= 0; 0 exactly at a saddle point)."""
        return self.max_dual(model, params, x, y) - self.min_primal(model, params, x, y)


class AUCModel(nn.Module):
    """A scorer ``h(x)`` (one output) with the AUC min-max scalars ``a``, ``b`` (primal) and ``alpha`` (dual);
    forward packs ``[h, a, b, alpha]`` per sample."""

    def __init__(self, scorer: nn.Module) -> None:
        super().__init__()
        self.scorer = scorer
        self.a = nn.Parameter(torch.zeros(()))
        self.b = nn.Parameter(torch.zeros(()))
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        h = self.scorer(x).reshape(x.shape[0])
        return torch.stack([h, self.a.expand_as(h), self.b.expand_as(h), self.alpha.expand_as(h)], dim=1)


class AUCMaximization(MinimaxProblem):
    """Square-loss AUC maximization as a min-max problem (see the module docstring)."""

    name: ClassVar[str] = "auc"
    dual_keys: ClassVar[tuple[str, ...]] = ("alpha",)

    def __init__(
        self,
        positive_classes: Annotated[
            list[int] | None, option("classes counted as positive (default: the upper half of the labels)")
        ] = None,
    ) -> None:
        self.positive_classes = positive_classes
        self.p = 0.5
        self.is_positive: Tensor | None = None

    def output_classes(self, num_classes: int) -> int:
        return 1

    def fit(self, y_train: Tensor, num_classes: int) -> None:
        chosen = self.positive_classes
        if chosen is None:
            chosen = list(range(num_classes // 2, num_classes))
        bad = [c for c in chosen if not 0 <= c < num_classes]
        if bad or not chosen:
            raise FedsimError(
                f"positive_classes must be a non-empty list of labels in 0..{num_classes - 1}, got {chosen}"
            )
        lookup = torch.zeros(num_classes, dtype=torch.bool, device=y_train.device)
        lookup[torch.as_tensor(chosen, device=y_train.device)] = True
        p = float(lookup[y_train].double().mean())
        if not 0.0 < p < 1.0:
            raise FedsimError(f"AUC maximization needs both classes in the training data; positives are {p:.0%}")
        self.is_positive, self.p = lookup, p

    def wrap(self, model: nn.Module) -> nn.Module:
        return AUCModel(model)

    def _parts(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, ...]:
        pos = self.is_positive.to(outputs.device)[targets].to(outputs.dtype)
        h, a, b, alpha = outputs.unbind(-1)
        return h, a, b, alpha, pos, 1.0 - pos

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        h, a, b, alpha, pos, neg = self._parts(outputs, targets)
        p = self.p
        return (
            (1 - p) * (h - a) ** 2 * pos
            + p * (h - b) ** 2 * neg
            + 2 * (1 + alpha) * (p * h * neg - (1 - p) * h * pos)
            - p * (1 - p) * alpha**2
        )

    def correct(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Threshold halfway between the estimated mean scores ``a`` (positives) and ``b`` (negatives)."""
        h, a, b, _, pos, _ = self._parts(outputs, targets)
        return ((h > (a + b) / 2) == (pos > 0.5)).to(outputs.dtype)

    @torch.no_grad()
    def max_dual(self, model: nn.Module, params: Tree, x: Tensor, y: Tensor) -> float:
        """F is ``A + 2 alpha B - p(1-p) alpha^2`` in alpha, so the max is ``A + B^2 / (p(1-p))``."""
        outputs = functional_call(model, params, (x,)).double()
        h, a, b, _, pos, neg = self._parts(outputs, y)
        p = self.p
        big_a = ((1 - p) * (h - a) ** 2 * pos + p * (h - b) ** 2 * neg + 2 * (p * h * neg - (1 - p) * h * pos)).mean()
        big_b = (p * h * neg - (1 - p) * h * pos).mean()
        return float(big_a + big_b**2 / (p * (1 - p)))

    @torch.no_grad()
    def metrics(self, model: nn.Module, params: Tree, x: Tensor, y: Tensor) -> dict[str, float | None]:
        outputs = functional_call(model, params, (x,))
        positive = self.is_positive.to(y.device)[y]
        return {"test_auc": auc_score(outputs[:, 0].double().cpu().numpy(), positive.cpu().numpy())}


class DROModel(nn.Module):
    """A classifier with the dual weights ``q`` over its ``K`` classes; forward packs ``[logits, q]``."""

    def __init__(self, classifier: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.classifier = classifier
        self.num_classes = num_classes
        self.q = nn.Parameter(torch.full((num_classes,), 1.0 / num_classes))

    def forward(self, x: Tensor) -> Tensor:
        logits = self.classifier(x)
        return torch.cat([logits, self.q.expand(logits.shape[0], self.num_classes)], dim=1)


class RobustLogisticRegression(MinimaxProblem):
    """Group-DRO logistic regression over the classes (see the module docstring); ``lam`` is ``lambda``."""

    name: ClassVar[str] = "dro"
    dual_keys: ClassVar[tuple[str, ...]] = ("q",)

    def __init__(self, lam: Annotated[float, option("chi-square penalty weight", gt=0)] = 1.0) -> None:
        if not lam > 0:
            raise FedsimError(f"lam must be > 0, got {lam}")
        self.lam = lam
        self.num_classes = 0
        self.prior: Tensor | None = None

    def fit(self, y_train: Tensor, num_classes: int) -> None:
        counts = torch.bincount(y_train, minlength=num_classes).double()
        if (counts == 0).any():
            missing = torch.nonzero(counts == 0).flatten().tolist()
            raise FedsimError(f"robust logistic regression needs every class in the training data; missing {missing}")
        self.num_classes, self.prior = num_classes, counts / counts.sum()

    def wrap(self, model: nn.Module) -> nn.Module:
        return DROModel(model, self.num_classes)

    def _split(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        return outputs[:, : self.num_classes], outputs[:, self.num_classes :]

    def _regularizer(self, q: Tensor) -> Tensor:
        return 0.5 * self.lam * ((q - 1.0 / self.num_classes) ** 2).sum(-1)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        logits, q = self._split(outputs)
        ce = F.cross_entropy(logits, targets, reduction="none")
        weight = q.gather(1, targets[:, None])[:, 0] / self.prior.to(outputs.device, outputs.dtype)[targets]
        return ce * weight - self._regularizer(q)

    def correct(self, outputs: Tensor, targets: Tensor) -> Tensor:
        logits, _ = self._split(outputs)
        return (logits.argmax(-1) == targets).to(outputs.dtype)

    def project(self, params: Tree) -> Tree:
        return {**params, "q": project_simplex(params["q"])}

    def class_losses(self, model: nn.Module, params: Tree, x: Tensor, y: Tensor) -> Tensor:
        """``L_k``: mean cross-entropy of each class's samples."""
        logits, _ = self._split(functional_call(model, params, (x,)))
        ce = F.cross_entropy(logits.double(), y, reduction="none")
        sums = torch.zeros(self.num_classes, dtype=torch.float64, device=y.device).index_add_(0, y, ce)
        return sums / torch.bincount(y, minlength=self.num_classes).clamp_min(1)

    @torch.no_grad()
    def max_dual(self, model: nn.Module, params: Tree, x: Tensor, y: Tensor) -> float:
        """``q* = P_simplex(1/K + L / lambda)`` maximizes the concave quadratic ``q.L - lambda/2 ||q - 1/K||^2``
        over the simplex (the projection of the unconstrained maximizer, as the quadratic is isotropic)."""
        losses = self.class_losses(model, params, x, y)
        q = project_simplex(1.0 / self.num_classes + losses / self.lam)
        return float((q * losses).sum() - self._regularizer(q))

    @torch.no_grad()
    def metrics(self, model: nn.Module, params: Tree, x: Tensor, y: Tensor) -> dict[str, float | None]:
        correct = self.correct(functional_call(model, params, (x,)), y).double()
        per_class = [float(correct[y == k].mean()) for k in range(self.num_classes) if bool((y == k).any())]
        return {"worst_class_accuracy": min(per_class) if per_class else None}


PROBLEMS: dict[str, type[MinimaxProblem]] = {cls.name: cls for cls in (AUCMaximization, RobustLogisticRegression)}


for _cls in (AUCMaximization, RobustLogisticRegression):
    components.register("problem", _cls.name, _cls)


class DescentAscentClient(ClientAlgorithm):
    """Local SGDA: descent on the primal block, ascent on the dual block with step ``eta_y = ratio * eta_x``.

    The dual gradient is replaced by ``-ratio * grad_y`` before the optimizer step, so the local optimizer's
    descent step ``y <- y - eta_x (-ratio grad_y)`` is the ascent step ``y <- y + eta_y grad_y`` (exact for
    plain SGD; the config refuses a dual learning rate with adaptive optimizers, whose normalization would
    cancel the ratio). After every step the dual is projected onto its feasible set.
    """

    name = "sgda"

    def __init__(self, problem: MinimaxProblem, ratio: float = 1.0) -> None:
        self.problem, self.ratio = problem, ratio

    def grad_transform(self, grads: Tree, params: Tree, ctx: LocalContext) -> Tree:
        return {k: (-self.ratio * g if k in self.problem.dual_keys else g) for k, g in grads.items()}

    def project(self, params: Tree) -> Tree:
        return self.problem.project(params)


class MinimaxTask:
    """Decentralized SGDA (``strategy: dsgda``) on a min-max ``problem``: its loss, correctness and wrapped
    model; the descent-ascent client algorithm with ``dual_lr / lr``; and the evaluation, for the average
    model ``(x_bar, y_bar)``: ``primal_dual_gap`` on all nodes' training data, ``test_loss``/``train_loss`` as
    the objective ``f`` on the test/training set, ``generalization_gap`` (their difference),
    ``node_generalization_gap`` (per node, on its own data), ``test_accuracy``, and the problem's own metric
    (``test_auc`` for AUC maximization, ``worst_class_accuracy`` for robust logistic regression)."""

    def __init__(self, problem: MinimaxProblem) -> None:
        self.problem = problem
        self.loss_fn, self.correct = problem.loss, problem.correct

    def output_classes(self, num_classes: int) -> int:
        return self.problem.output_classes(num_classes)

    def prepare(self, y_train: Tensor, num_classes: int) -> None:
        self.problem.fit(y_train, num_classes)

    def wrap(self, model: nn.Module) -> nn.Module:
        return self.problem.wrap(model)  # the problem's own variables start at fixed values

    def client_algorithm(self, lr: float, strategy_options: dict) -> DescentAscentClient:
        return DescentAscentClient(self.problem, (strategy_options.get("dual_lr") or lr) / lr)

    def evaluate_nodes(self, sim, nodes: Tree) -> dict[str, float | None]:
        average = {k: v.mean(0) for k, v in nodes.items()}
        x_train, y_train = train_data(sim)
        problem, model = self.problem, sim.model
        test_loss = problem.objective(model, average, sim.x_test, sim.y_test)
        train_loss = problem.objective(model, average, x_train, y_train)
        node_test_loss, node_test_acc = node_scores(sim, nodes, sim.x_test, sim.y_test)
        with torch.no_grad():
            outputs = functional_call(model, average, (sim.x_test,))
        record = {
            "test_accuracy": float(self.correct(outputs, sim.y_test).double().mean()),
            "test_loss": test_loss,
            "generalization_gap": test_loss - train_loss,
            "node_generalization_gap": float((node_test_loss - own_data_loss(sim, nodes)).mean()),
            "primal_dual_gap": problem.primal_dual_gap(model, average, x_train, y_train),
        }
        record.update(problem.metrics(model, average, sim.x_test, sim.y_test))
        record.update(node_spread(node_test_acc))
        return record
