"""The learner's input pipeline: stored examples to the network's input, or to cached embeddings.

Images are decoded (:mod:`daemon.learning.decoding`: in a pool of processes on
a GPU machine, else in the learner's thread), stacked as uint8, copied to the
device (through pinned memory on CUDA) and normalised there: a quarter of the
bytes through PCIe. In head mode the frozen backbone's outputs are cached
(:mod:`daemon.learning.embeddings`), and an example whose embedding is cached
is neither read back from the store nor decoded.

With decoder processes the pipeline reads ahead: while a step runs, the next
step's new examples and replay sample are decoded beside it (``read_ahead``);
the next step takes them (``step``), checks they are the ones it needs
(:meth:`ReadAhead.fits`) and decodes only the rest (``prepare``). A read-ahead
holds shared slots of the pool until its result is taken once
(when the step ends), whether or not a step used it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from daemon.learning.decoding import CHUNK, DecodePool, Decoding, auto_workers
from daemon.learning.embeddings import EmbeddingCache
from daemon.learning.placement import Placement
from daemon.store.reader import StoredExample, StoreReader
from models.zoo import BackboneSpec

log = logging.getLogger("sprout.learner")


@dataclass
class ReadAhead:
    """The next step, prepared while this one runs: its new train examples, its replay sample, their pixels."""

    after: int  # the high-water mark the upcoming examples follow
    train_seqs: tuple[int, ...]
    replay: list[StoredExample]
    seqs: list[int]  # the examples being decoded, in the order of decoding.result()
    decoding: Decoding

    def fits(self, after: int, train: Sequence[StoredExample]) -> bool:
        """Read for this batch: not for another (a restore moved the high-water mark), decoded for nothing."""
        return self.after == after and tuple(e.seq for e in train[: len(self.train_seqs)]) == self.train_seqs


def decode_pool(input_size: int, workers: int | str, device: torch.device, rows: int) -> DecodePool:
    """The decoders for steps of ``rows`` images: ``workers`` processes ("auto": none on a CPU, see
    :func:`~daemon.learning.decoding.auto_workers`)."""
    # Shared pixels for two steps: the one read ahead and whatever this step decodes besides; at least
    # one worker's chunk, which a pool needs (a step of one or two images).
    count = auto_workers(device.type) if workers == "auto" else int(workers)
    return DecodePool(input_size, count, slots=max(2 * rows, CHUNK))


class Inputs:
    def __init__(
        self,
        pool: DecodePool,
        reader: StoreReader,
        cache: EmbeddingCache | None,
        backbone: nn.Module,
        spec: BackboneSpec,
        placement: Placement,
    ):
        self.decode_pool = pool
        self.reader = reader
        self.cache = cache
        self.backbone = backbone
        self.embedding_size = spec.embedding_size
        self.device = device = placement.device
        self.autocast = placement.autocast
        self._mean = torch.tensor(spec.preprocessing.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(spec.preprocessing.std, device=device).view(1, 3, 1, 1)
        self._ahead: ReadAhead | None = None
        self._pixels: dict[int, np.ndarray | None] = {}  # this step's decoded images, by seq
        self.read_ahead_decoded = 0  # images whose decoding ran beside an earlier step
        self.undecodable = 0

    @property
    def reads_ahead(self) -> bool:
        """Only decoder processes can work beside the step."""
        return self.decode_pool.in_processes

    # -- a step's images ---------------------------------------------------------------------

    @contextmanager
    def step(self) -> Iterator[ReadAhead | None]:
        """One step's use of the pipeline: gives what was read ahead for it (or None), and when the step ends
        forgets its pixels and takes the read-ahead's result, once, so that its slots go back to the pool
        whether or not the step used it."""
        ahead, self._ahead = self._ahead, None
        try:
            yield ahead
        finally:
            self._pixels = {}
            if ahead is not None:
                ahead.decoding.result()

    def drop_ahead(self) -> None:
        """Forget what was read ahead (its replay sample is out of date: a restore, a label change)."""
        if self._ahead is not None:
            self._ahead.decoding.result()
            self._ahead = None

    def prepare(self, examples: Sequence[StoredExample], ahead: ReadAhead | None) -> None:
        """With decoder processes, every image this step needs decoded before it starts: what was read ahead,
        then the rest at once (in parallel, not a few at a time inside the step). In the thread, images are
        decoded as the step needs them."""
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

    def read_ahead(self, after: int, train: list[StoredExample], replay: list[StoredExample]) -> None:
        """Start decoding the next step's images (its new train examples and its replay sample) in the pool."""
        todo = list({e.seq: e for e in train + replay if e.image}.values())
        self._ahead = ReadAhead(
            after,
            tuple(e.seq for e in train),
            replay,
            [e.seq for e in todo],
            self.decode_pool.submit([e.image for e in todo]),
        )

    def with_images(self, examples: list[StoredExample]) -> list[StoredExample]:
        """Read image bytes back from the store only where no cached embedding will do.

        Examples neither cached nor in the store any more (deleted by retention) are left out.
        """
        cached = self.cache.get([e.seq for e in examples]).keys() if self.cache is not None else set()
        need = [e.seq for e in examples if e.seq not in cached]
        if not need:
            return examples
        images = {e.seq: e for e in self.reader.by_seq(need)}
        return [images.get(e.seq, e) for e in examples if e.seq in cached or e.seq in images]

    # -- to the network ----------------------------------------------------------------------

    def embeddings(self, examples: Sequence[StoredExample], grad: bool) -> tuple[torch.Tensor, list[bool]]:
        """Backbone outputs (cached in head mode) for the examples that decode; ok[i] says which did."""
        vectors: dict[int, np.ndarray] = self.cache.get([e.seq for e in examples]) if self.cache is not None else {}
        missing = [e for e in examples if e.seq not in vectors]
        computed = self._computed(missing, grad) if missing else {}
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
            return torch.empty(0, self.embedding_size, device=self.device), ok
        return torch.stack(rows), ok

    def _computed(self, examples: Sequence[StoredExample], grad: bool) -> dict[int, torch.Tensor]:
        """The backbone's outputs for the examples that decode, by seq; in head mode, cached."""
        x, decoded = self._decode(examples)
        if not decoded:
            return {}
        with (
            torch.set_grad_enabled(grad),
            torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast),
        ):
            out = self.backbone(x).float()
        if self.cache is not None:
            # Use exactly what the cache will return later, so a step gives the same result
            # whether an embedding was just computed or read back (after a resume, say).
            out = out.half().float()
            # A non-finite embedding is not cached: every later replay of the example would read it
            # back and make its step non-finite too, long after the cause is gone.
            finite = out.isfinite().all(1).tolist()
            self.cache.put({e.seq: out[i].detach().cpu().numpy() for i, e in enumerate(decoded) if finite[i]})
        return {e.seq: out[i] for i, e in enumerate(decoded)}

    def decoded(self, examples: Sequence[StoredExample]) -> tuple[torch.Tensor | None, list[bool]]:
        """Pixels for the captured step (no embedding cache: the backbone trains); ok[i] says which decoded."""
        x, decoded = self._decode(examples)
        seqs = {e.seq for e in decoded}
        return x, [e.seq in seqs for e in examples]

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
        return (self.network_input(self._stack(pixels)) if decoded else None), decoded

    def _stack(self, pixels: list[np.ndarray]) -> torch.Tensor:
        """One uint8 (N, H, W, 3) tensor of the images. On CUDA it is stacked straight into pinned memory,
        which the copy to the GPU needs, rather than stacked and then copied there (~25 MB a step)."""
        if self.device.type == "cuda":
            out = torch.empty((len(pixels), *pixels[0].shape), dtype=torch.uint8, pin_memory=True)
            np.stack(pixels, out=out.numpy())
            return out
        return torch.from_numpy(np.stack(pixels))

    def network_input(self, rgb: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) RGB -> normalised float32 (N, 3, H, W) on the device.

        On CUDA: pinned host memory and a non-blocking copy, and the NHWC bytes become a channels-last
        tensor without a copy (the layout cuDNN's fastest kernels want). On the CPU a contiguous NCHW
        tensor. The arithmetic is the same as edge devices' preprocessing: (pixels / 255 - mean) / std
        in float32.
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
        self.decode_pool.close()
