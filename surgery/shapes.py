"""What surgery needs to know about the base, the donor and the target, and whether they can be grafted.

Everything here reads config.json only (cheap, before any tensor); every refusal is a one-line UserError that
names the width or setting at fault and what to do about it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from pipeline.config import TargetWidths
from pipeline.errors import UserError

log = logging.getLogger(__name__)

WIDTH_FLAGS = {
    "hidden_size": "--hidden-size",
    "num_attention_heads": "--num-attention-heads",
    "num_key_value_heads": "--num-key-value-heads",
    "intermediate_size": "--intermediate-size",
}


@dataclass(frozen=True)
class Widths:
    """The four widths surgery changes, plus head_dim, which it never changes."""

    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    head_dim: int

    @property
    def heads_per_kv_group(self) -> float:
        return self.num_attention_heads / self.num_key_value_heads

    def dim(self, axis: str) -> int:
        """Length of one axis of a Llama weight: hidden, q (all query heads), kv (all kv heads) or inter."""
        return {
            "hidden": self.hidden_size,
            "q": self.num_attention_heads * self.head_dim,
            "kv": self.num_key_value_heads * self.head_dim,
            "inter": self.intermediate_size,
        }[axis]

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class ModelShape:
    """One Llama checkpoint as surgery sees it: its folder, raw config and the settings that must match."""

    role: str  # "base" or "donor", for messages
    folder: Path
    config: dict
    widths: Widths
    num_hidden_layers: int
    vocab_size: int
    tie_word_embeddings: bool
    rope: dict
    rms_norm_eps: float


# LlamaConfig's defaults for keys a config.json may leave out. Read by hand rather than through transformers'
# LlamaConfig: importing transformers costs 1.5-3 s per surgery run, a tenth of widening a 1B model.
LLAMA_DEFAULTS = {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 10000.0}
REQUIRED_KEYS = ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers", "vocab_size")


def rope_settings(config: dict) -> dict:
    """rope_parameters in transformers 5's form, also from older files (rope_theta + rope_scaling at top level)."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params.setdefault("rope_theta", config.get("rope_theta", LLAMA_DEFAULTS["rope_theta"]))
    params["rope_type"] = params.get("rope_type") or params.pop("type", None) or "default"
    params.pop("type", None)
    params["rope_theta"] = float(params["rope_theta"])
    return params


def _load_llama_config(folder: Path, role: str) -> dict:
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{role} {path} cannot be read ({err}); re-download the model") from None
    model_type = raw.get("model_type")
    architectures = raw.get("architectures") or ["LlamaForCausalLM"]
    if model_type != "llama" or "LlamaForCausalLM" not in architectures:
        raise UserError(
            f"{role} {folder} is a {model_type!r} model ({', '.join(architectures)}), not a Llama-architecture "
            "causal LM; surgery widens LlamaForCausalLM checkpoints only, pick a Llama base and donor"
        )
    for key in ("attention_bias", "mlp_bias"):
        if raw.get(key):
            raise UserError(f"{role} {path} sets {key}: true; surgery handles bias-free Llamas only")
    for key in REQUIRED_KEYS:
        if not isinstance(raw.get(key), int) or raw[key] <= 0:
            raise UserError(f"{role} {path}: {key} is missing or not a positive integer; fix or re-download it")
    return raw


def read_model_shape(folder: Path, role: str) -> ModelShape:
    config = _load_llama_config(folder, role)
    heads = config["num_attention_heads"]
    widths = Widths(
        hidden_size=config["hidden_size"],
        num_attention_heads=heads,
        num_key_value_heads=config.get("num_key_value_heads") or heads,
        intermediate_size=config["intermediate_size"],
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
    )
    if widths.num_attention_heads % widths.num_key_value_heads:
        raise UserError(
            f"{role} {folder}/config.json: {widths.num_attention_heads} heads do not split into "
            f"{widths.num_key_value_heads} kv groups; the config is broken"
        )
    return ModelShape(
        role=role,
        folder=folder,
        config=config,
        widths=widths,
        num_hidden_layers=config["num_hidden_layers"],
        vocab_size=config["vocab_size"],
        tie_word_embeddings=bool(config.get("tie_word_embeddings", LLAMA_DEFAULTS["tie_word_embeddings"])),
        rope=rope_settings(config),
        rms_norm_eps=float(config.get("rms_norm_eps", LLAMA_DEFAULTS["rms_norm_eps"])),
    )


