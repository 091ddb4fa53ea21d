"""Run an exported GGUF file in llama.cpp itself: greedy tokens and next-token logits from token ids.

Two users: the test that our GGUF export means to llama.cpp what our checkpoint means to us
(same greedy tokens, close logits), and the decode benchmark's llama.cpp column. Both start
from token ids, which llama-cpp-py-sync's high-level ``Llama`` class does not take (it starts
from text and samples through its own chain), so this drives llama.cpp's public C API
through the CFFI handles the package documents for that (``_cffi_bindings.get_lib/get_ffi``).
The package ships a prebuilt CPU ``libllama`` in its wheel (``llama-cpp-python`` builds
llama.cpp from source, which takes too long on small machines); it is imported lazily.

That prebuilt library needs glibc 2.38 (its ``manylinux2014`` tag says otherwise). On an older
system, build llama.cpp's ``libllama`` from a source tree whose ``include/llama.h`` matches the
installed bindings (``llama_cpp_py_sync.__llama_cpp_commit__``, or pick the bindings release that
matches your tree), e.g. ``cmake -B build -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF && cmake --build
build --target llama``, and point ``LLAMA_CPP_LIB`` at ``build/bin/libllama.so``: it is opened with
the package's own declarations, so a mismatched header means wrong struct layouts.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from codefoundry.errors import UserError
from codefoundry.extras import require

_LIB = None  # the opened library, once per process
_QUIET_LOG = None  # the no-op log callback, kept alive for as long as llama.cpp may call it


class LlamaCppUnavailable(UserError):
    """llama-cpp-py-sync is installed but its library cannot be opened on this system."""


def open_library():
    """(lib, ffi) of llama.cpp (``LLAMA_CPP_LIB`` if set, else the bundled one), its load-time chatter silenced."""
    global _LIB, _QUIET_LOG
    cffi = require("llama_cpp_py_sync._cffi_bindings")
    ffi = cffi.get_ffi()
    if _LIB is None:
        own = os.environ.get("LLAMA_CPP_LIB")
        try:
            lib = ffi.dlopen(own) if own else cffi.get_lib()
        except (OSError, RuntimeError) as exc:
            reason = str(exc).split(".  ")[0]  # the loader's first sentence names the missing piece
            raise LlamaCppUnavailable(f"llama.cpp's library does not load here ({reason}); build one and set "
                                      "LLAMA_CPP_LIB, as codefoundry/export/llamacpp.py says") from None
        _QUIET_LOG = ffi.callback("ggml_log_callback", lambda level, text, data: None)
        lib.llama_log_set(_QUIET_LOG, ffi.NULL)
        lib.llama_backend_init()
        _LIB = lib
    return _LIB, ffi


class LlamaCpp:
    """One GGUF model and one llama.cpp context on the CPU, ``threads`` threads for every step."""

    def __init__(self, path: str | Path, threads: int, n_ctx: int = 512) -> None:
        self.lib, self.ffi = lib, ffi = open_library()
        model_params = lib.llama_model_default_params()
        model_params.n_gpu_layers = 0
        self.model = lib.llama_model_load_from_file(str(path).encode(), model_params)
        if self.model == ffi.NULL:
            raise RuntimeError(f"llama.cpp could not load {path}")
        ctx_params = lib.llama_context_default_params()
        ctx_params.n_ctx = ctx_params.n_batch = ctx_params.n_ubatch = n_ctx
        ctx_params.n_threads = ctx_params.n_threads_batch = threads
        self.ctx = lib.llama_init_from_model(self.model, ctx_params)
        if self.ctx == ffi.NULL:
            lib.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not create a context for {path}")
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.n_past = 0

    def reset(self) -> None:
        """Forget every position (a new prompt starts at 0)."""
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        self.n_past = 0

    def eval(self, ids: Sequence[int]) -> np.ndarray:
        """Append ``ids`` to the context; the logits (n_vocab,) that follow the last of them (a copy)."""
        tokens = self.ffi.new("llama_token[]", list(ids))
        if self.lib.llama_decode(self.ctx, self.lib.llama_batch_get_one(tokens, len(ids))) != 0:
            raise RuntimeError(f"llama_decode failed after {self.n_past} positions")
        self.n_past += len(ids)
        logits = self.lib.llama_get_logits_ith(self.ctx, -1)
        return np.frombuffer(self.ffi.buffer(logits, 4 * self.n_vocab), dtype=np.float32).copy()

    def greedy(self, prompt: Sequence[int], max_new: int) -> Iterator[int]:
        """Greedy continuation of ``prompt`` from an empty context, one token at a time."""
        self.reset()
        logits = self.eval(prompt)
        for _ in range(max_new):  # step after yielding, as our generate_tokens does: same work per token
            token = int(logits.argmax())
            yield token
            logits = self.eval([token])

    def close(self) -> None:
        if self.ctx is not None:
            self.lib.llama_free(self.ctx)
            self.lib.llama_model_free(self.model)
            self.ctx = self.model = None

    def __enter__(self) -> LlamaCpp:  # noqa: PYI034  (typing.Self needs Python 3.11)
        return self

    def __exit__(self, *exc) -> None:
        self.close()
