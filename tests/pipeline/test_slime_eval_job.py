"""The GPU profile's eval job against a server speaking SGLang's /generate on loopback (CPU stand-in for
the SGLang server the job starts on a GPU node): real episode loop, real sandbox, real reward."""

from __future__ import annotations

import json

from retool.backends.slime.evaluate import eval_job, main
from retool.config import PipelineConfig
from retool.layout import Layout

from ..rollout.rt_server import ServerHandle
from ..rollout.rt_tokenizer import build_tokenizer_dir


def _call(code: str) -> str:
    return f'<tool_call>\n{{"name": "code_interpreter", "arguments": {{"code": {json.dumps(code)}}}}}\n</tool_call>'


def test_eval_job_scores_checkpoint_through_an_sglang_server(tmp_path):
    tok_dir = build_tokenizer_dir(tmp_path / "model")
    server = ServerHandle(str(tok_dir))
    try:
        server.add_scripts({"good": [_call("print(6 * 7)"), "So \\boxed{42}"], "bad": ["\\boxed{41}"]})
        problems = tmp_path / "eval.jsonl"
        problems.write_text(
            json.dumps({"prompt": "[[good]] 6*7?", "label": "42"})
            + "\n"
            + json.dumps({"prompt": "[[bad]] 6*7?", "label": "42"})
            + "\n"
        )
        cfg = PipelineConfig(profile="qwen3-4b")
        settings = json.loads(eval_job(cfg, "rl", tok_dir, problems, tmp_path / "o.json").argv[-3])
        settings["eval"].update(n_samples=2, greedy=True)
        out = tmp_path / "out.json"
        rc = main(
            [
                "--model",
                str(tok_dir),
                "--problems",
                str(problems),
                "--out",
                str(out),
                "--settings",
                json.dumps(settings),
                "--server-url",
                server.url,
            ]
        )
        assert rc == 0
        result = json.loads(out.read_text())
        m = result["metrics"]
        assert m["acc"] == 0.5 and m["pass@2"] == 0.5 and m["tool_call_rate"] == 0.5
        assert m["greedy_acc"] == 0.5
        assert len(result["samples"]) == 4
        assert {s["pred"] for s in result["samples"]} == {"42", "41"}
    finally:
        server.stop()


def test_eval_job_spec_ships_our_package_and_asks_for_gpus(tmp_path):
    cfg = PipelineConfig(profile="qwen3-4b")
    lay = Layout(tmp_path)
    spec = eval_job(cfg, "sft", lay.sft_model, lay.eval_jsonl, tmp_path / "x.json")
    assert spec.argv[:3] == [cfg.slime.cluster.python, "-m", "retool.backends.slime.evaluate"]
    assert spec.resources.entrypoint_gpus == cfg.slime.eval.gpus
    assert spec.runtime_env["py_modules"] and str(lay.sft_model) in spec.argv
