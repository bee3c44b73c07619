"""MLflow helpers that never take training down with them.

Library code calls :func:`log_metrics` / :func:`log_params` and does not care whether a run is active, a
server is reachable, or MLflow is configured at all. The pipeline opens runs with :func:`stage_run`: one
child run per stage under the pipeline's parent run (its id travels between processes in
``RETOOL_MLFLOW_PARENT_RUN_ID``).

When the tracking server cannot be reached, every call is appended to a local JSON-lines buffer instead
(with a single warning), and :func:`sync_buffer` (``retool mlflow sync``) replays it later into the server,
recreating the runs with their parent links, parameters, tags and stepped metrics.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PARENT_ENV = "RETOOL_MLFLOW_PARENT_RUN_ID"
BUFFER_ENV = "RETOOL_MLFLOW_BUFFER"
DEFAULT_BUFFER = Path(".retool") / "mlflow-buffer.jsonl"
_MAX_PARAM_LEN = 6000

_lock = threading.Lock()
_state: dict[str, Any] = {"offline_run": None, "warned": False}


# ----------------------------------------------------------------------------------------------- helpers
def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested config into MLflow's flat ``a.b.c`` parameter names (values as strings)."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            text = json.dumps(value) if isinstance(value, list | tuple) else str(value)
            out[name] = text[:_MAX_PARAM_LEN]
    return out


_INVALID_KEY = re.compile(r"[^A-Za-z0-9_\-. :/]")


def metric_key(name: str) -> str:
    """MLflow refuses '@' (and most punctuation) in metric names: ``pass@4`` is logged as ``pass_at_4``."""
    return _INVALID_KEY.sub("_", name.replace("@", "_at_"))


def tracking_uri() -> str:
    import mlflow

    return str(mlflow.get_tracking_uri())


def server_reachable(uri: str | None = None, timeout_s: float = 2.0) -> bool:
    """True for local stores (sqlite, files) and for HTTP servers that answer ``/health`` quickly."""
    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _buffer_path() -> Path:
    return Path(os.environ.get(BUFFER_ENV, str(DEFAULT_BUFFER)))


def _buffer(record: dict[str, Any]) -> None:
    path = _buffer_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _lock, path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def _warn_offline(err: object) -> None:
    if not _state["warned"]:
        _state["warned"] = True
        log.warning(
            "MLflow unreachable (%s); metrics are kept in %s and can be sent later with `retool mlflow sync`",
            err,
            _buffer_path(),
        )


def _active_run_id() -> str | None:
    import mlflow

    run = mlflow.active_run()
    if run is not None:
        return str(run.info.run_id)
    return os.environ.get("MLFLOW_RUN_ID") or None


# ----------------------------------------------------------------------------------------------- logging
def log_metrics(metrics: Mapping[str, float], step: int | None = None, run_id: str | None = None) -> None:
    """Log finite numeric metrics to ``run_id`` or the active run (or the offline buffer). Never raises.

    Names are made MLflow-safe with :func:`metric_key` (``pass@4`` → ``pass_at_4``).
    """
    clean = {
        metric_key(k): float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
    }
    if not clean:
        return
    offline = _state["offline_run"]
    if offline is not None and run_id is None:
        _buffer({"kind": "metrics", "run": offline, "metrics": clean, "step": step, "ts": time.time()})
        return
    target = run_id
    try:
        target = run_id or _active_run_id()
        if target is None:
            return
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        ts = int(time.time() * 1000)
        items = [Metric(k, v, ts, step or 0) for k, v in clean.items()]
        client = MlflowClient()
        for i in range(0, len(items), 500):  # MLflow takes at most 1000 metrics per batch
            client.log_batch(target, metrics=items[i : i + 500], synchronous=True)
    except Exception as err:  # noqa: BLE001 - tracking must never stop training
        _warn_offline(err)
        _buffer({"kind": "metrics", "run": target, "metrics": clean, "step": step, "ts": time.time()})


def _active_run_id_safe() -> str | None:
    try:
        return _active_run_id()
    except Exception:  # noqa: BLE001
        return None


def log_params(params: Mapping[str, Any]) -> None:
    """Log (flattened) parameters to the active run (or the offline buffer). Never raises."""
    flat = flatten(params)
    offline = _state["offline_run"]
    if offline is not None:
        _buffer({"kind": "params", "run": offline, "params": flat})
        return
    try:
        run_id = _active_run_id()
        if run_id is None:
            return
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        items = [Param(k, v) for k, v in flat.items()]
        client = MlflowClient()
        for i in range(0, len(items), 90):
            client.log_batch(run_id, params=items[i : i + 90], synchronous=True)
    except Exception as err:  # noqa: BLE001
        _warn_offline(err)
        _buffer({"kind": "params", "run": _active_run_id_safe(), "params": flat})


def set_tags(tags: Mapping[str, Any]) -> None:
    """Set tags on the active run (or buffer them). Never raises."""
    clean = {k: str(v) for k, v in tags.items() if v is not None}
    offline = _state["offline_run"]
    if offline is not None:
        _buffer({"kind": "tags", "run": offline, "tags": clean})
        return
    try:
        import mlflow

        if _active_run_id() is not None and mlflow.active_run() is not None:
            mlflow.set_tags(clean)
    except Exception as err:  # noqa: BLE001
        _warn_offline(err)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    """Upload a file to the active run's artifacts (S3 when the server is configured so). Never raises."""
    if _state["offline_run"] is not None:
        _buffer(
            {
                "kind": "artifact",
                "run": _state["offline_run"],
                "path": str(Path(path).resolve()),
                "artifact_path": artifact_path,
            }
        )
        return
    try:
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.log_artifact(str(path), artifact_path=artifact_path)
    except Exception as err:  # noqa: BLE001
        _warn_offline(err)


