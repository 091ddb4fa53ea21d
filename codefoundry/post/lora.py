"""LoRA fine-tuning through ``peft``: adapters on our model's linear layers, saved on their own, merged for export.

``apply_lora`` injects peft's LoRA layers into our :class:`~codefoundry.model.Transformer` *in
place* (``peft.inject_adapter_in_model``), so the result is still our model: the trainer, the
KV cache, DDP and checkpoint unwrapping see the same object, and only the adapter weights
require gradients. Target names are the transformers ones (``q_proj``, ``k_proj``, ``v_proj``,
``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``), which our attention and MLP modules
share, so a spec written for a Llama/Qwen recipe means the same layers here; ``all-linear``
takes all seven. ``save_adapter`` writes the PEFT layout (``adapter_config.json`` +
``adapter_model.safetensors``) holding only the adapter weights, under our module names;
``merge_lora`` folds each adapter into its base weight with peft's own merge and hands back
a plain Transformer that every export and loader takes unchanged.

``sft --lora`` / ``dpo --lora`` train through :class:`LoraWeights`, the engine's
``Stage.partial`` hook: each checkpoint's model.safetensors is the merged model (so eval,
generate and export read it unchanged), its train_state.pt holds the adapter weights for an
exact resume, and the run ends with the adapter alone in OUT/adapter/.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from codefoundry.config import TrainConfig
from codefoundry.errors import UserError

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER = "default"


@dataclass
class LoraSpec:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


def parse_lora_spec(spec: str) -> LoraSpec:
    """``"r=16,alpha=32,targets=q_proj,v_proj"`` -> LoraSpec; bare names after ``targets=`` extend the list."""
    values: dict[str, list[str]] = {}
    key = None
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if "=" in part:
            key, _, value = part.partition("=")
            key = key.strip()
            values[key] = [value.strip()]
        elif key == "targets":
            values[key].append(part)
        else:
            raise UserError(f"--lora {spec!r}: write key=value pairs, e.g. r=16,alpha=32,targets=q_proj,v_proj")
    unknown = set(values) - {"r", "alpha", "dropout", "targets"}
    if unknown:
        raise UserError(f"--lora: unknown keys {sorted(unknown)} (known: r, alpha, dropout, targets)")
    out = LoraSpec()
    try:
        if "r" in values:
            out.r = int(values["r"][0])
        out.alpha = float(values["alpha"][0]) if "alpha" in values else 2.0 * out.r
        if "dropout" in values:
            out.dropout = float(values["dropout"][0])
    except ValueError:
        raise UserError(f"--lora {spec!r}: r must be an integer, alpha and dropout numbers") from None
    if "targets" in values:
        out.targets = list(TARGETS) if values["targets"] == ["all-linear"] else values["targets"]
    bad = [t for t in out.targets if t not in TARGETS]
    if bad or out.r < 1 or not 0 <= out.dropout < 1:
        raise UserError(f"--lora {spec!r}: r >= 1, 0 <= dropout < 1, targets among {', '.join(TARGETS)} "
                        f"or all-linear{f' (not {bad})' if bad else ''}")
    return out


def _peft():
    try:
        import peft
    except ImportError:
        raise UserError("LoRA needs peft: pip install 'codefoundry[post]'") from None
    return peft


def lora_config(spec: LoraSpec):
    return _peft().LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                              target_modules=list(spec.targets), bias="none")


def apply_lora(model: torch.nn.Module, spec: LoraSpec | str) -> torch.nn.Module:
    """``model`` with LoRA adapters on the targeted linears; every other parameter frozen."""
    spec = parse_lora_spec(spec) if isinstance(spec, str) else spec
    peft = _peft()
    try:
        model = peft.inject_adapter_in_model(lora_config(spec), model, adapter_name=ADAPTER)
    except ValueError as exc:  # peft: no module matched the targets
        raise UserError(f"--lora targets {spec.targets} match no layer of this model ({exc})") from None
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    model.lora_spec = spec
    return model


def lora_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def save_adapter(model: torch.nn.Module, out: str | Path) -> Path:
    """The adapters alone, in PEFT's layout (adapter_config.json, adapter_model.safetensors)."""
    from safetensors.torch import save_file

    peft = _peft()
    spec: LoraSpec | None = getattr(model, "lora_spec", None)
    if spec is None or not lora_layers(model):
        raise UserError("this model has no LoRA adapters to save; apply_lora first")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = peft.get_peft_model_state_dict(model, adapter_name=ADAPTER)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(out / "adapter_model.safetensors"))
    lora_config(spec).save_pretrained(str(out))
    return out


