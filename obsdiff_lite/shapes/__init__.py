"""The tiny world: captioned-shapes data, a classical detector, ShapeBench and the tiny pipelines."""

from .dataset import (
    ATTRIBUTES,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapeSpec,
    all_specs,
    balanced_specs,
    make_dataset,
    parse_caption,
    render,
)

__all__ = [
    "ATTRIBUTES", "COLORS", "POSITIONS", "SHAPES", "SIZES", "ShapeSpec", "all_specs",
    "balanced_specs", "make_dataset", "parse_caption", "render",
]
