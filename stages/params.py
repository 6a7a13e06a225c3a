"""Reading params.yaml: sections by name, checked against the keyword arguments they end in."""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from typing import Any, Callable

import typer
import yaml

PARAMS_OPTION = typer.Option(Path("params.yaml"), "--params", help="The parameters file (DVC's params.yaml).")


class ParamsError(ValueError):
    """A parameter problem, reported before any work starts."""


def load_params(path: Path) -> dict:
    if not path.exists():
        raise ParamsError(f"{path}: parameters file not found (run from the project root or pass --params)")
    params = yaml.safe_load(path.read_text())
    if not isinstance(params, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return params


def section(params: dict, dotted: str, path: Path = Path("params.yaml")) -> Any:
    """params['a']['b'] for 'a.b', with an error naming the missing key and the nearest valid one."""
    node: Any = params
    walked = []
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            choices = sorted(node) if isinstance(node, dict) else []
            close = difflib.get_close_matches(key, choices, n=1)
            hint = f"; did you mean {'.'.join(walked + close)!r}?" if close else (f"; have {choices}" if choices else "")
            raise ParamsError(f"{path}: missing parameter {'.'.join(walked + [key])!r}{hint}")
        node = node[key]
        walked.append(key)
    return node


def kwargs_for(fn: Callable, values: dict | None, where: str, *, skip: tuple[str, ...] = ()) -> dict:
    """Check a params section against fn's keyword arguments: unknown keys, missing required ones."""
    values = dict(values or {})
    signature = inspect.signature(fn)
    accepted = [n for n, p in signature.parameters.items() if p.kind == p.KEYWORD_ONLY and n not in skip]
    for key in values:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ParamsError(f"params.yaml: unknown parameter {where}.{key}{hint} (valid: {', '.join(accepted)})")
    missing = [
        n for n in accepted
        if signature.parameters[n].default is inspect.Parameter.empty and n not in values
    ]
    if missing:
        raise ParamsError(f"params.yaml: missing parameter(s) {', '.join(f'{where}.{m}' for m in missing)}")
    return values


def fail(err: Exception) -> None:
    """Print one clear line and exit non-zero."""
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(code=2)
