"""The command line: parse arguments, load the config, call one stage function. No logic lives here.

Commands: `run` (the whole pipeline), `demo` (the offline demo), `traces teacher|student|stats|export`,
`train`, `eval`, `score`, `show-prompt`, `report`, `config show|reference`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .config import ConfigError, config_reference, dump_config, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="the run's YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.lr=1e-5 policy.phi=0")


def cmd_config(args: argparse.Namespace) -> int:
    if args.what == "reference":
        print(config_reference(), end="")
        return 0
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def _parse_fields(items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        last = None
        for part in item.split(","):
            if "=" not in part:
                if last is not None:  # options=A,B,C,D: several columns hold the options
                    out[last] += "," + part.strip()
                    continue
                raise ConfigError(f"--fields {part!r} must look like ours=yours (e.g. question=prompt)")
            k, v = part.split("=", 1)
            last = k.strip()
            out[last] = v.strip()
    return out


def _task_from_args(args: argparse.Namespace) -> Any:
    from .config import DataSplit, TaskConfig

    return TaskConfig(name=args.task, kind=args.kind, grader=args.grader, fields=_parse_fields(args.fields),
                      skip_invalid=args.skip_invalid, test=DataSplit(path=args.data, split=args.split))


def cmd_score(args: argparse.Namespace) -> int:
    import json

    from .tasks.show import score_file

    try:
        summary = score_file(_task_from_args(args), args.predictions, out=args.out)
    except ValueError as e:  # bad data, predictions or task: a message naming file, line and field
        raise ConfigError(str(e)) from e
    print(json.dumps(summary, ensure_ascii=False))
    return 0


def cmd_show_prompt(args: argparse.Namespace) -> int:
    from .tasks.show import show_prompt

    try:
        text = show_prompt(_task_from_args(args), args.index, model=args.model, template=args.template,
                           system_prompt=args.system_prompt, raw=args.raw)
    except (ValueError, OSError) as e:
        raise ConfigError(str(e)) from e
    print(text, end="")
    return 0


def _add_task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="built-in task (gsm8k, arc_challenge, openbookqa, medqa, strategyqa, "
                                                 "commonsenseqa, synthetic) or a kind (multiple_choice, numeric, "
                                                 "yes_no, exact, custom) or your own name with --kind")
    p.add_argument("--data", default=None, help="JSONL/JSON/CSV/Parquet file, dataset folder or hub name "
                                                "(default: a built-in task's hub dataset)")
    p.add_argument("--split", default=None, help="split inside a dataset folder or hub dataset (default: test)")
    p.add_argument("--kind", default="auto", choices=["auto", "multiple_choice", "numeric", "yes_no", "exact",
                                                      "custom"], help="grading kind for your own task name")
    p.add_argument("--grader", default=None, help="module:function (or file.py:function) for --kind custom")
    p.add_argument("--fields", action="extend", nargs="+", metavar="OURS=YOURS",
                   help="map our field names (question, options, answer, id, rationale) to the file's, e.g. "
                        "question=prompt answer=label, or options=A,B,C,D for option columns")
    p.add_argument("--skip-invalid", action="store_true", help="skip malformed rows (counted) instead of failing")


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from .config import DataSplit, ModelConfig, TaskConfig
    from .evaluate import run_eval

    model = ModelConfig(model=args.model, gguf_file=args.gguf_file, template=args.template,
                        batch_size=args.batch_size, device=args.device)
    task = TaskConfig(name=args.task, kind=args.kind, grader=args.grader, fields=_parse_fields(args.fields),
                      test=DataSplit(path=args.data, limit=args.limit))
    try:
        result = run_eval(model, task, args.out, max_new_tokens=args.max_new_tokens, majority_k=args.majority_k,
                          temperature=args.temperature, seed=args.seed, batch_size=args.batch_size,
                          progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:  # bad data, model path or arguments: a message, not a traceback
        raise ConfigError(str(e)) from e
    print(json.dumps(result.metrics(), ensure_ascii=False))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import load_results, report_runs, write_report

    try:
        if len(args.dirs) == 1 and args.out is None:
            written = write_report(args.dirs[0], load_results(args.dirs[0]))
        else:
            written = report_runs(args.dirs, args.out or "report")
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from e
    print(written[0].read_text(encoding="utf-8"), end="")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train import MissingTraces, run_train, summarize

    cfg = load_config(args.config, args.overrides)
    try:
        results = run_train(cfg, variants=args.variant, seeds=args.seed, progress=not args.no_progress)
    except MissingTraces as e:  # the message names the `orpo-distill traces ...` command to run
        raise ConfigError(str(e)) from e
    for r in results:
        print(summarize(r))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import parse_sweep, run, run_sweep
    from .report import render_results_md

    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"run.out_dir={args.out}")
    if args.seeds:
        overrides.append(f"run.seeds={args.seeds}")
    cfg = load_config(args.config, overrides)
    try:
        if args.sweep:
            run_sweep(cfg, parse_sweep(args.sweep), progress=not args.no_progress)
            print((Path(cfg.run.out_dir) / "sweep.md").read_text(encoding="utf-8"), end="")
            return 0
        results = run(cfg, progress=not args.no_progress)
    except _STAGE_ERRORS() as e:
        raise ConfigError(str(e)) from e
    print(render_results_md(results, []), end="")
    print(f"wrote {Path(cfg.run.out_dir) / 'results.json'}, results.md and plots/")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .pipeline import run_demo

    run_demo(args.out, quick=args.quick, overrides=args.overrides, progress=not args.no_progress)
    return 0


def cmd_traces(args: argparse.Namespace) -> int:
    import json

    from .sampling.stage import SamplingAborted, export_traces, run_traces, traces_stats
    from .store import format_stats

    try:
        if args.what in ("teacher", "student"):
            cfg = load_config(args.config, args.overrides)
            try:
                report = run_traces(cfg, args.what, progress=not args.no_progress)
            except SamplingAborted as e:  # the endpoint stayed down: work so far is kept, say how to resume
                print(f"orpo-distill: {e}", file=sys.stderr)
                print(e.report.summary())
                return 3
            print(report.summary())
        elif args.what == "stats":
            stats = traces_stats(args.config, args.overrides)
            print(json.dumps(stats, indent=1) if args.json else format_stats(stats))
        else:
            n = export_traces(args.config, args.out, args.overrides)
            print(f"wrote {n} traces to {args.out}")
    except (*_STAGE_ERRORS(), ValueError, FileNotFoundError, ImportError) as e:
        raise ConfigError(str(e)) from e
    return 0


def _STAGE_ERRORS() -> tuple[type[BaseException], ...]:
    """Errors of the stages that are the user's to fix (bad data, missing traces): shown as one message."""
    from .tasks import TaskDataError
    from .train import MissingTraces

    return (TaskDataError, MissingTraces)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="orpo-distill", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="the whole pipeline: traces, every variant x seed, results table and plots "
                                   "(each stage resumes and is skipped when done)")
    _add_config_args(p)
    p.add_argument("--out", default=None, help="output directory (run.out_dir)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per variant (run.seeds)")
    p.add_argument("--sweep", nargs="+", default=None, metavar="KEY=V1,V2",
                   help="a grid, e.g. --sweep objective.lam=0.1,1 policy.phi=0,0.5,1; best cell chosen on validation")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="the offline demo: tiny teacher and student, every variant, the results table")
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.add_argument("--quick", action="store_true", help="fewer questions and one seed (about a minute)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the demo config")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("traces", help="sample teacher / initial-student traces into the run's trace store, or "
                                      "show its stats, or export it")
    tsub = p.add_subparsers(dest="what", required=True)
    for what, text in (("teacher", "sample the teacher's K traces per train question (only what the store lacks)"),
                       ("student", "sample the initial student's traces per train question (source 'initial')")):
        q = tsub.add_parser(what, help=text)
        _add_config_args(q)
        q.add_argument("--no-progress", action="store_true", help="no progress bar")
        q.set_defaults(func=cmd_traces)
    q = tsub.add_parser("stats", help="counts per role, correct/unparsed/duplicate rates, tokens and cost")
    q.add_argument("config", metavar="CONFIG|STORE", help="a run config, or a traces.sqlite file")
    q.add_argument("overrides", nargs="*", help="dotted overrides (with a config)")
    q.add_argument("--json", action="store_true", help="print the stats as JSON")
    q.set_defaults(func=cmd_traces)
    q = tsub.add_parser("export", help="write every trace as JSON lines")
    q.add_argument("config", metavar="CONFIG|STORE", help="a run config, or a traces.sqlite file")
    q.add_argument("overrides", nargs="*", help="dotted overrides (with a config)")
    q.add_argument("--out", required=True, help="the JSONL file to write")
    q.set_defaults(func=cmd_traces)

    p = sub.add_parser("config", help="print the resolved config (`show`) or the reference of every key")
    p.add_argument("what", choices=["show", "reference"])
    p.add_argument("config", nargs="?", default=None)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("eval", help="accuracy of a model on a data file (greedy, or majority vote over k samples)")
    p.add_argument("--model", required=True, help="hub id or local folder of the model (HF backend)")
    p.add_argument("--task", required=True, help="built-in task name, or a kind (numeric, multiple_choice, ...)")
    p.add_argument("--data", required=True, help="the questions: JSONL/JSON/CSV/Parquet file or dataset folder")
    p.add_argument("--kind", default="auto", help="grading kind when --task is your own name (default: auto)")
    p.add_argument("--grader", default=None, help="module:function grading a completion, for --kind custom")
    p.add_argument("--fields", action="append", metavar="OURS=YOURS",
                   help="map our field names to the file's, e.g. question=prompt,answer=label (repeatable)")
    p.add_argument("--majority-k", type=int, default=1, help="k > 1: majority vote over k samples (default 1: greedy)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature for --majority-k > 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--template", choices=["auto", "chat", "plain"], default="auto",
                   help="the model's chat template, or the plain one for base models (auto: chat if it has one)")
    p.add_argument("--gguf-file", default=None, help="load weights from this GGUF file inside --model")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="write DIR/predictions.jsonl and DIR/metrics.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("train", help="train variants of a run from its stored traces (resumes; skips finished ones)")
    _add_config_args(p)
    p.add_argument("--variant", action="append", default=None, metavar="NAME",
                   choices=["zero_shot", "sft_single", "sft_diverse", "orpo_teacher_neg", "orpo_off", "orpo_on",
                            "orpo_mixed"],
                   help="train only this variant (repeatable; default: run.variants): sft_single, sft_diverse, "
                        "orpo_teacher_neg, orpo_off, orpo_on, orpo_mixed, zero_shot")
    p.add_argument("--seed", action="append", type=int, default=None, metavar="N",
                   help="train only this seed (repeatable; default: run.seed .. run.seed + run.seeds - 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("report", help="re-render a run's results.md and plots, or one table across several runs")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run directories (each with results.json)")
    p.add_argument("--out", default=None, help="where the cross-run report goes (default: ./report; with one DIR "
                                               "and no --out the run's own results.md and plots/ are rewritten)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("score", help="grade a predictions JSONL (a `completion` per row, in data order); prints "
                                     "one JSON line: accuracy, n, correct, wrong, unparsed")
    _add_task_args(p)
    p.add_argument("--predictions", required=True, help="JSONL with a `completion` field per row")
    p.add_argument("--out", default=None, help="also write one graded JSON row per question here")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("show-prompt", help="the exact prompt of one question and the task's answer line")
    _add_task_args(p)
    p.add_argument("--index", type=int, default=0, help="0-based position of the question in the data")
    p.add_argument("--model", default=None, help="render with this model's tokenizer (its chat template); "
                                                 "without it: the plain template for base models")
    p.add_argument("--template", choices=["auto", "chat", "plain"], default="auto")
    p.add_argument("--system-prompt", default=None, help="system message for chat templates")
    p.add_argument("--raw", action="store_true", help="print only the prompt, byte for byte")
    p.set_defaults(func=cmd_show_prompt)

    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"orpo-distill: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("orpo-distill: interrupted; everything written so far is kept, run the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

