"""Training as a torchrun group: data-parallel fine-tuning over the shared store, in fixed-length rounds.

``sprout run --role trainer`` is started by torchrun, one process per GPU (or a few on CPU), on one host
or several. Every rank holds the whole learner (backbone, head, optimizer, label map, replay and holdout
indexes); DistributedDataParallel averages the gradients (gloo on CPU, NCCL on CUDA). A round is one
step of every rank:

1. the ranks agree whether to stop: when any rank was asked to, all stop at this boundary;
2. rank 0 plans the round and broadcasts it (:class:`Round`): the label changes to apply, the next new
   examples in commit order (up to ``world_size x training.batch_size``) and the replay sample;
3. every rank applies the label changes and grows the head for new classes, all alike, then learns its
   slice of the new examples and of the replay sample: every world_size-th example, so slices differ by
   one at most; in head mode, the examples whose seq modulo world_size is its rank, so that each rank's
   embedding cache holds the vectors of the examples that come back to it as replay (a cache miss costs
   a backbone forward; striding, half the replay sample missed with 2 ranks and a round took 2.3 times
   as long). A rank whose slice is empty still steps, with a zero gradient: every all-reduce meets all
   ranks, and no rank waits for data another has;
4. the loss is the round's, not the slice's: each class's weight comes from the whole round's counts
   (one all-reduce), so N ranks step as one process would over the same global batch;
5. every rank gathers what each slice learned and predicted, and so keeps the same indexes and scores.

Rank 0 alone reads the checkpoint at start (and hands it to the others), writes checkpoints at round
boundaries in the checkpoint format the single node writes (the exporter reads it unchanged), scores the
holdout, and serves /healthz and /metrics. A rank that dies fails the collective it was in on every
other rank: torchrun stops the group and starts it again from the last checkpoint, so the rounds since
are learned again, each example once in a round.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from daemon.common.settings import ModelSettings, TrainingSettings
from daemon.learning import checkpoint
from daemon.learning.checkpoint import Checkpoint
from daemon.learning.learner import Learner
from daemon.learning.step import EagerStep, targets_of
from daemon.learning.training import Training
from daemon.store.labels import LabelChange
from daemon.store.location import StoreLocation
from daemon.store.reader import StoredExample

log = logging.getLogger("sprout.group")

# How long a rank waits in a collective for the others. Rank 0 scores the holdout and writes checkpoints
# between two rounds while the others wait: both must fit. A dead peer is noticed at once (its
# connection closes); this bounds a peer that hangs.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
IDLE_WAIT_S = 0.2  # between two rounds with nothing new: rank 0's pause, the others wait in the next collective
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

Pair = tuple[int, str]  # an example's seq and label


class GroupError(Exception):
    """The process was not started as a member of a torchrun group."""


@dataclass(frozen=True)
class Member:
    """This process's place in the group, from the variables torchrun sets."""

    rank: int
    world_size: int
    local_rank: int
    restart: int  # torchrun's restart count: 0 at the group's first start

    @classmethod
    def from_environment(cls, env: Mapping[str, str] = os.environ) -> Member:
        if missing := [name for name in TORCHRUN_VARIABLES if name not in env]:
            raise GroupError(
                f"role = 'trainer' runs under torchrun, which sets {', '.join(missing)}: start it as "
                "`torchrun --nproc-per-node=2 .venv/bin/sprout run --role trainer ...` (docs/scale.md)"
            )
        return cls(
            int(env["RANK"]),
            int(env["WORLD_SIZE"]),
            int(env["LOCAL_RANK"]),
            int(env.get("TORCHELASTIC_RESTART_COUNT", "0")),
        )

    @property
    def leads(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class Round:
    """What rank 0 decided for one round; every rank learns it alike."""

    after: int  # the group's high-water mark before the round
    until: int  # after it: the last example read, learned or not (holdout, retired classes)
    changes: tuple[LabelChange, ...]  # label changes to apply first (rank 0 applied them as it planned)
    new: tuple[Pair, ...]  # train examples to learn, in commit order
    holdout: tuple[Pair, ...]
    replay: tuple[Pair, ...]
    forget_pruned: bool = False  # drop cached embeddings of examples retention deleted, after the round

    @property
    def idle(self) -> bool:
        return self.until == self.after and not self.changes

    def share(self, pairs: tuple[Pair, ...], member: Member, by_seq: bool) -> list[StoredExample]:
        """This rank's slice: every world_size-th in order (slices within one example of each other); or
        ``by_seq``, the examples whose seq falls to this rank, so that a rank always meets the same examples
        and its embedding cache holds their vectors when they come back as replay (head mode)."""
        n, r = member.world_size, member.rank
        mine = [p for p in pairs if p[0] % n == r] if by_seq else pairs[r::n]
        return [StoredExample(seq, label, "train", b"") for seq, label in mine]


@dataclass(frozen=True)
class SliceResult:
    """What one rank's slice of a round gave: every rank applies all of them, in commit order."""

    learned: tuple[tuple[int, str, str | None], ...]  # (seq, label, prediction before the update) that decoded
    replayed: int


class Network(nn.Module):
    """What DDP wraps: the head, behind the backbone when it trains (its input is then pixels, else embeddings)."""

    def __init__(self, head: nn.Module, backbone: nn.Module | None, device_type: str, autocast: bool):
        super().__init__()
        self.head, self.backbone = head, backbone
        self.device_type, self.autocast = device_type, autocast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.autocast):
            if self.backbone is not None:
                x = self.backbone(x)
            return self.head(x).float()


