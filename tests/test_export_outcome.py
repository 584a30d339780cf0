"""The export process's report and job are typed: each round-trips as JSON, and a malformed one is refused by name."""

from __future__ import annotations

import pytest

from daemon.common.settings import Settings
from daemon.export.gates import Refusal, RefusalKind
from daemon.export.job import ExportJob
from daemon.export.outcome import (
    DiskFull,
    ExportOutcome,
    MalformedReport,
    NothingExported,
    read_report,
    write_report,
)
from daemon.export.verification import RuntimeFault


def test_every_report_round_trips_with_its_types():
    refusal = Refusal(
        kind=RefusalKind.RUNTIME_FAILED,
        runtime="tflite-runtime",
        runtime_version="2.14.0",
        fault=RuntimeFault.REFUSED,
        error="no FULLY_CONNECTED version 12",
    ).in_mode("dynamic")
    outcome = ExportOutcome(
        published={"version": 3}, reasons=(refusal,), metrics={"size_bytes": 10}, seconds=2.5, skipped=("int8",)
    )
    for report in (
        outcome,
        NothingExported(why="no checkpoint yet"),
        DiskFull(errno=28, strerror="full", filename=None),
    ):
        assert read_report(write_report(report)) == report
    back = read_report(write_report(outcome))
    assert back.reasons[0].kind is RefusalKind.RUNTIME_FAILED and back.reasons[0].fault is RuntimeFault.REFUSED
    assert (
        str(back.reasons[0])
        == "dynamic: tflite-runtime 2.14.0 could not load or run the model: no FULLY_CONNECTED version 12"
    )
    assert outcome.summary()["rejected_because"] == [str(refusal)]


def test_a_disk_full_report_gives_back_the_error():
    report = read_report(write_report(DiskFull.of(OSError(28, "No space left on device", "/var/x"))))
    err = report.error()
    assert (err.errno, err.strerror, err.filename) == (28, "No space left on device", "/var/x")


@pytest.mark.parametrize(
    ("document", "named"),
    [
        ("", "the document"),
        ("not json", "the document"),
        ('{"outcome": {"published": null}}', "the document"),  # the old dict: no kind of report
        ('{"ended": "exported", "seconds": "soon"}', "seconds"),
        ('{"ended": "exported", "reasons": [{"kind": "tired"}]}', "reasons.0.kind"),
        ('{"ended": "disk_full", "errno": 28, "strerror": null}', "filename"),
    ],
)
def test_a_malformed_report_is_refused_naming_the_field(document: str, named: str):
    with pytest.raises(MalformedReport, match=f"malformed: {named}"):
        read_report(document)


def test_the_export_process_gets_its_sections_only():
    settings = Settings.load(
        None,
        {"mqtt": {"password": "hunter2"}, "server": {"token": "s3cret"}, "training": {"seed": 7}},
    )
    job = ExportJob.from_settings(settings)
    document = job.model_dump_json()
    assert "hunter2" not in document and "s3cret" not in document and '"mqtt"' not in document
    assert ExportJob.model_validate_json(document) == job
    assert (job.seed, job.export, job.model, job.state_dir) == (7, settings.export, settings.model, settings.state_dir)
