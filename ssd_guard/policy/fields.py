"""Validated field types of the policy models, and their strict frozen base model."""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value}")
    return float(value)


def _quantile_range(value: float) -> float:
    if not (0.0 <= value <= 1.0):  # also catches NaN
        raise ValueError(f"expected a quantile between 0 and 1, got {value}")
    return float(value)


def _slug(value: str) -> str:
    stripped = value.strip()
    if not stripped:
        raise ValueError("expected a non-empty name")
    if stripped != value or any(c.isspace() for c in value):
        raise ValueError(f"names may not contain whitespace, got {value!r}")
    return value


def _non_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("expected a non-empty string")
    return value


FiniteFloat = Annotated[float, AfterValidator(_finite)]
QuantileFloat = Annotated[float, AfterValidator(_quantile_range)]
Name = Annotated[str, AfterValidator(_slug)]
NonEmptyStr = Annotated[str, AfterValidator(_non_empty)]


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", strict=True, frozen=True, validate_by_name=True, validate_by_alias=True
    )
