"""``python -m pipeline.train`` that stops at the start of one epoch and says so on a pipe.

A test kills or interrupts the run at that fixed point, after it has read the word, instead of
racing the clock (polling for the checkpoint and hoping the run is still going). Usage::

    PAUSE_AT_EPOCH=2 PAUSE_FD=<fd> python tests/paused_train.py <pipeline.train arguments>

``PAUSE_AT_EPOCH`` counts the epochs this process starts (1 = its first); ``PAUSE_FD`` is the write
end of a pipe the process inherits: it writes ``paused`` there, then waits for a signal.
"""

from __future__ import annotations

import os
import signal
import sys

from pipeline import train as train_stage


def main() -> int:
    pause_at, pipe = int(os.environ["PAUSE_AT_EPOCH"]), int(os.environ["PAUSE_FD"])
    train_one_epoch = train_stage.train_one_epoch
    started = 0

    def pausing(*args, **kwargs):
        nonlocal started
        started += 1
        if started == pause_at:
            os.write(pipe, b"paused\n")
            while True:  # until a signal ends the process or its handler raises (SIGINT, SIGTERM)
                signal.pause()
        return train_one_epoch(*args, **kwargs)

    train_stage.train_one_epoch = pausing  # the name train() looks up for every epoch
    return train_stage.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
