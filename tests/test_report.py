"""report.py: the paper's table from results dicts, plots, tables across runs, sweeps chosen on validation."""

from __future__ import annotations

import json
import math

import pytest

from orpo_distill.report import (
    aggregate,
    best_cell,
    describe_differences,
    format_accuracy,
    load_results,
    paper_reference_table,
    report_runs,
    save_results,
    sweep_table,
    write_report,
    write_sweep_report,
)

PAPER_ROWS = ["zero-shot CoT", "single-CoT SFT", "diverse-CoT SFT", "ORPO teacher negatives", "off-policy ORPO",
              "on-policy ORPO", "mixed-policy ORPO"]


def _pool(cur: float, init: float, teach: float, none: int) -> dict:
    return {"current": cur, "initial": init, "teacher": teach, "none": none, "mean_age": 0.5}


def _seed(acc: float, seed: int, orpo: bool = True, n: int = 50) -> dict:
    eps = [{"epoch": e, "accuracy": acc - 0.1 + 0.05 * e, "loss": 2.0 / e,
            **({"pool": _pool(0.5, 0.4, 0.1, e)} if orpo else {})} for e in (1, 2)]
    return {"accuracy": acc, "n": n, "unparsed": 2 + seed, "seed": seed, "per_epoch": eps}


def _results(task: str = "synthetic", student: str = "tiny-llama", phi: float = 0.5, seeds: int = 2,
             bump: float = 0.0) -> dict:
    base = {"orpo_mixed": 0.70, "zero_shot": 0.20, "sft_single": 0.40, "orpo_off": 0.60, "sft_diverse": 0.50,
            "orpo_on": 0.55, "orpo_teacher_neg": 0.45}  # deliberately not in the paper's order
    variants = {}
    for v, a in base.items():
        variants[v] = aggregate([_seed(a + bump + 0.02 * s, s, orpo=v.startswith("orpo")) for s in range(seeds)])
    variants["zero_shot"].pop("per_epoch", None)
    return {"task": task, "teacher": "tiny-gpt2", "student": student, "variants": variants,
            "costs": {"teacher": {"tokens": 12345, "seconds": 10.5}, "training_seconds": 99.0},
            "config": {"run": {"out_dir": f"runs/{task}-{student}-{phi}"}, "task": {"name": task,
                       "test": {"path": f"data/{task}.jsonl"}}, "student": {"model": student},
                       "teacher": {"model": "tiny-gpt2"}, "policy": {"phi": phi}}}


