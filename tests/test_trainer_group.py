"""The trainer group: `sprout run --role trainer` under torchrun, 2 ranks with gloo on the CPU, on a real store.

torchrun starts the ranks, restarts them when one dies, and forwards its SIGTERM; the tests read what rank 0
leaves: its checkpoint, in the single node's format."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from helpers import REPO, wait_for
from learning_helpers import stream

from daemon.learning import checkpoint
from daemon.learning.checkpoint import Checkpoint
from daemon.store.examples import Store
from daemon.tools.broker import free_port

TORCHRUN = Path(sys.executable).with_name("torchrun")
CLASSES = [0, 1, 2]


def fill(state: Path, per_class: int, seed: int = 31) -> int:
    """A new store of ``per_class`` colour examples of each class (every fifth one holdout); returns its last seq."""
    examples = stream(CLASSES, per_class, seed=seed, order="iid")
    store = Store(state / "examples.db")
    try:
        store.commit(examples)
    finally:
        store.close()
    return len(examples)  # seqs count from 1 in a new store


def add(state: Path, per_class: int, seed: int, classes: list[int] = CLASSES) -> int:
    """More examples in the store; returns how many."""
    examples = stream(classes, per_class, seed=seed, order="iid")
    store = Store(state / "examples.db")
    try:
        store.commit(examples)
    finally:
        store.close()
    return len(examples)


class TrainerGroup:
    """``torchrun --nproc-per-node=N sprout run --role trainer``, as a service manager would start it."""

    def __init__(self, state: Path, ranks: int, batch_size: int, max_restarts: int = 0, mode: str = "head"):
        self.state, self.http_port = state, free_port()
        self.log_path = state.parent / f"{state.name}-group-{ranks}.log"
        self.args = [
            str(TORCHRUN),
            "--standalone",
            f"--nproc-per-node={ranks}",
            f"--max-restarts={max_restarts}",
            "--monitor-interval=0.2",
            "-m",
            "daemon.cli",
            "run",
            "--role",
            "trainer",
            "--state",
            str(state),
            "--model",
            "leaves",
            "--http",
            f"127.0.0.1:{self.http_port}",
        ]
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            # torchrun's own store, shared with the ranks, hands a restarted rank the address of the rank it
            # replaced (pytorch issues #135712, #167288): each attempt gets a store of its own instead.
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
            "SPROUT_MODEL__BACKBONE": "tiny",
            "SPROUT_MODEL__INPUT_SIZE": "32",
            "SPROUT_TRAINING__DEVICE": "cpu",
            "SPROUT_TRAINING__MODE": mode,
            "SPROUT_TRAINING__CPU_THREADS": "1",
            "SPROUT_TRAINING__BATCH_SIZE": str(batch_size),  # per rank: a round learns ranks x batch_size
            "SPROUT_TRAINING__LEARNING_RATE": "0.1",
            "SPROUT_TRAINING__CHECKPOINT_EVERY_S": "0.3",
            "SPROUT_TRAINING__HOLDOUT_EVERY_STEPS": "5",
        }
        self.proc: subprocess.Popen | None = None

    def start(self) -> TrainerGroup:
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        return self

    def log(self) -> str:
        return self.log_path.read_text()

    def checkpoint(self) -> Checkpoint | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"torchrun exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
        try:
            return checkpoint.load(self.state / "checkpoints")
        except checkpoint.CheckpointError:
            return None

    def learned_up_to(self, seq: int, timeout_s: float = 90.0) -> Checkpoint:
        return wait_for(
            lambda: (c := self.checkpoint()) is not None and c.high_water_mark >= seq and c,
            timeout_s,
            f"rank 0 to checkpoint past example {seq} (log: {self.log_path})",
        )

    def members(self) -> dict[tuple[int, int], int]:
        """(restart, rank) -> pid, from each rank's first line."""
        return {
            (int(restart), int(rank)): int(pid)
            for rank, pid, restart in re.findall(
                r"trainer group: rank (\d+) of \d+ \(local rank \d+, pid (\d+), "
                r"restart (\d+)\)",
                self.log(),
            )
        }

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)  # torchrun forwards it to every rank
        return self.proc.wait(60)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def groups():
    started: list[TrainerGroup] = []

    def start(*args, **kwargs) -> TrainerGroup:
        started.append(TrainerGroup(*args, **kwargs).start())
        return started[-1]

    yield start
    for g in started:
        g.kill()
        for pid in g.members().values():  # ranks torchrun may have left behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.parametrize("mode", ["head", "full"])
