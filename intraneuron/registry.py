"""Analyses by name: `conf/analysis/<name>.yaml` names a class by `_target_`; this module resolves
it, refusing anything that is not an Analysis, and builds it from the file's other keys.

Only `analysis._target_` and `clustering.estimator._target_` name classes in the config tree: a
`_target_` anywhere else would let a command line reach arbitrary callables, so it is refused.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from intraneuron.errors import ConfigError
from intraneuron.paths import CONF_DIR

TARGET_KEYS = ("analysis._target_", "clustering.estimator._target_")


def available() -> dict[str, str]:
    """Option name -> `_target_` of every analysis in conf/analysis/ (read as text: no imports)."""
    from omegaconf import OmegaConf

    found = {}
    for path in sorted((CONF_DIR / "analysis").glob("*.yaml")):
        node = OmegaConf.load(path)
        target = node.get("_target_") or next(
            (f"(alias of {d})" for d in node.get("defaults", []) if isinstance(d, str) and d != "_self_"),
            "?",
        )
        found[path.stem] = target
    return found


def analysis_class(target: Any) -> type:
    """The Analysis subclass a `_target_` names; ConfigError for anything else."""
    from intraneuron.analyses.base import Analysis

    classes = sorted({t for t in available().values() if not t.startswith("(")})  # aliases name no class
    allowed = f"an Analysis class, e.g. {', '.join(classes)}"
    if not isinstance(target, str) or not target:
        raise ConfigError("analysis._target_", target, allowed)
    # imported here rather than by hydra.utils.get_class, which logs every failure at ERROR level:
    # the user would read the mistake twice, once as a multi-line log record
    module_name, _, attribute = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attribute)
    except Exception:  # no such module or attribute, an empty module name, a module that fails to import
        raise ConfigError("analysis._target_", target, allowed) from None
    if not (inspect.isclass(cls) and issubclass(cls, Analysis)) or inspect.isabstract(cls):
        raise ConfigError("analysis._target_", target, allowed)
    return cls


def build_analysis(node: dict[str, Any]):
    """The analysis instance from the `analysis` group: its class by `_target_`, its parameters
    bound to the constructor (an unknown key names itself and lists the known ones)."""
    node = dict(node)
    cls = analysis_class(node.pop("_target_", None))
    signature = inspect.signature(cls)
    for key in node:
        if key not in signature.parameters:
            known = ", ".join(signature.parameters)
            raise ConfigError(f"analysis.{key}", node[key], f"a parameter of {cls.name}: {known}")
    for key, value in node.items():
        _check_type(cls, key, value, signature.parameters[key])
    return cls(**node)


def _check_type(cls: type, key: str, value: Any, parameter: inspect.Parameter) -> None:
    """Values of the declared type (from the default's type): `n_permutations=many` fails here."""
    default = parameter.default
    if default is inspect.Parameter.empty or default is None:
        return
    expected = float if isinstance(default, float) else type(default)
    if value is None:  # null only where the constructor declares it (`int | None`)
        if "None" in str(parameter.annotation):
            return
        raise ConfigError(f"analysis.{key}", value, f"a value of type {expected.__name__}")
    ok = isinstance(value, expected) and not (isinstance(value, bool) and expected is not bool)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise ConfigError(f"analysis.{key}", value, f"a value of type {expected.__name__}")


def refuse_other_targets(tree: Any, path: str = "") -> None:
    """ConfigError for a `_target_` outside TARGET_KEYS (and outside the `hydra` node)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            full = f"{path}.{key}" if path else str(key)
            if key == "_target_" and full not in TARGET_KEYS:
                raise ConfigError(full, value, f"no `_target_` here; only {' and '.join(TARGET_KEYS)} name classes")
            if full == "clustering.estimator":
                continue  # its own checks refuse nested targets with the estimator's key
            refuse_other_targets(value, full)
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            refuse_other_targets(value, f"{path}.{i}")
