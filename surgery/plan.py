"""The surgery plan: every output tensor with its shape, dtype and sources, known before any tensor is computed.

The plan is what `--dry-run` prints, what the writer lays its shard headers out from, and what tests inspect.
Building it reads only config.json files and safetensors headers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from pipeline.checkpoint import TensorIndex, TensorSpec
from pipeline.errors import UserError
from surgery.blocks import EXACT_MODES, FILL_MODES, LEGACY_MODES, Role, norm_compensation, widened_rms_norm_eps
from surgery.depth import LayerSource, layer_layout
from surgery.shapes import ModelShape, Widths

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# Llama linears: (role, output axis, input axis), axes as in Widths.dim.
LINEARS: dict[str, tuple[Role, str, str]] = {
    "self_attn.q_proj": ("reader", "q", "hidden"),
    "self_attn.k_proj": ("reader", "kv", "hidden"),
    "self_attn.v_proj": ("reader", "kv", "hidden"),
    "self_attn.o_proj": ("writer", "hidden", "q"),
    "mlp.gate_proj": ("reader", "inter", "hidden"),
    "mlp.up_proj": ("reader", "inter", "hidden"),
    "mlp.down_proj": ("writer", "hidden", "inter"),
}
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")
EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
FINAL_NORM = "model.norm.weight"
# Buffers some older checkpoints carry; transformers recomputes them, so they are neither read nor written.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def expected_tensors(model: ModelShape) -> dict[str, tuple[int, ...]]:
    """Every tensor a LlamaForCausalLM checkpoint of these widths holds, with its shape."""
    widths, hidden = model.widths, model.widths.hidden_size
    shapes: dict[str, tuple[int, ...]] = {EMBED: (model.vocab_size, hidden)}
    for layer in range(model.num_hidden_layers):
        prefix = layer_prefix(layer)
        for suffix, (_, out_axis, in_axis) in LINEARS.items():
            shapes[f"{prefix}{suffix}.weight"] = (widths.dim(out_axis), widths.dim(in_axis))
        for norm in LAYER_NORMS:
            shapes[f"{prefix}{norm}.weight"] = (hidden,)
    shapes[FINAL_NORM] = (hidden,)
    if not model.tie_word_embeddings:
        shapes[LM_HEAD] = (model.vocab_size, hidden)
    return shapes


def check_checkpoint(reader: TensorIndex, model: ModelShape) -> None:
    """Refuse a checkpoint whose tensors are not exactly those its config.json describes (headers only)."""
    expected = expected_tensors(model)
    present = {name for name in reader.names if not name.endswith(IGNORED_SUFFIXES)}
    if model.tie_word_embeddings:
        present.discard(LM_HEAD)  # some tied checkpoints store the shared matrix twice
    for name in sorted(expected):
        if name not in present:
            raise UserError(
                f"{model.role} {model.folder}: tensor {name} is missing (config.json describes "
                f"{model.num_hidden_layers} layers); the checkpoint is incomplete, re-download or re-save it"
            )
    extra = sorted(present - set(expected))
    if extra:
        raise UserError(
            f"{model.role} {model.folder}: unexpected tensor {extra[0]} (and {len(extra) - 1} more); this is not a "
            "plain LlamaForCausalLM checkpoint matching its config.json, re-save it with transformers"
        )
    for name, shape in expected.items():
        actual = reader.shape(name)
        if actual != shape:
            raise UserError(
                f"{model.role} {model.folder}: tensor {name} has shape {list(actual)} but config.json implies "
                f"{list(shape)}; the weights and the config disagree, fix config.json or re-download"
            )


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: where its pieces come from and by which rule they are put together."""

    name: str
    kind: str  # q_proj, ..., down_proj, input_layernorm, post_attention_layernorm, norm, embed_tokens, lm_head
    # linear | columns | norm | ones, and for new layers: cut (the donor region as it is) | zeros
    rule: str
    shape: tuple[int, ...]
    base_source: str | None
    donor_source: str | None = None  # donor tensor name; with a random donor, the output name seeds it
    donor_region: tuple[tuple[int, int], ...] | None = None  # (start, stop) per axis of the donor tensor
    role: Role | None = None
    layer: int | None = None  # the output layer
    donor_layer: int | None = None
    fill: str = ""  # human-readable block layout, for the printed plan
    # A `copy` new layer's tensor is built exactly as this earlier output tensor is (random blocks included)
    copy_of: str | None = None

    @property
    def seed_name(self) -> str:
        """The name a random donor block is seeded by: a copy must draw the same values as its original."""
        return self.copy_of or self.name


