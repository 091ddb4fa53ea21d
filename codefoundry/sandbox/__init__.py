"""Running untrusted programs: the evaluation harness's candidate programs and the agent's
shell commands go through the same sandbox (namespaces, rlimits, an unprivileged uid, no
network), so it sits below both ``eval/`` and ``infer/``.

* :mod:`~codefoundry.sandbox.runner` — the worker pool and the command runner (the API)
* ``launcher.py`` — the stdlib-only script each worker runs (``python -I``)
* ``wire.py`` — the value-and-call protocol between a program and its checker
"""