class GroupStep:
    """One rank's step of a round under DistributedDataParallel, rebuilt whenever the head's tensors change."""

    def __init__(self, learner: Learner, member: Member, input_size: int):
        self.learner, self.member, self.input_size = learner, member, input_size
        self.ddp: DistributedDataParallel | None = None
        self._wrapped: tuple[int, ...] = ()
        self.rebuilds = 0

    def _network(self) -> DistributedDataParallel:
        lr = self.learner
        params = (id(lr.head), *(id(p) for p in lr.head.parameters()), id(lr.optimizer))
        if self.ddp is None or params != self._wrapped:
            # A new class (grow), a label change (remove) or a restore replaced the head's tensors: a new
            # wrapper registers its hooks on them, and its construction re-broadcasts rank 0's weights.
            net = Network(lr.head, lr.backbone if lr.trainable else None, lr.device.type, lr.placement.autocast)
            cuda = lr.device.type == "cuda"
            self.ddp = DistributedDataParallel(
                net, device_ids=[lr.device.index or 0] if cuda else None, forward_sync_buffers=False
            )
            self._wrapped = params
            self.rebuilds += 1
        return self.ddp

    def __call__(self, plan: Round, known_before: int) -> tuple[SliceResult, float | None, bool]:
        """Learn this rank's slice; returns what it learned, the round's loss (None when no image of the round
        decoded: no step), and whether the loss was finite (the weights moved)."""
        lr, m = self.learner, self.member
        by_seq = lr.inputs.cache is not None
        mine = plan.share(plan.new, m, by_seq)
        found = lr.inputs.with_images(mine + plan.share(plan.replay, m, by_seq))  # those still stored
        ours = {e.seq for e in mine}
        new_found = sum(e.seq in ours for e in found)
        if lr.trainable:
            x, ok = lr.inputs.decoded(found)
            if x is None:
                x = torch.empty(0, 3, self.input_size, self.input_size, device=lr.device)
        else:
            x, ok = lr.inputs.embeddings(found, grad=False)
        classes = {label: i for i, label in enumerate(lr.labels)}
        targets = targets_of(found, ok, classes, lr.device)
        n_classes = len(lr.labels)
        totals = torch.cat(
            [
                torch.bincount(targets, minlength=n_classes).float(),
                torch.tensor([float(len(targets))], device=lr.device),
            ]
        )
        dist.all_reduce(totals)  # the round's examples per class, and in all
        counts, decoded = totals[:n_classes], float(totals[-1])
        if lr.settings.balance_classes:
            weights, weight_sum = 1.0 / counts[targets], float((counts > 0).sum())
        else:
            weights, weight_sum = torch.ones(len(targets), device=lr.device), decoded
        logits = self._network()(x)
        per_example = nn.functional.cross_entropy(logits, targets, reduction="none")
        local = (per_example * weights).sum()
        loss = local.detach().clone()
        dist.all_reduce(loss)
        round_loss = float(loss) / weight_sum if decoded else None
        finite = bool(torch.isfinite(loss)) and decoded > 0
        lr.optimizer.zero_grad(set_to_none=True)
        # Every rank runs backward, even with nothing decoded or a non-finite loss, so that DDP's all-reduce
        # meets all ranks; DDP averages, so each rank's share is scaled by the world size.
        (local * (m.world_size / max(weight_sum, 1.0))).backward()
        if finite:
            lr.optimizer.step()
        # The prediction of the model before this round's update, over the classes it knew then.
        before = logits.detach()[:, :known_before].argmax(1).tolist() if known_before else []
        learned: list[tuple[int, str, str | None]] = []
        for e, good in zip(found[:new_found], ok[:new_found], strict=True):
            if good:  # the decoded new examples lead the logits, in order
                learned.append((e.seq, e.label, lr.labels[before[len(learned)]] if known_before else None))
        return SliceResult(tuple(learned), len(found) - new_found), round_loss, finite