@dataclass
class SurgeryPlan:
    base: ModelShape
    donor: ModelShape | None  # None: a random donor
    target: Widths
    mode: str
    legacy: bool
    layer_map: str
    dtype: str
    seed: int
    max_shard_bytes: int
    donor_layers: list[int]
    tie_word_embeddings: bool
    rms_norm_eps: float
    layers: list[LayerSource] = field(default_factory=list)  # one per output layer
    new_layers: str | None = None  # donor | copy when depth grows, else None
    tensors: list[TensorPlan] = field(default_factory=list)

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layers)

    @property
    def exact(self) -> bool:
        return self.mode in EXACT_MODES and not self.legacy

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def specs(self) -> list[TensorSpec]:
        return [TensorSpec(t.name, t.shape, self.torch_dtype) for t in self.tensors]

    @property
    def bytes_to_write(self) -> int:
        return sum(spec.nbytes for spec in self.specs())

    @property
    def params_before(self) -> int:
        return sum(math.prod(shape) for shape in expected_tensors(self.base).values())

    @property
    def params_after(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors)

    @property
    def exactness(self) -> str:
        if self.legacy:
            return "not exact: --legacy reproduces the 2023 script, which skipped the RMSNorm compensation"
        if self.mode == "block_triangular":
            return "not exact: new heads read base features and write into the new dims, changing every RMS"
        return "exact: the base's logits are reproduced (fp32 up to rounding; bf16/fp16 output adds rounding)"

    def summary(self) -> dict:
        """What the manifest records about the plan."""
        return {
            "mode": self.mode,
            "legacy": self.legacy,
            "layer_map": self.layer_map,
            "donor_layers": self.donor_layers,
            "dtype": self.dtype,
            "seed": self.seed,
            "exact": self.exact,
            "base_widths": self.base.widths.as_dict(),
            "target_widths": self.target.as_dict(),
            "num_hidden_layers": self.num_hidden_layers,
            "base_num_hidden_layers": self.base.num_hidden_layers,
            "new_layers": self.new_layers,
            "layer_sources": [source.as_dict() for source in self.layers],
            "tie_word_embeddings": self.tie_word_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "bytes_to_write": self.bytes_to_write,
            "tensors": len(self.tensors),
        }

    def render(self, free_disk: int | None = None) -> str:
        """The plan as `--dry-run` prints it: a header with the totals, then one line per output tensor."""
        donor = "random (seeded normal, std of the matching base tensor)" if self.donor is None else self.donor.folder
        widens = self.target != self.base.widths
        lines = [
            f"base:   {self.base.folder}",
            f"donor:  {donor}",
            f"widths: {_widths_line(self.base.widths)}  ->  {_widths_line(self.target)}",
            f"mode:   {self.mode}{' (legacy 2023 construction)' if self.legacy else ''}; {self.exactness}",
            f"layers: {self.base.num_hidden_layers} -> {self.num_hidden_layers}"
            + (f", new layers from: {self.new_layers}" if self.new_layers else "")
            + f"; donor layer per target layer ({self.layer_map}): "
            f"{self.donor_layers if self.donor is not None else 'n/a (random)'}",
            f"rms_norm_eps: {self.base.rms_norm_eps:g} -> {self.rms_norm_eps:g}; tied embeddings: "
            f"{self.base.tie_word_embeddings} -> {self.tie_word_embeddings}",
            f"params: {self.params_before:,} -> {self.params_after:,}",
            f"write:  {_gb(self.bytes_to_write)} as {self.dtype} in shards of at most {_gb(self.max_shard_bytes)}"
            + (f"; free disk there: {_gb(free_disk)}" if free_disk is not None else ""),
            "",
            "where each output layer comes from:",
            *(f"  layer {j:>3}: {source.describe(widens)}" for j, source in enumerate(self.layers)),
            "",
        ]
        width = max(len(t.name) for t in self.tensors)
        for t in self.tensors:
            lines.append(f"{t.name:<{width}}  {_shape(t.shape):>14}  {t.fill:<20} {_sources(t, self.donor is None)}")
        return "\n".join(lines)


def _gb(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(n) for n in shape)


def _widths_line(widths: Widths) -> str:
    return (
        f"hidden {widths.hidden_size}, heads {widths.num_attention_heads}/{widths.num_key_value_heads} kv, "
        f"intermediate {widths.intermediate_size}"
    )


def _sources(t: TensorPlan, random_donor: bool) -> str:
    parts = [f"base {t.base_source}"] if t.base_source else []
    if t.donor_region is not None:
        region = ",".join(f"{start}:{stop}" for start, stop in t.donor_region)
        parts.append(f"random[{region}]" if random_donor else f"donor {t.donor_source}[{region}]")
    sources = " + ".join(parts)
    return f"copy of {t.copy_of} ({sources})" if t.copy_of else sources


