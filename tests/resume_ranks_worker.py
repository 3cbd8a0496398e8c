"""Run by tests/test_sigterm.py under torchrun with 2 gloo processes: golf_dist.training.resume.resume_checkpoint when
each rank sees another checkpoints folder.

    torchrun --nproc_per_node 2 tests/resume_ranks_worker.py BASE CASE [CASE ...]

For each CASE rank r resumes from BASE/CASE/rank<r> and writes BASE/CASE-rank<r>.json: the checkpoint it
loaded (path, step, the model's value) or the error it stopped with. Exit status 1 when any case stopped.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch.distributed as dist  # noqa: E402

from golf_dist.errors import GolfError  # noqa: E402
from golf_dist.training.resume import resume_checkpoint  # noqa: E402


def main() -> int:
    base, cases = Path(sys.argv[1]), sys.argv[2:]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    failed = False
    for case in cases:
        try:
            ckpt = resume_checkpoint(base / case / f"rank{rank}", rank, world)
            result = {"path": None} if ckpt is None else {
                "path": str(ckpt["path"]), "step": ckpt["state"]["step"], "value": float(ckpt["model"]["w"][0])}
        except GolfError as err:
            result, failed = {"error": str(err)}, True
        (base / f"{case}-rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
