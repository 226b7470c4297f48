"""How fedsim data travel in Flower records (flwr 1.41 Message API), and the checks on what comes back.

A train message carries ``"arrays"`` (ArrayRecord: the global model), ``"config"`` (ConfigRecord:
``server-round`` and the local learning rate ``lr``) and, when the strategy broadcasts extras (SCAFFOLD's
``c``, FedCM's momentum), ``"fedsim.broadcast"`` (ArrayRecord). A reply carries ``"arrays"`` (the client's
local model after training, as every Flower client does), one MetricRecord with ``num-examples``,
``num-steps`` and ``train-loss`` (plus a regulator's diagnostics), and, when the client algorithm uploads
extras (SCAFFOLD's ``dc.*``), ``"fedsim.extras"`` (ArrayRecord). A node keeps its persistent client state
in ``context.state["fedsim.client_state.<algorithm name>"]`` and its sampler state in
``context.state["fedsim.sampler_state"]``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from fedsim.core.errors import FedsimError
from fedsim.core.protocol import ClientUpdates
from fedsim.core.pytree import Tree, concat

FLOWER_EXTRA = "pip install 'fedsim[flower]'"
ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"
BROADCAST, EXTRAS = "fedsim.broadcast", "fedsim.extras"
CLIENT_STATE, SAMPLER_STATE = "fedsim.client_state", "fedsim.sampler_state"
NUM_EXAMPLES, NUM_STEPS, TRAIN_LOSS = "num-examples", "num-steps", "train-loss"
NUM_PROCESSED = "num-processed"
"""Optional reply metric: the samples a client processed (the virtual clock's compute time); fedsim's clients
send it, and a reply without it counts ``num-steps`` full batches."""
RESERVED_METRICS = (NUM_EXAMPLES, NUM_STEPS, TRAIN_LOSS, NUM_PROCESSED)


class FlowerReplyError(FedsimError):
    """A Flower reply that cannot be used (an error reply, or one without the expected records)."""


def require_flower() -> None:
    """Raise a one-line error naming the ``flower`` extra when Flower is not installed."""
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise FedsimError(f"this needs Flower, which is not installed: {FLOWER_EXTRA}") from None


def to_record(tree: Tree):
    """A tree as an ArrayRecord (host copies)."""
    from flwr.app import ArrayRecord

    return ArrayRecord({k: v.detach().cpu() for k, v in tree.items()})


def from_record(record, device: torch.device | str = "cpu") -> Tree:
    """An ArrayRecord as a tree of torch tensors on ``device``."""
    return {k: v.to(device) for k, v in record.to_torch_state_dict().items()}


def last_line(text: str) -> str:
    """The last non-empty line of a (multi-line, possibly colored) error text: what went wrong, in one line."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(text).splitlines()]
    lines = [line for line in lines if line and line != "'>"]
    return lines[-1].rstrip("'>") if lines else "no reason given"


def reply_metrics(content) -> Any:
    """The one MetricRecord of a reply (None when there is none)."""
    records = list(content.metric_records.values())
    return records[0] if len(records) == 1 else None


def updates_from_replies(
    replies: Iterable, client_of: dict[int, int], params: Tree, *, lr: float | None, num_clients: int,
    required_extras: tuple[str, ...] = (), batch_size: int = 1,
) -> ClientUpdates:  # fmt: skip
    """Our :class:`ClientUpdates` from Flower train replies: ``deltas = params - local model``, sample counts,
    step counts, losses, extras and diagnostics, in client-id order. ``client_of`` maps node id -> client id.
    A reply with an error, or without the local model, ``num-examples``/``num-steps``/``train-loss``, or an
    extras record the strategy needs (``required_extras`` prefixes), raises :class:`FlowerReplyError` naming
    the client."""
    rows, device = [], next(iter(params.values())).device
    for msg in replies:
        node = msg.metadata.src_node_id
        client = client_of.get(node)
        who = f"client {client} (node {node})" if client is not None else f"node {node}"
        if client is None:
            raise FlowerReplyError(f"reply from {who}, which was not sent a train message this round")
        if msg.has_error():
            raise FlowerReplyError(f"{who} failed to train: {last_line(msg.error.reason)}")
        content = msg.content
        if ARRAYS not in content.array_records:
            raise FlowerReplyError(f"reply of {who} has no ArrayRecord '{ARRAYS}' (the local model)")
        metrics = reply_metrics(content)
        missing = [k for k in (NUM_EXAMPLES, NUM_STEPS, TRAIN_LOSS) if metrics is None or k not in metrics]
        if missing:
            raise FlowerReplyError(f"reply of {who} has no MetricRecord with {', '.join(repr(k) for k in missing)}")
        extras = from_record(content[EXTRAS], device) if EXTRAS in content.array_records else {}
        for prefix in required_extras:
            if not any(k.startswith(prefix) for k in extras):
                raise FlowerReplyError(f"reply of {who} has no '{prefix}*' arrays in ArrayRecord '{EXTRAS}'")
        local = from_record(content[ARRAYS], device)
        if local.keys() != params.keys():
            raise FlowerReplyError(f"reply of {who}: its model's arrays do not match the global model's names")
        stats = {k: float(v) for k, v in metrics.items() if k not in RESERVED_METRICS}
        rows.append((client, {k: params[k] - local[k] for k in params}, metrics, extras, stats))
    if not rows:
        raise FlowerReplyError("no client replied to this round's train messages")
    rows.sort(key=lambda r: r[0])
    column = lambda key, dtype: torch.tensor([float(r[2][key]) for r in rows], dtype=dtype, device=device)  # noqa: E731
    stats_keys = rows[0][4].keys()
    return ClientUpdates(
        client_ids=np.array([r[0] for r in rows], dtype=np.int64),
        deltas=concat([{k: v.unsqueeze(0) for k, v in r[1].items()} for r in rows]),
        num_samples=column(NUM_EXAMPLES, torch.float64),
        num_steps=column(NUM_STEPS, torch.float64).long(),
        train_loss=column(TRAIN_LOSS, torch.float32),
        extras=concat([{k: v.unsqueeze(0) for k, v in r[3].items()} for r in rows]) if rows[0][3] else {},
        stats={k: torch.tensor([r[4][k] for r in rows], device=device) for k in stats_keys},
        lr=lr,
        num_clients=num_clients,
        samples_processed=torch.tensor(
            [float(r[2].get(NUM_PROCESSED, float(r[2][NUM_STEPS]) * batch_size)) for r in rows], device=device
        ),
    )


def train_content(arrays, config, broadcast: Tree):
    """A train message's records: the global model ``arrays`` (an ArrayRecord), ``config`` (a ConfigRecord with
    ``server-round`` and ``lr``) and the strategy's broadcast extras when there are any."""
    from flwr.app import RecordDict

    content = {ARRAYS: arrays, CONFIG: config}
    if broadcast:
        content[BROADCAST] = to_record(broadcast)
    return RecordDict(content)


def read_train(content, device: torch.device | str) -> tuple[Tree, Tree, Any]:
    """The global model, the broadcast extras (possibly empty) and the config of a train message."""
    from flwr.app import ConfigRecord

    params = from_record(content[ARRAYS], device)
    broadcast = from_record(content[BROADCAST], device) if BROADCAST in content.array_records else {}
    config = content[CONFIG] if CONFIG in content.config_records else ConfigRecord()
    return params, broadcast, config


def train_replies(messages: dict, params: Tree, updates: ClientUpdates) -> list:
    """Flower train replies from our updates (``messages``: client id -> its train message): client ``k``'s
    local model ``params - Delta_k``, its metrics and, when the client algorithm uploads extras, the
    ArrayRecord ``fedsim.extras``."""
    from flwr.app import Message, MetricRecord, RecordDict

    replies = []
    for row, client in enumerate(updates.client_ids):
        local = {k: params[k] - v[row] for k, v in updates.deltas.items()}
        metrics = {
            NUM_EXAMPLES: int(updates.num_samples[row]), NUM_STEPS: int(updates.num_steps[row]),
            **({NUM_PROCESSED: int(updates.samples_processed[row])} if updates.samples_processed is not None else {}),
            TRAIN_LOSS: float(updates.train_loss[row]), **{k: float(v[row]) for k, v in updates.stats.items()},
        }  # fmt: skip
        content = {ARRAYS: to_record(local), "metrics": MetricRecord(metrics)}
        if updates.extras:  # uploads beyond the model (SCAFFOLD's dc.*), for fedsim's Flower strategies
            content[EXTRAS] = to_record({k: v[row] for k, v in updates.extras.items()})
        replies.append(Message(content=RecordDict(content), reply_to=messages[int(client)]))
    return replies
