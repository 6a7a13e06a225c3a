"""rcekd: knowledge distillation for top-N recommenders, built around RCE-KD (Zhu & Zhang, ICLR 2026)."""

__version__ = "0.1.0"
