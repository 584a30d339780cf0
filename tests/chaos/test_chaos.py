"""Under seeded chaos, nothing the broker acknowledged is lost or stored twice, and every published model verifies."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from . import audit
from .harness import AUTOSAVE_INTERVAL_S, MAX_QUEUED_MESSAGES, MODEL, Chaos, Plan, table

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_the_broker_runs_with_the_settings_that_docs_broker_md_asks_for(tmp_path):
    documented = dict(
        re.findall(r"^(autosave_interval|max_queued_messages) (\d+)", (DOCS / "broker.md").read_text(), re.M)
    )
    assert int(documented["autosave_interval"]) == AUTOSAVE_INTERVAL_S
    assert int(documented["max_queued_messages"]) == MAX_QUEUED_MESSAGES
    conf = Chaos(tmp_path, Plan(1, [], 0, 1, 1.0)).broker.conf.read_text()
    assert "persistence true" in conf
    assert f"autosave_interval {AUTOSAVE_INTERVAL_S}\n" in conf
    assert f"max_queued_messages {MAX_QUEUED_MESSAGES}\n" in conf


@pytest.mark.slow
def test_seeded_kills_and_broker_restarts_lose_nothing_and_publish_only_verified_models(tmp_path):
    plan = Plan.from_environment()
    chaos = Chaos(tmp_path, plan)
    try:
        code = chaos.run()
    finally:
        chaos.close()
    state = chaos.state
    examples = audit.examples(state, chaos.feeder.acked_ids())
    models = audit.models(state, MODEL)
    temporaries = audit.temporaries(state)
    # The export processes' folders; torch's own cache folder (torchinductor_<user>, made when torch._dynamo
    # is first imported, empty here) is torch's and stays, as it would in any process using torch.
    outside = sorted(p.name for p in chaos.tmpdir.iterdir() if not p.name.startswith("torchinductor_"))
    print(f"\nchaos run (SPROUT_CHAOS_KILLS={plan.kills}, SPROUT_CHAOS_SEED={plan.seed}):")
    print(table(plan, chaos.tally, examples, models, temporaries, outside))

    assert code == 0, f"the final SIGTERM gave exit code {code}:\n{chaos.log_since_start()[-3000:]}"
    assert chaos.tally.total_kills >= plan.kills
    assert chaos.tally.missed_windows == 0, "a targeted kill's window never came while the feed ran: it tested nothing"
    assert examples.published == plan.examples
    assert not examples.lost, f"{len(examples.lost)} acknowledged ids never stored, e.g. {examples.lost[:5]}"
    assert not examples.duplicated, f"stored twice: {examples.duplicated[:5]}"
    assert not examples.unexpected
    assert audit.learner(state) == []
    assert models.versions_published, "no model was published during the run"
    assert models.problems == []
    assert models.failing == []
    assert models.refused_by_runtime == 0
    assert temporaries == [], f"left behind in the state folder: {temporaries}"
    assert outside == [], f"left behind in TMPDIR: {outside}"
