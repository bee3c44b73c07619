"""`dvc push` / `dvc pull` of datasets and checkpoints against moto's S3 server on loopback."""

from __future__ import annotations

import hashlib
import shutil

import boto3

from .conftest import dvc
from .servers import moto_server


def _digest(path):
    return {
        p.relative_to(path).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def test_push_then_pull_restores_outputs_from_s3(reproduced_project, tmp_path, monkeypatch):
    project = tmp_path / "copy"
    shutil.copytree(reproduced_project, project, symlinks=True)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with moto_server(tmp_path) as endpoint:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="retool-artifacts")
        assert dvc(project, "remote", "add", "-d", "s3", "s3://retool-artifacts/pipeline").returncode == 0
        assert dvc(project, "remote", "modify", "s3", "endpointurl", endpoint).returncode == 0
        before = {name: _digest(project / name) for name in ("data/raw", "models/rl")}
        push = dvc(project, "push")
        assert push.returncode == 0, push.stderr
        listed = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket="retool-artifacts")
        assert listed["KeyCount"] > 5

        shutil.rmtree(project / ".dvc" / "cache")
        shutil.rmtree(project / "data" / "raw")
        shutil.rmtree(project / "models" / "rl")
        pull = dvc(project, "pull")
        assert pull.returncode == 0, pull.stderr
        assert {name: _digest(project / name) for name in ("data/raw", "models/rl")} == before
        status = dvc(project, "status")
        assert "changed" not in status.stdout
