"""The online learner: a pretrained backbone and a growing head, fine-tuned on the stream in small batches.

A river-sized surface: ``learn_many`` (predict, score, then learn the next
examples in commit order, mixed with a class-balanced replay sample of older
ones so that old classes are not forgotten), ``predict_many``, ``state`` and
``load_state`` (a :class:`~daemon.learning.checkpoint.Checkpoint`). Its parts
have their own modules: where it runs, chosen once (``placement``); decoding,
reading ahead and the embedding cache (``inputs``); the step, eager or
captured as a CUDA graph behind one interface (``step``); ``replay``;
``divergence``; the ``head``; the ``scores``.

Label changes (``sprout labels``: daemon/store/labels.py) are applied between two
steps (:meth:`Learner.apply_label_changes`): everything kept per class (the
outputs, the replay and holdout indexes, the per-class metrics) follows the
change, and the store reader resolves labels with exactly the changes applied.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from daemon.common.settings import ModelSettings, TrainingSettings
from daemon.learning.checkpoint import Checkpoint
from daemon.learning.divergence import fits, reload_starting_backbone, state_is_finite
from daemon.learning.embeddings import EmbeddingCache
from daemon.learning.head import GrowingHead
from daemon.learning.inputs import Inputs, decode_pool
from daemon.learning.placement import Placement, choose_device, choose_mode, network_key, put_on, select_trainable
from daemon.learning.replay import Replay
from daemon.learning.scores import Holdout, Prequential
from daemon.learning.step import load_optimizer, make_optimizer, make_step
from daemon.store.labels import LabelChange, LabelMap, outputs_after
from daemon.store.reader import StoredExample, StoreReader
from models import zoo

log = logging.getLogger("sprout.learner")


class Learner:
    def __init__(self, model: ModelSettings, training: TrainingSettings, state_dir: Path, reader: StoreReader):
        self.model_settings = model
        self.settings = training  # replaced whole by a reload, between two steps (daemon/service/reload.py)
        device = choose_device(training.device)
        mode = choose_mode(training.mode, device)
        if device.type == "cpu":
            torch.set_num_threads(training.cpu_threads)
        torch.manual_seed(training.seed)
        self.replay = Replay(training.seed)
        self.spec = zoo.get(model.backbone)
        self.backbone = zoo.build_starting_network(model.backbone, weights_file=model.weights_file, seed=training.seed)
        put_on(self.backbone, device)
        self._trainable = select_trainable(self.backbone, mode, training.last_blocks)
        self.placement = Placement.of(device, mode, trains=bool(self._trainable), cuda_graphs=training.cuda_graphs)
        rows = training.batch_size + round(training.replay_ratio * training.batch_size)  # a full step
        pool = decode_pool(model.input_size, training.decode_workers, device, rows)
        self.head = GrowingHead(self.spec.embedding_size).to(device)
        self.labels: list[str] = []
        self._label_index: dict[str, int] = {}
        self.optimizer = make_optimizer(self.head, self._trainable, training, capturable=self.placement.graphed)
        self.network_key = network_key(model, self.spec)
        self.cache = (
            EmbeddingCache(state_dir / "embeddings.db", self.network_key, self.spec.embedding_size)
            if mode == "head"
            else None
        )
        self.inputs = Inputs(pool, reader, self.cache, self.backbone, self.spec, self.placement)
        self.update = make_step(
            self.placement, self.inputs, self.backbone, self._trainable, rows, model.input_size, training
        )
        # Only the most recent holdout examples are ever scored.
        self.holdout_index: deque[tuple[int, str]] = deque(maxlen=training.holdout_max_examples)
        self.high_water_mark = 0  # the last example taken, in commit order
        self.step = 0
        self.trained = 0  # new train examples learned
        self.replayed = 0
        self.nonfinite_skipped = 0
        self.nonfinite_streak = 0  # consecutive steps skipped for a non-finite loss
        self.divergence_restores = 0
        # Why the model must go back to a good state, set by a step; the owner of the checkpoints
        # (daemon.learning.training) answers with recover(). None while all is well.
        self.diverged: str | None = None
        self.last_loss: float | None = None
        self.prequential = Prequential()
        self.holdout = Holdout()

    @property
    def reader(self) -> StoreReader:
        """The store's reader, which the input pipeline reads images through too."""
        return self.inputs.reader

    @reader.setter
    def reader(self, reader: StoreReader) -> None:
        self.inputs.reader = reader

    @property
    def device(self) -> torch.device:
        return self.placement.device

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        """The backbone's weights that learn (none in head mode)."""
        return self._trainable

    @property
    def mode(self) -> str:
        return self.placement.mode

    @property
    def reads_ahead(self) -> bool:
        """Whether ``learn_many`` makes use of the upcoming batch: only decoder processes work beside the step."""
        return self.inputs.reads_ahead

    @property
    def compiling_since(self) -> float | None:
        """Monotonic time the first compiled capture began, while it runs (the watchdog allows it longer)."""
        return self.update.compiling_since

    # -- learning ----------------------------------------------------------------------------

    def learn_many(self, batch: Sequence[StoredExample], upcoming: Sequence[StoredExample] = ()) -> None:
        """Predict, score, then learn the next examples in commit order (both splits; only 'train' is learned).

        ``upcoming``: the examples that follow ``batch`` in the store, when known. With decoder processes,
        the next step's replay sample is drawn and its images decoded while this step runs (a replay sample
        drawn one step early does not hold this step's new examples, which the one after it can).
        """
        with self.inputs.step() as ahead:
            if not batch:
                return
            before_batch = self.high_water_mark
            self.high_water_mark = max(self.high_water_mark, max(e.seq for e in batch))
            batch = self.live(batch)
            self.holdout_index.extend((e.seq, e.label) for e in batch if e.split == "holdout")
            train = [e for e in batch if e.split == "train"]
            if not train:
                return
            known_before = len(self.labels)
            for label in dict.fromkeys(e.label for e in train):
                if label not in self._label_index:
                    self.add_class(label)
            if ahead is not None and not ahead.fits(before_batch, train):
                ahead = None  # read for another batch (a restore moved the high-water mark): decoded for nothing
            wanted = round(self.settings.replay_ratio * len(train))
            replay = ahead.replay[:wanted] if ahead is not None else []
            replay += self.replay.sample(wanted - len(replay), self.inputs.with_images)
            examples = train + replay
            self.inputs.prepare(examples, ahead)
            # Predict and learn in one pass: the logits are the model's before this batch's update.
            outcome = self.update(
                self.head,
                self.optimizer,
                examples,
                self._label_index,
                self.settings.balance_classes,
                meanwhile=lambda: self._read_ahead(upcoming),
            )
            if outcome is None:
                return  # nothing in this batch decoded (each one counted in inputs.undecodable)
            learned = [e for e, good in zip(train, outcome.ok[: len(train)], strict=True) if good]
            # Score: the prediction of the model as it was before this batch, over the classes it knew then.
            before = outcome.logits[: len(learned), :known_before].argmax(1).tolist() if known_before else []
            for i, e in enumerate(learned):
                self.prequential.update(e.label, self.labels[before[i]] if known_before else None)
            self.watch_divergence(outcome.finite, outcome.loss)
            self.step += 1
            self.trained += len(learned)
            self.replayed += len(replay)
            self.replay.add(learned)

    def watch_divergence(self, finite: bool, loss: float) -> None:
        """Count a skipped step; mark the learner ``diverged`` after a run of them or with a non-finite state."""
        if finite:
            self.nonfinite_streak = 0
            self.last_loss = loss
        else:
            self.nonfinite_skipped += 1
            self.nonfinite_streak += 1
            log.warning("non-finite loss at step %d: step skipped (%d so far)", self.step, self.nonfinite_skipped)
            # A skip leaves the weights as they were (the captured step's zeroed gradients: but for weight
            # decay), so one bad batch costs nothing; a run of them means the model itself has drifted
            # into a region that overflows.
            if self.nonfinite_streak >= self.settings.divergence_restore_after_steps:
                self.diverged = f"{self.nonfinite_streak} consecutive steps with a non-finite loss"
        # A finite loss does not prove a finite update (an overflowing gradient, a poisoned moment): such
        # weights would make every later step and every export non-finite.
        if self.diverged is None and not self.update.state_finite(self.head, self.optimizer):
            self.diverged = "non-finite weights or optimizer state"

    def _read_ahead(self, upcoming: Sequence[StoredExample]) -> None:
        """Start decoding the next step's new train examples and its replay sample beside this step."""
        train = [e for e in self.live(upcoming) if e.split == "train"]
        if not train or not self.reads_ahead:
            return
        replay = self.replay.sample(round(self.settings.replay_ratio * len(train)), self.inputs.with_images)
        self.inputs.read_ahead(self.high_water_mark, train, replay)

    def add_class(self, label: str) -> None:
        self._label_index[label] = len(self.labels)
        self.labels.append(label)
        self.head.grow(1, self.optimizer)
        log.info("new class %r (now %d classes)", label, len(self.labels))

    def live(self, examples: Sequence[StoredExample]) -> list[StoredExample]:
        """The examples of classes that are not retired: a retired class's examples stay stored, never learned."""
        retired = self.reader.labels.retired
        return [e for e in examples if e.label not in retired]

    # -- evaluation --------------------------------------------------------------------------

    @torch.no_grad()
    def predict_many(self, examples: Sequence[StoredExample]) -> list[str | None]:
        """Top-1 label per example (None when it does not decode or no class is known yet)."""
        embeddings, ok = self.inputs.embeddings(examples, grad=False)
        if not self.labels:
            return [None] * len(examples)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.placement.autocast):
            top = self.head(embeddings).float().argmax(1).tolist()
        it = iter(top)
        return [self.labels[next(it)] if good else None for good in ok]

    @torch.no_grad()
    def embed_photos(self, images: Sequence[bytes]) -> list[np.ndarray | None]:
        """The backbone's embedding of each photo, as it is now (None where one does not decode): for photos that are
        no example (devices' photos for labelling, daemon/learning/field_scout.py), so never cached."""
        rgb = self.inputs.decode_pool.rgb(list(images))
        good = [i for i, r in enumerate(rgb) if r is not None]
        out: list[np.ndarray | None] = [None] * len(images)
        if good:
            x = self.inputs.network_input(np.stack([rgb[i] for i in good]))  # type: ignore[misc]
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.placement.autocast):
                vectors = self.backbone(x).float().cpu().numpy()
            for row, i in enumerate(good):
                out[i] = vectors[row]
        return out

    @torch.no_grad()
    def stored_embeddings(self, count: int, rng: random.Random) -> np.ndarray:
        """Embeddings of up to ``count`` learned train examples drawn uniformly by ``rng`` (never the replay's own
        generator, which the checkpoint keeps): what the stored photos look like to the backbone now."""
        seqs = [seq for seqs in self.replay.index.values() for seq in seqs]
        picks = sorted(rng.sample(seqs, min(count, len(seqs))))
        examples = self.inputs.with_images([StoredExample(seq, "", "train", b"") for seq in picks])
        if not examples:
            return np.zeros((0, self.spec.embedding_size), dtype=np.float32)
        vectors, _ = self.inputs.embeddings(examples, grad=False)
        return vectors.float().cpu().numpy()

    def evaluate_holdout(self) -> Holdout:
        """Score the most recent holdout examples (``training.holdout_max_examples``) as the model is now."""
        recent = list(self.holdout_index)
        hits: dict[str, list[int]] = {}
        for start in range(0, len(recent), 256):
            chunk = recent[start : start + 256]
            examples = self.inputs.with_images([StoredExample(seq, label, "holdout", b"") for seq, label in chunk])
            for e, predicted in zip(examples, self.predict_many(examples), strict=True):
                h = hits.setdefault(e.label, [0, 0])
                h[0] += predicted == e.label
                h[1] += 1
        self.holdout.record({label: (c, n) for label, (c, n) in hits.items()}, self.step)
        return self.holdout

    # -- divergence --------------------------------------------------------------------------

    def finite(self) -> bool:
        """True when every learned weight and every optimizer moment is finite (frozen weights cannot change)."""
        return state_is_finite(self.head, self._trainable, self.optimizer, self.device)

    def recover(self, checkpoint: Checkpoint | None) -> None:
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
        if checkpoint is not None and fits(checkpoint, self.config_digest(), self.labels):
            self._load_network(checkpoint)
            source = f"the checkpoint of step {checkpoint.step}"
        else:
            # No checkpoint yet (or one this learner cannot take): the only known-good state is the
            # one learning started from, the pretrained backbone and a fresh head. Frozen in head mode,
            # the backbone never changed (and its cached embeddings stay valid).
            if self._trainable:
                reload_starting_backbone(self.backbone, self.model_settings, self.settings.seed)
            self.head = GrowingHead(self.spec.embedding_size, 0).to(self.device)
            self.optimizer = make_optimizer(self.head, self._trainable, self.settings, self.placement.graphed)
            source = "the starting weights (no usable checkpoint)"
        # Classes first seen after the checkpoint keep their place in the label map, with fresh outputs.
        self.head.grow(len(self.labels) - self.head.num_classes, self.optimizer)
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

    # -- checkpoints -------------------------------------------------------------------------

    def config_digest(self) -> str:
        """What a checkpoint must match to be resumed: the network and the mode."""
        return hashlib.sha256(f"{self.network_key}|{self.mode}".encode()).hexdigest()[:16]

    def state(self) -> Checkpoint:
        """Everything needed to resume exactly: weights, optimizer, label map, position in the stream, metrics."""
        return Checkpoint(
            config_digest=self.config_digest(),
            backbone=self.spec.name,
            input_size=self.model_settings.input_size,
            mode=self.mode,
            labels=tuple(self.labels),
            head={k: v.detach().cpu() for k, v in self.head.state_dict().items()},
            backbone_state=(
                {k: v.detach().cpu() for k, v in self.backbone.state_dict().items()} if self._trainable else None
            ),
            optimizer=self.optimizer.state_dict(),
            step=self.step,
            high_water_mark=self.high_water_mark,
            trained=self.trained,
            replayed=self.replayed,
            nonfinite_skipped=self.nonfinite_skipped,
            divergence_restores=self.divergence_restores,
            undecodable=self.inputs.undecodable,
            last_loss=self.last_loss,
            prequential=self.prequential.state(),
            holdout=self.holdout.state(),
            rng=self.replay.rng.getstate(),
            label_change=self.label_change,
        )

    def load_state(self, checkpoint: Checkpoint) -> bool:
        """Resume from a checkpoint; False (and a fresh start) when it was made for another network or mode."""
        self.inputs.drop_ahead()  # drawn from the replay index this replaces
        if checkpoint.config_digest != self.config_digest():
            made_for = f"{checkpoint.backbone}/{checkpoint.input_size} px/{checkpoint.mode}"
            this = f"{self.spec.name}/{self.model_settings.input_size} px/{self.mode}"
            log.warning("checkpoint was made for %s; this config is %s: learning afresh from the store", made_for, this)
            return False
        self.labels = list(checkpoint.labels)
        self._label_index = {label: i for i, label in enumerate(self.labels)}
        self._load_network(checkpoint)
        self.step = checkpoint.step
        self.high_water_mark = checkpoint.high_water_mark
        self.trained = checkpoint.trained
        self.replayed = checkpoint.replayed
        self.nonfinite_skipped = checkpoint.nonfinite_skipped
        self.divergence_restores = checkpoint.divergence_restores
        self.inputs.undecodable = checkpoint.undecodable
        self.last_loss = checkpoint.last_loss
        self.prequential = Prequential.from_state(checkpoint.prequential)
        self.holdout = Holdout.from_state(checkpoint.holdout)
        self.replay.rng.setstate(checkpoint.rng)
        # The labels as of the checkpoint; later changes are applied next.
        applied = checkpoint.label_change
        self.reader.labels = LabelMap.replay(c for c in self.reader.label_changes() if c.id <= applied)
        # The replay and holdout indexes are the store's, up to the resumed position.
        self.replay.rebuild(self.reader.labels_up_to(self.high_water_mark, "train"), set(self.labels))
        self.holdout_index.clear()
        self.holdout_index.extend(self.reader.labels_up_to(self.high_water_mark, "holdout"))
        return True

    def _load_network(self, checkpoint: Checkpoint) -> None:
        """The checkpoint's head, backbone and optimizer, under this learner's own optimizer flags."""
        self.head = GrowingHead(self.spec.embedding_size, len(checkpoint.labels)).to(self.device)
        self.head.load_state_dict(checkpoint.head)
        if checkpoint.backbone_state is not None:
            self.backbone.load_state_dict(checkpoint.backbone_state)
        self.optimizer = make_optimizer(self.head, self._trainable, self.settings, self.placement.graphed)
        load_optimizer(self.optimizer, checkpoint.optimizer)

    # -- label changes (sprout labels) ---------------------------------------------------------

    @property
    def label_change(self) -> int:
        """Id of the last label change applied (0: none)."""
        return self.reader.labels.last

    def apply_label_changes(self) -> list[LabelChange]:
        """Apply the label changes recorded in the store since the last one applied; returns them."""
        changes = self.reader.label_changes(self.label_change)
        for change in changes:
            self.apply_label_change(change)
        return changes

    def apply_label_change(self, change: LabelChange) -> None:
        self.inputs.drop_ahead()  # its replay sample carries the old labels
        outputs, removed = outputs_after(self.labels, change)
        if removed is not None:
            self.head.remove(removed, self.optimizer)
        self.labels = outputs
        self._label_index = {label: i for i, label in enumerate(outputs)}
        labels = self.reader.labels
        labels.apply(change)
        # Everything kept per class, under each class's name after the change: a merged class's examples
        # join the one it merged into, a retired class's go.
        self.replay.relabel(labels.resolve)
        self.holdout_index = deque(
            ((seq, name) for seq, label in self.holdout_index if (name := labels.resolve(label)) is not None),
            maxlen=self.holdout_index.maxlen,
        )
        self.prequential.relabel(labels.resolve)
        self.holdout.relabel(labels.resolve)
        log.info("label change %d: %s; %d outputs now", change.id, change, len(self.labels))

    # -- resources ---------------------------------------------------------------------------

    def forget_pruned(self) -> int:
        """Drop the cached embeddings of examples retention deleted from the store; returns how many."""
        return self.inputs.forget_pruned()

    def close(self) -> None:
        """Stop the decoder processes, if any (the learner's thread ends)."""
        self.inputs.close()
