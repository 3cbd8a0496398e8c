"""Run under torchrun with 2 gloo processes: golf_dist.training.resume.resume_checkpoint (tests/test_sigterm.py)
or, with --resume-from, resume_from_checkpoint (tests/test_resume_trust.py), when each rank sees another folder.

    torchrun --nproc_per_node 2 tests/resume_ranks_worker.py [--resume-from] BASE CASE [CASE ...]

For each CASE rank r resumes from BASE/CASE/rank<r>, or with --resume-from works in that folder and resumes from
the relative path `checkpoints` (train.resume_from: the same words on every rank, each rank's own copy, as
node-local disks show it), then writes BASE/CASE-rank<r>.json: the checkpoint it loaded (path, step, the
model's first value) or the error it stopped with. Exit status 1 when any case stopped.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch.distributed as dist  # noqa: E402

from golf_dist.errors import GolfError  # noqa: E402
from golf_dist.training.resume import resume_checkpoint, resume_from_checkpoint  # noqa: E402


def main() -> int:
    from_option = sys.argv[1] == "--resume-from"
    base, cases = Path(sys.argv[1 + from_option]), sys.argv[2 + from_option :]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    failed = False
    for case in cases:
        try:
            if from_option:
                os.chdir(base / case / f"rank{rank}")
                ckpt = resume_from_checkpoint("checkpoints", Path("scratch"), None, rank, world)
            else:
                ckpt = resume_checkpoint(base / case / f"rank{rank}", rank, world)
            result = (
                {"path": None}
                if ckpt is None
                else {
                    "path": str(ckpt["path"]),
                    "step": ckpt["state"]["step"],
                    "value": float(ckpt["model"]["w"].flatten()[0]),
                }
            )
        except GolfError as err:
            result, failed = {"error": str(err)}, True
        (base / f"{case}-rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