class GroupTraining(Training):
    """One rank of the trainer group; a part of the daemon (role trainer), like the single node's Training."""

    def __init__(
        self,
        model: ModelSettings,
        settings: TrainingSettings,
        state_dir: Path,
        store: StoreLocation,
        on_group_stop: Callable[[], None] = lambda: None,
        member: Member | None = None,
    ):
        self.member = m = member or Member.from_environment()
        cuda = settings.device in ("auto", "cuda") and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(m.local_rank)  # before the learner places its backbone on "cuda"
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            log.warning(
                "torchrun shares its store with the ranks: a restarted group may fail to connect, handed the "
                "address of a rank it replaced; start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
                "(docs/scale.md)"
            )
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", timeout=COLLECTIVE_TIMEOUT)
        self.comm = torch.device("cuda", m.local_rank) if cuda else torch.device("cpu")
        log.info(
            "trainer group: rank %d of %d (local rank %d, pid %d, restart %d), %s",
            m.rank,
            m.world_size,
            m.local_rank,
            os.getpid(),
            m.restart,
            "NCCL" if cuda else "gloo",
        )
        # Each rank its own embedding cache (one SQLite writer each), beside the shared state.
        super().__init__(model, settings, state_dir, None, store, cache_dir=state_dir / "group" / f"rank-{m.rank}")
        self.name = "learner"
        self.on_group_stop = on_group_stop
        lr = self.learner
        lr.update = EagerStep(lr.inputs, lr.trainable, lr.placement)  # what watches divergence, eagerly
        self._start_alike()
        self.step_fn = GroupStep(lr, m, model.input_size)
        self.rounds = 0
        self.stopped_by = ""  # why the group stopped, once it has

    def _broadcast(self, value: object) -> object:
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.comm)
        return box[0]

    def _start_alike(self) -> None:
        """Every rank from rank 0's state: its checkpoint, or its fresh learner (which seeds alike anyway)."""
        state = self._broadcast(self.learner.state() if self.member.leads else None)
        if not self.member.leads:
            assert isinstance(state, Checkpoint)
            self.learner.load_state(state)
        self.store_high_water_mark = self.learner.high_water_mark

    # -- the loop --------------------------------------------------------------------------------

    def run(self) -> None:
        leads = self.member.leads
        try:
            while True:
                if self._agree_to_stop():
                    break
                plan = self._broadcast(self._plan() if leads else None)
                assert isinstance(plan, Round)
                self.learn_round(plan)
                self.rounds += 1
                if leads:
                    self._after_round(plan)
                if plan.idle and leads:
                    self._stop_requested.wait(IDLE_WAIT_S)
                self.last_progress = time.monotonic()
            if leads:
                self.observe(force=True)
                self.save()
        except BaseException as err:  # the daemon notices the dead thread; torchrun restarts the group
            self.error = err
            log.exception("trainer group: rank %d stopped: %s", self.member.rank, err)
        finally:
            self.learner.close()
            self.reader.close()
            if dist.is_initialized():
                dist.destroy_process_group()

    def _agree_to_stop(self) -> bool:
        flag = torch.tensor([1.0 if self._stop_requested.is_set() else 0.0], device=self.comm)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not self.stopped_by:
            self.stopped_by = "this rank" if self._stop_requested.is_set() else "another rank"
            log.info("trainer group: stopping at round %d (asked on %s)", self.rounds, self.stopped_by)
            self.on_group_stop()  # the daemon's stop, before this thread ends: not a failed part
        return bool(flag.item())

    def _plan(self) -> Round:
        """Rank 0: the next round, read from the store after the group's high-water mark."""
        lr = self.learner
        changes = tuple(lr.apply_label_changes())
        after = lr.high_water_mark
        rows = lr.reader.rows_after(after, self.member.world_size * self.settings.batch_size)
        live = lr.live(rows)
        new = tuple((e.seq, e.label) for e in live if e.split == "train")
        holdout = tuple((e.seq, e.label) for e in live if e.split == "holdout")

        def still_stored(picks: list[StoredExample]) -> list[StoredExample]:
            stored = lr.reader.stored([e.seq for e in picks])
            return [e for e in picks if e.seq in stored]

        wanted = round(self.settings.replay_ratio * len(new))
        replay = tuple((e.seq, e.label) for e in lr.replay.sample(wanted, still_stored))
        due = time.monotonic() - self._saved_at >= self.settings.checkpoint_every_s
        self.store_high_water_mark = max(self.store_high_water_mark, lr.reader.high_water_mark())
        return Round(after, rows[-1].seq if rows else after, changes, new, holdout, replay, forget_pruned=due)

    def learn_round(self, plan: Round) -> None:
        """Every rank: apply the round's label changes and new classes, step on its slice, keep the results."""
        lr = self.learner
        if not self.member.leads:
            for change in plan.changes:
                lr.apply_label_change(change)
        lr.high_water_mark = max(lr.high_water_mark, plan.until)
        lr.holdout_index.extend(plan.holdout)
        if plan.new:
            known_before = len(lr.labels)
            for label in dict.fromkeys(label for _, label in plan.new):
                if label not in lr.labels:
                    lr.add_class(label)
            mine, loss, finite = self.step_fn(plan, known_before)
            gathered: list[SliceResult | None] = [None] * self.member.world_size
            dist.all_gather_object(gathered, mine)
            if loss is not None:  # else no image of the round decoded (each counted as undecodable): no step
                self._keep(gathered, loss, finite)
        if plan.forget_pruned and (forgotten := lr.forget_pruned()):
            log.info("embedding cache: dropped %d vectors of examples retention deleted", forgotten)

    def _keep(self, gathered: list[SliceResult | None], loss: float, finite: bool) -> None:
        """Every rank alike: the slices' results in commit order, the step, and a restore after a divergence."""
        lr = self.learner
        results = [r for r in gathered if r is not None]
        learned = sorted((x for r in results for x in r.learned), key=lambda x: x[0])
        for _, label, predicted in learned:
            lr.prequential.update(label, predicted)
        lr.watch_divergence(finite, loss)
        lr.step += 1
        lr.trained += len(learned)
        lr.replayed += sum(r.replayed for r in results)
        lr.replay.add(StoredExample(seq, label, "train", b"") for seq, label, _ in learned)
        if lr.diverged is not None:  # alike on every rank: the same weights and the same round loss
            saved = self._broadcast(checkpoint.load(self.checkpoints) if self.member.leads else None)
            lr.recover(saved if isinstance(saved, Checkpoint) else None)

    def _after_round(self, plan: Round) -> None:
        """Rank 0, between two rounds: the holdout score, the curves, the checkpoint."""
        lr = self.learner
        if plan.new and lr.step % self.settings.holdout_every_steps == 0 and lr.holdout_index:
            lr.evaluate_holdout()
        if not plan.idle:
            self.observe()
        # After a label change at once (`sprout labels` and the exporter read the checkpoint), else on time.
        if plan.changes or time.monotonic() - self._saved_at >= self.settings.checkpoint_every_s:
            self.save()

    def save(self) -> Path | None:
        return super().save() if self.member.leads else None
