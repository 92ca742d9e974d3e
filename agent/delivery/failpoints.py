"""Named points in the delivery path where a test may stop the process, to prove crash safety.

Production code calls `reach(name, **context)` at each point; with no handler
installed (always, outside the crash tests) it does nothing. The crash tests run a
worker process that installs a handler which SIGKILLs itself at the chosen point
or byte offset, then restart the worker and check the store.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Handler = Callable[[str, dict[str, Any]], None]

handler: Handler | None = None
"""Installed by the crash-test worker only."""


def reach(point: str, **context: Any) -> None:
    if handler is not None:
        handler(point, context)
