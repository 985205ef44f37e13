"""Fold scalings into the feature maps that consume them, so kernels read q and k directly."""
from __future__ import annotations

from dataclasses import replace

from ..ir import FeatureMap, Scale


def feature_map_of_scale(n):
    # φ_c(a·x)  ->  φ_{c·a}(x)
    if isinstance(n, FeatureMap) and isinstance(n.x, Scale):
        return replace(n, x=n.x.x, prescale=n.prescale * n.x.factor)
    return None


def scale_of_scale(n):
    # a·(b·x)  ->  (a·b)·x
    if isinstance(n, Scale) and isinstance(n.x, Scale):
        return Scale(n.x.x, n.factor * n.x.factor, span=n.span)
    return None


RULES = [("feature_map_of_scale", feature_map_of_scale), ("scale_of_scale", scale_of_scale)]
