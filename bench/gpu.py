"""GPU throughput: full fine-tuning step variants, JPEG decoding, and the daemon end to end, in one run.

Three sections, each printed as a markdown table (and all in --json):

1. Training step. Full fine-tuning of EfficientNet-Lite0 (the shipped
   ImageNet weights, ``models.zoo``) with a linear head on its embedding
   (10 classes), AdamW over every weight, cross-entropy, on random inputs of
   --input-size px at each of --batches. BatchNorm statistics stay frozen
   (eval mode), as in the daemon's learner. Variants:

   - eager fp32: the plain step;
   - eager bf16 channels_last: bf16 autocast, model and inputs channels-last;
   - graphed bf16 channels_last: that step captured once as a CUDA graph
     (static input and target buffers, AdamW(foreach, capturable), warmed up
     on a side stream first, as PyTorch's CUDA graphs docs show) and replayed
     after copying the batch into the static buffers; CUDA only;
   - compiled: the bf16 channels_last step with the model under
     ``torch.compile(mode="reduce-overhead")`` (the optimizer stays eager),
     in a child process per batch size so that a compilation can be bounded:
     when compilation and warm-up take longer than --compile-budget-s, the
     child is killed and the cell reads "did not finish in N s", and the larger
     batches are not tried.

   Each figure is the median over --repeats timed windows of --steps steps,
   after --warmup-steps, with the device synchronised before and after each
   window; the speed-up is against eager fp32 at the same batch, in the same run.

2. Decoding. 224x224 JPEGs of about 30 KB (Fashion-MNIST upscaled with
   sensor-like noise, as bench/ingest.py makes them) decoded and resized to
   --input-size by ``daemon.learning.decoding.DecodePool`` in batches of
   --decode-batch: in the learner's thread (workers 0), and in N worker
   processes for each N of --decode-workers ("auto": what the daemon takes on
   a CUDA host), pixels back through shared memory as the learner's pool
   returns them. The pool is warmed up (workers spawned) before the clock starts.

3. End to end. The real daemon (``sprout run``, its own process) against a
   private Mosquitto, training.mode=full on --device at --input-size (and each
   further mode of --e2e-modes in turn: last_blocks and head are reported
   beside full, not instead of it), exports off, every other setting the
   daemon's default (--e2e-env changes one), fed --e2e-examples of those JPEGs
   by the lean QoS 1 load generator
   (bench/loadgen.py) as fast as the broker acknowledges, after a warm-up of
   two batches. From the daemon's /metrics (sprout_examples_learned, polled
   every 0.1 s): the examples learned per second over the steady window (from
   10% to 90% of the examples learned), and overall; the time from the last
   publish to that example being learned (its id is chosen to fall in the
   train split, so its learning shows in the counter; after a burst this is
   the time to work off the backlog); and the time from publishing one example
   to an idle learner to its being learned (median of 3).

The machine (CPU, versions, and the GPU's name) is printed first. --device cuda
without CUDA exits non-zero at once. --device cpu is a smoke run: torch takes
training.cpu_threads threads (1), as the daemon does, the graphed variant reads
"needs CUDA". --quick shrinks every size (batch 2, 64 px, 3 steps, 1 repeat,
200 decode images, 300 examples end to end, which the daemon learns on the
tiny network) and skips the compiled variant unless --compiled on. Not part of
bench/suite.py (it needs a GPU); tests/test_bench_gpu.py runs the smoke run.

Usage: python bench/gpu.py --json bench/out/gpu.json           # on a CUDA host, about 5 minutes (make bench-gpu)
       python bench/gpu.py --device cpu --quick [--json out.json]  # smoke run, under a minute on 2 cores
       [--batches 8,32,64] [--input-size 224] [--steps 30] [--repeats 3] [--compiled auto|on|off]
       [--compile-budget-s 90] [--decode-workers auto|0,4,14] [--e2e-examples 10000] [--e2e-env NAME=VALUE]
       [--e2e-modes full,last_blocks,head]
       [--sections training,decode,e2e]
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import ROOT, DaemonProcess, machine, wait_subscribed
from ingest import make_jpegs
from loadgen import LoadGenerator

from daemon.common.settings import StoreSettings, TrainingSettings
from daemon.ingest.wire import holdout_split
from daemon.learning.decoding import CHUNK, DecodePool, auto_workers
from daemon.tools.broker import Mosquitto
from models import zoo

BACKBONE = "efficientnet_lite0"
CLASSES = 10
BASELINE = "eager fp32"
VARIANTS = (BASELINE, "eager bf16 channels_last", "graphed bf16 channels_last", "compiled")
MODEL = "bench"
TOPIC = f"sprout/{MODEL}/examples"
CAPTURE_WARMUP = 3  # eager steps on a side stream before capture: lazy optimizer state, cuBLAS/cuDNN handles
CHILD_READY_TIMEOUT_S = 180.0  # the compile child's import and model load, before its budget starts
CHILD_MEASURE_TIMEOUT_S = 180.0  # its timed windows, once compiled

FULL = {
    "batches": "8,32,64",
    "input_size": 224,
    "steps": 30,
    "repeats": 3,
    "warmup_steps": 5,
    "decode_images": 2000,
    "e2e_examples": 10_000,
    "e2e_backbone": BACKBONE,
    "distinct": 500,
}
# The daemon learns on the tiny network in a quick run (as `python -m bench --quick` does): in full mode on
# 2 cores EfficientNet-Lite0 learns ~5 examples/s, and 300 of them would take the smoke run a minute alone.
QUICK = {
    "batches": "2",
    "input_size": 64,
    "steps": 3,
    "repeats": 1,
    "warmup_steps": 1,
    "decode_images": 200,
    "e2e_examples": 300,
    "e2e_backbone": "tiny",
    "distinct": 100,
}


# -- training step -----------------------------------------------------------------------------


class Classifier(nn.Module):
    """The backbone and a linear head on its embedding: what the learner trains in full mode."""

    def __init__(self, backbone: nn.Module, embedding_size: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(embedding_size, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def make_model(template: nn.Module, device: torch.device, channels_last: bool) -> Classifier:
    """A fresh copy per cell, so that no variant inherits another's optimizer state, graph or compiled code."""
    torch.manual_seed(0)
    model = Classifier(copy.deepcopy(template), zoo.get(BACKBONE).embedding_size).to(device)
    if channels_last:
        # Module.to takes memory_format (documented, handled at run time), but torch's stubs leave it out.
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    for p in model.parameters():
        p.requires_grad_(True)
    # Eval mode, as the learner: BatchNorm statistics stay frozen (batches of 16-32 are too small to
    # re-estimate them) while every weight, BatchNorm's affine ones included, trains.
    return model.eval()


