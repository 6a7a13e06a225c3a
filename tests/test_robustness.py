"""Property-based tests (hypothesis): the raw-data parsers on malformed lines, and every distillation
loss on extreme scores (±1e4)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_rcekd_pieces import fixed_mf, make_context

from rcekd.kd import CD, DCD, RRD, SLD, FullCE, HetComp, RCEKD, UnKD, VanillaCE
from rcekd.kd.tarec import TripleOT
from rcekd.sources import read_lightgcn, read_recbole_inter, read_snap_checkins, read_users_dat, read_yelp_reviews

FEW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------ parsers

TOKENS = st.one_of(
    st.integers(0, 99).map(str),
    st.sampled_from(["", "-1", "1.5", "x", "²", "٣", "7e3", "\t", " ", "NaN", "2011-02-30T25:00:00Z", '{"a"', "null"]),
    st.text(min_size=1, max_size=4),
)
LINES = st.lists(st.lists(TOKENS, max_size=6).map(" ".join), min_size=0, max_size=8)
TAB_LINES = st.lists(st.lists(TOKENS, max_size=7).map("\t".join), min_size=0, max_size=8)


def check_parse(read, path: Path, target: Path | None = None) -> None:
    """Either a well-formed frame or a ValueError naming the file; nothing else."""
    try:
        frame = read(path)
    except ValueError as err:
        assert str(target or path) in str(err), str(err)
        return
    assert len(frame) > 0
    assert frame["user"].map(lambda v: isinstance(v, str) and v != "").all()
    assert frame["item"].map(lambda v: isinstance(v, str) and v != "").all()
    assert frame["order"].tolist() == list(range(len(frame)))


def write(path: Path, lines: list[str], *, raw: bytes = b"") -> Path:
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + raw)
    return path


@FEW
@given(lines=LINES, raw=st.binary(max_size=4))
def test_users_dat_parser_on_malformed_lines(lines, raw):
    with tempfile.TemporaryDirectory() as tmp:
        check_parse(read_users_dat, write(Path(tmp) / "users.dat", lines, raw=raw))


@FEW
@given(train=LINES, test=LINES)
def test_lightgcn_parser_on_malformed_lines(train, test):
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp) / "train.txt", train)
        write(Path(tmp) / "test.txt", test)
        try:
            frame = read_lightgcn(Path(tmp))
        except ValueError as err:
            assert tmp in str(err), str(err)
            return
        assert set(frame["split"]) <= {"train", "test"} and len(frame) > 0


@FEW
@given(lines=TAB_LINES)
@example(lines=["0\t-1\t0\t0\t0"])  # a date out of pandas' range: it raised even when coercing
def test_snap_checkins_parser_on_malformed_lines(lines):
    with tempfile.TemporaryDirectory() as tmp:
        check_parse(read_snap_checkins, write(Path(tmp) / "checkins.txt", lines))


JSON_VALUES = st.one_of(st.none(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=5),
                        st.sampled_from(["2019-01-01 10:00:00", "not a date"]))


@FEW
@given(records=st.lists(st.dictionaries(st.sampled_from(["user_id", "business_id", "stars", "date", "x"]), JSON_VALUES),
                        max_size=6),
       junk=st.lists(st.sampled_from(["", "{", "[1, 2]", "null", '"text"']), max_size=2))
@example(records=[{"user_id": None, "stars": 4, "date": 0, "business_id": "b"}], junk=[])  # a null id: missing, not NaN
def test_yelp_parser_on_malformed_records(records, junk):
    with tempfile.TemporaryDirectory() as tmp:
        lines = [json.dumps(r) for r in records] + junk
        check_parse(read_yelp_reviews, write(Path(tmp) / "reviews.json", lines))


@FEW
@given(header=st.sampled_from(["user_id:token\titem_id:token", "user_id:token\titem_id:token\ttimestamp:float", "user:token\titem:token"]),
       lines=TAB_LINES)
def test_recbole_parser_on_malformed_lines(header, lines):
    with tempfile.TemporaryDirectory() as tmp:
        check_parse(read_recbole_inter, write(Path(tmp) / "data.inter", [header, *lines]))


# ------------------------------------------------------------------ losses on extreme scores

N_USERS, N_ITEMS = 5, 30


def methods(ctx):
    """Every method (TaReC by its transport term), with sizes that fit 30 items."""
    return {
        "ce": VanillaCE(ctx, k=5),
        "full_ce": FullCE(ctx),
        "cd": CD(ctx, n=2, pool=10, rank_temperature=5.0),
        "rrd": RRD(ctx, k=4, l=6, m=10, t=2.0),
        "dcd": DCD(ctx, m=5, n_under=2, n_over=2, every=1, rank_cap=10, item_batch=8, rrd={"k": 4, "l": 6, "m": 10, "t": 2.0}),
        "hetcomp": HetComp(ctx, k=5, negatives=4, top=3),
        "sld": SLD(ctx, q=4, t=2.0, pool=10),
        "unkd": UnKD(ctx, groups=2, pairs_per_group=3, pool=10, t=5.0),
        "tarec": TripleOT(ctx, ctx.teacher.gather, triples=3, epsilon=0.1, iterations=20),
        **{f"rcekd_{v}": RCEKD(ctx, k=5, l=5, beta=3.0, variant=v) for v in ("full", "wo_sep", "wo_s", "wo_t")},
        "rcekd_code": RCEKD(ctx, k=5, l=5, beta=3.0, sampling="code", pool_top_m=10),
    }


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), teacher_scale=st.sampled_from([1e4, -1e4, 1.0]), student_scale=st.sampled_from([1e4, 1.0]),
       saturate=st.booleans())
def test_every_kd_loss_is_finite_on_extreme_scores(seed, teacher_scale, student_scale, saturate):
    """Teacher and student scores up to ±1e4 (optionally every score at ±1e4): every method's loss
    and its gradients stay finite."""
    rng = np.random.default_rng(seed)
    teacher = rng.normal(size=(N_USERS, N_ITEMS))
    student = rng.normal(size=(N_USERS, N_ITEMS))
    if saturate:
        teacher, student = np.sign(teacher), np.sign(student)
    teacher, student = teacher * teacher_scale, student * student_scale
    train = {u: set(rng.choice(N_ITEMS, 3, replace=False).tolist()) for u in range(N_USERS)}
    with tempfile.TemporaryDirectory() as tmp:
        base = make_context(Path(tmp), teacher.tolist(), train, topk=10, chunk=2)
        lists = torch.stack([torch.stack([torch.randperm(N_ITEMS)[:5] for _ in range(N_USERS)]) for _ in range(2)])
        ctx = type(base)(**{**base.__dict__, "trajectory": lists})
        model = fixed_mf(student)
        users = torch.arange(N_USERS)
        for name, method in methods(ctx).items():
            method.prepare_epoch(model, torch.Generator().manual_seed(seed))
            user_vecs, table = model.encode(users)
            loss = method.loss(users, user_vecs, table)["kd"]
            assert torch.isfinite(loss).all(), (name, loss)
            model.zero_grad()
            loss.sum().backward()
            for parameter in model.parameters():
                assert parameter.grad is None or torch.isfinite(parameter.grad).all(), name


def test_parsers_name_the_file_for_bytes_that_are_not_text(tmp_path):
    path = tmp_path / "users.dat"
    path.write_bytes(b"2 1 2\n\xff\xfe 3\n")
    with pytest.raises(ValueError, match=str(path)):
        read_users_dat(path)