def _table_rows(md: str, header_start: str) -> list[list[str]]:
    lines = md.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[i:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return [rows[0]] + rows[2:]  # drop the alignment row


def _assert_png(path) -> None:
    from matplotlib.image import imread

    assert path.is_file() and path.stat().st_size > 2000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(path)
    assert img.shape[0] > 200 and img.shape[1] > 300
    assert img.std() > 0.01  # not a blank canvas


def test_aggregate_mean_sample_std_and_epochs():
    e = aggregate([_seed(0.5, 0), _seed(0.6, 1), _seed(0.7, 2)])
    assert e["accuracy"] == pytest.approx(0.6)
    assert e["std"] == pytest.approx(0.1)  # sample std (ddof=1) of 0.5, 0.6, 0.7
    assert e["seeds"] == pytest.approx([0.5, 0.6, 0.7]) and e["seed_ids"] == [0, 1, 2]
    assert e["n"] == 50 and e["unparsed"] == pytest.approx(3.0)
    ep1 = e["per_epoch"][0]
    assert ep1["epoch"] == 1 and ep1["accuracy"] == pytest.approx(0.55) and ep1["n_seeds"] == 3
    assert ep1["accuracy_std"] == pytest.approx(0.1) and ep1["loss"] == pytest.approx(2.0)
    assert ep1["pool"]["current"] == pytest.approx(0.5) and ep1["pool"]["none"] == pytest.approx(1)
    one = aggregate([{"accuracy": 0.3, "n": 10, "unparsed": 1}])
    assert one["std"] == 0.0 and one["seeds"] == [0.3] and "per_epoch" not in one
    with pytest.raises(ValueError, match="different numbers of questions"):
        aggregate([_seed(0.5, 0, n=50), _seed(0.5, 1, n=49)])
    with pytest.raises(ValueError, match="no seed results"):
        aggregate([])


def test_format_accuracy():
    assert format_accuracy({"accuracy": 0.41204, "std": 0.01351, "seeds": [0.4, 0.42]}) == "41.20 ± 1.35"
    assert format_accuracy({"accuracy": 0.41204, "std": 0.0, "seeds": [0.41204]}) == "41.20"
    assert format_accuracy({"accuracy": 0.5}) == "50.00"
    assert format_accuracy(None) == "—"


def test_write_report_files_table_and_plots(tmp_path):
    res = _results()
    save_results(tmp_path, res)
    assert load_results(tmp_path) == json.loads((tmp_path / "results.json").read_text())
    written = write_report(tmp_path, res)
    names = sorted(p.name for p in written)
    assert names == ["accuracy_by_variant.png", "accuracy_loss_by_epoch.png", "negative_pool_by_epoch.png",
                     "results.md"]
    for p in written:
        if p.suffix == ".png":
            _assert_png(p)
    md = (tmp_path / "results.md").read_text(encoding="utf-8")
    rows = _table_rows(md, "| setting | synthetic |")
    assert [r[0] for r in rows[1:]] == PAPER_ROWS  # the paper's order and names, whatever the dict order
    # mixed-policy: seeds 0.70, 0.72 -> 71.00 ± 1.41
    assert rows[-1] == ["mixed-policy ORPO", "71.00 ± 1.41"]
    assert rows[1] == ["zero-shot CoT", "21.00 ± 1.41"]
    assert "teacher: `tiny-gpt2`" in md and "student: `tiny-llama`" in md and "(n): 50" in md and "seeds: 2" in md
    assert "| stage | tokens | seconds |" in md and "| teacher | 12,345 | 10.5 |" in md
    assert "| training_seconds | 99 |" in md
    assert "](plots/accuracy_by_variant.png)" in md
    assert "paper's numbers" not in md  # synthetic is not one of the paper's tasks
    # one seed: no ± anywhere in the main table
    one = _results(seeds=1)
    write_report(tmp_path / "one", one)
    rows1 = _table_rows((tmp_path / "one" / "results.md").read_text(), "| setting |")
    assert rows1[-1] == ["mixed-policy ORPO", "70.00"] and not any("±" in c for r in rows1 for c in r)


def test_report_for_a_paper_task_shows_paper_numbers_and_skips_missing_plots(tmp_path):
    res = {"task": "gsm8k", "teacher": "t", "student": "s",
           "variants": {"zero_shot": {"accuracy": 0.1, "n": 20, "unparsed": 3}}}
    written = write_report(tmp_path, res)
    assert [p.name for p in written] == ["results.md", "accuracy_by_variant.png"]  # no epochs, no pool
    md = (tmp_path / "results.md").read_text()
    assert "| GSM8K |" in md and "11.97" in md and "secondary source" in md


def test_bad_results_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"variants.orpo_off.accuracy must be a number in 0..1"):
        write_report(tmp_path, {"task": "x", "variants": {"orpo_off": {"accuracy": 41.2}}})
    with pytest.raises(ValueError, match="variants"):
        save_results(tmp_path, {"task": "x"})
    (tmp_path / "results.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"results.json:1: not valid JSON"):
        load_results(tmp_path)
    with pytest.raises(FileNotFoundError, match="no results.json"):
        load_results(tmp_path / "missing")


def test_report_runs_students_by_tasks_is_the_papers_layout(tmp_path):
    dirs = []
    for student, bump in (("TinyLlama", 0.0), ("InternLM", 0.1)):
        for task in ("medqa", "gsm8k"):
            d = tmp_path / f"{student}-{task}"
            save_results(d, _results(task=task, student=student, bump=bump + (0.05 if task == "gsm8k" else 0)))
            dirs.append(d)
    out = tmp_path / "cmp"
    written = report_runs(dirs, out)
    assert sorted(p.name for p in written) == ["accuracy_across_runs.png", "report.json", "report.md"]
    _assert_png(out / "plots" / "accuracy_across_runs.png")
    md = (out / "report.md").read_text()
    rows = _table_rows(md, "| run |")
    assert rows[0] == ["run", "setting", "MedQA", "GSM8K", "avg"]
    assert rows[1][:2] == ["student=TinyLlama", "zero-shot CoT"] and rows[8][:2] == ["student=InternLM",
                                                                                      "zero-shot CoT"]
    assert rows[2][0] == ""  # the run's label only on its block's first row
    # TinyLlama mixed: medqa seeds .70/.72 -> 71.00; gsm8k +5 -> 76.00; avg 73.50
    assert rows[7] == ["", "mixed-policy ORPO", "71.00 ± 1.41", "76.00 ± 1.41", "73.50"]
    assert "Runs differ in: the task (the columns), `student.model`" in md
    data = json.loads((out / "report.json").read_text())
    assert data["layout"] == "tasks_as_columns" and data["differing_keys"] == ["student.model"]


def test_report_runs_one_task_several_phi_labels_columns_by_phi(tmp_path):
    dirs = []
    for phi, bump in ((0.0, 0.0), (0.5, 0.01), (1.0, 0.02)):
        d = tmp_path / f"phi{phi}"
        save_results(d, _results(phi=phi, bump=bump))
        dirs.append(d)
    report_runs(dirs, tmp_path / "out")
    rows = _table_rows((tmp_path / "out" / "report.md").read_text(), "| setting (synthetic) |")
    assert rows[0] == ["setting (synthetic)", "policy.phi=0", "policy.phi=0.5", "policy.phi=1"]
    assert rows[-1] == ["mixed-policy ORPO", "71.00 ± 1.41", "72.00 ± 1.41", "73.00 ± 1.41"]
    # identical configs: told apart by directory name
    labels, keys = describe_differences([_results(), _results()])
    assert labels == ["", ""] and keys == []


def _cells() -> list[dict]:
    # best on test is lam=1 (cell 2), best on validation is lam=0.3 (cell 1): the validation one must be chosen
    return [{"overrides": {"objective.lam": 0.1}, "validation": [0.50, 0.52], "test": [0.50, 0.50]},
            {"overrides": {"objective.lam": 0.3}, "validation": [0.60, 0.62], "test": [0.55, 0.57]},
            {"overrides": {"objective.lam": 1.0}, "validation": [0.58, 0.60], "test": [0.80, 0.82]},
            {"overrides": {"objective.lam": 3.0}, "validation": [0.61, 0.61], "test": [0.10, 0.10]}]


def test_sweep_best_is_chosen_on_validation_not_test(tmp_path):
    cells = _cells()
    assert best_cell(cells) == 1  # 0.61 mean; cell 3 ties at 0.61 and loses to the earlier cell
    md = sweep_table(cells)
    rows = _table_rows(md, "| objective.lam |")
    assert rows[0] == ["objective.lam", "validation %", "test %", "seeds", "chosen"]
    assert rows[2] == ["0.3", "61.00 ± 1.41", "56.00 ± 1.41", "2", "**best (validation)**"]
    assert [r[-1] for r in rows[1:]].count("**best (validation)**") == 1
    with pytest.raises(ValueError, match="validation"):
        best_cell([{"overrides": {"a": 1}, "test": [0.9]}])
    written = write_sweep_report(tmp_path, cells, title="lambda sweep")
    assert {p.name for p in written} == {"sweep.md", "sweep.json", "sweep.png"}
    _assert_png(tmp_path / "plots" / "sweep.png")
    assert json.loads((tmp_path / "sweep.json").read_text())["chosen"] == 1


def test_sweep_plot_labels_are_short_and_name_the_variant_only_when_it_varies():
    from orpo_distill.report import sweep_labels

    one = [{"variant": "orpo_mixed", "overrides": {"objective.lam": 1.0, "policy.phi": 0}},
           {"variant": "orpo_mixed", "overrides": {"objective.lam": 0.1, "policy.phi": 0.5}}]
    assert sweep_labels(one) == ["lam=1\nphi=0", "lam=0.1\nphi=0.5"]
    two = [{"variant": "orpo_off", "overrides": {"a.x": 1, "b.x": 2}}, {"variant": "orpo_mixed", "overrides": {}}]
    assert sweep_labels(two) == ["off-policy ORPO\na.x=1\nb.x=2", "mixed-policy ORPO"]  # same tails: full keys
    assert sweep_labels([{"overrides": {}}]) == ["(defaults)"]


def test_sweep_per_variant_choice():
    cells = [{"variant": "orpo_off", "overrides": {"objective.lam": 0.1}, "validation": [0.4], "test": [0.9]},
             {"variant": "orpo_off", "overrides": {"objective.lam": 1.0}, "validation": [0.5], "test": [0.1]},
             {"variant": "orpo_mixed", "overrides": {"objective.lam": 0.1}, "validation": [0.7], "test": [0.2]},
             {"variant": "orpo_mixed", "overrides": {"objective.lam": 1.0}, "validation": [0.6], "test": [0.8]}]
    rows = _table_rows(sweep_table(cells), "| variant |")
    chosen = [(r[0], r[1]) for r in rows[1:] if r[-1]]
    assert chosen == [("off-policy ORPO", "1"), ("mixed-policy ORPO", "0.1")]


def test_paper_reference_table():
    md = paper_reference_table()
    rows = _table_rows(md, "| student / setting |")
    assert rows[0] == ["student / setting", "MedQA", "ARC-C", "StrategyQA", "OBQA", "GSM8K", "avg"]
    assert rows[1] == ["TinyLlama-1.1B zero-shot CoT", "29.78", "29.95", "43.52", "26.60", "11.97", "28.36"]
    assert ["mixed-policy ORPO", "50.43", "59.32", "61.75", "55.22", "52.47", "55.84"] in rows
    assert ["ORPO teacher negatives (ablation, off-policy)", "41.72", "45.87", "—", "—", "—", "—"] in rows
    assert "secondary source" in md and "2509.25100" in md
    sub = _table_rows(paper_reference_table(["arc_challenge"]), "| student / setting |")
    assert sub[0] == ["student / setting", "ARC-C"] and sub[-1] == ["mixed-policy ORPO", "59.32"]
    # TinyLlama has no teacher-negative row in the paper; every row's average is consistent with its cells
    for r in rows[1:]:
        vals = [float(x) for x in r[1:6] if x != "—"]
        if len(vals) == 5:
            assert math.isclose(sum(vals) / 5, float(r[6]), abs_tol=0.02)


def test_cli_report_one_run_and_across_runs(tmp_path, capsys):
    from orpo_distill.cli import main

    a, b = tmp_path / "a", tmp_path / "b"
    save_results(a, _results(student="s1"))
    save_results(b, _results(student="s2", bump=0.1))
    assert main(["report", str(a)]) == 0
    assert (a / "results.md").is_file() and (a / "plots" / "accuracy_by_variant.png").is_file()
    assert "| mixed-policy ORPO | 71.00 ± 1.41 |" in capsys.readouterr().out
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "| setting (synthetic) | student=s1 | student=s2 |" in out
    assert (tmp_path / "cmp" / "report.md").is_file()
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no results.json" in capsys.readouterr().err


def test_policy_pool_stats_are_read_as_shares(tmp_path):
    """per_epoch pools may be the policy's PoolStats dicts (counts); they become shares of questions."""
    stats = {"epoch": 2, "phi": 0.5, "questions": 10, "from_current": 4, "from_initial": 3, "from_older": 1,
             "from_teacher": 0, "no_negatives": 2, "negatives": 20, "share_current": 0.4, "mean_age": 0.25}
    e = aggregate([{"accuracy": 0.5, "n": 10, "unparsed": 0, "per_epoch": [{"epoch": 2, "accuracy": 0.5,
                                                                            "pool": stats}]}])
    pool = e["per_epoch"][0]["pool"]
    assert pool["current"] == pytest.approx(0.5) and pool["initial"] == pytest.approx(0.375)
    assert pool["older"] == pytest.approx(0.125) and pool["none"] == 2 and pool["mean_age"] == 0.25
    res = {"task": "t", "variants": {"orpo_mixed": e}}
    written = write_report(tmp_path, res)
    assert "negative_pool_by_epoch.png" in [p.name for p in written]
    md = (tmp_path / "results.md").read_text()
    assert "| mixed-policy ORPO | 2 | 50.00 | — | 50% | 12% | 38% | 0% | 2 | 0.25 |" in md


def _strict_load(path):
    """json.loads that refuses NaN/Infinity (what strict JSON readers do)."""
    def bad(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=bad)


def test_a_diverged_variant_is_null_in_json_and_diverged_in_tables_never_zero(tmp_path):
    res = _results(seeds=2)
    # every seed of orpo_on diverged (NaN accuracy); one of two seeds of orpo_off diverged
    res["variants"]["orpo_on"] = aggregate([{"accuracy": math.nan, "n": 50, "seed": 0},
                                            {"accuracy": None, "diverged": True, "n": 50, "seed": 1}])
    res["variants"]["orpo_off"] = aggregate([_seed(0.6, 0), {"accuracy": math.inf, "n": 50, "seed": 1}])
    res["variants"]["sft_single"] = {"accuracy": math.nan, "n": 50}  # as a trainer might hand it over
    res["variants"]["orpo_mixed"]["per_epoch"][0]["loss"] = math.nan
    save_results(tmp_path, res)
    data = _strict_load(tmp_path / "results.json")  # strict: no NaN/Infinity tokens anywhere
    assert data["variants"]["orpo_on"]["accuracy"] is None and data["variants"]["orpo_on"]["diverged"] is True
    assert data["variants"]["sft_single"] == {"accuracy": None, "n": 50, "diverged": True}
    assert data["variants"]["orpo_off"]["accuracy"] == pytest.approx(0.6)
    assert data["variants"]["orpo_off"]["diverged_seeds"] == 1
    assert data["variants"]["orpo_mixed"]["per_epoch"][0]["loss"] is None
    write_report(tmp_path, load_results(tmp_path))
    md = (tmp_path / "results.md").read_text(encoding="utf-8")
    rows = dict((r[0], r[1]) for r in _table_rows(md, "| setting | synthetic |")[1:])
    assert rows["on-policy ORPO"] == "diverged" and rows["single-CoT SFT"] == "diverged"
    assert rows["off-policy ORPO"] == "60.00 (1 of 2 seeds diverged)"
    assert "nan" not in md.lower() and "| on-policy ORPO | 0.00" not in md
    # across runs and in sweeps: null in JSON, "diverged" in the table
    save_results(tmp_path / "b", _results(seeds=2))
    written = report_runs([tmp_path, tmp_path / "b"], tmp_path / "cmp")
    rep = _strict_load(tmp_path / "cmp" / "report.json")
    on = next(r for r in rep["rows"] if r["variant"] == "orpo_on")
    assert on["cells"][0] is None
    assert "diverged" in written[0].read_text(encoding="utf-8")
    cells = [{"overrides": {"trainer.lr": 1e-3}, "validation": [math.nan], "test": [math.nan]},
             {"overrides": {"trainer.lr": 1e-5}, "validation": [0.5], "test": [0.4]}]
    write_sweep_report(tmp_path / "sw", cells)
    sweep = _strict_load(tmp_path / "sw" / "sweep.json")
    assert sweep["chosen"] == 1 and sweep["cells"][0]["validation"] == [None]


def test_a_failed_savefig_leaves_no_temp_file_and_a_dead_writers_leftover_is_swept(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    res = _results(seeds=1)
    plots = tmp_path / "plots"
    plots.mkdir()
    # a previous run killed while plotting: a 0-byte hidden temp file of a process that no longer exists
    # (the old naming .STEM.tmpPID.png and the current .NAME.tmpPID-HEX), and one of a live writer (this test)
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    old_style = plots / f".accuracy_by_variant.tmp{dead}.png"
    new_style = plots / f".accuracy_by_variant.png.tmp{dead}-0a1b2c3d"
    old_style.touch()
    new_style.touch()
    unrelated = plots / ".notes.txt"
    unrelated.touch()

    def full_disk(self, fname, *a, **k):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_report(tmp_path, res)
    left = sorted(p.name for p in plots.iterdir())
    assert left == [".notes.txt"]  # the failed write's temp file is gone, and so are the dead writer's
    assert not (tmp_path / "results.md").exists()
    monkeypatch.undo()
    written = write_report(tmp_path, res)
    assert all(p.is_file() and p.stat().st_size > 0 for p in written)
    assert sorted(p.name for p in plots.iterdir() if p.name.startswith(".")) == [".notes.txt"]


def test_report_across_runs_never_shows_a_credential_from_a_config(tmp_path):
    secret = "Zq81SECRETvalue4412abcXYZ"
    a, b = _results(), _results(bump=0.01)
    a["config"]["teacher"] = {"model": "t", "base_url": f"https://h/v1?api_key={secret}"}
    b["config"]["teacher"] = {"model": "t", "base_url": "https://other/v1"}
    save_results(tmp_path / "a", a)
    save_results(tmp_path / "b", b)
    written = report_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "cmp")
    md = written[0].read_text(encoding="utf-8")
    assert "teacher.base_url=https://h/v1?api_key=***" in md
    for p in written:
        assert secret.encode() not in p.read_bytes()


def test_plots_explain_themselves(tmp_path):
    """Titles name the models (a local folder by name and architecture, not `assets/student`); the
    accuracy band says it is std over seeds; NLL and L_OR on their own axes; the share of questions without a
    negative is its own hatched segment of the pool bar."""
    from matplotlib.figure import Figure

    from orpo_distill.report import model_title, plot_epochs, plot_negative_pool, pool_makeup

    student = tmp_path / "assets" / "student"
    student.mkdir(parents=True)
    (student / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2,
                                                     "hidden_size": 128}))
    assert model_title(str(student)) == "student (llama, 2 x 128)"
    import torch
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(5)}, str(student / "model.safetensors"))
    assert model_title(str(student)) == "student (llama, 2 x 128, 0.00M params)"
    (student / "model.safetensors").unlink()
    assert model_title("org/model") == "org/model"

    def seed(s: int, orpo: bool) -> dict:
        eps = [{"epoch": e, "accuracy": 0.3 + 0.1 * e + 0.01 * s, "loss": 1.0 / e,
                **({"nll": 0.5 / e, "l_or": 0.6 / e, "pool": {"questions": 10, "from_current": 4, "from_initial": 4,
                                                             "from_older": 0, "from_teacher": 0,
                                                             "no_negatives": 2}} if orpo else {})}
               for e in (1, 2)]
        return {"accuracy": 0.5, "n": 20, "unparsed": 0, "seed": s, "per_epoch": eps}

    variants = {"sft_diverse": aggregate([seed(s, False) for s in (0, 1)]),
                "orpo_mixed": aggregate([seed(s, True) for s in (0, 1)])}
    pool = variants["orpo_mixed"]["per_epoch"][0]["pool"]
    assert pool["none_share"] == pytest.approx(0.2) and pool["current"] == pytest.approx(0.5)
    assert pool_makeup({"questions": 10, "from_current": 10, "no_negatives": 0})["none_share"] == 0.0
    results = {"task": "synthetic", "teacher": "org/teacher", "student": str(student), "variants": variants,
               "config": {"eval": {"split": "test"}}}

    seen: dict[str, Figure] = {}
    real_save = Figure.savefig

    def keep(fig: Figure, *a, **k):
        seen[str(len(seen))] = fig
        return real_save(fig, *a, **k)

    import unittest.mock as mock

    with mock.patch.object(Figure, "savefig", keep):
        assert plot_epochs(results, tmp_path / "e.png").is_file()
        assert plot_negative_pool(results, tmp_path / "p.png").is_file()
    epochs_fig, pool_fig = seen["0"], seen["1"]
    acc_ax, nll_ax, or_ax = epochs_fig.axes
    assert "std over 2 seeds" in acc_ax.get_title()
    assert "NLL" in nll_ax.get_title() and "L_OR" in or_ax.get_title()
    assert [round(y, 6) for y in or_ax.lines[0].get_ydata()] == [0.6, 0.3]  # L_OR, not the total loss
    assert "student (llama, 2 x 128)" in epochs_fig._suptitle.get_text()
    assert "assets/student" not in epochs_fig._suptitle.get_text()
    labels = pool_fig.axes[0].get_legend_handles_labels()[1]
    assert "no negative (SFT only)" in labels
    tops = [p.get_y() + p.get_height() for p in pool_fig.axes[0].patches]
    assert max(tops) == pytest.approx(100.0)  # sources scaled to 80 % + 20 % without a negative
