"""Shared test fixtures: one local Ray instance and one moto S3 server on loopback per test session.

Both are real: Ray runs the read / decode / write tasks; moto speaks the S3 protocol over HTTP on
127.0.0.1, reached through s3fs and boto3 exactly like a real bucket (dummy credentials, set as the
usual AWS environment variables). Nothing here touches the network beyond loopback.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
import ray
from moto.server import ThreadedMotoServer


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A local Ray instance with 2 CPUs, started once (~3 s) and shut down after the session."""
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    key: str
    secret: str

    @property
    def storage_options(self) -> dict[str, Any]:
        """Explicit fsspec options for this server (for tests that don't rely on the environment)."""
        return {"endpoint_url": self.endpoint, "key": self.key, "secret": self.secret}

    def client(self) -> Any:
        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=self.key, aws_secret_access_key=self.secret,
            region_name="us-east-1",
        )

    def new_bucket(self) -> str:
        """A fresh, empty bucket (one per test keeps tests independent)."""
        name = f"test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def upload(self, bucket: str, files: dict[str, bytes]) -> None:
        """Put `files` ({key: bytes}) into `bucket`."""
        client = self.client()
        for key, data in files.items():
            client.put_object(Bucket=bucket, Key=key, Body=data)

    def upload_tree(self, bucket: str, prefix: str, root: Path) -> str:
        """Upload every file under `root` to `s3://bucket/prefix/...`; returns that URI."""
        files = [p for p in root.rglob("*") if p.is_file()]
        self.upload(bucket, {f"{prefix}/{p.relative_to(root).as_posix()}": p.read_bytes() for p in files})
        return f"s3://{bucket}/{prefix}"


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """A moto S3 server on 127.0.0.1 (free port), with dummy credentials and the endpoint in the AWS
    environment variables for the whole session."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    info = S3Server(endpoint=f"http://{host}:{port}", key="testing-key", secret="testing-secret")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ACCESS_KEY_ID", info.key)
        patch.setenv("AWS_SECRET_ACCESS_KEY", info.secret)
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        patch.setenv("AWS_ENDPOINT_URL", info.endpoint)
        patch.setenv("AWS_CONFIG_FILE", "/nonexistent")  # never pick up a developer's real AWS setup
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        patch.setenv("NO_PROXY", "127.0.0.1,localhost")
        patch.delenv("AWS_PROFILE", raising=False)
        patch.delenv("AWS_SESSION_TOKEN", raising=False)
        yield info
    server.stop()


@pytest.fixture
def run_job_calls(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Replaces pipeline.job.run_job (the commands' boundary) with a recorder of the JobConfigs it is given,
    returning a fixed summary: 10 items, 28 rows ok, 2 with errors, 4 skipped, in 4 s."""
    from pipeline import job

    calls: list[Any] = []

    def fake_run_job(config: job.JobConfig) -> job.JobSummary:
        calls.append(config)
        return job.JobSummary(items=10, rows_ok=28, rows_error=2, skipped=4, seconds=4.0, output=config.output_uri)

    monkeypatch.setattr(job, "run_job", fake_run_job)
    return calls
