"""The world designs by name (the name a model's `facts_model.json` and the tools' --design use)."""

from __future__ import annotations

from edit_tools.facts.broad_world import BROAD
from edit_tools.facts.world import CLASSIC, World, WorldDesign, generate_world

DESIGNS = {design.name: design for design in (CLASSIC, BROAD)}


def design_named(name: str) -> WorldDesign:
    if name not in DESIGNS:
        raise ValueError(f"unknown world design {name!r}; expected one of {sorted(DESIGNS)}")
    return DESIGNS[name]


def world_of(seed: int, design: str = CLASSIC.name) -> World:
    """The world of this seed and design name, as `generate_world` builds it."""
    return generate_world(seed, design_named(design))
