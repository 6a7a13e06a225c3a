"""Reading params.yaml: sections by name, checked against the keyword arguments they end in."""

from __future__ import annotations

import copy
import difflib
import inspect
import re
from pathlib import Path
from typing import Any, Callable

import typer
import yaml

PARAMS_OPTION = typer.Option(Path("params.yaml"), "--params", help="The parameters file (DVC's params.yaml).")


class ParamsError(ValueError):
    """A parameter problem, reported before any work starts."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1's safe loader, with YAML 1.2's floats: `1e-05` is a number, as DVC (YAML 1.2) reads it
    and writes it (`dvc exp run -S x=0.00001` writes `x: 1e-05`), not the text PyYAML would make of it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def read_yaml(text: str) -> Any:
    """YAML text as DVC reads it (YAML 1.2's floats)."""
    return yaml.load(text, Loader=_Loader)


def load_params(path: Path) -> dict:
    if not path.exists():
        raise ParamsError(f"{path}: parameters file not found (run from the project root or pass --params)")
    try:
        params = read_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(params, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    validate(params, path)
    return params


# What every stage checks before any work: each known section's keys and the type and range of each
# value. A stage reads only its sections, and checks there what needs the data (K against the items).
Rule = Callable[[Any], bool]
INT_GE0: tuple[str, Rule] = ("an integer >= 0", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0)
INT_GE1: tuple[str, Rule] = ("an integer >= 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1)
NUMBER_GE0: tuple[str, Rule] = ("a number >= 0", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0)
SHARE: tuple[str, Rule] = ("a number in (0, 1)", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1)
BOOL: tuple[str, Rule] = ("true or false", lambda v: isinstance(v, bool))
NAME: tuple[str, Rule] = ("a name (text)", lambda v: isinstance(v, str) and v != "")
NAMES: tuple[str, Rule] = ("a non-empty list of names", lambda v: isinstance(v, list) and v != [] and all(isinstance(x, str) for x in v))
SEEDS: tuple[str, Rule] = (
    "a non-empty list of distinct integers >= 0",
    lambda v: isinstance(v, list) and v != [] and all(INT_GE0[1](x) for x in v) and len(set(v)) == len(v),
)
DEVICE: tuple[str, Rule] = ("auto, cpu, cuda or cuda:<index>", lambda v: isinstance(v, str) and (v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit())))
SPLIT_MODE: tuple[str, Rule] = ("chronological, holdout or leave_one_out", lambda v: v in ("chronological", "holdout", "leave_one_out"))
SELECT: tuple[str, Rule] = ("ndcg@20 or recall@20", lambda v: v in ("ndcg@20", "recall@20"))
KS: tuple[str, Rule] = ("a list of distinct integers >= 1 with 20 among them", lambda v: SEEDS[1](v) and 20 in v and 0 not in v)
SCHEMA: dict[str, Any] = {
    "seed": INT_GE0,
    "device": DEVICE,
    "dataset": NAME,
    "datasets": dict,
    "split": {"mode": SPLIT_MODE, "train": SHARE, "valid": SHARE, "holdout": SHARE, "valid_users": SHARE, "seed": INT_GE0},
    "train": {"batch_size": INT_GE1, "lr": NUMBER_GE0, "max_epochs": INT_GE1, "patience": INT_GE1, "eval_chunk": INT_GE1,
              "resume_every": NUMBER_GE0, "select": SELECT},
    "backbones": dict,
    "trajectory": {"every": INT_GE1, "topk": INT_GE1},
    "cache": {"topk": INT_GE1, "chunk": INT_GE1, "store": NAME, "hstu_logit": NAME},
    "evaluate": {"exclude_valid_in_test": BOOL, "valid_in_test_input": BOOL, "ks": KS},
    "grid": {"teachers": NAMES, "students": NAMES, "methods": NAMES, "seeds": SEEDS},
    "report": {"target": NAME, "baselines": NAMES},
    "tuning": {"seed": INT_GE0, "trials": INT_GE1, "spaces": dict},
    "records": dict,
    "diagnostics": {"users": INT_GE1, "rank_users": INT_GE0, "k": INT_GE1},
    "kd": dict,
}


def validate(params: dict, path: Path) -> None:
    """Every problem of the known sections at once, each naming the parameter and what was expected:
    unknown keys (with the closest valid name), wrong types and impossible values, the split's
    shares, the dataset and the grid's names against the sections that define them."""
    problems = []

    def unknown(where: str, key: str, valid: list[str]) -> str:
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f" (did you mean {'.'.join(filter(None, [where, close[0]]))!r}?)" if close else ""
        return f"unknown parameter {'.'.join(filter(None, [where, key]))!r}{hint}; valid: {', '.join(valid)}"

    for key, value in params.items():
        rule = SCHEMA.get(key)
        if rule is None:
            problems.append(unknown("", key, list(SCHEMA)))
        elif rule is dict:
            if not isinstance(value, dict):
                problems.append(f"{key} = {value!r}; expected a mapping of sections")
        elif isinstance(rule, dict):
            if not isinstance(value, dict):
                problems.append(f"{key} = {value!r}; expected a mapping with {', '.join(rule)}")
                continue
            for name, item in value.items():
                if name not in rule:
                    problems.append(unknown(key, name, list(rule)))
                elif not rule[name][1](item):
                    problems.append(f"{key}.{name} = {item!r}; expected {rule[name][0]}")
        elif not rule[1](value):
            problems.append(f"{key} = {value!r}; expected {rule[0]}")
    split = params.get("split")
    if isinstance(split, dict) and all(SHARE[1](split.get(k)) for k in ("train", "valid")) and split["train"] + split["valid"] >= 1:
        problems.append(f"split.train + split.valid = {split['train'] + split['valid']:g}; expected < 1 (the test part is the rest)")
    datasets, dataset = params.get("datasets"), params.get("dataset")
    if isinstance(datasets, dict) and isinstance(dataset, str) and dataset not in datasets:
        problems.append(unknown("datasets", dataset, sorted(datasets)).replace("unknown parameter", "dataset names no section"))
    grid = params.get("grid") if isinstance(params.get("grid"), dict) else {}
    for key, where in (("teachers", "backbones"), ("students", "backbones"), ("methods", "kd")):
        defined, names = params.get(where), grid.get(key)
        if isinstance(defined, dict) and NAMES[1](names):
            for name in names:
                if name not in defined:
                    problems.append(f"grid.{key} names {name!r}, which is not a section of {where}; valid: {', '.join(defined)}")
    if problems:
        raise ParamsError(f"{path}: " + ("; ".join(problems) if len(problems) == 1 else f"{len(problems)} problems:\n  " + "\n  ".join(problems)))


def with_settings(params: dict, settings: dict) -> dict:
    """A copy of `params` with each setting (dotted key → value, as DVC's `-S ++key=value`) set."""
    params = copy.deepcopy(params)
    for dotted, value in settings.items():
        *path, last = dotted.split(".")
        node = params
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
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
