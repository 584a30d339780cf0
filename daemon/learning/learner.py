"""The online learner: a pretrained backbone and a growing head, fine-tuned on the stream in small batches.

One step = the next batch of stored examples in commit order, each first
predicted (prequential accuracy) and then learned, mixed with a class-balanced
replay sample of older examples so that old classes are not forgotten.
Device, mode and autocast are chosen once, here; the step is the same code in
every mode:

- ``head``: the backbone is frozen; each example's embedding is computed once
  and cached (:mod:`daemon.learning.embeddings`), so replay costs almost nothing.
- ``last_blocks`` / ``full``: the last k stages / every weight fine-tunes too
  (bf16 autocast on CUDA). BatchNorm statistics stay frozen: batches of 16-32
  are too small to re-estimate them.

Label changes (``sprout labels``: daemon/store/labels.py) are applied between two
steps (:meth:`Learner.apply_label_changes`): everything kept per class (the
outputs, the replay and holdout indexes, the per-class metrics) follows the
change, and the store reader resolves labels with exactly the changes applied.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import random
import time
from array import array
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from daemon.common.settings import ModelSettings, TrainingSettings
from daemon.learning.decoding import CHUNK, DecodePool, Decoding, auto_workers
from daemon.learning.embeddings import EmbeddingCache
from daemon.learning.head import GrowingHead
from daemon.learning.scores import Holdout, Prequential
from daemon.learning.static_step import StaticStep
from daemon.store.examples import StoredExample, StoreReader
from daemon.store.labels import LabelChange, LabelMap, outputs_after
from models import zoo

log = logging.getLogger("sprout.learner")


def choose_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("training.device = 'cuda' but torch sees no CUDA device: use 'auto' or 'cpu'")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def choose_mode(requested: str, device: torch.device) -> str:
    if requested == "auto":
        return "full" if device.type == "cuda" else "head"
    return requested


@dataclass
class _ReadAhead:
    """The next step, prepared while this one runs: its new train examples, its replay sample, their pixels."""

    after: int  # the high-water mark the upcoming examples follow
    train_seqs: tuple[int, ...]
    replay: list[StoredExample]
    seqs: list[int]  # the examples being decoded, in the order of decoding.result()
    decoding: Decoding


class Learner:
    def __init__(self, model: ModelSettings, training: TrainingSettings, state_dir: Path, reader: StoreReader):
        self.model_settings = model
        self.settings = training
        self.reader = reader
        self.device = choose_device(training.device)
        self.mode = choose_mode(training.mode, self.device)
        if self.device.type == "cpu":
            torch.set_num_threads(training.cpu_threads)
        torch.manual_seed(training.seed)
        self.rng = random.Random(training.seed)
        self.spec = zoo.get(model.backbone)
        self.backbone = zoo.load_backbone(model.backbone, pretrained=self.spec.pretrained is not None)
        if model.weights_file is not None:
            zoo.load_weights(self.backbone, model.weights_file)
        self.backbone.to(self.device).eval()  # eval: BatchNorm statistics stay frozen in every mode
        self._trainable = self._select_trainable()
        self.autocast = self.device.type == "cuda" and self.mode != "head"
        # On CUDA a training backbone runs as one captured graph per step (daemon/learning/static_step.py), in
        # channels-last layout (cuDNN's fastest convolutions for bf16). Head mode's step is one small matmul.
        self._graphed = self.device.type == "cuda" and bool(self._trainable) and training.cuda_graphs
        if self.device.type == "cuda":
            self.backbone.to(memory_format=torch.channels_last)
        # The backbone's shapes never change (the step's rows and the input size are fixed; a new class
        # grows the head only), so it compiles once per process and every later capture reuses it.
        self._compiled = (
            torch.compile(self.backbone, dynamic=False) if self._graphed and training.compile_backbone else None
        )
        if training.compile_backbone and not self._graphed:
            log.warning(
                "training.compile_backbone applies to the CUDA-graphed step only (CUDA, a backbone that "
                "trains, cuda_graphs): ignored here"
            )
        self._static: StaticStep | None = None
        self.compiling_since: float | None = None  # monotonic time the first compiled capture began
        self._captures = 0
        workers = training.decode_workers
        self._rows = training.batch_size + round(training.replay_ratio * training.batch_size)  # a full step
        # Shared pixels for two steps: the one read ahead and whatever this step decodes besides; at least
        # one worker's chunk, which a pool needs (a step of one or two images).
        self.decode_pool = DecodePool(
            model.input_size,
            auto_workers(self.device.type) if workers == "auto" else workers,
            slots=max(2 * self._rows, CHUNK),
        )
        self._ahead: _ReadAhead | None = None
        self._pixels: dict[int, np.ndarray | None] = {}  # this step's decoded images, by seq
        self.read_ahead_decoded = 0  # images whose decoding ran beside an earlier step
        # Normalisation on the device, after a uint8 copy: a quarter of the bytes through PCIe.
        self._mean = torch.tensor(self.spec.preprocessing.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.spec.preprocessing.std, device=self.device).view(1, 3, 1, 1)
        self.head = GrowingHead(self.spec.embedding_size).to(self.device)
        self.labels: list[str] = []
        self._label_index: dict[str, int] = {}
        self.optimizer = self._make_optimizer()
        self.network_key = self._network_key()
        self.cache = (
            EmbeddingCache(state_dir / "embeddings.db", self.network_key, self.spec.embedding_size)
            if self.mode == "head"
            else None
        )
        # Seqs of learned train examples per class, 8 bytes each: months of stream fit in memory.
        self.replay_index: dict[str, array] = {}
        # Only the most recent holdout examples are ever scored.
        self.holdout_index: deque[tuple[int, str]] = deque(maxlen=training.holdout_max_examples)
        self.high_water_mark = 0
        self.step = 0
        self.trained = 0  # new train examples learned
        self.replayed = 0
        self.nonfinite_skipped = 0
        self.nonfinite_streak = 0  # consecutive steps skipped for a non-finite loss
        self.divergence_restores = 0
        # Why the model must go back to a good state, set by a step; the owner of the checkpoints
        # (daemon.training) answers with recover(). None while all is well.
        self.diverged: str | None = None
        self.undecodable = 0
        self.last_loss: float | None = None
        self.prequential = Prequential()
        self.holdout = Holdout()

    # -- set-up ------------------------------------------------------------------------------

    def _select_trainable(self) -> list[nn.Parameter]:
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        if self.mode == "head":
            return []
        blocks = self.backbone.blocks()
        chosen = blocks if self.mode == "full" else blocks[-self.settings.last_blocks :]
        params = [p for block in chosen for p in block.parameters()]
        for p in params:
            p.requires_grad_(True)
        return params

    def _make_optimizer(self) -> torch.optim.Optimizer:
        groups: list[dict[str, Any]] = [{"params": list(self.head.parameters()), "lr": self.settings.learning_rate}]
        if self._trainable:
            # A pretrained backbone wants gentler steps than a fresh head.
            groups.append({"params": self._trainable, "lr": self.settings.learning_rate / 10})
        if self._graphed:
            # Step count and moments on the device, updated without a host sync: what a graph can replay.
            return torch.optim.AdamW(groups, weight_decay=self.settings.weight_decay, foreach=True, capturable=True)
        return torch.optim.AdamW(groups, weight_decay=self.settings.weight_decay)

    def _load_optimizer(self, state: dict[str, Any]) -> None:
        """A fresh optimizer with a checkpoint's state, under this learner's own implementation flags.

        A checkpoint written on a GPU (capturable, foreach) may resume on a CPU, and the other way round.
        """
        self.optimizer = self._make_optimizer()
        flags = {k: self.optimizer.param_groups[0][k] for k in ("capturable", "foreach")}
        self.optimizer.load_state_dict(state)
        for group in self.optimizer.param_groups:
            group.update(flags)
            for param in group["params"]:
                state_of = self.optimizer.state.get(param, {})
                if torch.is_tensor(state_of.get("step")):  # capturable keeps it on the device, otherwise the host
                    state_of["step"] = state_of["step"].to(
                        "cpu" if not flags["capturable"] else param.device, torch.float32
                    )

    def _network_key(self) -> str:
        """What the cached embeddings depend on: backbone, its weights, input size."""
        weights = self.model_settings.weights_file
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:16] if weights else "shipped"
        return f"{self.spec.name}:{digest}:{self.model_settings.input_size}"

    # -- the step ----------------------------------------------------------------------------

    @property
    def reads_ahead(self) -> bool:
        """Whether ``learn`` makes use of the upcoming batch: only decoder processes can work beside the step."""
        return self.decode_pool.in_processes

    def learn(self, batch: Sequence[StoredExample], upcoming: Sequence[StoredExample] = ()) -> None:
        """Predict, then learn, the next examples in commit order (both splits; only 'train' is learned).

        ``upcoming``: the examples that follow ``batch`` in the store, when known. With decoder processes,
        the next step's replay sample is drawn and its images decoded while this step runs (a replay sample
        drawn one step early does not hold this step's new examples, which the one after it can).
        """
        ahead, self._ahead = self._ahead, None
        try:
            self._learn(batch, upcoming, ahead)
        finally:
            self._pixels = {}
            if ahead is not None:
                ahead.decoding.result()  # once only: a read-ahead this step did not use gives its slots back

    def _learn(
        self, batch: Sequence[StoredExample], upcoming: Sequence[StoredExample], ahead: _ReadAhead | None
    ) -> None:
        if not batch:
            return
        before_batch = self.high_water_mark
        self.high_water_mark = max(self.high_water_mark, max(e.seq for e in batch))
        batch = self._live(batch)
        for e in batch:
            if e.split == "holdout":
                self.holdout_index.append((e.seq, e.label))
        train = [e for e in batch if e.split == "train"]
        if not train:
            return
        known_before = len(self.labels)
        for label in dict.fromkeys(e.label for e in train):
            if label not in self.labels:
                self._add_class(label)
        wanted = round(self.settings.replay_ratio * len(train))
        if ahead is not None and (
            ahead.after != before_batch or tuple(e.seq for e in train[: len(ahead.train_seqs)]) != ahead.train_seqs
        ):
            ahead = None  # read for another batch (a restore moved the high-water mark): decoded for nothing
        replay = ahead.replay[:wanted] if ahead is not None else []
        replay += self._replay_sample(wanted - len(replay))
        examples = train + replay
        self._decode_step(examples, ahead)
        static = self._static_step()
        if static is not None:
            x, ok = self._decoded(examples)
            if not any(ok):
                return
            targets = self._targets(examples, ok)
            n = static.launch(x, targets, self._example_weights(targets, len(self.labels)))
            self._read_ahead(upcoming)  # the next step's store reads and decoding, while the GPU runs this one
            logits, loss_value, finite = static.finish(n)
        else:
            self._read_ahead(upcoming)
            embeddings, ok = self._embeddings(examples, grad=bool(self._trainable))
            if not any(ok):
                return  # nothing in this batch decoded (each one counted in self.undecodable)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                logits = self.head(embeddings).float()
            targets = self._targets(examples, ok)
            loss = self._balanced_loss(logits, targets)
            finite = bool(torch.isfinite(loss))
        n_new = sum(ok[: len(train)])
        # Prequential: the prediction of the model as it was before this batch, over the classes it knew then.
        if known_before:
            before = logits[:n_new, :known_before].argmax(1).tolist()
        else:
            before = [None] * n_new
        new_good = [e for e, good in zip(train, ok[: len(train)], strict=True) if good]
        for e, p in zip(new_good, before, strict=True):
            self.prequential.update(e.label, self.labels[p] if p is not None else None)
        if not finite:
            self.nonfinite_skipped += 1
            self.nonfinite_streak += 1
            log.warning("non-finite loss at step %d: step skipped (%d so far)", self.step, self.nonfinite_skipped)
            if static is None:
                self.optimizer.zero_grad(set_to_none=True)
            # A skip leaves the weights as they were (the graphed step's zeroed gradients: but for weight
            # decay), so one bad batch costs nothing; a run of them means the model itself has drifted
            # into a region that overflows.
            if self.nonfinite_streak >= self.settings.divergence_restore_after_steps:
                self.diverged = f"{self.nonfinite_streak} consecutive steps with a non-finite loss"
        elif static is not None:
            self.nonfinite_streak = 0
            self.last_loss = loss_value
        else:
            self.nonfinite_streak = 0
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.last_loss = float(loss.detach())
        # The graphed step checked its weights and moments itself, on the device (daemon/learning/static_step.py).
        if self.diverged is None and not (static.state_finite if static is not None else self.finite()):
            # A finite loss does not prove a finite update (an overflowing gradient, a poisoned moment):
            # such weights would make every later step and every export non-finite.
            self.diverged = "non-finite weights or optimizer state"
        self.step += 1
        self.trained += n_new
        self.replayed += len(examples) - len(train)
        for e in new_good:
            self.replay_index.setdefault(e.label, array("q")).append(e.seq)

    def finite(self) -> bool:
        """True when every learned weight and every optimizer moment is finite (frozen weights cannot change)."""
        tensors = [p.detach() for p in self.head.parameters()] + [p.detach() for p in self._trainable]
        tensors += [
            v
            for state in self.optimizer.state.values()
            for v in state.values()
            if torch.is_tensor(v) and v.is_floating_point()
        ]
        # One flag per tensor and a single read back: one device sync per step, not one per tensor.
        # (AdamW keeps its step count on the CPU even when the weights are on the GPU.)
        flags = [t.isfinite().all().to(self.device) for t in tensors]
        return bool(torch.stack(flags).all()) if flags else True

    def recover(self, payload: dict[str, Any] | None) -> None:
        """Go back to a good model after a divergence: the checkpoint's weights, or the starting ones.

        Only the network and its optimizer go back. The position in the stream (high-water mark), the
        counters, the metrics and the replay index stay where they are: the examples learned since the
        checkpoint stay stored and replayable, but are not learned again as new ones. Moving the
        high-water mark back would feed the very batches that diverged through the same steps again,
        which can diverge again and restore again, forever; moving on, the worst case is the learning of
        one checkpoint interval given up, and replay brings those examples back a few at a time.
        """
        reason, self.diverged = self.diverged, None
        self.nonfinite_streak = 0
        self.divergence_restores += 1
        labels = list(self.labels)
        usable = (
            payload is not None
            and payload.get("config_digest") == self.config_digest()
            and labels[: len(payload["labels"])] == list(payload["labels"])
        )
        if usable:
            self.head = GrowingHead(self.spec.embedding_size, len(payload["labels"])).to(self.device)
            self.head.load_state_dict(payload["head"])
            if payload["backbone_state"] is not None:
                self.backbone.load_state_dict(payload["backbone_state"])
            self._load_optimizer(payload["optimizer"])
            source = f"the checkpoint of step {payload['step']}"
        else:
            # No checkpoint yet (or one this learner cannot take): the only known-good state is the
            # one learning started from, the pretrained backbone and a fresh head. Frozen in head mode,
            # the backbone never changed (and its cached embeddings stay valid); a trained one is
            # reloaded under the learner's seed, as __init__ built it.
            if self._trainable:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self.settings.seed)
                    start = zoo.load_backbone(self.spec.name, pretrained=self.spec.pretrained is not None)
                if self.model_settings.weights_file is not None:
                    zoo.load_weights(start, self.model_settings.weights_file)
                self.backbone.load_state_dict(start.state_dict())  # in place: the trainable list stays valid
            self.head = GrowingHead(self.spec.embedding_size, 0).to(self.device)
            self.optimizer = self._make_optimizer()
            source = "the starting weights (no usable checkpoint)"
        # Classes first seen after the checkpoint keep their place in the label map, with fresh outputs.
        self.head.grow(len(labels) - self.head.num_classes, self.optimizer)
        log.warning(
            "divergence at step %d (%s): back to %s, keeping the stream position at example %d "
            "(%d non-finite steps skipped, %d restores so far)",
            self.step,
            reason,
            source,
            self.high_water_mark,
            self.nonfinite_skipped,
            self.divergence_restores,
        )

    def _balanced_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy in which every class present in the step weighs the same.

        A step holds a batch of new examples, often of one or two classes, and a replay
        sample spread over all of them: unweighted, the new classes dominate the gradient
        and the head drifts towards them (recency bias), which is most of what
        class-incremental streams forget.
        """
        if not self.settings.balance_classes:
            return nn.functional.cross_entropy(logits, targets)
        weights = self._example_weights(targets, logits.shape[1])
        per_example = nn.functional.cross_entropy(logits, targets, reduction="none")
        return (per_example * weights).sum() / weights.sum()

    def _example_weights(self, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Each example's weight in the loss: 1 / (examples of its class in the step), or 1 without balancing."""
        if not self.settings.balance_classes:
            return torch.ones(len(targets), device=targets.device)
        counts = torch.bincount(targets, minlength=num_classes).float()
        return 1.0 / counts[targets]

    def _targets(self, examples: Sequence[StoredExample], ok: list[bool]) -> torch.Tensor:
        return torch.tensor(
            [self._label_index[e.label] for e, good in zip(examples, ok, strict=True) if good], device=self.device
        )

    def _static_step(self) -> StaticStep | None:
        """The CUDA-graphed step (daemon/learning/static_step.py) for a backbone that trains on CUDA; None elsewhere.

        Made again when the head grew or the optimizer was replaced (a restore): the next step captures anew.
        """
        if not self._graphed:
            return None
        if self._static is None or not self._static.matches(self.head, self.optimizer):
            rows = self._rows
            started = time.monotonic()
            if self._compiled is not None and not self._captures:
                self.compiling_since = started  # its warm-up compiles the backbone, for minutes perhaps
                log.info("compiling the backbone (training.compile_backbone): the first step waits for it")
            try:
                self._static = StaticStep(
                    self.backbone,
                    self.head,
                    self.optimizer,
                    rows,
                    self.model_settings.input_size,
                    self.device,
                    self.autocast,
                    graph=self.device.type == "cuda",
                    forward=self._compiled,
                )
            finally:
                self.compiling_since = None
            self._captures += 1
            log.info(
                "training step captured as a CUDA graph%s: %d rows, %d classes (capture %d, %.1fs)",
                " with the compiled backbone" if self._compiled is not None else "",
                rows,
                self.head.num_classes,
                self._captures,
                time.monotonic() - started,
            )
        return self._static

    def _add_class(self, label: str) -> None:
        self._label_index[label] = len(self.labels)
        self.labels.append(label)
        self.head.grow(1, self.optimizer)
        log.info("new class %r (now %d classes)", label, len(self.labels))

    def _live(self, examples: Sequence[StoredExample]) -> list[StoredExample]:
        """The examples of classes that are not retired: a retired class's examples stay stored, never learned."""
        retired = self.reader.labels.retired
        return [e for e in examples if e.label not in retired]

    # -- label changes (sprout labels) ---------------------------------------------------------

    @property
    def label_change(self) -> int:
        """Id of the last label change applied (0: none)."""
        return self.reader.labels.last

    def apply_label_changes(self) -> list[LabelChange]:
        """Apply the label changes recorded in the store since the last one applied; returns them."""
        changes = self.reader.label_changes(self.label_change)
        for change in changes:
            self._apply_label_change(change)
        return changes

    def _apply_label_change(self, change: LabelChange) -> None:
        if self._ahead is not None:  # its replay sample carries the old labels
            self._ahead.decoding.result()
            self._ahead = None
        outputs, removed = outputs_after(self.labels, change)
        if removed is not None:
            self.head.remove(removed, self.optimizer)
        self.labels = outputs
        self._label_index = {label: i for i, label in enumerate(outputs)}
        labels = self.reader.labels
        labels.apply(change)
        # Everything kept per class, under each class's name after the change: a merged class's examples
        # join the one it merged into, a retired class's go.
        replay: dict[str, list[array]] = {}
        for label, seqs in self.replay_index.items():
            if (name := labels.resolve(label)) is not None:
                replay.setdefault(name, []).append(seqs)
        # Sorted, as the replay index's arrays always are (retention trims them by bisection).
        self.replay_index = {
            name: parts[0] if len(parts) == 1 else array("q", sorted(chain(*parts))) for name, parts in replay.items()
        }
        self.holdout_index = deque(
            ((seq, name) for seq, label in self.holdout_index if (name := labels.resolve(label)) is not None),
            maxlen=self.holdout_index.maxlen,
        )
        self.prequential.relabel(labels.resolve)
        self.holdout.relabel(labels.resolve)
        log.info("label change %d: %s; %d outputs now", change.id, change, len(self.labels))

    def _decode_step(self, examples: Sequence[StoredExample], ahead: _ReadAhead | None) -> None:
        """With decoder processes, every image this step needs decoded before it starts: what was read ahead,
        then the rest at once (in parallel, not a few at a time inside the step). In the thread, images are
        decoded as the step needs them, as they always were."""
        if not self.reads_ahead:
            return
        if ahead is not None:
            self._pixels = dict(zip(ahead.seqs, ahead.decoding.result(), strict=True))
            self.read_ahead_decoded += len(ahead.seqs)
        cached = self.cache.get([e.seq for e in examples]).keys() if self.cache is not None else set()
        rest = list(
            {e.seq: e for e in examples if e.image and e.seq not in self._pixels and e.seq not in cached}.values()
        )
        if rest:
            self._pixels.update(zip((e.seq for e in rest), self.decode_pool.rgb([e.image for e in rest]), strict=True))

    def _read_ahead(self, upcoming: Sequence[StoredExample]) -> None:
        """Start decoding the next step's images (its new train examples and its replay sample) in the pool."""
        train = [e for e in self._live(upcoming) if e.split == "train"]
        if not train or not self.reads_ahead:
            return
        replay = self._replay_sample(round(self.settings.replay_ratio * len(train)))
        todo = list({e.seq: e for e in train + replay if e.image}.values())
        self._ahead = _ReadAhead(
            self.high_water_mark,
            tuple(e.seq for e in train),
            replay,
            [e.seq for e in todo],
            self.decode_pool.submit([e.image for e in todo]),
        )

    def _replay_sample(self, count: int) -> list[StoredExample]:
        """Class-balanced: a uniformly chosen known class, then a uniformly chosen stored example of it."""
        classes = [c for c, seqs in self.replay_index.items() if seqs]
        if count <= 0 or not classes:
            return []
        picks = []
        for _ in range(count):
            label = self.rng.choice(classes)
            picks.append(StoredExample(self.rng.choice(self.replay_index[label]), label, "train", b""))
        found = self._with_images(picks)
        if len(found) < len(picks):
            # Retention deletes train examples oldest first (daemon/store/examples.py), so every train example
            # up to the newest one missing is gone too: forget them all at once, in every class.
            gone = max({e.seq for e in picks} - {e.seq for e in found})
            for seqs in self.replay_index.values():
                del seqs[: bisect.bisect_right(seqs, gone)]
        return found

    def _with_images(self, examples: list[StoredExample]) -> list[StoredExample]:
        """Read image bytes back from the store only where no cached embedding will do.

        Examples neither cached nor in the store any more (deleted by retention) are left out.
        """
        cached = self.cache.get([e.seq for e in examples]).keys() if self.cache is not None else set()
        need = [e.seq for e in examples if e.seq not in cached]
        if not need:
            return examples
        images = {e.seq: e for e in self.reader.by_seq(need)}
        return [images.get(e.seq, e) for e in examples if e.seq in cached or e.seq in images]

    def _embeddings(self, examples: Sequence[StoredExample], grad: bool) -> tuple[torch.Tensor, list[bool]]:
        """Backbone outputs (cached in head mode) for the examples that decode; ok[i] says which did."""
        vectors: dict[int, np.ndarray] = self.cache.get([e.seq for e in examples]) if self.cache is not None else {}
        missing = [e for e in examples if e.seq not in vectors]
        computed: dict[int, torch.Tensor] = {}
        if missing:
            x, decoded = self._decode(missing)
            if decoded:
                with (
                    torch.set_grad_enabled(grad),
                    torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast),
                ):
                    out = self.backbone(x).float()
                if self.cache is not None:
                    # Use exactly what the cache will return later, so a step gives the same result
                    # whether an embedding was just computed or read back (after a resume, say).
                    out = out.half().float()
                computed = {e.seq: out[i] for i, e in enumerate(decoded)}
                if self.cache is not None:
                    # A non-finite embedding is not cached: every later replay of the example would read it
                    # back and make its step non-finite too, long after the cause is gone.
                    finite = out.isfinite().all(1).tolist()
                    self.cache.put({e.seq: out[i].detach().cpu().numpy() for i, e in enumerate(decoded) if finite[i]})
        rows, ok = [], []
        for e in examples:
            if e.seq in computed:
                rows.append(computed[e.seq])
                ok.append(True)
            elif e.seq in vectors:
                rows.append(torch.from_numpy(vectors[e.seq]).to(self.device))
                ok.append(True)
            else:
                ok.append(False)
        if not rows:
            return torch.empty(0, self.spec.embedding_size, device=self.device), ok
        return torch.stack(rows), ok

    def _decode(self, examples: Sequence[StoredExample]) -> tuple[torch.Tensor | None, list[StoredExample]]:
        """The network's input for the examples that decode (counting those that do not), and which those are."""
        pixels, decoded = [], []
        rest = [e for e in examples if e.seq not in self._pixels]
        fresh = iter(self.decode_pool.rgb([e.image for e in rest]))
        for e in examples:
            rgb = self._pixels[e.seq] if e.seq in self._pixels else next(fresh)
            if rgb is None:
                self.undecodable += 1
                log.warning("example %d (%s) does not decode: skipped", e.seq, e.label)
                continue
            pixels.append(rgb)
            decoded.append(e)
        return (self._network_input(self._stack(pixels)) if decoded else None), decoded

    def _stack(self, pixels: list[np.ndarray]) -> torch.Tensor:
        """One uint8 (N, H, W, 3) tensor of the images. On CUDA it is stacked straight into pinned memory,
        which the copy to the GPU needs, rather than stacked and then copied there (~25 MB a step)."""
        if self.device.type == "cuda":
            out = torch.empty((len(pixels), *pixels[0].shape), dtype=torch.uint8, pin_memory=True)
            np.stack(pixels, out=out.numpy())
            return out
        return torch.from_numpy(np.stack(pixels))

    def _decoded(self, examples: Sequence[StoredExample]) -> tuple[torch.Tensor | None, list[bool]]:
        """Pixels for the graphed step (no embedding cache: the backbone trains); ok[i] says which decoded."""
        x, decoded = self._decode(examples)
        seqs = {e.seq for e in decoded}
        return x, [e.seq in seqs for e in examples]

    def _network_input(self, rgb: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) RGB -> normalised float32 (N, 3, H, W) on the device.

        On CUDA: pinned host memory and a non-blocking copy, and the NHWC bytes become a channels-last
        tensor without a copy (the layout cuDNN's fastest kernels want). On the CPU a contiguous NCHW
        tensor, as the CPU path always had. The arithmetic is the same as edge devices' preprocessing:
        (pixels / 255 - mean) / std in float32.
        """
        x = rgb if torch.is_tensor(rgb) else torch.from_numpy(rgb)
        if self.device.type == "cuda":
            # Pinned memory is recycled by torch's host allocator only once this copy has completed.
            x = (x if x.is_pinned() else x.pin_memory()).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float()
        if self.device.type != "cuda":
            x = x.contiguous()
        return (x / 255.0 - self._mean) / self._std

    def forget_pruned(self) -> int:
        """Drop the cached embeddings of examples retention deleted from the store; returns how many."""
        if self.cache is None:
            return 0
        return self.cache.forget_pruned(self.reader.retention_frontiers(), self.reader.seqs_between)

    def close(self) -> None:
        """Stop the decoder processes, if any (the learner's thread ends)."""
        self.decode_pool.close()

    # -- evaluation --------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, examples: Sequence[StoredExample]) -> list[str | None]:
        """Top-1 label per example (None when it does not decode or no class is known yet)."""
        embeddings, ok = self._embeddings(examples, grad=False)
        if not self.labels:
            return [None] * len(examples)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            top = self.head(embeddings).float().argmax(1).tolist()
        it = iter(top)
        return [self.labels[next(it)] if good else None for good in ok]

    def evaluate_holdout(self) -> Holdout:
        recent = list(self.holdout_index)
        hits: dict[str, list[int]] = {}
        for start in range(0, len(recent), 256):
            chunk = recent[start : start + 256]
            examples = self._with_images([StoredExample(seq, label, "holdout", b"") for seq, label in chunk])
            for e, predicted in zip(examples, self.predict(examples), strict=True):
                h = hits.setdefault(e.label, [0, 0])
                h[0] += predicted == e.label
                h[1] += 1
        self.holdout.record({label: (c, n) for label, (c, n) in hits.items()}, self.step)
        return self.holdout

    # -- checkpoints -------------------------------------------------------------------------

    def config_digest(self) -> str:
        """What a checkpoint must match to be resumed: the network and the mode."""
        return hashlib.sha256(f"{self.network_key}|{self.mode}".encode()).hexdigest()[:16]

    def state(self) -> dict[str, Any]:
        """Everything needed to resume exactly: weights, optimizer, label map, position in the stream, metrics."""
        return {
            "config_digest": self.config_digest(),
            "backbone": self.spec.name,
            "input_size": self.model_settings.input_size,
            "mode": self.mode,
            "labels": list(self.labels),
            "head": {k: v.detach().cpu() for k, v in self.head.state_dict().items()},
            "backbone_state": (
                {k: v.detach().cpu() for k, v in self.backbone.state_dict().items()} if self._trainable else None
            ),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "high_water_mark": self.high_water_mark,
            "trained": self.trained,
            "replayed": self.replayed,
            "nonfinite_skipped": self.nonfinite_skipped,
            "divergence_restores": self.divergence_restores,
            "undecodable": self.undecodable,
            "last_loss": self.last_loss,
            "prequential": self.prequential.state(),
            "holdout": self.holdout.state(),
            "rng": self.rng.getstate(),
            "label_change": self.label_change,
        }

    def restore(self, payload: dict[str, Any]) -> bool:
        """Resume from a checkpoint; False (and a fresh start) when it was made for another network or mode."""
        if self._ahead is not None:  # drawn from the replay index this replaces
            self._ahead.decoding.result()
            self._ahead = None
        if payload.get("config_digest") != self.config_digest():
            log.warning(
                "checkpoint was made for %s/%s px/%s; this config is %s/%s px/%s: learning afresh from the store",
                payload.get("backbone"),
                payload.get("input_size"),
                payload.get("mode"),
                self.spec.name,
                self.model_settings.input_size,
                self.mode,
            )
            return False
        self.labels = list(payload["labels"])
        self._label_index = {label: i for i, label in enumerate(self.labels)}
        self.head = GrowingHead(self.spec.embedding_size, len(self.labels)).to(self.device)
        self.head.load_state_dict(payload["head"])
        if payload["backbone_state"] is not None:
            self.backbone.load_state_dict(payload["backbone_state"])
        self._load_optimizer(payload["optimizer"])
        self.step = payload["step"]
        self.high_water_mark = payload["high_water_mark"]
        self.trained = payload["trained"]
        self.replayed = payload["replayed"]
        self.nonfinite_skipped = payload["nonfinite_skipped"]
        self.divergence_restores = payload.get("divergence_restores", 0)  # absent from older checkpoints
        self.undecodable = payload["undecodable"]
        self.last_loss = payload.get("last_loss")  # absent from older checkpoints
        self.prequential = Prequential.from_state(payload["prequential"])
        self.holdout = Holdout.from_state(payload["holdout"])
        self.rng.setstate(_as_tuple(payload["rng"]))
        # The labels as of the checkpoint (0 before label changes existed); later changes are applied next.
        applied = payload.get("label_change", 0)
        self.reader.labels = LabelMap.replay(c for c in self.reader.label_changes() if c.id <= applied)
        # The replay and holdout indexes are the store's, up to the resumed position.
        known = set(self.labels)
        self.replay_index = {}
        for seq, label in self.reader.labels_up_to(self.high_water_mark, "train"):
            if label in known:
                self.replay_index.setdefault(label, array("q")).append(seq)
        self.holdout_index.clear()
        self.holdout_index.extend(self.reader.labels_up_to(self.high_water_mark, "holdout"))
        return True


def _as_tuple(value: Any) -> Any:
    """random.Random state comes back from torch.load with lists where it had tuples."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