def log_table(rows: list[dict[str, Any]], artifact_file: str) -> None:
    """Log rows (e.g. eval samples) as an MLflow table artifact. Never raises."""
    if not rows:
        return
    try:
        import mlflow

        if mlflow.active_run() is not None and _state["offline_run"] is None:
            columns = {key: [row.get(key) for row in rows] for key in rows[0]}
            mlflow.log_table(data=columns, artifact_file=artifact_file)
    except Exception as err:  # noqa: BLE001
        _warn_offline(err)


# ------------------------------------------------------------------------------------------------- runs
@contextlib.contextmanager
def stage_run(
    name: str,
    *,
    experiment: str | None = None,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
) -> Iterator[str]:
    """Open an MLflow run for one stage (a child of the pipeline run when there is one), or for a part of
    a stage (a child of the stage's run, e.g. one evaluated checkpoint).

    Yields the run id (a local id when offline). The run ends FAILED when the body raises.
    """
    import mlflow

    # Nested under the run open in this process (a stage), else under the pipeline run of the flow.
    parent = parent_run_id or _active_run_id_safe() or os.environ.get(PARENT_ENV) or None
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    if not server_reachable():
        yield from _offline_run(name, experiment, params, tags, parent)
        return
    try:
        if experiment:
            mlflow.set_experiment(experiment)
        run = mlflow.start_run(run_name=name, parent_run_id=parent, nested=parent is not None)
    except Exception as err:  # noqa: BLE001
        _warn_offline(err)
        yield from _offline_run(name, experiment, params, tags, parent)
        return
    status = "FAILED"
    try:
        if tags:
            set_tags(tags)
        if params:
            log_params(params)
        yield str(run.info.run_id)
        status = "FINISHED"
    finally:
        with contextlib.suppress(Exception):
            mlflow.end_run(status=status)


def _offline_run(
    name: str,
    experiment: str | None,
    params: Mapping[str, Any] | None,
    tags: Mapping[str, Any] | None,
    parent: str | None,
) -> Iterator[str]:
    local_id = f"offline-{uuid.uuid4().hex[:12]}"
    _buffer(
        {
            "kind": "start",
            "run": local_id,
            "name": name,
            "experiment": experiment,
            "parent": parent,
            "ts": time.time(),
        }
    )
    previous = _state["offline_run"]
    _state["offline_run"] = local_id
    status = "FAILED"
    try:
        if tags:
            set_tags(tags)
        if params:
            log_params(params)
        yield local_id
        status = "FINISHED"
    finally:
        _state["offline_run"] = previous
        _buffer({"kind": "end", "run": local_id, "status": status, "ts": time.time()})


def sync_buffer(path: str | Path | None = None) -> int:
    """Replay an offline buffer into the current tracking server; return the number of records sent.

    Runs are recreated (with their parent, when it was a real run id or another buffered run); the buffer
    is renamed to ``*.synced`` afterwards so it is never sent twice.
    """
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    source = Path(path) if path else _buffer_path()
    if not source.exists():
        return 0
    client = MlflowClient()
    run_map: dict[str, str] = {}
    sent = 0
    for line in source.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        kind, key = rec["kind"], rec.get("run")
        if kind == "start":
            exp_name = rec.get("experiment") or "Default"
            exp = client.get_experiment_by_name(exp_name)
            exp_id = exp.experiment_id if exp else client.create_experiment(exp_name)
            tags = {"mlflow.runName": rec["name"], "retool.synced_from": str(source)}
            parent = rec.get("parent")
            if parent:
                tags["mlflow.parentRunId"] = run_map.get(parent, parent)
            run_map[key] = client.create_run(exp_id, tags=tags, start_time=int(rec["ts"] * 1000)).info.run_id
        elif key is None:
            continue
        else:
            run_id = run_map.get(key, key)
            if kind == "metrics":
                ts = int(rec.get("ts", time.time()) * 1000)
                metrics = [Metric(k, v, ts, rec.get("step") or 0) for k, v in rec["metrics"].items()]
                client.log_batch(run_id, metrics=metrics)
            elif kind == "params":
                items = [Param(k, v) for k, v in rec["params"].items()]
                for i in range(0, len(items), 90):
                    client.log_batch(run_id, params=items[i : i + 90])
            elif kind == "tags":
                for k, v in rec["tags"].items():
                    client.set_tag(run_id, k, v)
            elif kind == "artifact" and Path(rec["path"]).exists():
                client.log_artifact(run_id, rec["path"], rec.get("artifact_path"))
            elif kind == "end":
                client.set_terminated(
                    run_id, status=rec.get("status", "FINISHED"), end_time=int(rec["ts"] * 1000)
                )
        sent += 1
    source.rename(source.with_suffix(source.suffix + ".synced"))
    return sent
