"""A stage on S3 (a moto server on 127.0.0.1 standing in for the bucket): payload and result
go through fsspec's s3fs, the job runs and its files land in the bucket."""

from __future__ import annotations

import s3fs

import mljobs
from tests.conftest import S3_CREDS as CREDS
from tests.conftest import ServerProc, assert_no_leftovers


def test_job_on_an_s3_stage(s3_endpoint, tmp_path_factory):
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, key="testing", secret="testing")
    fs.mkdir("mljobs-bucket")
    home = tmp_path_factory.mktemp("mlh")
    srv = ServerProc(home, extra_env={**CREDS, "AWS_ENDPOINT_URL_S3": s3_endpoint})
    srv.start()
    try:
        s = mljobs.Session(url=srv.url)
        mljobs.create_stage("cloud", "s3://mljobs-bucket/stages/cloud", session=s)

        @mljobs.remote("DEFAULT_POOL", stage_name="cloud", session=s)
        def double(x: int) -> int:
            return 2 * x

        job = double(21)
        assert job.result(timeout=60) == 42
        keys = fs.find(f"mljobs-bucket/stages/cloud/{job.id}")
        assert any(k.endswith("/result") for k in keys) and any("/app/" in k for k in keys)
        mljobs.delete_job(job, session=s)
        fs.invalidate_cache()
        assert fs.find(f"mljobs-bucket/stages/cloud/{job.id}") == []
    finally:
        srv.stop()
        assert_no_leftovers(home)
