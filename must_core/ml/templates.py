"""Default prompt templates for the zero-shot classifier."""

from __future__ import annotations

# A small generic ensemble for unknown datasets: "a photo of a {}." plus the 7-prompt subset that the
# CLIP authors found to work well across datasets. Users can pass their own (one ``{}`` slot each).
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


def validate_templates(templates: list[str] | tuple[str, ...]) -> list[str]:
    """Each template must contain exactly one ``{}`` slot and nothing else ``str.format`` would read."""
    from must_core.errors import InvalidConfigError

    out = []
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise InvalidConfigError(f"template {t!r} must contain exactly one '{{}}' slot")
        try:
            t.format("x")
        except (IndexError, KeyError, ValueError) as exc:
            raise InvalidConfigError(f"template {t!r} is not a valid format string: {exc}") from exc
        out.append(t)
    if not out:
        raise InvalidConfigError("at least one template is required")
    return out


def validate_class_names(names: list[str] | tuple[str, ...]) -> list[str]:
    """Class names: at least two, non-empty after stripping, unique (case-insensitive)."""
    from must_core.errors import InvalidConfigError

    cleaned = [str(n).strip() for n in names]
    if len(cleaned) < 2:
        raise InvalidConfigError("at least two class names are required")
    if any(not n for n in cleaned):
        raise InvalidConfigError("class names must be non-empty")
    seen: set[str] = set()
    for n in cleaned:
        key = n.casefold()
        if key in seen:
            raise InvalidConfigError(f"duplicate class name {n!r}")
        seen.add(key)
    return cleaned