def make_batch(batch: int, size: int, device: torch.device, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 3, size, size, generator=gen)
    y = torch.randint(0, CLASSES, (batch,), generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(device), y.to(device)


def loss_of(
    model: Callable[[torch.Tensor], torch.Tensor],  # a module, or what torch.compile made of one
    x: torch.Tensor,
    y: torch.Tensor,
    bf16: bool,
    autocast_cache: bool = True,
) -> torch.Tensor:
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=autocast_cache):
        logits = model(x)
    return F.cross_entropy(logits.float(), y)  # the loss in float32, as the learner computes it


def eager_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_of(model, x, y, bf16).backward()
        optimizer.step()

    return step


def graphed_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """The bf16 step captured once as a CUDA graph; each call copies the batch in and replays it."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True, capturable=True)
    static_x, static_y = x.clone(), y.clone()  # clone keeps the channels-last layout

    def body() -> None:
        # Autocast's weight cache would keep casts made at capture time alive across replays: off, as the
        # CUDA graphs docs require.
        loss_of(model, static_x, static_y, bf16=True, autocast_cache=False).backward()
        optimizer.step()

    # Warm-up on a side stream: the optimizer's lazily created state and the libraries' workspaces must
    # exist before capture, and must not be created on the stream being captured.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(CAPTURE_WARMUP):
            optimizer.zero_grad(set_to_none=True)
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # The gradients are then allocated from the graph's pool, and every replay writes them in place.
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        body()

    def step() -> None:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()

    step.graph = graph  # type: ignore[attr-defined]  # the graph (and its memory pool) lives as long as the step
    return step


def compiled_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """The bf16 step with the model compiled (reduce-overhead: CUDA graphs of forward and backward)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    compiled = torch.compile(model, mode="reduce-overhead", dynamic=False)

    def step() -> None:
        # Tells CUDA graph trees that a new iteration begins, so that last step's outputs may be overwritten.
        torch.compiler.cudagraph_mark_step_begin()
        optimizer.zero_grad(set_to_none=True)
        loss_of(compiled, x, y, bf16=True).backward()
        optimizer.step()

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_rates(
    step: Callable[[], None], device: torch.device, batch: int, steps: int, repeats: int, warmup: int
) -> list[float]:
    """Images per second in each of ``repeats`` windows of ``steps`` steps, after ``warmup`` steps."""
    for _ in range(warmup):
        step()
    rates = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        rates.append(batch * steps / (time.perf_counter() - started))
    return rates