def test_two_ranks_reach_the_weights_one_rank_reaches_with_the_same_global_batch(tmp_path: Path, groups, mode: str):
    checkpoints = {}
    for ranks in (1, 2):
        state = tmp_path / f"ranks-{ranks}"
        state.mkdir()
        last = fill(state, per_class=40)
        # And a holdout and a train example of class 0: the last round has one new example, so with 2 ranks
        # one slice is empty and that rank steps with a zero gradient.
        last += add(state, per_class=2, seed=77, classes=[0])
        group = groups(state, ranks, batch_size=8 // ranks, mode=mode)
        group.learned_up_to(last)
        group.stop()
        checkpoints[ranks] = checkpoint.load(state / "checkpoints")
    one, two = checkpoints[1], checkpoints[2]
    assert one is not None and two is not None
    # The same rounds: 15 of 8 examples and one of 1, the same classes in the same order, the same replay draws.
    assert (one.step, one.trained, one.replayed, one.labels) == (two.step, two.trained, two.replayed, two.labels)
    assert one.step == 16 and one.trained == 97
    weights = {f"head.{k}": (v, two.head[k]) for k, v in one.head.items()}
    if mode == "full":
        assert one.backbone_state is not None and two.backbone_state is not None
        weights |= {f"backbone.{k}": (v, two.backbone_state[k]) for k, v in one.backbone_state.items()}
    for name, (a, b) in weights.items():
        diff = (a.float() - b.float()).abs().max().item()
        # Only the order of float sums differs (one process, or gloo's sum of two): measured 1.5e-6 at most. AdamW
        # hides a gradient off by a constant factor (it divides by the gradient's scale): not scaling each rank's
        # loss by the world size moved the head by 1.6e-5, weighting classes by the slice's counts by 5e-2.
        assert diff < 5e-6, f"{name}: 1 rank and 2 ranks differ by {diff}"


def test_a_rank_killed_mid_round_is_restarted_by_torchrun_and_the_group_goes_on(tmp_path: Path, groups):
    state = tmp_path / "state"
    state.mkdir()
    first = fill(state, per_class=150)  # 450 examples, ~56 rounds of 2 x 4: still learning when the kill comes
    group = groups(state, 2, batch_size=4, max_restarts=2)
    wait_for(lambda: (c := group.checkpoint()) is not None and c.high_water_mark > 0, 90, "a first checkpoint")
    members = wait_for(lambda: (m := group.members()) and (0, 1) in m and m, 10, "rank 1's pid")
    os.kill(members[(0, 1)], signal.SIGKILL)
    wait_for(lambda: (1, 1) in group.members() and (1, 0) in group.members(), 90, "torchrun to restart both ranks")
    add(state, per_class=50, seed=32)  # more examples after the restart: the group goes on learning
    final = group.learned_up_to(first + 150)
    # Every train example learned once (those after the last checkpoint before the kill: once again).
    assert final.trained == (450 + 150) * 4 // 5
    restarted = group.members()
    assert restarted[(1, 0)] != members[(0, 0)] and restarted[(1, 1)] != members[(0, 1)]
    status = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{group.http_port}/healthz", timeout=5).read())
    assert status.get("learner") is True, status
    assert group.stop() == 0 or "SignalException" in group.log()
    saved = checkpoint.load(state / "checkpoints")
    assert saved is not None and saved.high_water_mark == first + 150


def test_role_trainer_outside_torchrun_exits_78_saying_how_to_start_it(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}
    env.update({"SPROUT_MODEL__BACKBONE": "tiny", "SPROUT_MODEL__INPUT_SIZE": "32"})
    run = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "run", "--role", "trainer", "--state", str(tmp_path / "s")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert run.returncode == 78, run.stderr
    assert "torchrun" in run.stderr and "RANK" in run.stderr
