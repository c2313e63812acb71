"""``--feature-layer``: cut a backbone at a named layer, refuse layers that give no feature map or whose
name Keras invents anew in each build, and list the sensible candidates (the last layer at each resolution)."""

from __future__ import annotations

import re

from featcache.errors import FeatcacheError


def select_feature_layer(spec, backbone, feature_layer: str | None):
    """``backbone`` itself, or the sub-model from its input to the output of layer ``feature_layer``.

    The weights stay the whole backbone's (``hash_weights`` and the saved random weights do not depend on
    the layer); the sub-model shares them.

    Args:
        spec: the registry entry (``backbones.BackboneSpec``), for its name in messages.
        backbone: the whole backbone, a functional ``keras.Model``.
        feature_layer: a layer name, or None for the backbone's last output.

    Raises:
        FeatcacheError: no layer of that name, or its output is not one (batch, h, w, c) map.
    """
    import keras

    if feature_layer is None:
        return backbone
    names = [layer.name for layer in backbone.layers]
    if feature_layer not in names:
        choices = ", ".join(name for name, _ in feature_layer_choices(backbone))
        raise FeatcacheError(
            f"{spec.name} has no layer {feature_layer!r}; the last layer at each resolution is: {choices} "
            f"('featcache backbones {spec.name}' lists them with shapes). Received: feature_layer={feature_layer!r}"
        )
    layer = backbone.get_layer(feature_layer)
    if _auto_named(layer):
        raise FeatcacheError(
            f"Layer {feature_layer!r} of {spec.name} has a name Keras numbers anew in each build, so the cache could "
            f"not find it again; pick a named layer. Received: feature_layer={feature_layer!r}"
        )
    output = _single_output(layer)
    if output is None or len(output.shape) != 4:
        shape = None if output is None else tuple(output.shape)
        raise FeatcacheError(
            f"Layer {feature_layer!r} of {spec.name} does not give one (batch, h, w, c) feature map (output shape "
            f"{shape}); pick a convolutional block output. Received: feature_layer={feature_layer!r}"
        )
    return keras.Model(backbone.inputs, output, name=f"{backbone.name}_to_{feature_layer}")


def _single_output(layer):
    """The layer's one symbolic output, or None (several outputs, or a layer called more than once)."""
    try:
        output = layer.output
    except (AttributeError, ValueError):
        return None
    return output if not isinstance(output, (list, tuple)) else None


def feature_layer_choices(backbone) -> list[tuple[str, tuple]]:
    """(name, output shape) of the last layer at each spatial resolution, input side first: the block outputs
    that make sensible ``--feature-layer`` values (e.g. ResNet50's ``conv4_block6_out``)."""
    last: dict[tuple, tuple[str, tuple]] = {}
    input_side, output_side = tuple(backbone.input_shape[1:3]), tuple(backbone.output_shape[1:3])
    for layer in backbone.layers[1:]:
        output = _single_output(layer)
        if output is None or len(output.shape) != 4 or _auto_named(layer):
            continue
        side = tuple(output.shape[1:3])
        # Not the model's own rescaling layers (input side), nor squeeze-excitation vectors (1x1 inside a block).
        if side != input_side and side[0] >= output_side[0]:
            last[side] = (layer.name, tuple(output.shape[1:]))
    return list(last.values())


def _auto_named(layer) -> bool:
    """Whether Keras named the layer itself (``rescaling_3``): such a name changes from build to build, so a
    cache could not find its layer again."""
    from keras.src.utils.naming import to_snake_case

    return re.fullmatch(rf"{re.escape(to_snake_case(type(layer).__name__))}(_\d+)?", layer.name) is not None
