"""Finding the flows a user's Python file defines: `PATH.py` or `PATH.py:NAME`."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from serveflow.logical.flow import Flow


class LoadError(Exception):
    """The file cannot be imported, or defines no flow (under that name)."""


def _ship_by_value(module: ModuleType) -> None:
    """Have cloudpickle (how runtimes send plans to worker processes) carry this
    module's functions and classes by value, so workers need not import the file."""
    try:
        import cloudpickle
    except ImportError:  # a runtime without worker processes
        return
    cloudpickle.register_pickle_by_value(module)


def _import_file(path: Path) -> ModuleType:
    """Import `path` by its dotted name when it sits inside packages, else as a
    standalone module."""
    path = path.resolve()
    parts = [path.stem]
    root = path.parent
    while (root / "__init__.py").is_file():
        parts.insert(0, root.name)
        root = root.parent
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    name = ".".join(parts)
    if len(parts) > 1:
        return importlib.import_module(name)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise LoadError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _as_flow(value: object, name: str, target: str) -> Flow:
    if isinstance(value, Flow):
        return value
    if callable(value):  # a factory such as build_flow()
        flow = value()
        if isinstance(flow, Flow):
            return flow
        raise LoadError(f"{target}: {name}() returned {type(flow).__name__}, not a sf.Flow")
    raise LoadError(f"{target}: {name} is a {type(value).__name__}, not a sf.Flow")


def load_flows(target: str) -> list[Flow]:
    """The flows named by `PATH.py[:NAME]`.

    Without NAME: every module-level `sf.Flow` object of the file. NAME may be a Flow
    object or a function taking no arguments that returns one (e.g. `build_flow`).
    Flow names (`flow.name`) must be unique: they are the URL path of each flow.
    """
    file, _, attr = target.partition(":")
    path = Path(file)
    if not path.is_file():
        raise LoadError(f"{file}: no such file")
    try:
        module = _import_file(path)
        _ship_by_value(module)
    except LoadError:
        raise
    except Exception as error:
        raise LoadError(f"{file}: import failed: {type(error).__name__}: {error}") from error
    if attr:
        if not hasattr(module, attr):
            raise LoadError(f"{file} defines no {attr!r}")
        flows = [_as_flow(getattr(module, attr), attr, file)]
    else:
        flows = list({id(v): v for v in vars(module).values() if isinstance(v, Flow)}.values())
        if not flows:
            raise LoadError(
                f"{file} defines no module-level sf.Flow; name a flow or a function that "
                f"builds one: {file}:NAME"
            )
    names = [flow.name for flow in flows]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise LoadError(f"{file}: several flows are named {duplicates}; flow names must differ")
    return flows
