"""The fixed-shape training step (daemon/learning/static_step.py): padded, weighted, guarded, and the same step as the eager one.

Its CUDA graph needs a GPU (the tests at the end are skipped without one);
everything it replays is the eager function tested here on the CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
from learning_helpers import drive, learn_all, make_learner, stream

from daemon.common.settings import ModelSettings, TrainingSettings
from daemon.learning import checkpoint
from daemon.learning.head import GrowingHead
from daemon.learning.learner import Learner
from daemon.learning.static_step import StaticStep
from daemon.learning.step import CapturedStep, EagerStep
from models import zoo

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def network(classes: int = 3) -> tuple[torch.nn.Module, GrowingHead, torch.optim.Optimizer]:
    torch.manual_seed(61)
    backbone = zoo.load_backbone("tiny", pretrained=False).eval()
    head = GrowingHead(zoo.get("tiny").embedding_size, classes)
    optimizer = torch.optim.AdamW(
        [{"params": list(head.parameters()), "lr": 0.05}, {"params": list(backbone.parameters()), "lr": 0.005}],
        weight_decay=0.01,
    )
    return backbone, head, optimizer


def batch(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(62)
    x = torch.randn(n, 3, 32, 32, generator=generator)
    targets = torch.tensor([i % 3 for i in range(n)])
    counts = torch.bincount(targets, minlength=3).float()
    return x, targets, 1.0 / counts[targets]


def eager_step(
    eager: tuple, optimizer: torch.optim.Optimizer, x: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """The learner's eager step on the same rows: its logits before the update and its loss."""
    logits = eager[1](eager[0](x))
    per_example = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    loss = (per_example * weights).sum() / weights.sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return logits.detach(), float(loss.detach())


def test_a_padded_step_is_the_eager_step_on_its_rows():
    backbone, head, optimizer = network()
    eager = copy.deepcopy((backbone, head))
    eager_optimizer = torch.optim.AdamW(
        [{"params": list(eager[1].parameters()), "lr": 0.05}, {"params": list(eager[0].parameters()), "lr": 0.005}],
        weight_decay=0.01,
    )
    step = StaticStep(
        backbone, head, optimizer, rows=12, input_size=32, device=torch.device("cpu"), autocast=False, graph=False
    )
    for n in (7, 12, 5):  # padded, full, padded again: the buffers are reused
        x, targets, weights = batch(n)
        logits, loss, finite = step.run(x, targets, weights)
        want_logits, want_loss = eager_step(eager, eager_optimizer, x, targets, weights)
        assert finite and logits.shape == (n, 3)
        assert torch.allclose(logits, want_logits, atol=1e-5)
        assert loss == pytest.approx(want_loss, rel=1e-5)
    for got, want in zip(
        [*backbone.parameters(), *head.parameters()], [*eager[0].parameters(), *eager[1].parameters()], strict=True
    ):
        assert torch.allclose(got, want, atol=1e-5)


def test_a_non_finite_loss_moves_the_weights_by_weight_decay_alone():
    backbone, head, optimizer = network()
    step = StaticStep(
        backbone, head, optimizer, rows=8, input_size=32, device=torch.device("cpu"), autocast=False, graph=False
    )
    before = [p.detach().clone() for p in head.parameters()]
    x, targets, weights = batch(6)
    x[2] = float("inf")
    _, loss, finite = step.run(x, targets, weights)
    assert not finite and loss != loss  # NaN
    for p, old in zip(head.parameters(), before, strict=True):
        assert torch.isfinite(p).all()
        assert torch.allclose(p, old * (1 - 0.05 * 0.01))  # AdamW's decoupled decay; zero moments move nothing


def test_a_step_knows_when_it_must_be_made_again():
    backbone, head, optimizer = network()
    step = StaticStep(
        backbone, head, optimizer, rows=4, input_size=32, device=torch.device("cpu"), autocast=False, graph=False
    )
    assert step.matches(head, optimizer)
    head.grow(1, optimizer)
    assert not step.matches(head, optimizer)  # a new class: new tensors, a new capture
    assert not StaticStep(backbone, head, optimizer, 4, 32, torch.device("cpu"), False, False).matches(
        head, torch.optim.AdamW(head.parameters())
    )
    with pytest.raises(ValueError, match="5 examples in a step sized for 4"):
        step.run(*batch(5))


