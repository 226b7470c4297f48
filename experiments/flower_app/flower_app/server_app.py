"""ServerApp: fedsim's SCAFFOLD as a Flower strategy, the global model evaluated on the test set each round."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedsim.engine.evaluate import evaluate
from strategies.flower import SCAFFOLD

from .task import make_model, settings, test_set

app = ServerApp()
LAST_RESULT: dict = {}
"""The last run's ``flwr`` Result (read by the tests)."""


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = settings(context.run_config)
    model = make_model(cfg["seed"])
    x_test, y_test = test_set(cfg["seed"])

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        params = dict(arrays.to_torch_state_dict())
        scores = evaluate(model, params, x_test, y_test)
        return MetricRecord({"accuracy": scores["accuracy"], "loss": scores["loss"]})

    strategy = SCAFFOLD(lr=cfg["lr"], seed=cfg["seed"], fraction_train=cfg["fraction-train"])
    result = strategy.start(
        grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=cfg["num-server-rounds"],
        evaluate_fn=evaluate_fn,
    )  # fmt: skip
    LAST_RESULT["result"] = result
