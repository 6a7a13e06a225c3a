"""`rcekd record`'s progress line: the training left is estimated from each method's own landed cells
(their timing.csv), not from the run's pace so far, whose cheap cells come first."""

from pathlib import Path

from stages.record import Record, training_seconds


def timing(folder: Path, run: str, seconds: list[float]) -> None:
    path = folder / "artifacts/citeulike" / run / "timing.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = "".join(f"{epoch},{value},0,{value}\n" for epoch, value in enumerate(seconds, 1))
    path.write_text("epoch,epoch_seconds,prep_seconds,train_seconds\n" + rows)


def test_a_pause_does_not_count_in_a_runs_training_time(tmp_path):
    timing(tmp_path, "mf_to_mf/rd/seed_0", [2.0, 2.0, 500.0, 2.0])  # the third epoch held by SIGSTOP
    assert training_seconds(tmp_path / "artifacts/citeulike/mf_to_mf/rd/seed_0/timing.csv") == 8.0


def test_the_cells_left_are_timed_by_their_own_methods_landed_cells(tmp_path):
    record = Record(tmp_path, "r", {"grid.seeds": [0, 1, 2]}, {})
    cells = [f"s{seed}-{method}" for seed in range(3) for method in ("rd", "mkd", "htd")]
    assert record.progress() == ""  # before start
    record.start(cells, jobs=2)
    timing(tmp_path, "mf_to_mf/rd/seed_0", [3.0] * 600)  # 1,800 s
    timing(tmp_path, "mf_to_mf/rd/seed_1", [3.0] * 1800)  # 5,400 s: rd's mean 3,600 s
    timing(tmp_path, "mf_to_mf/mkd/seed_0", [20.0] * 720)  # 14,400 s
    timing(tmp_path, "mf_to_lightgcn/mkd/seed_0", [20.0] * 720)  # a second pair of the same cell: 28,800 s in all
    record.meta["cells"] = {"s0-rd": {}, "s1-rd": {}, "s0-mkd": {}}
    # left: s2-rd (1 h), s1-mkd and s2-mkd (8 h each), 3 htd cells untimed; 17 h over 2 workers
    assert record.progress() == (" of 9 (about 8.5 h of training left for the 3 cells of timed methods, at 2 at once; "
                                 "not yet timed: htd)")
    record.meta["cells"] = {cell: {} for cell in cells}
    assert record.progress() == " of 9"
