"""Run an `rcekd` command and interrupt it at an exact point, as a crash or a scheduler would:

    python tests/interrupt.py SIGNAL step N  -- <rcekd arguments>   # at the N-th optimiser step
    python tests/interrupt.py SIGNAL save N  -- <rcekd arguments>   # halfway through the N-th torch.save
    python tests/interrupt.py SIGNAL chunk N -- <rcekd cache-teacher arguments>   # after its N-th chunk

SIGNAL is KILL (nothing runs after it) or TERM (what `kill`, Slurm or DVC send first). For `save`, half of
the file's bytes are written to its temporary name before the signal, as when the disk write is cut.
"""

from __future__ import annotations

import io
import os
import signal
import sys

import torch

from stages import cache_teacher
from stages.cli import app


def main() -> None:
    name, point, count, dash, *args = sys.argv[1:]
    assert dash == "--" and point in ("step", "save", "chunk")
    signum, at, calls = getattr(signal, f"SIG{name}"), int(count), [0]

    def reached() -> bool:
        calls[0] += 1
        return calls[0] == at

    if point == "step":
        step = torch.optim.Adam.step

        def interrupted_step(self, *a, **k):
            if reached():
                os.kill(os.getpid(), signum)
            return step(self, *a, **k)

        torch.optim.Adam.step = interrupted_step
    elif point == "chunk":  # the cache's progress report follows each chunk written
        def interrupted_progress(label: str):
            def report(done: int, total: int) -> None:
                if reached():
                    print(f"interrupted after {done}/{total} users", file=sys.stderr, flush=True)
                    os.kill(os.getpid(), signum)
            return report

        cache_teacher.progress = interrupted_progress
    else:
        save = torch.save

        def interrupted_save(obj, f, *a, **k):
            if not reached():
                return save(obj, f, *a, **k)
            buffer = io.BytesIO()
            save(obj, buffer, *a, **k)
            with open(f, "wb") as handle:
                handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                handle.flush()
                os.kill(os.getpid(), signum)
                handle.write(buffer.getvalue()[len(buffer.getvalue()) // 2 :])  # reached only if the signal is caught and ignored

        torch.save = interrupted_save
    sys.argv = ["rcekd", *args]
    app()


if __name__ == "__main__":
    main()