def test_a_checkpoint_of_a_graphed_learner_resumes_on_the_cpu(tmp_path):
    """A GPU learner's optimizer is capturable and foreach; a CPU learner resumes it under its own flags."""
    learner, reader = make_learner(tmp_path, stream([0, 1], 8, seed=63, order="iid"), mode="full")
    learn_all(learner, reader)
    payload = learner.state()
    for group in payload.optimizer["param_groups"]:
        group.update(capturable=True, foreach=True)  # as written on CUDA
    checkpoint.save(tmp_path / "checkpoints", payload)
    again = Learner(
        ModelSettings(backbone="tiny", input_size=32),
        TrainingSettings(mode="full", device="cpu", batch_size=4, learning_rate=0.1),
        tmp_path,
        reader,
    )
    assert again.load_state(checkpoint.load(tmp_path / "checkpoints"))
    assert all(not g["capturable"] for g in again.optimizer.param_groups)
    store_more = stream([0, 1], 4, seed=64)
    from daemon.store.examples import Store

    store = Store(tmp_path / "examples.db")
    store.commit(store_more)
    store.close()
    learn_all(again, reader)  # steps run: no "capturable" complaint from AdamW on the CPU
    assert again.step > learner.step and again.finite()


@CUDA
def test_the_captured_step_replays_the_eager_step_on_cuda():
    cuda = torch.device("cuda")
    backbone, head, optimizer = network()
    backbone, head = backbone.to(cuda), head.to(cuda)
    optimizer = torch.optim.AdamW(
        [{"params": list(head.parameters()), "lr": 0.05}, {"params": list(backbone.parameters()), "lr": 0.005}],
        weight_decay=0.01,
        foreach=True,
        capturable=True,
    )
    eager = copy.deepcopy((backbone, head))
    eager_optimizer = torch.optim.AdamW(
        [{"params": list(eager[1].parameters()), "lr": 0.05}, {"params": list(eager[0].parameters()), "lr": 0.005}],
        weight_decay=0.01,
    )
    step = StaticStep(backbone, head, optimizer, rows=12, input_size=32, device=cuda, autocast=False, graph=True)
    assert step.captures == 1
    for n in (7, 12):
        x, targets, weights = (t.to(cuda) for t in batch(n))
        logits, loss, finite = step.run(x, targets, weights)
        want, want_loss = eager_step(eager, eager_optimizer, x, targets, weights)
        assert finite and loss == pytest.approx(want_loss, rel=1e-3)
        assert torch.allclose(logits, want, atol=1e-3)  # the warm-up before capture left no trace


@CUDA
def test_a_cuda_learner_captures_once_per_head_size(tmp_path):
    learner, reader = make_learner(tmp_path, stream([0, 1, 2], 12, seed=65), mode="full", device="cuda")
    learn_all(learner, reader)
    assert learner.update.captures == 3  # class-incremental: one capture per head size
    assert learner.finite() and learner.trained > 0


