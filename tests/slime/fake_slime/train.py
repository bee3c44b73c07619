"""Stand-in for slime's train.py: reads the same flags, calls the custom log hooks slime would call,
writes TensorBoard scalars where slime's adapter writes them and Megatron-style checkpoints to --save.
It resumes like slime: with --load naming a save directory, it continues after the saved iteration."""

import argparse
import importlib
import os
from dataclasses import dataclass, field
from enum import Enum

ap = argparse.ArgumentParser(allow_abbrev=False)
ap.add_argument("--save")
ap.add_argument("--load")
ap.add_argument("--num-rollout", type=int)
ap.add_argument("--save-interval", type=int)
ap.add_argument("--custom-rollout-log-function-path")
ap.add_argument("--custom-eval-rollout-log-function-path")
ap.add_argument("--fail-at", type=int, default=int(os.environ.get("FAKE_FAIL_AT", "-1")))
args, _unknown = ap.parse_known_args()


@dataclass
class Sample:
    group_index: int = 0
    index: int = 0
    prompt: str = ""
    tokens: list = field(default_factory=lambda: [1, 2, 3, 4])
    response: str = "ok"
    response_length: int = 2
    label: str = "1"
    reward: dict = field(default_factory=lambda: {"score": 1.0, "acc": 1.0, "pred": "1"})
    loss_mask: list = field(default_factory=lambda: [1, 1])
    rollout_log_probs: list = field(default_factory=lambda: [-0.1, -0.2])

    class Status(Enum):
        COMPLETED = "completed"
        TRUNCATED = "truncated"

    status: Status = Status.COMPLETED
    metadata: dict = field(default_factory=dict)


def load(path):
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


start = 0
if args.load and os.path.exists(os.path.join(args.load, "latest_checkpointed_iteration.txt")):
    with open(os.path.join(args.load, "latest_checkpointed_iteration.txt")) as f:
        start = int(f.read()) + 1
print(f"start_rollout_id={start}", flush=True)
print(f"RETOOL_MARK={os.environ.get('RETOOL_MARK')}", flush=True)

# tensorboard's own writer (the same event-file format torch's SummaryWriter writes; importing torch
# would only make this stand-in slower)
from tensorboard.compat.proto import event_pb2, summary_pb2  # noqa: E402
from tensorboard.summary.writer.event_file_writer import EventFileWriter  # noqa: E402


class Writer:
    def __init__(self, logdir):
        self._w = EventFileWriter(logdir)

    def add_scalar(self, tag, value, step):
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)])
        self._w.add_event(event_pb2.Event(step=step, summary=summary))

    def flush(self):
        self._w.flush()

    def close(self):
        self._w.close()


writer = Writer(os.environ["TENSORBOARD_DIR"])
log_rollout = load(args.custom_rollout_log_function_path)
log_eval = load(args.custom_eval_rollout_log_function_path)
for rollout_id in range(start, args.num_rollout):
    if rollout_id == args.fail_at:
        raise SystemExit(f"simulated crash at rollout {rollout_id}")
    samples = [
        Sample(group_index=0, index=0),
        Sample(group_index=0, index=1, reward={"score": -1.0, "acc": 0.0, "pred": "2"}),
    ]
    assert log_rollout(rollout_id, args, samples, {}, 0.5) is False
    writer.add_scalar("train/loss", 1.0 / (rollout_id + 1), rollout_id)
    writer.add_scalar("train/grad_norm", 2.0, rollout_id)
    writer.flush()
    if (rollout_id + 1) % args.save_interval == 0 or rollout_id == args.num_rollout - 1:
        os.makedirs(os.path.join(args.save, f"iter_{rollout_id:07d}"), exist_ok=True)
        with open(os.path.join(args.save, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(rollout_id))
    print(f"rollout {rollout_id} done", flush=True)
assert (
    log_eval(
        args.num_rollout - 1,
        args,
        {"aime": {"rewards": [1.0], "truncated": [False], "samples": [Sample()]}},
        {},
    )
    is False
)
writer.close()
