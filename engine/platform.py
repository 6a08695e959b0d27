"""The platform properties an action runs with: one reading for admission (the server's
Execute) and for the choice of runner (the worker)."""

from __future__ import annotations

from engine.proto import re_pb2
from engine.runners.protocol import Platform


def platform_of(action: re_pb2.Action, command: re_pb2.Command | None) -> Platform:
    """The Action's own properties (REAPI v2.2+), else its Command's, which older clients
    only set; sorted by name then value."""
    props = action.platform.properties
    if not props and command is not None:
        props = command.platform.properties
    return tuple(sorted((p.name, p.value) for p in props))


def value_of(platform: Platform, name: str) -> str | None:
    """The value of property `name` (compared without case, as BuildBuddy does), or None."""
    lowered = name.lower()
    for key, value in platform:
        if key.lower() == lowered:
            return value
    return None
