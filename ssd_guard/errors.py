"""Every error ssd-guard raises derives from :class:`SSDGuardError`."""

from __future__ import annotations

__all__ = [
    "ArtifactError",
    "ArtifactIntegrityError",
    "ArtifactMismatchError",
    "CacheUnavailableError",
    "ConfigError",
    "GuardBlockedError",
    "GuardInputError",
    "MissingExtraError",
    "ModelLoadError",
    "PolicyError",
    "SSDGuardError",
    "require_extra",
]


class SSDGuardError(Exception):
    """Base class of all ssd-guard errors."""


class ModelLoadError(SSDGuardError):
    """A base model or embedder could not be loaded offline."""


class ArtifactError(SSDGuardError):
    """A student artifact is missing, malformed or unreadable."""


class ArtifactIntegrityError(ArtifactError):
    """The artifact's weights do not match the sha256 recorded in its manifest."""


class ArtifactMismatchError(ArtifactError):
    """The artifact was trained for another base model, hidden size or embedder."""


class ConfigError(SSDGuardError):
    """A recipe or configuration file is invalid."""


class PolicyError(ConfigError):
    """A YAML policy is invalid; the message names the file, the key path and the reason."""


class CacheUnavailableError(SSDGuardError):
    """The score cache (Redis) is unreachable and its ``fail_mode`` is ``closed``."""


class GuardInputError(SSDGuardError, ValueError):
    """An argument given to the guard is not what it expects (e.g. ``None``, ``bytes`` or
    an ``int`` as a prompt, text with a lone surrogate, a single string where a list of
    strings is expected). :attr:`argument` names the argument (``"documents[2]"``...)."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(message)
        self.argument = argument


class GuardBlockedError(SSDGuardError):
    """Raised when a policy blocks a call (abstain / reject) and ``raise_error`` is set."""

    def __init__(self, message: str, *, action: str, rule: str | None, scores: dict[str, float]):
        super().__init__(message)
        self.action = action
        self.rule = rule
        self.scores = scores


def type_phrase(value: object, *, mapping: str = "a mapping") -> str:
    """How error messages name what was found instead (``"a number"``, ``"null"``...);
    *mapping* is the word for a dict (``"an object"`` where the input is JSON)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return mapping
    return type(value).__name__


class MissingExtraError(SSDGuardError, ImportError):
    """A part of ssd-guard was used whose optional dependencies are not installed; the
    message names the extra to install (``pip install 'ssd-guard[redis]'``)."""

    def __init__(self, feature: str, extra: str, module: str) -> None:
        super().__init__(
            f"{feature} needs the optional dependency {module!r}: pip install 'ssd-guard[{extra}]'"
        )
        self.feature = feature
        self.extra = extra
        self.module = module


def require_extra(module: str, extra: str, feature: str) -> None:
    """Raise :class:`MissingExtraError` naming *extra* when *module* cannot be imported."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(feature, extra, module) from exc
