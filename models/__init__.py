"""Network definitions in plain torch and the model zoo (backbone name -> constructor, weights, preprocessing)."""

from models.zoo import (
    Backbone,
    BackboneSpec,
    Preprocessing,
    build_starting_network,
    get,
    load_backbone,
    load_weights,
    names,
)

__all__ = [
    "Backbone",
    "BackboneSpec",
    "Preprocessing",
    "build_starting_network",
    "get",
    "load_backbone",
    "load_weights",
    "names",
]