def check_donor_matches(base: ModelShape, donor: ModelShape) -> None:
    """Refuse donors whose heads, vocabulary or positions cannot be grafted onto the base."""
    for field in fields(Widths):
        name = field.name
        if name == "head_dim":
            continue
        have, need = getattr(donor.widths, name), getattr(base.widths, name)
        if have < need:
            raise UserError(
                f"the donor is narrower than the base in {name} ({have} < {need}); pick a donor at least as "
                "wide as the base in every width"
            )
    if donor.vocab_size != base.vocab_size:
        raise UserError(
            f"vocab sizes differ (base {base.vocab_size}, donor {donor.vocab_size}); the donor must share the "
            "base's tokenizer and vocabulary"
        )
    if donor.widths.head_dim != base.widths.head_dim:
        raise UserError(
            f"head_dim differs (base {base.widths.head_dim}, donor {donor.widths.head_dim}); heads cannot be "
            f"grafted across head sizes, pick a donor with head_dim {base.widths.head_dim}"
        )
    if donor.rope != base.rope:
        raise UserError(
            f"rope settings differ (base {base.rope}, donor {donor.rope}); the donor's heads were trained with "
            "other positions, pick a donor with the base's rope_theta and rope scaling"
        )
    if donor.widths.heads_per_kv_group != base.widths.heads_per_kv_group:
        raise UserError(
            f"heads per kv group differ (base {base.widths.heads_per_kv_group:g}, donor "
            f"{donor.widths.heads_per_kv_group:g}); the donor's query heads would pair with the wrong kv heads, "
            "pick a donor with the base's num_attention_heads / num_key_value_heads ratio"
        )


def target_widths(base: ModelShape, donor: ModelShape | None, requested: TargetWidths) -> Widths:
    """The grown model's widths: the requested ones, else the donor's; between the base's and the donor's.

    Equal to the base's is allowed here: a run may grow depth only (the plan refuses growing nothing)."""
    values: dict[str, int] = {}
    missing = []
    for name, flag in WIDTH_FLAGS.items():
        value = getattr(requested, name)
        if value is None:
            if donor is None:
                missing.append(flag)
                continue
            value = getattr(donor.widths, name)
        values[name] = value
    if missing:
        raise UserError(
            f"--donor random needs every target width; add {' '.join(f'{flag} N' for flag in missing)} "
            "(or surgery.target.* in the config)"
        )
    target = Widths(**values, head_dim=base.widths.head_dim)
    for name, flag in WIDTH_FLAGS.items():
        want, floor = getattr(target, name), getattr(base.widths, name)
        if want < floor:
            raise UserError(f"target {name} {want} is below the base's {floor}; surgery only widens, raise {flag}")
        if donor is not None and want > getattr(donor.widths, name):
            raise UserError(
                f"target {name} {want} is wider than the donor's {getattr(donor.widths, name)}; lower {flag} "
                "or pick a wider donor"
            )
    if target.num_attention_heads % target.num_key_value_heads or (
        target.heads_per_kv_group != base.widths.heads_per_kv_group
    ):
        raise UserError(
            f"target {target.num_attention_heads} heads over {target.num_key_value_heads} kv heads changes the "
            f"heads per kv group from the base's {base.widths.heads_per_kv_group:g}; new query heads must map to "
            f"new kv heads, so keep num_attention_heads / num_key_value_heads at "
            f"{base.widths.heads_per_kv_group:g}"
        )
    if target.hidden_size % target.num_attention_heads:
        raise UserError(
            f"target hidden_size {target.hidden_size} is not a multiple of its {target.num_attention_heads} heads; "
            "transformers refuses to load such a Llama config, choose a hidden size divisible by the head count"
        )
    return target
