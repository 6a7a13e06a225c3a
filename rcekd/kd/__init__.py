"""Distillation methods: one module each, one registry line each.

A method is built from a KDContext plus its own keyword parameters (params.yaml kd.<name>), and
gives the training loop two things: `prepare_epoch(student, generator)` (per-epoch sampling, returns
stats to log) and `loss(users, user_vecs, item_table)` whose "kd" entry is a per-user loss [B]. A method
may also read the batch's training rows and every user's vector (`wants`, see rcekd.train.KDMethod)
and own parameters (an nn.Module: MKD's projectors), which the loop trains and resumes.
The student trained alone is no method: it is `rcekd train --role student` (the train stage).
"""

from rcekd.kd.cd import CD
from rcekd.kd.ce import VanillaCE
from rcekd.kd.common import KDContext
from rcekd.kd.dcd import DCD
from rcekd.kd.de import DE, DERRD
from rcekd.kd.full_ce import FullCE
from rcekd.kd.hetcomp import HetComp
from rcekd.kd.htd import HTD
from rcekd.kd.mkd import MKD
from rcekd.kd.rcekd import RCEKD
from rcekd.kd.rd import RD
from rcekd.kd.rrd import RRD
from rcekd.kd.sld import SLD
from rcekd.kd.tarec import TaReC
from rcekd.kd.unkd import UnKD

METHODS = {
    "ce": VanillaCE,
    "full_ce": FullCE,
    "cd": CD,
    "rrd": RRD,
    "dcd": DCD,
    "hetcomp": HetComp,
    "sld": SLD,
    "unkd": UnKD,
    "tarec": TaReC,
    "rcekd": RCEKD,
    "mkd": MKD,
    "rd": RD,
    "de": DE,
    "de_rrd": DERRD,
    "htd": HTD,
}

__all__ = ["METHODS", "KDContext"]
