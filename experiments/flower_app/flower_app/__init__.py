"""fedsim's SCAFFOLD + ECGR inside a Flower app (see ../pyproject.toml)."""
