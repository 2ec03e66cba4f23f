"""Turn nested config values into MLflow params and tags: flat dotted keys, string
values, passwords in URIs masked, size limits."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

from intraneuron.tracking.redact import redact

TRUNCATION_MARKER = "...[truncated]"


def flatten(tree: Mapping[str, Any], sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings into one level: {"a": {"b": 1}} -> {"a.b": 1}.

    Lists and other leaves are kept whole (a layer list is one param, not one per element);
    an empty mapping is kept as a leaf so that the key is still recorded.
    """
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, sep=sep, prefix=name))
        else:
            flat[name] = value
    return flat


def to_text(value: Any) -> str:
    """Stringify a leaf the way the YAML config spells it (null/true/false), so searches match."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def truncate(text: str, limit: int) -> str:
    """Cut text to at most `limit` characters, ending with a visible marker when cut."""
    if len(text) <= limit:
        return text
    return text[: limit - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER


def mlflow_params(params: Mapping[str, Any], sep: str = ".") -> dict[str, str]:
    """Flatten, stringify, mask passwords in URIs and truncate to MLflow's param value limit (6000
    characters); masked before cut, so no part of a password is left where the mask cannot find it."""
    return {k: truncate(redact(to_text(v)), MAX_PARAM_VAL_LENGTH) for k, v in flatten(params, sep).items()}


def mlflow_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    """Stringify, mask passwords in URIs and truncate to MLflow's tag value limit (8000 characters).
    Keys are kept as given."""
    return {str(k): truncate(redact(to_text(v)), MAX_TAG_VAL_LENGTH) for k, v in tags.items()}
