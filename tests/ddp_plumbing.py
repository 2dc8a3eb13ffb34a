"""Run by tests/test_data.py under `torchrun --nproc_per_node=2`: each rank reads one epoch of a
32-image demo set through `Batches`, and its share of an image folder with one corrupt file; rank 0
writes every rank's image ids and skipped-file counts to a JSON file."""

import json
import sys

import torch
import torch.distributed as dist

from common import cleanup_distributed, setup_distributed
from data import Batches, DemoShapes, ImageFolder, count_skipped, eval_loader


class Indexed(DemoShapes):
    """Demo images whose label is their index, so a rank can report what it saw."""

    def __getitem__(self, index):
        return super().__getitem__(index)[0], index


def main(out_path, folder):
    env = setup_distributed("cpu")
    torch.manual_seed(env.rank)
    assert env.world_size == 2 and dist.get_backend() == "gloo"
    batches = Batches(Indexed(32, 8), batch_size=4, env=env, seed=0, num_workers=1)
    it = iter(batches)
    seen = torch.cat([next(it)[1] for _ in range(batches.steps_per_epoch)]).tolist()
    images = ImageFolder(folder, 8)
    for _ in eval_loader(images, 2, env, num_workers=1):  # only one rank meets the corrupt file
        pass
    gathered = [None, None]
    dist.all_gather_object(gathered, {"seen": seen, "skipped": count_skipped(images, env)})
    if env.is_main:
        with open(out_path, "w") as f:
            json.dump(gathered, f)
    del it, batches
    cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
