"""Where every layer of the grown model comes from: depth growth with zero-writer layers (design/surgery.md).

A decoder layer adds attn(norm(x)) @ W_o^T and mlp(norm(x)) @ W_down^T to the residual stream; with o_proj and
down_proj entirely zero it adds nothing, whatever its readers and norms hold. So base layer i keeps its place in
the order at target position round_half_up(i (N - 1) / (L - 1)), every other position holds such a new layer,
and the grown model computes the base's function exactly (LLaMA-Pro's construction; LEMON's for LayerNorm).

Pure functions of layer counts: no files, no tensors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pipeline.errors import UserError


def spread(index: int, span: int, steps: int) -> int:
    """round_half_up(index * span / steps) in integer arithmetic, so a tie is a tie and not 2.4999..."""
    return (2 * index * span + steps) // (2 * steps)


def base_layer_positions(base_layers: int, target_layers: int) -> list[int]:
    """Target position of each base layer: the first stays first, the last stays last, the rest evenly between.

    Consecutive positions differ by (N - 1) / (L - 1) >= 1 before rounding, so no two base layers collide.
    """
    if target_layers < base_layers:
        raise UserError(
            f"--num-hidden-layers {target_layers} is below the base's {base_layers} layers; surgery only grows, "
            f"ask for {base_layers} or more"
        )
    if base_layers == 1:
        return [0]
    return [spread(i, target_layers - 1, base_layers - 1) for i in range(base_layers)]


def donor_layer_sources(target_layers: int, donor_layers: int, layer_map: str) -> list[int]:
    """Which donor layer feeds each target position (its new heads and neurons, or a whole new layer).

    `index` is the 2023 script's choice (position j <- donor layer j; deeper donor layers are dropped);
    `proportional` spreads the donor's depth over the target's: round_half_up(j * (L_donor - 1) / (N - 1)).
    With N equal to the donor's depth both use every donor layer once.
    """
    if layer_map == "index":
        if donor_layers < target_layers:
            raise UserError(
                f"layer map index needs a donor at least as deep as the target (donor {donor_layers} < target "
                f"{target_layers} layers); use --layer-map proportional"
            )
        return list(range(target_layers))
    if target_layers == 1:
        return [0]
    return [spread(j, donor_layers - 1, target_layers - 1) for j in range(target_layers)]


@dataclass(frozen=True)
class LayerSource:
    """One layer of the grown model: a widened base layer, or a new layer whose writers are zero."""

    base_layer: int | None  # the base layer widened into this position; None for a new layer
    donor_layer: int | None  # the donor layer its new units (or, for a `donor` new layer, all of it) come from
    copy_of: int | None = None  # a `copy` new layer: the output position (a base layer's) it repeats

    @property
    def is_new(self) -> bool:
        return self.base_layer is None

    def describe(self, widens: bool = True) -> str:
        donor = f"donor layer {self.donor_layer}" if self.donor_layer is not None else "random donor"
        if self.base_layer is not None:
            return f"base layer {self.base_layer}" + (f", new heads and neurons from {donor}" if widens else "")
        if self.copy_of is not None:
            return f"new: copy of layer {self.copy_of}, o_proj and down_proj zero"
        return f"new: {donor} cut to the target widths, o_proj and down_proj zero"

    def as_dict(self) -> dict[str, int | None]:
        return asdict(self)


def layer_layout(
    base_layers: int, target_layers: int, donor_layers: int | None, layer_map: str, new_layers: str
) -> list[LayerSource]:
    """Every target position's source. `donor_layers` None: a random donor, which has no layers to map.

    `new_layers` donor: a new layer is its position's donor layer (cut to the target widths); copy: the nearest
    earlier output layer that came from a base layer, copied whole (LLaMA-Pro). Position 0 always holds base
    layer 0, so every new layer has one before it.
    """
    positions = base_layer_positions(base_layers, target_layers)
    donors = donor_layer_sources(target_layers, donor_layers, layer_map) if donor_layers is not None else None
    base_at = {position: layer for layer, position in enumerate(positions)}
    layout: list[LayerSource] = []
    last_base_position = 0
    for position in range(target_layers):
        donor = donors[position] if donors is not None else None
        if position in base_at:
            last_base_position = position
            layout.append(LayerSource(base_layer=base_at[position], donor_layer=donor))
        elif new_layers == "copy":
            layout.append(LayerSource(base_layer=None, donor_layer=layout[last_base_position].donor_layer,
                                      copy_of=last_base_position))
        else:
            layout.append(LayerSource(base_layer=None, donor_layer=donor))
    return layout
