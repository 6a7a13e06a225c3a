"""Values params.yaml tunes in one place and that other sections must not silently inherit.

A variant section of `kd` (`method: X`, e.g. an ablation) is read on its own: the distill stage does not
merge kd.X into it. So every value of kd.X a variant leaves out must be the method's own default, or a
variant would silently keep old values once kd.X is tuned.

kd.<m>.student_weight_decay was tuned for the MF student, and the distill stage applies it to whatever
student it trains. So a record whose students are another backbone must set it for each of its methods."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from rcekd.kd import METHODS

PARAMS = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
KD = PARAMS["kd"]
VARIANTS = sorted(name for name, section in KD.items() if section.get("method", name) != name)


@pytest.mark.parametrize("name", VARIANTS)
def test_a_variant_leaves_out_only_values_its_method_defaults_to(name: str) -> None:
    base = KD[name]["method"]
    defaults = inspect.signature(METHODS[base].__init__).parameters
    differ = {
        key: (value, defaults[key].default if key in defaults else "(read by the loop: no default)")
        for key, value in KD[base].items()
        if key not in KD[name] and (key not in defaults or defaults[key].default != value)
    }
    assert not differ, f"kd.{name} leaves out kd.{base}'s values that are not {base}'s defaults (value, default): {differ}"


def test_the_variants_are_found() -> None:
    assert {"rcekd_wo_sep", "hetcomp_no_stay", "mkd_wo_sld"} <= set(VARIANTS)


@pytest.mark.parametrize("name", sorted(PARAMS["records"]))
def test_a_record_of_other_students_sets_each_methods_student_weight_decay(name: str) -> None:
    settings = PARAMS["records"][name]["set"]
    students = settings.get("grid.students", PARAMS["grid"]["students"])
    if students == ["mf"]:
        return
    methods = settings.get("grid.methods", PARAMS["grid"]["methods"])
    missing = [m for m in methods if "student_weight_decay" in KD[m] and f"kd.{m}.student_weight_decay" not in settings]
    assert not missing, (f"records.{name} trains {students} students but keeps the MF-tuned student_weight_decay of "
                         f"kd.{', kd.'.join(missing)}: set each to the student backbone's own")
    (student,) = students
    own = settings.get(f"backbones.{student}.student.weight_decay", PARAMS["backbones"][student]["student"]["weight_decay"])
    other = {m: settings[f"kd.{m}.student_weight_decay"] for m in methods if f"kd.{m}.student_weight_decay" in settings
             and settings[f"kd.{m}.student_weight_decay"] != own}
    assert not other, f"records.{name}: {other} differ from the {student} student's own weight decay {own}"


@pytest.mark.parametrize("name", sorted(PARAMS["records"]))
def test_a_record_that_sets_a_methods_value_sets_it_for_its_variants_too(name: str) -> None:
    """A record that sets kd.X.key (a searched value) and also runs a variant of X (an ablation) must give the
    variant the same value: the variant is read on its own, so it would otherwise run with X's old value."""
    settings = PARAMS["records"][name]["set"]
    methods = settings.get("grid.methods", PARAMS["grid"]["methods"])
    stale = {}
    for key, value in settings.items():
        parts = key.split(".")
        if parts[0] != "kd" or len(parts) != 3:
            continue
        _, base, field = parts
        for variant in methods:
            if variant != base and KD[variant].get("method") == base:
                held = settings.get(f"kd.{variant}.{field}", KD[variant].get(field, KD[base].get(field)))
                if held != value:
                    stale[f"kd.{variant}.{field}"] = (held, value)
    assert not stale, f"records.{name} sets a method's value its variants do not take (theirs, the method's): {stale}"


SPACES = PARAMS["tuning"]["spaces"]


@pytest.mark.parametrize("name", sorted(SPACES))
def test_a_search_space_sets_only_what_its_runs_read(name: str) -> None:
    """Every key of a space names a parameter its run reads (a typo would make every trial the same run),
    and every value passes params.yaml's checks."""
    from stages.distill import method_settings
    from stages.params import validate, with_settings

    for key, values in SPACES[name].items():
        *path, last = key.split(".")
        if path[0] == "kd" and len(path) == 2:
            for value in values:  # the distill stage's own checks: a known key (method, loop or student), a valid value
                method_settings(with_settings(PARAMS, {key: value}), path[1], Path("params.yaml"))
        elif path[:1] == ["backbones"] and last in ("lr", "weight_decay"):
            assert isinstance(PARAMS["backbones"][path[1]][path[2]], dict), key
        else:
            node = PARAMS
            for part in path + [last]:
                assert isinstance(node, dict) and part in node, f"tuning.spaces.{name}: {key} names no parameter of params.yaml"
                node = node[part]
        for value in values:
            validate(with_settings(PARAMS, {key: value}), Path("params.yaml"))
