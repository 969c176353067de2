"""The API's job summary is the store's job record (one list of a job's fields), plus what the
server works out; a record of every kind validates into it."""

from __future__ import annotations

import dataclasses
import datetime as dt

from mljobs.server import schemas as S
from mljobs.server.records import JobRecord


def _record(**over):
    base = dict(id="MLJOB_1", name="n", status="DONE", message="", database_name="d", schema_name="s",
                owner="alice", compute_pool="P", stage_name="st", target_instances=1, min_instances=1,
                instances_ran=1, created_time=dt.datetime(2026, 12, 7, tzinfo=dt.timezone.utc))
    return JobRecord(**{**base, **over})


def test_summary_fields_are_the_records_public_fields_and_the_worked_out_ones():
    public = {f.name for f in dataclasses.fields(JobRecord)} - JobRecord.PRIVATE
    worked_out = {"peak_rss_bytes", "cpu_seconds", "pending_reason"}
    assert set(S.JobSummary.model_fields) == public | worked_out
    assert set(S.JobOut.model_fields) >= public | worked_out
    assert not JobRecord.PRIVATE & set(S.JobSummary.model_fields)


def test_a_record_validates_into_the_summary_with_its_status_typed():
    rec = _record(status="RUNNING", attempt=2, priority=-1, schedule_name="nightly",
                  scheduled_tick=dt.datetime(2026, 12, 7, 1, tzinfo=dt.timezone.utc), idempotency_key="k",
                  spec={"x": 1})
    out = S.JobSummary.model_validate({**rec.to_dict(), "pending_reason": None})
    assert out.status is S.JOB_STATUS.RUNNING and out.attempt == 2 and out.schedule_name == "nightly"
    assert "idempotency_key" not in out.model_dump() and "spec" not in out.model_dump()