def test_a_compiled_backbone_takes_the_same_step_and_a_new_class_does_not_compile_it_again():
    """training.compile_backbone: the backbone under torch.compile (Inductor; C++ kernels on a CPU, Triton on
    a GPU) inside the fixed-shape step gives the eager step, and a grown head reuses the compiled backbone."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    backbone, head, optimizer = network()
    eager = copy.deepcopy((backbone, head))
    eager_optimizer = torch.optim.AdamW(
        [{"params": list(eager[1].parameters()), "lr": 0.05}, {"params": list(eager[0].parameters()), "lr": 0.005}],
        weight_decay=0.01,
    )
    compiled = torch.compile(backbone, dynamic=False)
    step = StaticStep(
        backbone,
        head,
        optimizer,
        rows=12,
        input_size=32,
        device=torch.device("cpu"),
        autocast=False,
        graph=False,
        forward=compiled,
    )
    for n in (7, 12, 5):
        x, targets, weights = batch(n)
        logits, loss, finite = step.run(x, targets, weights)
        want_logits, want_loss = eager_step(eager, eager_optimizer, x, targets, weights)
        assert finite and torch.allclose(logits, want_logits, atol=1e-4)
        assert loss == pytest.approx(want_loss, rel=1e-4)
    for got, want in zip(backbone.parameters(), eager[0].parameters(), strict=True):
        assert torch.allclose(got, want, atol=1e-4)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1  # it did compile

    head.grow(1, optimizer)
    grown = StaticStep(
        backbone,
        head,
        optimizer,
        rows=12,
        input_size=32,
        device=torch.device("cpu"),
        autocast=False,
        graph=False,
        forward=compiled,
    )
    x, _, _ = batch(6)
    targets = torch.tensor([0, 1, 2, 3, 3, 0])
    _, _, finite = grown.run(x, targets, torch.ones(6))
    assert finite and counters["stats"]["unique_graphs"] == graphs


def test_compiling_the_backbone_is_for_the_graphed_step_only(tmp_path, caplog):
    learner, _ = make_learner(tmp_path, stream([0, 1], 3, seed=66), mode="full", compile_backbone=True)
    assert isinstance(learner.update, EagerStep)
    assert "compile_backbone applies to the CUDA-graphed step only" in caplog.text


@CUDA
def test_a_cuda_learner_with_a_compiled_backbone_learns_with_one_compilation(tmp_path):
    learner, reader = make_learner(
        tmp_path, stream([0, 1, 2], 12, seed=67), mode="full", device="cuda", compile_backbone=True
    )
    assert learner.update.compiled is not None
    learn_all(learner, reader)
    assert learner.update.captures == 3 and learner.finite() and learner.trained > 0


def test_the_step_checks_its_weights_and_moments_itself_and_changes_none():
    """The divergence guard's state check inside the step (one fused kernel on CUDA): a poisoned moment
    shows at the next step's read back, and the check leaves every value as it was."""
    backbone, head, optimizer = network()
    step = StaticStep(
        backbone, head, optimizer, rows=8, input_size=32, device=torch.device("cpu"), autocast=False, graph=False
    )
    _, _, finite = step.run(*batch(6))
    assert finite and step.state_finite
    weights = [p.detach().clone() for p in [*backbone.parameters(), *head.parameters()]]
    moments = [v.clone() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    step._check_state()
    assert step.state_bad.item() == 0
    assert all(torch.equal(a, b) for a, b in zip(weights, [*backbone.parameters(), *head.parameters()], strict=True))
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            moments, [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)], strict=True
        )
    )

    # A moment of a backbone weight turns NaN: the loss of the next step is still finite, the state is not.
    param = next(p for p in backbone.parameters() if p in optimizer.state)
    optimizer.state[param]["exp_avg_sq"].view(-1)[0] = float("nan")
    _, loss, finite = step.run(*batch(6))
    assert finite and loss == loss and not step.state_finite


@CUDA
def test_a_graphed_learner_sees_a_poisoned_moment_from_inside_its_step(tmp_path):
    learner, reader = make_learner(tmp_path, stream([0, 1], 12, seed=68), mode="full", device="cuda")
    batch_ = reader.after(0, 4)
    learner.learn_many(batch_)
    assert learner.diverged is None and learner.update.static is not None
    param = next(p for p in learner.backbone.parameters() if p in learner.optimizer.state)
    learner.optimizer.state[param]["exp_avg_sq"].view(-1)[0] = float("nan")
    learner.learn_many(reader.after(learner.high_water_mark, 4))
    assert learner.diverged == "non-finite weights or optimizer state"


def test_the_learners_graphed_path_learns_what_its_eager_path_learns(tmp_path):
    """The learner's side of the fixed-shape step (targets, class weights, padding, the prequential from the
    step's logits, launch and finish with the read-ahead between, one step per head size), run on the CPU
    without a graph: it ends where the eager path ends, weight for weight within float rounding."""
    examples = stream([0, 1, 2], 8, seed=69)
    results = []
    for name, graphed in (("eager", False), ("graphed", True)):
        learner, reader = make_learner(tmp_path / name, examples, mode="full", replay_ratio=1.0, decode_workers=2)
        if graphed:  # what CUDA chooses; StaticStep then runs without a graph here
            learner.update = CapturedStep(learner.inputs, learner.backbone, learner.placement, rows=8, input_size=32)
        try:
            drive(learner, reader, 4, read_ahead=True)
        finally:
            learner.close()
        results.append(learner)
    eager, graphed = results
    assert isinstance(eager.update, EagerStep) and graphed.update.static is not None and graphed.update.captures == 3
    assert graphed.trained == eager.trained > 0 and graphed.replayed == eager.replayed > 0
    assert graphed.prequential.state() == eager.prequential.state()
    assert graphed.diverged is None and graphed.last_loss == pytest.approx(eager.last_loss, rel=1e-4)
    for a, b in zip(
        [*graphed.head.parameters(), *graphed.backbone.parameters()],
        [*eager.head.parameters(), *eager.backbone.parameters()],
        strict=True,
    ):
        assert torch.allclose(a, b, atol=1e-4)
