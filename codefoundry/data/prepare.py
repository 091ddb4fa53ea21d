"""`data prepare`: sources in, filtered, deduplicated, decontaminated, tokenized shards out.

Layout of the output directory::

    OUT/tokenizer.json      copy of the tokenizer used (the data is meaningless without it)
    OUT/train/{tokens.bin,index.npy,metadata.json}    (FIM rows here only)
    OUT/val/{tokens.bin,index.npy,metadata.json}
    OUT/val_by_<language|source>/<domain>/...         (with ``val_by``)
    OUT/prepare.json        fingerprint of the command + summary: a rerun returns at once

Each document is stored as ``[EOT] + tokens``; ``metadata.json`` holds ``bytes`` (UTF-8 bytes of
the original documents, which bits-per-byte divides by), per-language counts, what every
filter removed (``removed``) and the inputs skipped as unreadable (``skipped``). The stages
themselves are in :mod:`codefoundry.data.pipeline`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from codefoundry.data.executors import ExecutorOptions
from codefoundry.data.pipeline import PrepareOptions, prepare_pipeline
from codefoundry.data.readers import SourceSpec
from codefoundry.errors import UserError
from codefoundry.tokenizer import CodeTokenizer
from codefoundry.tokenizer import special as sp


def prepare(sources: list[Path | str | SourceSpec], tokenizer: CodeTokenizer, out_dir: Path | str,
            val_fraction: float = 0.04, languages: set[str] | None = None, show_progress: bool = True,
            execution: ExecutorOptions | None = None, **options: Any) -> dict[str, Any]:
    """Run the data pipeline; returns per-split metadata (``documents``, ``tokens``, ``bytes``, ...).

    ``out_dir`` and the sources may be fsspec URLs. ``options`` are the fields of
    :class:`PrepareOptions` (``fim_rate``, ``workers``, ``max_tokens``...); ``execution`` picks the
    executor (local by default, Ray or Slurm).
    """
    specs = [s if isinstance(s, SourceSpec) else SourceSpec.parse(str(s)) for s in sources]
    names = [s.name for s in specs]
    if len(set(names)) < len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UserError(f"two sources are both named {dup!r} (the last path component); pass distinct folders")
    opt = PrepareOptions(val_fraction=val_fraction, languages=sorted(languages) if languages else None, **options)
    if opt.fim_rate > 0:  # fail here, in one line, before any worker starts or anything is written
        for role in (sp.FIM_PREFIX, sp.FIM_MIDDLE, sp.FIM_SUFFIX):
            tokenizer.special_ids[role]
    return prepare_pipeline(specs, tokenizer, str(out_dir), opt, show_progress=show_progress, execution=execution)
