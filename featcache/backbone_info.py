"""``featcache backbones``: the registry as a table, or one backbone's feature shape and the layers
``--feature-layer`` can take, read off the architecture built without ImageNet weights (no download)."""

from __future__ import annotations

from featcache.backbones import BACKBONES, check_image_size, get_backbone_spec, resolve_image_size
from featcache.feature_layers import feature_layer_choices


def describe_backbones() -> str:
    """One line per registered backbone: name, preprocessing mode, default and minimum input side."""
    lines = [f"{'backbone':<20} {'preprocessing':<13} {'default size':>12} {'min size':>8}  keras.applications"]
    for name, spec in sorted(BACKBONES.items()):
        minimum = f"x{spec.reduction}" if spec.reduction else str(spec.min_size)
        lines.append(f"{name:<20} {spec.preprocessing:<13} {spec.default_size:>12} {minimum:>8}  "
                     f"{spec.architecture or ('(test backbone)' if name == 'tiny' else name.upper())}")
    lines.append("Names are case-insensitive and ignore '_' and '-' (convnext_tiny = ConvNeXtTiny). "
                 "'featcache backbones NAME' shows one backbone's feature shape and layers.")
    return "\n".join(lines)


def describe_backbone(name: str, image_size: int | None = None) -> str:
    """The feature shape of one backbone at ``image_size`` (default: its own) and the last layer at each
    resolution, the candidates for ``--feature-layer``.

    Raises:
        FeatcacheError: unknown backbone or an image size it does not take.
    """
    spec = get_backbone_spec(name)
    size = resolve_image_size(spec, image_size)
    check_image_size(spec, size)
    backbone = spec.build(size, None)
    shape = tuple(int(d) for d in backbone.output_shape[1:])
    lines = [f"{spec.name}: preprocessing {spec.preprocessing}, input {size}x{size}, feature maps {shape} "
             f"(default size {spec.default_size}), {backbone.count_params():,} parameters",
             "  --feature-layer candidates (the last layer at each resolution):"]
    lines += [f"    {layer:<32} {tuple(int(d) for d in out)}" for layer, out in feature_layer_choices(backbone)]
    return "\n".join(lines)
