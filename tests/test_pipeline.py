"""`orpo-distill run` end to end on a tiny config: the teacher behind the OpenAI-compatible loopback server (with
injected faults), a tiny local student, every variant; every output file; a re-run skips every finished stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from fake_openai_server import FakeOpenAIServer, Faults

from orpo_distill.cli import main
from orpo_distill.config import VARIANTS
from orpo_distill.pipeline import cell_name, parse_sweep, sweep_cells


def _write_arith(path: Path, start: int, n: int) -> None:
    with path.open("w") as f:
        for i in range(start, start + n):
            a, b = i % 17 + 2, (i * 7) % 23 + 1
            f.write(json.dumps({"id": f"q{i}", "question": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n")


@pytest.fixture()
def tiny_run(tmp_path, tiny_llama_dir):
    _write_arith(tmp_path / "train.jsonl", 0, 12)
    _write_arith(tmp_path / "test.jsonl", 100, 6)
    _write_arith(tmp_path / "val.jsonl", 200, 4)
    cfg = {
        "run": {"out_dir": str(tmp_path / "run"), "seeds": 1},
        "task": {"name": "arith", "kind": "numeric", "train": {"path": str(tmp_path / "train.jsonl")},
                 "validation": {"path": str(tmp_path / "val.jsonl")}, "test": {"path": str(tmp_path / "test.jsonl")}},
        "teacher": {"backend": "openai", "model": "fake-teacher", "api_key_env": "ORPO_TEST_KEY", "concurrency": 4,
                    "max_retries": 8, "timeout_s": 1.0},
        "student": {"model": str(tiny_llama_dir), "template": "plain", "batch_size": 16},
        "sampling": {"k": 3, "max_new_tokens": 12},
        # the random-weight student never writes an answer line: let its unparsed traces be negatives
        "policy": {"unparsed_negatives": True},
        "trainer": {"epochs": 2, "batch_size": 4, "lr": 1e-3, "report_to": ["jsonl"]},
        "eval": {"batch_size": 16},
    }
    return tmp_path, cfg


def _mtimes(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()
            and p.name not in ("traces.sqlite-wal", "traces.sqlite-shm") and p.parent.name != "traces.sqlite.locks"}


def test_run_end_to_end_with_api_teacher_then_rerun_skips(tiny_run, monkeypatch):
    tmp, cfg = tiny_run
    monkeypatch.setenv("ORPO_TEST_KEY", "sk-test-secret-123")
    with FakeOpenAIServer(Faults(rate=0.2, slow_s=2.0, seed=3), api_key="sk-test-secret-123") as server:
        cfg["teacher"]["base_url"] = server.base_url
        path = tmp / "cfg.yaml"
        path.write_text(yaml.safe_dump(cfg))
        assert main(["run", str(path), "--no-progress"]) == 0
        first_requests = server.stats.requests
        assert first_requests > 0 and server.stats.injected > 0
        out = Path(cfg["run"]["out_dir"])

        # every output file
        for f in ("config.yaml", "traces.sqlite", "results.json", "results.md"):
            assert (out / f).is_file(), f
        pngs = list((out / "plots").glob("*.png"))
        assert pngs and all(p.stat().st_size > 1000 for p in pngs)
        res = json.loads((out / "results.json").read_text())
        assert res["task"] == "arith" and res["teacher"] == "fake-teacher"
        assert set(res["variants"]) == set(VARIANTS)
        for v, e in res["variants"].items():
            assert 0.0 <= e["accuracy"] <= 1.0 and e["n"] == 6, v
            assert "unparsed" in e and "std" in e
            if v != "zero_shot":
                assert len(e["per_epoch"]) == 2, v
                assert all(ep["loss"] is not None for ep in e["per_epoch"]), v
                model_dir = Path(e["model_dirs"][0])
                assert (model_dir / "model.safetensors").is_file() and (model_dir / "README.md").is_file()
        costs = res["costs"]
        assert costs["teacher"]["sampled"] == 12 * 3 and costs["teacher"]["completion_tokens"] > 0
        assert costs["student_initial"]["sampled"] == 12 * 3
        assert costs["student_refresh"]["sampled"] > 0  # on- and mixed-policy re-sampled the student
        assert costs["training"]["optimizer_steps"] > 0 and costs["training"]["train_seconds"] > 0
        md = (out / "results.md").read_text()
        for name in ("zero-shot", "single-CoT SFT", "diverse-CoT SFT", "mixed-policy ORPO"):
            assert name.lower() in md.lower(), name
        # the secret never lands in any file the run wrote
        for p in out.rglob("*"):
            if p.is_file():
                assert b"sk-test-secret-123" not in p.read_bytes(), p

        # a re-run: zero teacher calls, zero training steps, nothing rewritten but the report
        before = _mtimes(out)
        assert main(["run", str(path), "--no-progress"]) == 0
        assert server.stats.requests == first_requests
        after = _mtimes(out)
        changed = {k for k in before if before[k] != after.get(k)}
        assert changed <= {"results.json", "results.md", "config.yaml"} | {k for k in before if k.startswith("plots")}
        for v in VARIANTS:
            if v != "zero_shot":
                assert not any("variants" in k for k in changed), changed
        res2 = json.loads((out / "results.json").read_text())
        assert {v: e["accuracy"] for v, e in res2["variants"].items()} == \
               {v: e["accuracy"] for v, e in res["variants"].items()}


def test_sweep_grid_and_cells(tmp_path):
    from orpo_distill.config import Config

    grid = parse_sweep(["objective.lam=0.1,1", "policy.phi=0,0.5"])
    assert grid == {"objective.lam": [0.1, 1], "policy.phi": [0, 0.5]}
    base = Config.model_validate({"run": {"out_dir": str(tmp_path / "sw")}})
    cells = sweep_cells(base, grid)
    assert len(cells) == 4
    stores = {c.run.store for _, c in cells}
    assert stores == {str(tmp_path / "sw" / "traces.sqlite")}
    assert len({c.run.out_dir for _, c in cells}) == 4
    ov, c = cells[1]
    assert ov == {"objective.lam": 0.1, "policy.phi": 0.5} and c.objective.lam == 0.1 and c.policy.phi == 0.5
    assert cell_name(ov) == "objective.lam=0.1__policy.phi=0.5"
    # a store the config names is the one every cell shares (a sweep over the traces of an earlier run)
    named = Config.model_validate({"run": {"out_dir": str(tmp_path / "sw2"), "store": str(tmp_path / "t.sqlite")}})
    assert {c.run.store for _, c in sweep_cells(named, grid)} == {str(tmp_path / "t.sqlite")}
    with pytest.raises(ValueError, match="section.key=v1,v2"):
        parse_sweep(["objective.lam"])


def test_run_reports_missing_data_clearly(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"run": {"out_dir": str(tmp_path / "r")}, "task": {
        "name": "arith", "kind": "numeric", "train": {"path": str(tmp_path / "nope.jsonl")}},
        "teacher": {"model": "x"}, "student": {"model": "y"}}))
    assert main(["run", str(p), "--no-progress"]) == 2
    assert "nope.jsonl" in capsys.readouterr().err



def test_sweep_end_to_end_shares_traces_and_chooses_on_validation(tiny_run, monkeypatch):
    tmp, cfg = tiny_run
    monkeypatch.setenv("ORPO_TEST_KEY", "k")
    cfg["run"]["variants"] = ["zero_shot", "orpo_mixed"]
    cfg["trainer"]["epochs"] = 1
    with FakeOpenAIServer(api_key="k") as server:
        cfg["teacher"]["base_url"] = server.base_url
        path = tmp / "cfg.yaml"
        path.write_text(yaml.safe_dump(cfg))
        assert main(["run", str(path), "--no-progress", "--sweep", "policy.phi=0,1", "objective.lam=0.5"]) == 0
        out = Path(cfg["run"]["out_dir"])
        # the teacher was asked once per question, whatever the number of cells
        from orpo_distill.store import TraceStore

        with TraceStore(out / "traces.sqlite") as store:
            assert len(store.traces(role="teacher")) == 12 * 3
            assert len(store.traces(role="student", source="initial")) == 12 * 3
        requests = server.stats.requests
        sweep = json.loads((out / "sweep.json").read_text())
        cells = sweep["cells"]
        assert {(c["variant"], c["overrides"]["policy.phi"]) for c in cells} == \
               {(v, p) for v in ("zero_shot", "orpo_mixed") for p in (0, 1)}
        assert all(len(c["validation"]) == 1 and len(c["test"]) == 1 for c in cells)
        for name in ("policy.phi=0__objective.lam=0.5", "policy.phi=1__objective.lam=0.5"):
            assert (out / "cells" / name / "results.json").is_file()
            assert not (out / "cells" / name / "traces.sqlite").exists()
        assert (out / "sweep.md").is_file()
        # the choice per variant is the cell with the best validation accuracy (ties: the earlier cell)
        chosen = sweep["chosen"]
        for v in ("zero_shot", "orpo_mixed"):
            idx = [i for i, c in enumerate(cells) if c["variant"] == v]
            best = max(idx, key=lambda i: (sum(cells[i]["validation"]), -i))
            assert chosen[v] == best
        # a re-run samples nothing new
        assert main(["run", str(path), "--no-progress", "--sweep", "policy.phi=0,1", "objective.lam=0.5"]) == 0
        assert server.stats.requests == requests


def test_other_settings_in_a_finished_folder_are_refused_and_nothing_is_rewritten(tmp_path, capsys):
    """A folder holding a finished run, run again with other settings (as `demo --quick` into the full
    demo's folder did), must not print the old run's table as the new one, nor rewrite config.yaml/results.json."""
    from orpo_distill.demo import assets_dir

    cfg = {"run": {"out_dir": str(tmp_path / "run"), "variants": ["zero_shot", "sft_single"]},
           "task": {"name": "synthetic", "synthetic": {"n_train": 4, "n_validation": 2, "n_test": 2}},
           "teacher": {"model": str(assets_dir() / "teacher"), "template": "plain", "device": "cpu"},
           "student": {"model": str(assets_dir() / "student"), "template": "plain", "device": "cpu"},
           "sampling": {"k": 2, "max_new_tokens": 8}, "eval": {"max_new_tokens": 8},
           "policy": {"gold_rationale_fallback": True},
           "trainer": {"epochs": 1, "batch_size": 4, "report_to": ["jsonl"]}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "--no-progress"]) == 0
    out = tmp_path / "run"
    before = {f: (out / f).read_bytes() for f in ("config.yaml", "results.json", "results.md")}
    capsys.readouterr()
    assert main(["run", str(path), "--no-progress", "trainer.lr=1e-3"]) == 2
    captured = capsys.readouterr()
    assert "sft_single" in captured.err and "--out" in captured.err and "Traceback" not in captured.err
    assert "| setting" not in captured.out  # no table of the old run shown as this one's
    assert {f: (out / f).read_bytes() for f in before} == before
    # the same settings still resume (nothing to do), and another --out trains the new settings
    assert main(["run", str(path), "--no-progress"]) == 0
    assert main(["run", str(path), "--no-progress", "trainer.lr=1e-3", "--out", str(tmp_path / "run2")]) == 0