def _fill_label(fill_a: bool, fill_b: bool) -> str:
    def block(on: bool) -> str:
        return "D" if on else "0"

    return f"[[M,0],[{block(fill_a)},{block(fill_b)}]]"


def build_plan(
    base: ModelShape,
    donor: ModelShape | None,
    target: Widths,
    *,
    mode: str,
    legacy: bool,
    layer_map: str | None,
    dtype: str,
    seed: int,
    max_shard_bytes: int,
    num_hidden_layers: int | None = None,
    new_layers: str | None = None,
) -> SurgeryPlan:
    """Lay out every output tensor in checkpoint order (embed, layers, final norm, lm_head).

    `layer_map` None: the default, proportional (index under `legacy`). `num_hidden_layers` None: the base's
    depth. `new_layers` None: donor with a real donor, copy with a random one (it has no layers to take).
    """
    depth = num_hidden_layers or base.num_hidden_layers
    grows_depth = depth != base.num_hidden_layers
    if legacy and mode not in LEGACY_MODES:
        raise UserError(
            f"--legacy reproduces the 2023 script, which had only {' and '.join(sorted(LEGACY_MODES))}; "
            f"drop --legacy or choose one of those modes (got {mode})"
        )
    if legacy and layer_map not in (None, "index"):
        raise UserError(
            f"--legacy reproduces the 2023 script, which took donor layer i for target layer i; drop --layer-map "
            f"{layer_map} (or --legacy)"
        )
    if legacy and grows_depth:
        raise UserError(
            f"--legacy reproduces the 2023 script, which kept the base's {base.num_hidden_layers} layers; drop "
            f"--num-hidden-layers {depth} (or --legacy)"
        )
    if grows_depth and donor is None and new_layers == "donor":
        raise UserError("--new-layers donor takes new layers from the donor, and a random donor has none; use "
                        "--new-layers copy or a real --donor")
    if target == base.widths and not grows_depth:
        raise UserError("the target widths and depth equal the base's, so there is nothing to widen or deepen; set "
                        "wider target widths or --num-hidden-layers")
    new_layers = (new_layers or ("copy" if donor is None else "donor")) if grows_depth else None
    layer_map = layer_map or ("index" if legacy else "proportional")
    layers = layer_layout(base.num_hidden_layers, depth, donor.num_hidden_layers if donor is not None else None,
                          layer_map, new_layers or "donor")
    # A random donor has no layers: its blocks are seeded by output name, the donor layer is only a label.
    donor_layers = [s.donor_layer for s in layers] if donor is not None else list(range(depth))
    hidden, new_hidden = base.widths.hidden_size, target.hidden_size
    # lm_head's new columns read dims that stay 0, so copying the donor's keeps exactness and lets gradient
    # into the graft; `zero` and the 2023 script leave them 0 (and growing depth alone adds no columns).
    lm_head_from_donor = mode != "zero" and not legacy and new_hidden > hidden
    tie = base.tie_word_embeddings and not lm_head_from_donor
    eps = base.rms_norm_eps if legacy else widened_rms_norm_eps(base.rms_norm_eps, hidden, new_hidden)
    plan = SurgeryPlan(
        base=base,
        donor=donor,
        target=target,
        mode=mode,
        legacy=legacy,
        layer_map=layer_map,
        dtype=dtype,
        seed=seed,
        max_shard_bytes=max_shard_bytes,
        donor_layers=donor_layers,
        tie_word_embeddings=tie,
        rms_norm_eps=eps,
        layers=layers,
        new_layers=new_layers,
    )
    compensation = "" if legacy else f"*{norm_compensation(hidden, new_hidden):.4f}"
    vocab = base.vocab_size
    donor_tied = donor is not None and donor.tie_word_embeddings

    plan.tensors.append(
        TensorPlan(EMBED, "embed_tokens", "columns", (vocab, new_hidden), EMBED, fill="[M,0]")
    )
    by_name: dict[str, TensorPlan] = {}
    for position, source in enumerate(layers):
        if source.is_new:
            layer_tensors = _new_layer_plans(position, source, target, by_name)
        else:
            layer_tensors = _base_layer_plans(position, source, donor_layers[position], base.widths, target, mode,
                                              compensation)
        for entry in layer_tensors:
            by_name[entry.name] = entry
        plan.tensors.extend(layer_tensors)
    if legacy:
        plan.tensors.append(TensorPlan(FINAL_NORM, "norm", "ones", (new_hidden,), None, fill="ones (2023 bug)"))
    else:
        plan.tensors.append(
            TensorPlan(FINAL_NORM, "norm", "norm", (new_hidden,), FINAL_NORM, FINAL_NORM,
                       ((hidden, new_hidden),), fill=f"[g{compensation},D]")
        )
    if not tie:
        base_head = EMBED if base.tie_word_embeddings else LM_HEAD
        donor_head = EMBED if donor_tied else LM_HEAD
        plan.tensors.append(
            TensorPlan(
                LM_HEAD, "lm_head", "columns", (vocab, new_hidden), base_head,
                donor_head if lm_head_from_donor else None,
                ((0, vocab), (hidden, new_hidden)) if lm_head_from_donor else None,
                fill="[M,D]" if lm_head_from_donor else "[M,0]",
            )
        )
    return plan


