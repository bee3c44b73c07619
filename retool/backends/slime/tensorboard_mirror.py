"""Mirror slime's TensorBoard scalars (loss, kl, grad norm, lr, ...) into an MLflow run while a job runs.

slime logs its training curves only to wandb/TensorBoard. A background thread tails the event
files under the stage's ``TENSORBOARD_DIR`` (read incrementally, so a growing file is read once)
and logs the scalars whose tag starts with one of ``prefixes`` to the given run. It is idempotent:
a (tag, step) already in the run, from this mirror or an earlier attempt, is not logged again.
``stop()`` does a final pass, so nothing written before the job ended is missed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from retool.backends.slime.mlflow_bridge import log_to_run

log = logging.getLogger(__name__)


def _scalar(value: Any) -> float | None:
    if value.HasField("simple_value"):
        return float(value.simple_value)
    if value.HasField("tensor"):
        try:
            from tensorboard.util import tensor_util

            arr = tensor_util.make_ndarray(value.tensor)
            if arr.size == 1:
                return float(arr.reshape(()).item())
        except Exception:  # noqa: BLE001 - not a scalar
            return None
    return None


class TensorBoardMirror:
    def __init__(
        self,
        logdir: str | Path,
        run_id: str | None,
        *,
        prefixes: Sequence[str] = ("train/", "perf/"),
        interval_s: float = 15.0,
    ):
        self.logdir = Path(logdir)
        self.run_id = run_id
        self.prefixes = tuple(prefixes)
        self.interval_s = interval_s
        self._loaders: dict[Path, Any] = {}
        self._seen: dict[str, set[int]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.logged = 0  # metric values sent to MLflow by this mirror

    # ---------------------------------------------------------------- one pass
    def _known_steps(self, tag: str) -> set[int]:
        steps = self._seen.get(tag)
        if steps is None:
            steps = set()
            if self.run_id is not None:
                try:
                    from mlflow.tracking import MlflowClient

                    steps = {int(m.step) for m in MlflowClient().get_metric_history(self.run_id, tag)}
                except Exception as err:  # noqa: BLE001
                    log.warning("could not read MLflow history of %s (%s); it may be logged twice", tag, err)
            self._seen[tag] = steps
        return steps

    def poll(self) -> int:
        """Read what is new in every event file and log it; returns the number of values logged."""
        with self._lock:
            return self._poll_locked()

    def _poll_locked(self) -> int:
        from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

        if not self.logdir.is_dir():
            return 0
        for path in sorted(self.logdir.rglob("events.out.tfevents.*")):
            if path not in self._loaders:
                self._loaders[path] = LegacyEventFileLoader(str(path))
        by_step: dict[int, dict[str, float]] = {}
        for path, loader in self._loaders.items():
            try:
                events = list(loader.Load())
            except Exception as err:  # noqa: BLE001 - a damaged file must not stop the others
                log.warning("reading %s failed: %s", path, err)
                continue
            for event in events:
                if not event.HasField("summary"):
                    continue
                for value in event.summary.value:
                    if not value.tag.startswith(self.prefixes):
                        continue
                    number = _scalar(value)
                    if number is None:
                        continue
                    step = int(event.step)
                    known = self._known_steps(value.tag)
                    if step in known:
                        continue
                    known.add(step)
                    by_step.setdefault(step, {})[value.tag] = number
        count = 0
        for step in sorted(by_step):
            log_to_run(self.run_id, by_step[step], step)
            count += len(by_step[step])
        self.logged += count
        return count

    # ---------------------------------------------------------------- thread
    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception as err:  # noqa: BLE001 - keep mirroring
                log.warning("TensorBoard mirror pass failed: %s", err)

    def start(self) -> TensorBoardMirror:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="tb-mirror", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> int:
        """Stop the thread and do the final flush; returns the total number of values logged."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            self.poll()
        except Exception as err:  # noqa: BLE001
            log.warning("final TensorBoard mirror pass failed: %s", err)
        return self.logged

    def __enter__(self) -> TensorBoardMirror:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
