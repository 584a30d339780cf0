"""The trainer group's round time with 1 and 2 ranks (torchrun, gloo on the CPU or NCCL on CUDA).

A round is one step of every rank over one global batch (``--global-batch`` new examples plus the replay
sample), as ``sprout run --role trainer`` runs it (daemon/learning/group.py): rank 0 plans and broadcasts,
each rank learns its slice under DistributedDataParallel, the results are gathered. On one machine the ranks
share its cores (``--threads`` in all, split between them), so 2 ranks here show what the group costs over
one process, not what two machines gain; the all-reduce of the gradient is timed apart, for the scaling model
(docs/scale.md). Fashion-MNIST JPEGs at 224 px on the wire, as the demo sends them, in a real store.

Usage: python bench/group_step.py [--backbone efficientnet_lite0] [--input-size 128] [--modes head,full]
       [--ranks 1,2] [--global-batch 16] [--rounds 4] [--threads 2] [--device cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(args: argparse.Namespace) -> None:
    """One rank, under torchrun: a warm-up round, then ``--rounds`` timed ones; rank 0 prints a JSON line."""
    import torch
    import torch.distributed as dist

    from daemon.common.settings import ModelSettings, TrainingSettings
    from daemon.learning.group import GroupTraining, Round
    from daemon.store.location import StoreLocation

    world = int(os.environ["WORLD_SIZE"])
    training = TrainingSettings(
        mode=args.mode,
        device=args.device,
        cpu_threads=max(1, args.threads // world),
        batch_size=args.global_batch // world,
        decode_workers=0,
        cuda_graphs=False,
    )
    state = Path(args.state)
    group = GroupTraining(
        ModelSettings(backbone=args.backbone, input_size=args.input_size),
        training,
        state,
        StoreLocation.of(state, ""),
    )

    def one_round() -> None:
        plan = group._broadcast(group._plan() if group.member.leads else None)
        assert isinstance(plan, Round)
        group.learn_round(plan)

    one_round()  # warm-up: allocations, the first classes, the DDP wrapper
    times = []
    for _ in range(args.rounds):
        dist.barrier()
        started = time.perf_counter()
        one_round()
        if group.learner.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    # The all-reduce alone, of as many floats as the trained weights (the head, and the backbone's when it trains).
    sizes = sum(p.numel() for p in group.learner.head.parameters()) + sum(p.numel() for p in group.learner.trainable)
    grad = torch.zeros(sizes, device=group.comm)
    reduce_s = []
    for _ in range(5):
        dist.barrier()
        started = time.perf_counter()
        dist.all_reduce(grad)
        if grad.is_cuda:
            torch.cuda.synchronize()
        reduce_s.append(time.perf_counter() - started)
    if group.member.leads:
        print(
            "RESULT "
            + json.dumps(
                {
                    "round_s": statistics.median(times),
                    "rounds": times,
                    "allreduce_s": statistics.median(reduce_s),
                    "floats": sizes,
                    "device": str(group.learner.device),
                }
            ),
            flush=True,
        )
    group.learner.close()
    group.reader.close()
    dist.destroy_process_group()


def measure(args: argparse.Namespace, mode: str, ranks: int, state: Path) -> dict:
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", f"--nproc-per-node={ranks}", __file__, "--worker", "--state", str(state)]
    cmd += ["--mode", mode, "--backbone", args.backbone, "--input-size", str(args.input_size)]
    cmd += ["--global-batch", str(args.global_batch), "--rounds", str(args.rounds), "--threads", str(args.threads)]
    cmd += ["--device", args.device]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if run.returncode != 0 or not lines:
        raise SystemExit(f"torchrun with {ranks} ranks failed ({run.returncode}):\n{run.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--input-size", type=int, default=128)
    ap.add_argument("--modes", default="head,full")
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="torch threads in all, split between the ranks")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--state", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    from learner_speed import examples

    from daemon.store.examples import Store

    ranks = [int(r) for r in args.ranks.split(",")]
    # Enough for the warm-up and the timed rounds, alternated over repeats in one sitting.
    data = examples(args.global_batch * (args.rounds + 1))
    print(
        f"{args.backbone} at {args.input_size} px, global batch {args.global_batch}, {args.threads} threads in all, "
        f"{args.device}",
        flush=True,
    )
    rows = []
    for mode in args.modes.split(","):
        runs: dict[int, list[dict]] = {r: [] for r in ranks}
        for _ in range(args.repeats):
            for r in ranks:
                state = Path(tempfile.mkdtemp(prefix="sprout-group-"))
                store = Store(state / "examples.db")
                store.commit(data)
                store.close()
                runs[r].append(measure(args, mode, r, state))
        for r in ranks:
            round_s = statistics.median(x["round_s"] for x in runs[r])
            row = {
                "mode": mode,
                "ranks": r,
                "round_s": round_s,
                "examples_per_second": args.global_batch / round_s,
                "allreduce_ms": 1000 * statistics.median(x["allreduce_s"] for x in runs[r]),
                "floats": runs[r][0]["floats"],
                "device": runs[r][0]["device"],
            }
            rows.append(row)
            print(
                f"  {mode:5s} {r} rank{'s' if r > 1 else ' '}: {1000 * round_s:8.1f} ms a round, "
                f"{row['examples_per_second']:6.1f} new examples/s, all-reduce of {row['floats']:,} floats "
                f"{row['allreduce_ms']:.2f} ms",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