def load_adapter(model: torch.nn.Module, adapter_dir: str | Path) -> torch.nn.Module:
    """``model`` with the adapters saved in ``adapter_dir`` (its spec read from adapter_config.json)."""
    from safetensors.torch import load_file

    peft = _peft()
    adapter_dir = Path(adapter_dir)
    try:
        raw = json.loads((adapter_dir / "adapter_config.json").read_text())
        weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{adapter_dir} is not a LoRA adapter directory ({exc.__class__.__name__}); "
                        "save one with save_adapter") from None
    spec = LoraSpec(r=raw["r"], alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout", 0.0),
                    targets=sorted(raw["target_modules"]))
    model = apply_lora(model, spec)
    try:
        result = peft.set_peft_model_state_dict(model, weights, adapter_name=ADAPTER)
    except RuntimeError as exc:  # size mismatch: an adapter trained on another architecture
        reason = str(exc).splitlines()[-1].strip()
        raise UserError(f"adapter {adapter_dir} does not fit this model ({reason})") from None
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise UserError(f"adapter {adapter_dir} does not fit this model (e.g. {unexpected[0]})")
    return model


@torch.no_grad()
def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """A plain model: each adapter folded into its base weight (W + alpha/r * B A), LoRA layers removed."""
    for name, layer in lora_layers(model):
        layer.merge(adapter_names=[ADAPTER])
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.get_base_layer())
    if hasattr(model, "lora_spec"):
        del model.lora_spec
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def merge_adapter_checkpoint(base: str | Path, adapter_dir: str | Path, out: str | Path) -> Path:
    """A plain checkpoint ``out``: the base checkpoint with the adapters of ``adapter_dir`` merged in,
    its tokenizer (and chat template) carried over; what ``codefoundry export`` then takes."""
    from codefoundry.checkpoint import load_model, read_model_config, save_checkpoint

    model, _ = load_model(base)
    _, raw = read_model_config(base)
    merged = merge_lora(load_adapter(model, adapter_dir))
    return save_checkpoint(out, merged, Path(base) / "tokenizer.json", preset=raw.get("preset", ""))


@torch.no_grad()
def merged_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A plain Transformer whose weights are ``model``'s with each adapter folded in (W + alpha/r * B A),
    leaving ``model`` and its adapters untouched (training goes on after a checkpoint)."""
    from codefoundry.checkpoint import model_from_weights

    deltas = {f"{name}.weight": layer.get_delta_weight(ADAPTER) for name, layer in lora_layers(model)}
    weights = {}
    for key, tensor in model.state_dict().items():
        if "lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        weights[key] = tensor + deltas[key].to(tensor.dtype) if key in deltas else tensor
    return model_from_weights(dataclasses.replace(model.cfg), weights)


class LoraWeights:
    """A LoRA run as the training engine checkpoints it (``Stage.partial``): the merged model for
    model.safetensors, the adapter weights as the trained state."""

    def __init__(self, model: torch.nn.Module, spec: LoraSpec | str, tc: TrainConfig) -> None:
        if tc.linear_precision != "default":
            raise UserError(f"--lora trains in the default linear precision; drop train.linear_precision="
                            f"{tc.linear_precision}")
        self.model = apply_lora(model, spec)
        self.spec: LoraSpec = self.model.lora_spec

    def plain(self) -> torch.nn.Module:
        return merged_copy(self.model)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items() if "lora_" in k}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [k for k in missing if "lora_" in k]
        if missing or unexpected:
            raise UserError(f"the checkpoint's adapters differ from --lora {self.spec} (e.g. "
                            f"{(missing or unexpected)[0]}); resume with the --lora it was trained with")

    def finish(self, out: str | Path, is_main: bool) -> dict:
        """Write the adapter alone to OUT/adapter (main rank); the summary's LoRA entries."""
        adapter = Path(out) / "adapter"
        if is_main:
            save_adapter(self.model, adapter)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return {"lora": dataclasses.asdict(self.spec), "adapter": str(adapter), "trainable_params": trainable}
