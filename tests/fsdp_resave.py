"""Run by tests/test_train_dit.py under torchrun: train_dit.py whose `--resume` saves the checkpoint
again at once, on this run's ranks, so that the test can compare a checkpoint resharded on another
number of ranks with the one it was read from (--keep_every keeps the copy)."""

import sys

import common
import train_dit
from common import script_main

resume = common.Run.resume


def resume_and_save(run):
    step = resume(run)
    run.save(step)
    return step


if __name__ == "__main__":
    common.Run.resume = resume_and_save
    script_main(lambda: train_dit.main(sys.argv[1:]))
