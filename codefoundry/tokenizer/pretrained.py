"""Adopt a pretrained tokenizer: its own tokens for every role it has, ours appended for the rest.

Used by ``codefoundry tokenizer import`` (train from scratch on StarCoder's or Qwen2.5-Coder's
vocabulary) and by the model imports (``import --from hf|gguf``), which grow the embedding by
the rows of whatever had to be appended. See :mod:`codefoundry.tokenizer.roles` for how roles
map onto tokens.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from tokenizers import AddedToken, Tokenizer

from codefoundry.errors import UserError
from codefoundry.tokenizer.bpe import CodeTokenizer
from codefoundry.tokenizer.roles import (
    TokenizerConfig,
    find_roles,
    needed_roles,
    sidecar_path,
)


@dataclass
class Adopted:
    tokenizer: CodeTokenizer
    appended: list[str]  # roles that had no token and got ours, in id order

    def appended_ids(self) -> list[int]:
        return [self.tokenizer.special_ids[r] for r in self.appended]

    def report(self) -> list[str]:
        """One line per role: which token plays it, and whether it was appended."""
        tok = self.tokenizer
        lines = []
        for role, token in tok.role_tokens().items():
            mark = " (appended, untrained)" if role in self.appended else ""
            lines.append(f"{role:22s} -> {token} (id {tok.special_ids[role]}){mark}")
        template = "its own chat template" if tok.config.chat_template else "codefoundry's chat template"
        lines.append(f"chat: {template}; FIM order {tok.config.fim_order.upper()}")
        return lines


def adopt(tk: Tokenizer, config: TokenizerConfig, append: bool = True) -> Adopted:
    """``tk`` with our tokens appended (as special tokens) for the roles it has no token for."""
    found = find_roles(tk.token_to_id, config.chat_template is not None)
    missing = [r for r in needed_roles(config.chat_template is not None) if r not in found] if append else []
    tk.add_special_tokens([AddedToken(r, special=True, normalized=False) for r in missing])
    return Adopted(CodeTokenizer(tk, config), missing)


def read_hf_tokenizer(source: str | Path) -> tuple[Tokenizer, TokenizerConfig]:
    """A tokenizer and its config from a transformers directory, a tokenizer.json, or ``hf:NAME``."""
    if isinstance(source, str) and source.startswith("hf:"):
        return _from_hub(source[3:])
    path = Path(source)
    json_path = path / "tokenizer.json" if path.is_dir() else path
    if not json_path.is_file():
        raise UserError(f"{source}: no tokenizer.json found (a slow-only tokenizer must be saved by transformers "
                        "as a fast one first: AutoTokenizer.from_pretrained(...).save_pretrained(DIR))")
    try:
        tk = Tokenizer.from_file(str(json_path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
        raise UserError(f"{json_path} is not a valid tokenizers JSON file ({exc})") from None
    # Older saves keep BOS/EOS in special_tokens_map.json; tokenizer_config.json wins where both say.
    raw = {**_read_json(json_path.with_name("special_tokens_map.json")), **_read_json(sidecar_path(json_path))}
    return tk, TokenizerConfig.from_hf(raw, json_path.with_name("chat_template.jinja"))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc})") from None
    return raw if isinstance(raw, dict) else {}


def _from_hub(name: str) -> tuple[Tokenizer, TokenizerConfig]:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UserError("hf:NAME tokenizers need transformers: pip install 'codefoundry[hf]'") from None
    try:
        hf_tok = AutoTokenizer.from_pretrained(name)
    except OSError as exc:
        reason = str(exc).splitlines()[0]
        raise UserError(f"cannot load tokenizer {name!r} from the Hugging Face Hub ({reason})") from None
    with tempfile.TemporaryDirectory() as tmp:
        hf_tok.save_pretrained(tmp)
        return read_hf_tokenizer(tmp)


def import_tokenizer(source: str | Path, out: str | Path, append: bool = True, fim_order: str | None = None
                     ) -> Adopted:
    """Write ``out`` (tokenizer.json) and its sidecar from a pretrained tokenizer; nothing partial on error."""
    tk, config = read_hf_tokenizer(source)
    if fim_order:
        config = replace(config, fim_order=fim_order)
    adopted = adopt(tk, config, append)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        staged = Path(tmp) / out.name
        adopted.tokenizer.save(staged)
        if sidecar_path(staged).is_file():
            os.replace(sidecar_path(staged), sidecar_path(out))
        else:
            sidecar_path(out).unlink(missing_ok=True)
        os.replace(staged, out)
    return adopted
