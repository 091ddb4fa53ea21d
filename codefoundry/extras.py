"""Optional dependencies: a missing one is a one-line :class:`UserError` naming the extra to install.

Heavy or niche libraries live in ``pyproject.toml``'s optional extras and are imported only
by the commands that use them. :func:`require` imports one and, when it is absent, tells the
user which extra brings it in, instead of a ``ModuleNotFoundError`` traceback. The CLI
prints a :class:`UserError` as one line and exits 2.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from codefoundry.errors import UserError


class MissingExtra(UserError):
    """An optional dependency is not installed."""


def require(module: str, extra: str, what: str = "") -> ModuleType:
    """Import ``module``; if it (or a library it needs) is missing, raise :class:`MissingExtra`
    saying that ``what`` (default: the module) needs ``extra``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or module
        raise MissingExtra(f"{what or module} needs the '{extra}' extra ({missing} is not installed): "
                           f"pip install 'codefoundry[{extra}]'") from None
