"""Analyses by name: `conf/analysis/<name>.yaml` names a class by `_target_`; this module resolves
it, refusing anything that is not an Analysis, and builds it from the file's other keys.

Only `analysis._target_` and `clustering.estimator._target_` name classes in the config tree: a
`_target_` anywhere else would let a command line reach arbitrary callables, so it is refused.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import textwrap
from typing import Any

from intraneuron.errors import ConfigError
from intraneuron.paths import CONF_DIR, PROJECT_ROOT

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


def descriptions() -> dict[str, str]:
    """Option name -> one line about the analysis: the first paragraph of its class's docstring and
    the config groups it reads. Read from the source, not imported: `--help` must not pay for torch."""
    found = {}
    for name, target in available().items():
        if target.startswith("("):
            found[name] = target.strip("()")
            continue
        cls = _class_node(target)
        if cls is None:
            found[name] = target
            continue
        summary = " ".join((ast.get_docstring(cls) or target).split("\n\n")[0].split())
        groups = _dict_keys(cls, "groups")
        found[name] = f"{summary} Reads {', '.join(groups)}." if groups else summary
    return found


def help_text(width: int = 100) -> str:
    """The `--help` section listing every analysis (conf/hydra/help/intraneuron.yaml interpolates it)."""
    entries = descriptions()
    column = max(map(len, entries)) + 2
    lines = [
        textwrap.fill(text, width, initial_indent=name.ljust(column), subsequent_indent=" " * column)
        for name, text in entries.items()
    ]
    return "\n".join(lines).replace("$", "$$")  # Hydra fills the template with string.Template


def _class_node(target: str) -> ast.ClassDef | None:
    """The class statement a `_target_` of this package names, following re-exports
    (`from intraneuron.analyses.two_fold.analysis import TwoFoldAnalysis` in a package's __init__)."""
    module, _, name = target.rpartition(".")
    for _ in range(4):
        parts = module.split(".")
        base = PROJECT_ROOT.joinpath(*parts)
        path = next((p for p in (base / "__init__.py", base.with_suffix(".py")) if p.is_file()), None)
        if parts[0] != "intraneuron" or path is None:
            return None  # another package's class is not looked into
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and node.name == name:
                return node
            if isinstance(node, ast.ImportFrom) and any(alias.name == name for alias in node.names):
                package = module if path.name == "__init__.py" else module.rpartition(".")[0]
                module = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
                break
        else:
            return None
    return None


def _dict_keys(cls: ast.ClassDef, attribute: str) -> list[str]:
    """The string keys of a class attribute assigned a dict literal (`groups: ClassVar = {...}`)."""
    for node in cls.body:
        if isinstance(node, ast.AnnAssign):
            target = node.target
        elif isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        else:
            continue
        if isinstance(target, ast.Name) and target.id == attribute and isinstance(node.value, ast.Dict):
            return [key.value for key in node.value.keys if isinstance(key, ast.Constant)]
    return []


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
