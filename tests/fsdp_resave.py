"""Run by tests/test_t2i.py under torchrun: train_t2i.py whose `--resume` saves the checkpoint
again at once, on this run's ranks, so that the test can compare a checkpoint resharded on another
number of ranks with the one it was read from (--keep_every keeps the copy)."""

import sys

import common
import train_t2i
from common import script_main

resume = common.Run.resume


def resume_and_save(run):
    step = resume(run)
    run.save(step)
    return step


if __name__ == "__main__":
    common.Run.resume = resume_and_save
    script_main(lambda: train_t2i.main(sys.argv[1:]))
