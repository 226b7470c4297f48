"""The catalog of built-in components (fedsim.core.catalog) is current, and refuses exactly what the
registry refuses, with the same message."""

from __future__ import annotations

import pytest

from fedsim.core import catalog, components
from fedsim.core.errors import FedsimError

BAD_VALUES = (-1, 0, 2, 10**9, -1e-3, 0.5, "x", True, None, [0], [0.9, 1.0], [1, 2, 3])


def _built_ins() -> list[components.Component]:
    catalog._load_all()
    return [c for kind in components.KINDS for c in components.components(kind) if c.origin == "built-in"]


def test_generated_catalog_is_current():
    """``python -m fedsim.core.catalog`` regenerates fedsim/core/_catalog.py after a signature changes."""
    assert catalog.GENERATED.read_text(encoding="utf-8") == catalog.source(), (
        "fedsim/core/_catalog.py is stale: run python -m fedsim.core.catalog"
    )


def _outcome(component: components.Component, values: dict) -> str:
    try:
        return repr(component.schema(**values).model_dump())
    except Exception as err:  # noqa: BLE001 - the message is what is compared
        return f"{type(err).__name__}: {err}"


def _message(validate, values: dict) -> str:
    try:
        validate(values)
        return "accepted"
    except FedsimError as err:
        return str(err).split(" ('")[0]  # the owners hint lists the components loaded so far: not compared


def test_catalog_validates_like_the_registry():
    """Every option of every built-in, given each bad value, validates to the same result in both, and
    unknown options get the same one-line error."""
    checked = 0
    for component in _built_ins():
        entry = catalog.get(component.kind.name, component.name)
        assert entry is not None and entry.open == component.open
        assert list(entry.options()) == list(component.options())
        for option in [*component.options(), "no_such_option", *sorted(component.kind.context)[:1]]:
            for value in BAD_VALUES:
                values = {option: value}
                assert _outcome(entry, values) == _outcome(component, values), (component.name, option, value)
                if getattr(component.declared or component.obj, "check_options", None) is None:
                    assert _message(entry.validate, values) == _message(component.validate, values)
                checked += 1
    assert checked > 1000


def test_unknown_names_get_the_registry_message():
    catalog._load_all()
    for kind in ("strategy", "optimizer", "dataset", "regulator"):
        with pytest.raises(FedsimError) as fast:
            catalog.get(kind, "nosuch")
        with pytest.raises(FedsimError) as full:
            components.get(kind, "nosuch")
        assert str(fast.value) == str(full.value)


def test_references_and_plugins_are_left_to_the_full_check():
    assert catalog.get("strategy", "mypkg.module:MyStrategy") is None
    assert catalog.get("strategy", "flwr:FedAvg") is None
    assert catalog.get("strategy", "fedprox") is not None
