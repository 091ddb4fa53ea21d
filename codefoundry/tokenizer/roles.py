"""Roles: what the pipeline needs a token for, and which token of a given tokenizer plays it.

Our own tokenizers hold exactly the tokens of :mod:`codefoundry.tokenizer.special` at ids
0..14. A pretrained tokenizer (StarCoder, SmolLM, Qwen2.5-Coder, Llama 3) already has its own
tokens for most roles, and a model trained on it only knows those: ``<fim_prefix>`` or
``<|fim_prefix|>``, ``<|end_of_text|>``, ChatML's ``<|im_end|>``... So every role is named by
our canonical token string (the keys of ``CodeTokenizer.special_ids``) and is *played* by the
first of its aliases the tokenizer has (:data:`ALIASES`, ours first, so our tokenizers map onto
themselves). The mapping is a pure function of the vocabulary and of whether the tokenizer
comes with its own chat template, so a tokenizer JSON passed around alone (the data pipeline
ships it to workers as a string) resolves to the same ids as the checkpoint that carries it.

What is not in the vocabulary travels in a sidecar in transformers' own format,
``tokenizer_config.json`` beside ``tokenizer.json`` (:class:`TokenizerConfig`): the Jinja chat
template, the BOS/EOS strings the template refers to, and the FIM order (PSM or SPM).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codefoundry.errors import UserError
from codefoundry.tokenizer import special as sp

# Role -> tokens that play it, in order of preference (ours first).
ALIASES: dict[str, tuple[str, ...]] = {
    sp.EOT: (sp.EOT, "<|end_of_text|>", "</s>", "<eos>"),
    sp.FIM_PREFIX: (sp.FIM_PREFIX, "<fim_prefix>"),  # Qwen2.5-Coder spells it like us; StarCoder / SmolLM
    sp.FIM_MIDDLE: (sp.FIM_MIDDLE, "<fim_middle>"),
    sp.FIM_SUFFIX: (sp.FIM_SUFFIX, "<fim_suffix>"),
    sp.FIM_PAD: (sp.FIM_PAD, "<fim_pad>"),
    # Only with the model's own chat template: the token that ends an assistant turn, and the
    # tool-call delimiters the chat loop stops on (Qwen2.5 / Hermes style).
    sp.ASSISTANT_END: (sp.ASSISTANT_END, "<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"),
    sp.TOOL_CALL_START: (sp.TOOL_CALL_START, "<tool_call>"),
    sp.TOOL_CALL_END: (sp.TOOL_CALL_END, "</tool_call>"),
}
DOCUMENT_ROLES = (sp.EOT,)
FIM_ROLES = (sp.FIM_PREFIX, sp.FIM_MIDDLE, sp.FIM_SUFFIX, sp.FIM_PAD)
CHAT_ROLES = tuple(t for t in sp.SPECIAL_TOKENS if t not in DOCUMENT_ROLES + FIM_ROLES)
# What chat still needs from the vocabulary when the model brings its own template.
TEMPLATE_ROLES = (sp.ASSISTANT_END, sp.TOOL_CALL_START, sp.TOOL_CALL_END)
FIM_ORDERS = ("psm", "spm")


def needed_roles(templated: bool) -> tuple[str, ...]:
    """Every role the pipeline uses: documents, FIM, and chat (ours, or what a template leaves to us)."""
    return DOCUMENT_ROLES + FIM_ROLES + (TEMPLATE_ROLES if templated else CHAT_ROLES)


def find_roles(token_to_id, templated: bool) -> dict[str, int]:
    """Role -> id of the token playing it, for the roles this vocabulary has.

    Without a template of its own, chat renders with our template, which needs all of our chat
    tokens: then chat roles take only our own spellings (a ChatML ``<|im_end|>`` next to our
    ``<|user_start|>`` would make a template nobody trained on).
    """
    found: dict[str, int] = {}
    for role in sp.SPECIAL_TOKENS:
        spellings = ALIASES.get(role, (role,)) if templated or role not in CHAT_ROLES else (role,)
        for token in spellings:
            i = token_to_id(token)
            if i is not None:
                found[role] = i
                break
    return found


class RoleIds(dict):
    """Role -> token id; a role the tokenizer lacks is a one-line UserError naming it."""

    def __missing__(self, role: str):
        hint = ("FIM tokens" if role in FIM_ROLES else "chat tokens" if role in CHAT_ROLES else "a document separator")
        raise UserError(f"the tokenizer has no token for the role {role} ({hint}); import it with "
                        "`codefoundry tokenizer import` (which appends missing roles) or use another model")


@dataclass
class TokenizerConfig:
    """What a tokenizer needs beyond its vocabulary (the subset of transformers' tokenizer_config.json we use)."""

    chat_template: str | None = None  # Jinja, applied as transformers applies it; None: our own template
    bos_token: str | None = None  # the strings a template may print as {{ bos_token }} / {{ eos_token }}
    eos_token: str | None = None
    fim_order: str = "psm"  # psm: prefix, suffix, middle | spm: suffix, prefix, middle

    def __post_init__(self) -> None:
        if self.fim_order not in FIM_ORDERS:
            raise UserError(f"fim order {self.fim_order!r}: use one of {', '.join(FIM_ORDERS)}")

    @classmethod
    def from_hf(cls, raw: dict[str, Any], template_file: Path | None = None) -> "TokenizerConfig":
        """From a transformers tokenizer_config.json (and a ``chat_template.jinja`` beside it, as v5 saves)."""
        template = raw.get("chat_template")
        if isinstance(template, list):  # named templates: transformers uses "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template_file is not None and template_file.is_file():
            template = template_file.read_text()
        ours = raw.get("codefoundry") or {}
        return cls(template or None, _token_text(raw.get("bos_token")), _token_text(raw.get("eos_token")),
                   ours.get("fim_order", "psm"))

    def to_hf(self, roles: dict[str, str]) -> dict[str, Any]:
        """tokenizer_config.json content transformers reads; the role mapping is recorded for people."""
        out: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        for key in ("chat_template", "bos_token", "eos_token"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out["codefoundry"] = {"fim_order": self.fim_order, "roles": roles}
        return out

    def is_default(self) -> bool:
        return self == TokenizerConfig()


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def sidecar_path(tokenizer_json: str | Path) -> Path:
    """``tokenizer.json`` -> ``tokenizer_config.json`` (transformers' name); ``x.json`` -> ``x_config.json``."""
    path = Path(tokenizer_json)
    return path.with_name(f"{path.stem}_config.json")


def read_config(tokenizer_json: str | Path) -> TokenizerConfig:
    """The sidecar beside a tokenizer JSON, or the defaults (our own template, PSM) when there is none."""
    path = sidecar_path(tokenizer_json)
    if not path.is_file():
        return TokenizerConfig()
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); fix or delete it") from None
    beside = path.with_name("chat_template.jinja") if path.name == "tokenizer_config.json" else None
    return TokenizerConfig.from_hf(raw, beside)


def write_config(tokenizer_json: str | Path, config: TokenizerConfig, roles: dict[str, str]) -> None:
    """Write (or remove, for the defaults) the sidecar of a tokenizer JSON, atomically."""
    path = sidecar_path(tokenizer_json)
    if config.is_default():
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(config_text(config, roles))
    os.replace(tmp, path)


def config_text(config: TokenizerConfig, roles: dict[str, str]) -> str:
    return json.dumps(config.to_hf(roles), indent=2, ensure_ascii=False) + "\n"


def copy_tokenizer(tokenizer_json: str | Path, out_dir: str | Path) -> None:
    """Copy a tokenizer JSON and its sidecar into ``out_dir`` as tokenizer.json / tokenizer_config.json."""
    import shutil

    out_dir = Path(out_dir)
    shutil.copyfile(tokenizer_json, out_dir / "tokenizer.json")
    if sidecar_path(tokenizer_json).is_file():
        shutil.copyfile(sidecar_path(tokenizer_json), out_dir / "tokenizer_config.json")