def release(device: torch.device) -> None:
    """Give a finished cell's memory back, so the next cell starts from the same free memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def figure(rates: list[float], **extra) -> dict:
    return {"images_per_second": statistics.median(rates), "runs": rates, "note": None, **extra}


def no_figure(note: str) -> dict:
    return {"images_per_second": None, "runs": [], "note": note}


def measure_in_process(variant: str, template: nn.Module, batch: int, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if variant.startswith("graphed") and device.type != "cuda":
        return no_figure("needs CUDA")
    channels_last = "channels_last" in variant
    model = make_model(template, device, channels_last)
    x, y = make_batch(batch, args.input_size, device, channels_last)
    if variant == BASELINE:
        step = eager_step(model, x, y, bf16=False)
    elif variant.startswith("eager"):
        step = eager_step(model, x, y, bf16=True)
    else:
        step = graphed_step(model, x, y)
    rates = timed_rates(step, device, batch, args.steps, args.repeats, args.warmup_steps)
    del step, model, x, y
    release(device)
    return figure(rates)


def measure_compiled(batch: int, args: argparse.Namespace) -> dict:
    """The compiled variant in a child process (this file with --child-compiled): a compilation cannot be
    interrupted from inside, but a process can be killed when it overruns the budget."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child-compiled",
        str(batch),
        "--device",
        args.device,
        "--input-size",
        str(args.input_size),
        "--steps",
        str(args.steps),
        "--repeats",
        str(args.repeats),
        "--warmup-steps",
        str(args.warmup_steps),
    ]
    with tempfile.TemporaryFile("w+") as stderr:
        # Its own process group: the compile workers Inductor starts go with it when it is killed.
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True)
        lines = _line_queue(proc)
        try:
            if (ready := _expect(lines, "READY", CHILD_READY_TIMEOUT_S)) != "READY":
                return no_figure(_child_failure(ready, "start", stderr))
            warm = _expect(lines, "WARM ", args.compile_budget_s)
            if warm == "timeout":
                return no_figure(f"did not finish in {args.compile_budget_s:.0f} s")
            if not warm.startswith("WARM "):
                return no_figure(_child_failure(warm, "compile", stderr))
            result = _expect(lines, "RESULT ", CHILD_MEASURE_TIMEOUT_S)
            if not result.startswith("RESULT "):
                return no_figure(_child_failure(result, "measurement", stderr))
            out = json.loads(result.removeprefix("RESULT "))
            return figure(out["runs"], compile_and_warmup_s=out["compile_and_warmup_s"])
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _line_queue(proc: subprocess.Popen) -> queue.Queue:
    """The child's stdout lines as they come, then None at its end (read in a thread, to wait with a timeout)."""
    lines: queue.Queue = queue.Queue()
    stdout = proc.stdout
    assert stdout is not None, "the child's stdout is not a pipe"

    def pump() -> None:
        for line in stdout:
            lines.put(line.strip())
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _expect(lines: queue.Queue, prefix: str, timeout_s: float) -> str:
    """The first line starting with ``prefix``; "timeout", or "ended" when the child's output ends first."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return "timeout"
        if line is None:
            return "ended"
        if line.startswith(prefix):
            return line


def _child_failure(outcome: str, stage: str, stderr) -> str:
    stderr.seek(0)
    tail = [line for line in stderr.read().splitlines() if line.strip()][-1:]
    why = "timed out" if outcome == "timeout" else f"failed: {tail[0][:160] if tail else 'no message'}"
    return f"{stage} {why}"


def run_child_compiled(args: argparse.Namespace) -> None:
    """The compile child: READY once loaded, WARM <s> once compiled and warmed up, then RESULT <json>."""
    device = torch.device(args.device)
    batch = args.child_compiled
    model = make_model(zoo.build_starting_network(BACKBONE), device, channels_last=True)
    x, y = make_batch(batch, args.input_size, device, channels_last=True)
    step = compiled_step(model, x, y)
    print("READY", flush=True)
    started = time.perf_counter()
    # CUDA graph trees run a step eagerly, record the next and replay from the third: at least three.
    for _ in range(max(3, args.warmup_steps)):
        step()
    sync(device)
    compile_s = time.perf_counter() - started
    print(f"WARM {compile_s:.1f}", flush=True)
    rates = timed_rates(step, device, batch, args.steps, args.repeats, warmup=0)
    print("RESULT " + json.dumps({"runs": rates, "compile_and_warmup_s": round(compile_s, 1)}), flush=True)


def training_section(args: argparse.Namespace) -> dict:
    batches = [int(b) for b in args.batches.split(",")]
    template = zoo.build_starting_network(BACKBONE)
    cells: dict[str, dict[str, dict]] = {v: {} for v in VARIANTS}
    for batch in batches:
        for variant in VARIANTS[:3]:
            cells[variant][str(batch)] = cell = measure_in_process(variant, template, batch, args)
            _progress(variant, batch, cell)
    compile_failed_at = None
    for batch in batches:
        if not args.compiled:
            cell = no_figure("skipped (--quick; --compiled on runs it)" if args.quick else "skipped (--compiled off)")
        elif compile_failed_at is not None:
            # A larger batch compiles the same graphs again: it would overrun as well.
            cell = no_figure(f"not tried (no figure at batch {compile_failed_at})")
        else:
            cell = measure_compiled(batch, args)
            if cell["images_per_second"] is None:
                compile_failed_at = batch
        cells["compiled"][str(batch)] = cell
        _progress("compiled", batch, cell)
    for variant in VARIANTS:
        for key in map(str, batches):
            base, cell = cells[BASELINE][key]["images_per_second"], cells[variant][key]
            cell["speedup_vs_eager_fp32"] = cell["images_per_second"] / base if cell["images_per_second"] else None
    return {
        "backbone": BACKBONE,
        "input_size": args.input_size,
        "batches": batches,
        "steps": args.steps,
        "repeats": args.repeats,
        "warmup_steps": args.warmup_steps,
        "compile_budget_s": args.compile_budget_s,
        "variants": cells,
    }


def _progress(variant: str, batch: int, cell: dict) -> None:
    shown = f"{_rate(cell['images_per_second'])} images/s" if cell["images_per_second"] else cell["note"]
    extra = f" (compile and warm-up {cell['compile_and_warmup_s']} s)" if "compile_and_warmup_s" in cell else ""
    print(f"  {variant:28s} batch {batch:3d}: {shown}{extra}", flush=True)


# -- decoding ----------------------------------------------------------------------------------


def decode_rate(images: list[bytes], size: int, workers: int, batch: int) -> float:
    """Images/s through a pool as the learner makes it: pixels back through shared memory."""
    pool = DecodePool(size, workers, slots=2 * batch)
    try:
        # Warm-up: a chunk per worker, so that every worker process is spawned and has imported Pillow.
        pool.rgb(images[: max(batch, workers * CHUNK)])
        started = time.perf_counter()
        for i in range(0, len(images), batch):
            pool.rgb(images[i : i + batch])
        return len(images) / (time.perf_counter() - started)
    finally:
        pool.close()


def decode_section(args: argparse.Namespace, jpegs: list[tuple[str, bytes]]) -> dict:
    images = [jpegs[i % len(jpegs)][1] for i in range(args.decode_images)]
    if args.decode_workers == "auto":
        counts = [auto_workers("cuda")]  # what the daemon takes on a CUDA host with this many cores
    else:
        counts = [int(n) for n in args.decode_workers.split(",")]
    rates = {}
    for workers in dict.fromkeys([0, *counts]):
        rates[str(workers)] = {"images_per_second": decode_rate(images, args.input_size, workers, args.decode_batch)}
        print(f"  decode, {workers:2d} workers: {_rate(rates[str(workers)]['images_per_second'])} images/s", flush=True)
    return {
        "images": len(images),
        "batch": args.decode_batch,
        "input_size": args.input_size,
        "jpeg_kb_median": _kb_median(jpegs),
        "workers": rates,
    }


def _kb_median(jpegs: list[tuple[str, bytes]]) -> float:
    return round(statistics.median(len(data) for _, data in jpegs) / 1000, 1)


# -- end to end --------------------------------------------------------------------------------


def messages(jpegs: list[tuple[str, bytes]], n: int, prefix: str) -> tuple[list[tuple[str, str, bytes]], int]:
    """n (example_id, label, JPEG) triples ending with a train-split one, and how many are train.

    Holdout examples are scored, never learned: only a train example's learning shows in
    sprout_examples_learned, so the last one published (whose learning the clock waits for) must be one.
    """
    fraction = StoreSettings().holdout_fraction
    out = [(f"{prefix}-{i:06d}", *jpegs[i % len(jpegs)]) for i in range(n)]
    train = [i for i, m in enumerate(out) if holdout_split(m[0], fraction) == "train"]
    if not train:
        raise SystemExit(f"none of the {n} examples falls in the train split: use more --e2e-examples")
    out.append(out.pop(train[-1]))
    return out, len(train)


class LearnedCounter:
    """sprout_examples_learned of a running daemon, failing loudly when the daemon dies or stalls."""

    def __init__(self, daemon: DaemonProcess, log: Path):
        self.daemon, self.log = daemon, log

    def scrape(self) -> dict[str, float]:
        if self.daemon.proc.poll() is not None:
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
            raise SystemExit(f"the daemon exited with {self.daemon.proc.returncode}; its log ends:\n{tail}")
        return self.daemon.metrics()

    def wait_for(self, target: float, timeout_s: float, poll_s: float, what: str) -> tuple[float, list]:
        """Poll until the counter reaches target: (the time it did, [(time, count)] along the way)."""
        deadline, samples = time.monotonic() + timeout_s, [(time.monotonic(), 0.0)]
        while time.monotonic() < deadline:
            learned = self.scrape().get("sprout_examples_learned")
            if learned is not None:  # absent until the learner is up, or when a scrape fails
                samples.append((time.monotonic(), learned))
                if learned >= target:
                    return samples[-1][0], samples[1:]
            time.sleep(poll_s)
        raise SystemExit(
            f"{what}: the daemon learned {samples[-1][1]:.0f} of {target:.0f} within {timeout_s:.0f} s "
            f"(--keep-workdir keeps its log)"
        )

    def settled(self, at_least: float, timeout_s: float, quiet_s: float = 2.0) -> float:
        """The count once it is at least at_least, with no backlog, and unchanged for quiet_s.

        The quiet period outlasts a step (the backlog gauge can read 0 for the length of one step
        after a commit, until the learner next reads the store).
        """
        self.wait_for(at_least, timeout_s, 0.2, "warm-up")
        deadline, last = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            m = self.scrape()
            now = (m.get("sprout_examples_learned"), m.get("sprout_learner_backlog"))
            if now == last and now[1] == 0 and now[0] is not None:
                return now[0]
            last = now
            time.sleep(quiet_s)
        raise SystemExit(f"the learner did not settle within {timeout_s:.0f} s")


def steady_rate(samples: list[tuple[float, float]], total: float) -> float:
    """Examples learned per second between 10% and 90% of total: past start-up, before the tail."""
    inside = [(t, n) for t, n in samples if 0.1 * total <= n <= 0.9 * total]
    if len(inside) >= 2 and inside[-1][1] > inside[0][1]:
        (t0, n0), (t1, n1) = inside[0], inside[-1]
    else:  # too short a run for a window: from the first example learned to the last
        t0, n0 = next((t, n) for t, n in samples if n > 0)
        t1, n1 = samples[-1]
    return (n1 - n0) / (t1 - t0) if t1 > t0 else float("nan")


def e2e_env(args: argparse.Namespace, mode: str = "full") -> dict[str, str]:
    return {
        "SPROUT_LOGGING__LEVEL": "WARNING",
        "SPROUT_MODEL__BACKBONE": args.e2e_backbone,
        "SPROUT_TRAINING__DEVICE": args.device,
        "SPROUT_TRAINING__CPU_THREADS": str(args.cpu_threads),
        "SPROUT_TRAINING__MODE": mode,
        "SPROUT_MODEL__INPUT_SIZE": str(args.input_size),
        "SPROUT_EXPORT__ENABLED": "false",  # exports would take turns with the learner: the learner alone
        **dict(pair.split("=", 1) for pair in args.e2e_env),
    }


def e2e_section(args: argparse.Namespace, jpegs: list[tuple[str, bytes]], workdir: Path, mode: str = "full") -> dict:
    broker = Mosquitto(workdir / "broker").start()
    log = workdir / "daemon.log"
    daemon = DaemonProcess(broker.url, MODEL, workdir / "state", e2e_env(args, mode), log)
    counter = LearnedCounter(daemon, log)
    try:
        wait_subscribed(broker.url, TOPIC, jpegs[0][1])
        host, port = broker.url.removeprefix("mqtt://").split(":")
        gen = LoadGenerator(host, int(port), window=1000)
        try:
            # Warm-up: the model on the device, the decoder processes, the first steps' allocations.
            warm, warm_train = messages(jpegs, 2 * TrainingSettings().batch_size, "warm")
            gen.publish_all(TOPIC, warm)
            baseline = counter.settled(warm_train, args.e2e_timeout_s)
            burst = _burst(gen, counter, jpegs, args, baseline)
            idle = [_one_at_idle(gen, counter, jpegs, i, args) for i in range(3)]
            decoders = counter.scrape()
        finally:
            gen.close()
    finally:
        daemon.stop()
        broker.stop()
    print(
        f"  end to end, {mode}: {burst['learned_per_second_steady']:,.1f} examples learned/s (steady), last publish to "
        f"learned {burst['last_publish_to_learned_s']} s, one at idle {statistics.median(idle):.2f} s; "
        f"{decoders.get('sprout_images_decoded_ahead', 0):,.0f} images decoded beside an earlier step, "
        f"{decoders.get('sprout_decoder_fallbacks', 0):.0f} decoder fallbacks, "
        f"{decoders.get('sprout_images_decoded_short_of_slots', 0):.0f} images decoded short of slots",
        flush=True,
    )
    return {
        "device": args.device,
        "backbone": args.e2e_backbone,
        "mode": mode,
        "input_size": args.input_size,
        "jpeg_kb_median": _kb_median(jpegs),
        "env": e2e_env(args, mode),
        **burst,
        "idle_publish_to_learned_s": round(statistics.median(idle), 3),
        "idle_runs_s": idle,
        "images_decoded_ahead": decoders.get("sprout_images_decoded_ahead"),
        "decoder_fallbacks": decoders.get("sprout_decoder_fallbacks"),
        "images_decoded_short_of_slots": decoders.get("sprout_images_decoded_short_of_slots"),
    }


def _burst(gen: LoadGenerator, counter: LearnedCounter, jpegs, args: argparse.Namespace, baseline: float) -> dict:
    msgs, n_train = messages(jpegs, args.e2e_examples, "e2e")
    marks: dict[str, float] = {}

    def publish() -> None:
        gen.publish_all(TOPIC, msgs[:-1])
        marks["last_publish"] = time.monotonic()
        gen.publish_all(TOPIC, msgs[-1:])
        marks["acked"] = time.monotonic()

    answered = gen.acked + gen.failed
    feeder = threading.Thread(target=publish, daemon=True)
    started = time.monotonic()
    feeder.start()
    done, samples = counter.wait_for(baseline + n_train, args.e2e_timeout_s, 0.1, "end to end")
    feeder.join(60)
    if "acked" not in marks:
        raise SystemExit("the feeder did not finish publishing (see its error above)")
    if gen.acked + gen.failed - answered != len(msgs) or gen.failed:
        raise SystemExit(f"the broker acked {gen.acked + gen.failed - answered} of {len(msgs)} ({gen.failed} failed)")
    relative = [(t - started, n - baseline) for t, n in samples]
    return {
        "examples": len(msgs),
        "train_examples": n_train,
        "publish_s": round(marks["acked"] - started, 2),
        "learned_per_second_steady": steady_rate(relative, n_train),
        "learned_per_second_overall": n_train / (done - started),
        "last_publish_to_learned_s": round(done - marks["last_publish"], 2),
    }


def _one_at_idle(gen: LoadGenerator, counter: LearnedCounter, jpegs, i: int, args: argparse.Namespace) -> float:
    """Seconds from publishing one train example to an idle learner to its being learned."""
    before = counter.settled(0, args.e2e_timeout_s)
    example_id = next(
        f"idle{i}-{k}"
        for k in itertools.count()
        if holdout_split(f"idle{i}-{k}", StoreSettings().holdout_fraction) == "train"
    )
    published = time.monotonic()
    gen.publish_all(TOPIC, [(example_id, *jpegs[i % len(jpegs)])])
    done, _ = counter.wait_for(before + 1, args.e2e_timeout_s, 0.02, "one example at idle")
    return round(done - published, 3)


# -- report ------------------------------------------------------------------------------------


def render(report: dict) -> str:
    parts = []
    if tr := report.get("training"):
        batches = tr["batches"]
        parts += [
            f"### Training step: full fine-tuning of {tr['backbone']}, {tr['input_size']} px, "
            f"images/s (speed-up against eager fp32)",
            "",
            "| variant | " + " | ".join(f"batch {b}" for b in batches) + " |",
            "|---|" + "---:|" * len(batches),
        ]
        for variant, cells in tr["variants"].items():
            parts.append(f"| {variant} | " + " | ".join(_cell(cells[str(b)]) for b in batches) + " |")
        parts.append("")
    if dec := report.get("decode"):
        parts += [
            f"### Decoding: {dec['images']:,} JPEGs (224x224, median {dec['jpeg_kb_median']} KB) to "
            f"{dec['input_size']} px in batches of {dec['batch']}",
            "",
            "| decode workers | images/s |",
            "|---|---:|",
        ]
        for workers, d in dec["workers"].items():
            name = "0 (the learner's thread)" if workers == "0" else workers
            parts.append(f"| {name} | {_rate(d['images_per_second'])} |")
        parts.append("")
    for e2e in (report.get("end_to_end_by_mode") or {}).values():
        parts += [
            f"### End to end: sprout run, {e2e['backbone']}, training.mode={e2e['mode']} on {e2e['device']}, "
            f"{e2e['input_size']} px, "
            f"{e2e['examples']:,} examples ({e2e['train_examples']:,} train) published in {e2e['publish_s']} s",
            "",
            "| figure | value |",
            "|---|---:|",
            f"| examples learned per second, steady (10% to 90%) | {e2e['learned_per_second_steady']:,.1f} |",
            f"| examples learned per second, first publish to last learned | "
            f"{e2e['learned_per_second_overall']:,.1f} |",
            f"| last publish to that example learned | {e2e['last_publish_to_learned_s']} s |",
            f"| one example to an idle learner, publish to learned (median of 3) | "
            f"{e2e['idle_publish_to_learned_s']} s |",
            "",
        ]
    return "\n".join(parts)


def _cell(cell: dict) -> str:
    if cell["images_per_second"] is None:
        return cell["note"]
    return f"{_rate(cell['images_per_second'])} ({cell['speedup_vs_eager_fp32']:.2f}x)"


def _rate(per_second: float) -> str:
    """Whole numbers where they are large, three significant digits where they are small (a CPU's)."""
    return f"{per_second:,.0f}" if per_second >= 100 else f"{per_second:.3g}"


def machine_line(device: str) -> dict[str, str]:
    info = machine()
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = str(torch.version.cuda)
    return info


# -- main --------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, compiled variant skipped: a smoke run")
    ap.add_argument("--batches", help=f"comma-separated batch sizes (default {FULL['batches']})")
    ap.add_argument("--input-size", type=int, help=f"square input side in px (default {FULL['input_size']})")
    ap.add_argument("--steps", type=int, help=f"steps per timed window (default {FULL['steps']})")
    ap.add_argument("--repeats", type=int, help=f"timed windows per figure (default {FULL['repeats']})")
    ap.add_argument("--warmup-steps", type=int, help=f"untimed steps first (default {FULL['warmup_steps']})")
    ap.add_argument(
        "--compiled",
        choices=["auto", "on", "off"],
        default="auto",
        help="the torch.compile variant; auto: on, except with --quick",
    )
    ap.add_argument(
        "--compile-budget-s",
        type=float,
        default=90.0,
        help="most seconds of compilation and warm-up per batch size before the variant gives up",
    )
    ap.add_argument("--decode-images", type=int, help=f"images per decode figure (default {FULL['decode_images']})")
    ap.add_argument("--decode-batch", type=int, default=64)
    ap.add_argument(
        "--decode-workers",
        default="auto",
        help="comma-separated worker counts beside 0; auto: the daemon's count on a CUDA host",
    )
    ap.add_argument("--e2e-examples", type=int, help=f"examples fed to the daemon (default {FULL['e2e_examples']})")
    ap.add_argument("--e2e-backbone", help=f"the daemon's model.backbone (default {BACKBONE}; tiny with --quick)")
    ap.add_argument(
        "--e2e-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the daemon (e.g. SPROUT_TRAINING__BATCH_SIZE=64); repeatable",
    )
    ap.add_argument("--e2e-timeout-s", type=float, default=300.0)
    ap.add_argument(
        "--e2e-modes",
        default="full",
        help="comma-separated training.mode values, each run end to end in turn (full, last_blocks, head)",
    )
    ap.add_argument(
        "--cpu-threads",
        type=int,
        default=TrainingSettings().cpu_threads,
        help="torch threads with --device cpu, here and in the daemon (default: the daemon's)",
    )
    ap.add_argument("--distinct", type=int, help=f"distinct JPEGs made and cycled (default {FULL['distinct']})")
    ap.add_argument("--sections", default="training,decode,e2e")
    ap.add_argument("--keep-workdir", action="store_true", help="keep the daemon's state and log (path printed)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child-compiled", type=int, help=argparse.SUPPRESS)  # internal: the compile child's batch
    args = ap.parse_args()
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.compiled = args.compiled == "on" or (args.compiled == "auto" and not args.quick)
    return args


def main() -> None:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"bench/gpu.py: --device cuda, but torch {torch.__version__} sees no CUDA device "
            "(no GPU, or a CPU-only build): run it on a CUDA host, or --device cpu for a smoke run"
        )
    if args.device == "cpu":
        # As the daemon does (training.cpu_threads): on a small, shared machine more threads than free cores
        # stall at every parallel region (measured on 2 busy cores: 7 s a step at 2 threads, 0.14 s at 1).
        torch.set_num_threads(args.cpu_threads)
    if args.child_compiled is not None:
        run_child_compiled(args)
        return
    sections = set(args.sections.split(","))
    report: dict = {"machine": machine_line(args.device), "device": args.device, "quick": args.quick}
    print("machine: " + ", ".join(f"{k} {v}" for k, v in report["machine"].items()), flush=True)
    if "training" in sections:
        report["training"] = training_section(args)
        release(torch.device(args.device))
    jpegs = make_jpegs(args.distinct) if sections & {"decode", "e2e"} else []
    if "decode" in sections:
        report["decode"] = decode_section(args, jpegs)
    if "e2e" in sections:
        workdir = Path(tempfile.mkdtemp(prefix="sprout-bench-gpu-"))
        try:
            by_mode = report["end_to_end_by_mode"] = {}
            for mode in args.e2e_modes.split(","):
                (workdir / mode).mkdir()
                by_mode[mode] = e2e_section(args, jpegs, workdir / mode, mode)
            report["end_to_end"] = next(iter(by_mode.values()))  # the first mode's: full, by default
        finally:
            if args.keep_workdir:
                print(f"  daemon state and log kept in {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(render(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
