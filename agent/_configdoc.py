"""One row of the generated configuration reference (docs/configuration.md).

Shared by the station's models (agent/config_schema.py) and central.toml's
(agent/central/config.py), which may not import each other.
"""

from __future__ import annotations

from pathlib import Path

from pydantic.fields import FieldInfo


def field_row(key: str, field: FieldInfo) -> str:
    """`| key | type | default | meaning |` for one pydantic field, `|` escaped."""
    ann = field.annotation
    plain = isinstance(ann, type) and not getattr(ann, "__args__", None)
    kind = ann.__name__ if plain else str(ann)  # type: ignore[union-attr]
    kind = kind.replace("typing.", "").replace("pathlib.", "").replace("|", "\\|")
    if field.is_required():
        default = "required"
    elif field.default_factory is not None:
        default = f"`{field.default_factory()!r}`"  # type: ignore[call-arg]
    else:
        value = field.default
        default = f"`{str(value) if isinstance(value, Path) else repr(value)}`"
    default = default.replace("|", "\\|")
    desc = (field.description or "").replace("|", "\\|").replace("\n", " ")
    return f"| `{key}` | {kind} | {default} | {desc} |"
