"""Validators of the network options (options.py's table holds them)."""

from __future__ import annotations

import re
from typing import Any

from .options import OptionError, _show

NONE = "none"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def parse_network(value: Any, base: str) -> str:
    """none (only lo), or the name of a private network the run makes."""
    if value is None:
        return NONE
    if value == "host":
        raise OptionError("got 'host'; a container on the host's network would not be isolated: name a private "
                          "network (e.g. 'backend'), or keep 'none' and let the test reach host services "
                          "through allow=[...]")
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise OptionError(f"got {_show(value)}; accepted: 'none' (only lo, the default) or the name of a private "
                          "network: letters, digits, '_', '.', '-', at most 63 characters, e.g. 'backend'")
    return value
