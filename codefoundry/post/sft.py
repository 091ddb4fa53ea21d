"""Supervised fine-tuning: train a checkpoint on chat conversations, loss on assistant tokens only.

Conversations are rendered with the chat template (:mod:`codefoundry.tokenizer.chat`),
mixed by source weight and packed into rows with document masking, so packed
conversations never see each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from codefoundry.checkpoint import load_model
from codefoundry.config import TrainConfig
from codefoundry.errors import UserError
from codefoundry.post.loop import fit, save_result, setup
from codefoundry.post.sft_data import (
    LoadReport,
    Mixture,
    Source,
    pack_batches,
    render_examples,
)

SFT_DEFAULTS: dict[str, Any] = {"lr": 1e-4, "max_steps": 300, "batch_size": 8, "seq_len": 1024,
                                "schedule": "cosine", "warmup_steps": 10, "weight_decay": 0.0, "log_every": 10}


def sft(checkpoint: str | Path, sources: list[Source], out: str | Path, tc: TrainConfig,
        show_progress: bool = True) -> dict[str, Any]:
    """Fine-tune ``checkpoint`` on ``sources``; writes out/checkpoint, metrics.jsonl, summary.json."""
    if not sources:
        raise UserError("give at least one --data source")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rt = setup(tc)
    model, tok = load_model(checkpoint, rt.device)
    seq_len = min(tc.seq_len, model.cfg.max_seq_len)
    reports, sets = [], []
    for src in sources:
        report = LoadReport()
        sets.append(render_examples(src.records(), tok, seq_len, report))
        reports.append(report)
        if show_progress:
            print(f"sft data {src.location} (weight {src.weight:g}): {report}")
    batches = pack_batches(iter(Mixture(sets, [s.weight for s in sources], tc.seed)), tc.batch_size, seq_len,
                           tok.eot_id, rt.device)

    def step_loss():
        x, y = next(batches)
        return model(x, y), {}

    # Packed conversations each open with EOT; document masking keeps them apart. The switch is
    # a training-time setting, so the saved config keeps the checkpoint's own value.
    saved = model.cfg.doc_mask, model.cfg.doc_sep_id
    model.cfg.doc_mask, model.cfg.doc_sep_id = True, tok.eot_id
    try:
        records = fit(model, tc, rt, step_loss, out, "sft", show_progress)
    finally:
        model.cfg.doc_mask, model.cfg.doc_sep_id = saved
    data = {src.location: {"weight": src.weight, "kept": r.kept, "skipped": dict(r.skipped)}
            for src, r in zip(sources, reports)}
    save_result(model, checkpoint, out, records, {"data": data, "first": records[0]})
    return {"checkpoint": str(out / "checkpoint"), "first": records[0], "final": records[-1], "data": data}