def _layer_order() -> list[tuple[str, Role | None, str, str | None]]:
    """(suffix, role, output axis, input axis) of one layer's tensors in checkpoint order; norms have no role
    and no input axis."""
    order: list[tuple[str, Role | None, str, str | None]] = [("input_layernorm", None, "hidden", None)]
    for suffix, (role, out_axis, in_axis) in LINEARS.items():
        if suffix == "mlp.gate_proj":
            order.append(("post_attention_layernorm", None, "hidden", None))
        order.append((suffix, role, out_axis, in_axis))
    return order


def _base_layer_plans(
    position: int, source: LayerSource, donor_layer: int, widths: Widths, target: Widths, mode: str,
    compensation: str,
) -> list[TensorPlan]:
    """Base layer `source.base_layer` widened into `position`, its new units from the position's donor layer."""
    prefix, base_prefix = layer_prefix(position), layer_prefix(source.base_layer)
    donor_prefix = layer_prefix(donor_layer)
    hidden, new_hidden = widths.hidden_size, target.hidden_size
    plans = []
    for suffix, role, out_axis, in_axis in _layer_order():
        if role is None:
            plans.append(TensorPlan(
                name=f"{prefix}{suffix}.weight", kind=suffix, rule="norm", shape=(new_hidden,),
                base_source=f"{base_prefix}{suffix}.weight", donor_source=f"{donor_prefix}{suffix}.weight",
                donor_region=((hidden, new_hidden),), layer=position, donor_layer=donor_layer,
                fill=f"[g{compensation},D]",
            ))
            continue
        out, new_out, new_in = widths.dim(out_axis), target.dim(out_axis), target.dim(in_axis)
        fill = FILL_MODES[mode][role]
        takes_donor = (fill.a or fill.b) and new_out > out
        plans.append(TensorPlan(
            name=f"{prefix}{suffix}.weight",
            kind=suffix.split(".")[-1],
            rule="linear",
            shape=(new_out, new_in),
            base_source=f"{base_prefix}{suffix}.weight",
            donor_source=f"{donor_prefix}{suffix}.weight" if takes_donor else None,
            donor_region=((out, new_out), (0, new_in)) if takes_donor else None,
            role=role,
            layer=position,
            donor_layer=donor_layer,
            fill=_fill_label(fill.a, fill.b),
        ))
    return plans


def _new_layer_plans(
    position: int, source: LayerSource, target: Widths, earlier: dict[str, TensorPlan]
) -> list[TensorPlan]:
    """A new layer: o_proj and down_proj entirely zero (so it adds nothing to the residual stream), the rest
    the donor layer's first rows and columns (norms as the donor has them) or a copy of an earlier output layer."""
    prefix = layer_prefix(position)
    plans = []
    for suffix, role, out_axis, in_axis in _layer_order():
        name = f"{prefix}{suffix}.weight"
        kind = suffix.split(".")[-1]
        shape = (target.dim(out_axis),) if in_axis is None else (target.dim(out_axis), target.dim(in_axis))
        if role == "writer":
            plans.append(TensorPlan(name, kind, "zeros", shape, None, role=role, layer=position,
                                    fill="0 (new layer)"))
        elif source.copy_of is not None:
            original = earlier[f"{layer_prefix(source.copy_of)}{suffix}.weight"]
            plans.append(replace(original, name=name, layer=position, copy_of=original.name,
                                 fill=f"copy of layer {source.copy_of}"))
        else:
            donor_name = f"{layer_prefix(source.donor_layer)}{suffix}.weight"
            plans.append(TensorPlan(name, kind, "cut", shape, None, donor_name, tuple((0, n) for n in shape),
                                    role=role, layer=position, donor_layer=source.donor_layer,
                                    fill="D cut (new layer)"))
    return plans
