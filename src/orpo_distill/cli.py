"""The `orpo-distill` command line: parse the arguments, load the config, call one stage function, and report a
failure the user can fix as one line (`orpo-distill: <message>`, exit 2 bad input, 3 endpoint, 4 diverged, 130
interrupted) without a traceback unless `--debug` is given. Anything else is a bug and keeps its traceback.

Commands: `run` (the whole pipeline), `demo` (the offline demo), `traces teacher|student|stats|export`,
`train`, `eval`, `score`, `show-prompt`, `report`, `config show|reference`.
"""

from __future__ import annotations

import argparse
import errno
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import ConfigError, config_reference, dump_config, load_config
from .errors import OrpoDistillError, TrainingDiverged, UserError

DESCRIPTION = ("Distil a teacher LLM into a student of another architecture with ORPO-Distill: sample the "
               "teacher's and the student's reasoning traces, train the student on them (with the paper's "
               "baselines), evaluate, and write a results table. Start with `orpo-distill demo`, or "
               "`orpo-distill run CONFIG` (every key: `orpo-distill config reference`).")
EPILOG = ("exit codes: 0 done, 2 bad input (config, data, model path, command-line value, trace store), "
          "3 sampling endpoint unreachable, 4 training diverged, 130 interrupted (work so far is kept: run the same "
          "command again to resume).")
VARIANT_CHOICES = ["zero_shot", "sft_single", "sft_diverse", "orpo_teacher_neg", "orpo_off", "orpo_on",
                   "orpo_mixed"]


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument through the one error path (exit 2, `orpo-distill: ...`)."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        command = self.prog.partition(" ")[2]  # "eval", "traces stats"; empty for the top level
        raise UserError(f"{command + ': ' if command else ''}{message} (see `{self.prog} --help`)")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


_positive = _int_at_least(1)
_non_negative = _int_at_least(0)


# ---- commands ---------------------------------------------------------------------------------------------------

def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="the run's YAML config file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="change any config key for this command, e.g. trainer.lr=1e-5 policy.phi=0")


def _add_progress_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars or stage lines (for logs and CI); results are printed all the same")


def cmd_config(args: argparse.Namespace) -> int:
    if args.what == "reference":
        if args.config is not None:
            raise UserError("config reference takes no CONFIG (it lists every key of every config)")
        print(config_reference(), end="")
        return 0
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():  # `config show trainer.lr=1e-5`
        config, overrides = None, [config, *overrides]
    print(dump_config(load_config(config, overrides)), end="")
    return 0


def _parse_fields(items: list[str] | None) -> dict[str, str]:
    """`--fields question=prompt answer=label` or `--fields question=prompt,answer=label` (the same map);
    `options=A,B,C,D` names several option columns."""
    out: dict[str, str] = {}
    for item in items or []:
        last = None
        for part in item.split(","):
            if "=" not in part:
                if last is not None:  # options=A,B,C,D: several columns hold the options
                    out[last] += "," + part.strip()
                    continue
                raise UserError(f"--fields {part!r} must look like ours=yours (e.g. question=prompt)")
            k, v = part.split("=", 1)
            last = k.strip()
            out[last] = v.strip()
    return out


def _task_from_args(args: argparse.Namespace, limit: int | None = None) -> Any:
    from pydantic import ValidationError

    from .config import DataSplit, TaskConfig, format_validation_error

    if args.task == "synthetic" and args.data:
        raise UserError(f"--data {args.data}: the synthetic task generates its questions and never reads a file; "
                        "drop --data, or name your task with --task NAME --kind KIND to grade your file")
    try:
        return TaskConfig(name=args.task, kind=args.kind, grader=args.grader, fields=_parse_fields(args.fields),
                          skip_invalid=args.skip_invalid,
                          test=DataSplit(path=args.data, split=args.split, limit=limit))
    except ValidationError as e:
        raise UserError(format_validation_error(e, "(command-line task options)")) from None


def cmd_score(args: argparse.Namespace) -> int:
    import json

    from .tasks.show import score_file

    try:
        summary = score_file(_task_from_args(args), args.predictions, out=args.out)
    except ValueError as e:  # bad data, predictions or task: a message naming file, line and field
        raise UserError(str(e)) from e
    print(json.dumps(summary, ensure_ascii=False))
    return 0


def cmd_show_prompt(args: argparse.Namespace) -> int:
    from .tasks.show import show_prompt

    try:
        text = show_prompt(_task_from_args(args), args.index, model=args.model, template=args.template,
                           system_prompt=args.system_prompt, raw=args.raw)
    except (ValueError, OSError) as e:
        raise UserError(str(e)) from e
    print(text, end="")
    return 0


def _add_task_args(p: argparse.ArgumentParser) -> None:
    """The task options `eval`, `score` and `show-prompt` share (one spelling of each flag)."""
    p.add_argument("--task", required=True, help="built-in task (gsm8k, arc_challenge, openbookqa, medqa, strategyqa, "
                                                 "commonsenseqa, synthetic) or a kind (multiple_choice, numeric, "
                                                 "yes_no, exact, custom) or your own name with --kind")
    p.add_argument("--data", default=None, help="the questions: JSONL/JSON/CSV/Parquet file, dataset folder or hub "
                                                "name (default: a built-in task's hub dataset; the synthetic task "
                                                "takes none)")
    p.add_argument("--split", default=None, help="split inside a dataset folder or hub dataset (default: test)")
    p.add_argument("--kind", default="auto", choices=["auto", "multiple_choice", "numeric", "yes_no", "exact",
                                                      "custom"],
                   help="how answers are graded when --task is your own name (default: the built-in task's)")
    p.add_argument("--grader", default=None, help="module:function (or file.py:function) grading a completion, "
                                                  "for --kind custom")
    p.add_argument("--fields", action="extend", nargs="+", metavar="OURS=YOURS",
                   help="map our field names (question, options, answer, id, rationale) to your file's columns: "
                        "--fields question=prompt answer=label (or comma-separated), options=A,B,C,D for option "
                        "columns")
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip malformed rows (they are counted and reported) instead of stopping at the first")


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from pydantic import ValidationError

    from .config import ModelConfig, format_validation_error
    from .evaluate import run_eval
    from .models import check_model, resolve_device

    if args.majority_k > 1 and args.temperature is not None and args.temperature <= 0:
        raise UserError("--majority-k > 1 needs --temperature > 0 (at temperature 0 every sample is the same)")
    task = _task_from_args(args, limit=args.limit)
    try:
        model = ModelConfig(model=args.model, gguf_file=args.gguf_file, template=args.template,
                            batch_size=args.batch_size, device=args.device)
    except ValidationError as e:
        raise UserError(format_validation_error(e, "(command-line model options)")) from None
    check_model(model, key="--model")
    resolve_device(model.device, key="--device")
    try:
        result = run_eval(model, task, args.out, max_new_tokens=args.max_new_tokens, majority_k=args.majority_k,
                          temperature=args.temperature if args.temperature is not None else 0.8, seed=args.seed,
                          batch_size=args.batch_size, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:  # bad data or arguments: a message, not a traceback
        if isinstance(e, OrpoDistillError):
            raise
        raise UserError(str(e)) from e
    print(json.dumps(result.metrics(), ensure_ascii=False))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import load_results, report_runs, write_report

    if len(args.dirs) > 1 and args.out is None:
        raise UserError(f"report of {len(args.dirs)} runs: give --out DIR for the cross-run report.md and plots "
                        "(nothing is written into the current folder unasked)")
    try:
        if len(args.dirs) == 1 and args.out is None:
            written = write_report(args.dirs[0], load_results(args.dirs[0]))
        else:
            written = report_runs(args.dirs, args.out)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from e
    print(written[0].read_text(encoding="utf-8"), end="")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .pipeline import preflight, store_errors
    from .sampling.stage import store_path
    from .train import run_train, summarize

    cfg = load_config(args.config, args.overrides)
    seeds = args.seed if args.seed is not None else None
    preflight(cfg, stages=("train",), variants=args.variant, seeds=seeds)
    with store_errors(store_path(cfg)):
        results = run_train(cfg, variants=args.variant, seeds=seeds, progress=not args.no_progress)
    from .distributed import dist_info

    for r in results if dist_info().is_main else []:  # under torchrun / accelerate launch: printed once
        print(summarize(r))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import parse_sweep, run, run_sweep, store_errors
    from .report import render_results_md
    from .sampling.stage import store_path

    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"run.out_dir={args.out}")
    if args.seeds is not None:
        overrides.append(f"run.seeds={args.seeds}")
    if args.workers is not None:
        overrides.append(f"run.workers={args.workers}")
    grid = parse_sweep(args.sweep) if args.sweep else None  # bad --sweep syntax fails before the config loads
    cfg = load_config(args.config, overrides)
    out = Path(cfg.run.out_dir)
    if grid is not None:
        with store_errors(out / "traces.sqlite"):
            try:
                run_sweep(cfg, grid, progress=not args.no_progress)
            except TrainingDiverged:
                if (out / "sweep.md").is_file():
                    print((out / "sweep.md").read_text(encoding="utf-8"), end="")
                raise
        print((out / "sweep.md").read_text(encoding="utf-8"), end="")
        return 0
    with store_errors(store_path(cfg)):
        try:
            results = run(cfg, progress=not args.no_progress)
        except TrainingDiverged as e:
            if getattr(e, "results", None):
                print(render_results_md(e.results, []), end="")  # type: ignore[attr-defined]
            raise
    from .distributed import dist_info

    if dist_info().is_main:  # under torchrun / accelerate launch: printed once
        print(render_results_md(results, []), end="")
        print(f"wrote {out / 'results.json'}, results.md and plots/")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .pipeline import demo_config, run_demo, store_errors
    from .sampling.stage import store_path

    overrides = list(args.overrides) + ([f"run.workers={args.workers}"] if args.workers is not None else [])
    cfg = demo_config(args.out, quick=args.quick, overrides=overrides)  # bad overrides fail here
    with store_errors(store_path(cfg)):
        run_demo(args.out, quick=args.quick, overrides=overrides, progress=not args.no_progress)
    return 0


def _store_of(target: str, overrides: Sequence[str]) -> Path:
    """The trace store a `traces stats|export` argument names (for error messages): the file, or a config's."""
    from .sampling.stage import store_path

    try:
        return store_path(load_config(target, list(overrides)))
    except UserError:
        return Path(target)


def cmd_traces(args: argparse.Namespace) -> int:
    import json

    from .pipeline import preflight, store_error, store_errors
    from .sampling.stage import SamplingAborted, export_traces, run_traces, store_path, traces_stats
    from .store import format_stats

    if args.what in ("teacher", "student"):
        cfg = load_config(args.config, args.overrides)
        preflight(cfg, stages=(args.what,), variants=["orpo_mixed"])  # a variant that needs both stages
        with store_errors(store_path(cfg)):
            try:
                report = run_traces(cfg, args.what, progress=not args.no_progress)
            except SamplingAborted as e:  # the endpoint stayed down: work so far is kept, say how to resume
                print(e.report.summary())
                raise
            except (ValueError, ImportError) as e:
                if isinstance(e, OrpoDistillError):
                    raise
                raise UserError(str(e)) from e
        print(report.summary())
        return 0
    path = _store_of(args.config, args.overrides)
    with store_errors(path):
        try:
            if args.what == "stats":
                stats = traces_stats(args.config, args.overrides)
                print(json.dumps(stats, indent=1) if args.json else format_stats(stats))
            else:
                n = export_traces(args.config, args.out, args.overrides)
                print(f"wrote {n} traces to {args.out}")
        except (ValueError, FileNotFoundError) as e:
            if isinstance(e, OrpoDistillError):
                raise
            raise (store_error(path, e) if "trace store" in str(e) else UserError(str(e))) from e
    return 0


# ---- the parser -------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="orpo-distill", description=DESCRIPTION, epilog=EPILOG)
    ap.add_argument("--debug", action="store_true",
                    help="on an error, also print the Python traceback (for bug reports); may be given anywhere")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="the whole pipeline: traces, every variant x seed, results table and plots "
                                   "(each stage resumes and is skipped when done)",
                       description="Run everything a config describes, in order: teacher traces, the initial "
                                   "student's traces, every variant x seed trained and evaluated, then "
                                   "results.json/results.md/plots in run.out_dir. Each stage is skipped when its "
                                   "outputs exist, so the same command resumes an interrupted run. Everything "
                                   "that can be checked (models, data, devices, the trace store) is checked "
                                   "first.")
    _add_config_args(p)
    p.add_argument("--out", default=None, help="output folder (sets run.out_dir); use a new one for new settings")
    p.add_argument("--seeds", type=_positive, default=None, metavar="N",
                   help="train and evaluate each variant with N seeds (sets run.seeds)")
    p.add_argument("--sweep", nargs="+", default=None, metavar="KEY=V1,V2",
                   help="a grid, e.g. --sweep objective.lam=0.1,1 policy.phi=0,0.5,1: one run per cell (traces "
                        "shared), the best cell chosen on validation accuracy, summary in OUT/sweep.md")
    p.add_argument("--workers", type=_positive, default=None, metavar="N",
                   help="train the variant x seed jobs in N processes side by side (sets run.workers; default: "
                        "one per CPU core that memory allows, 1 for a GPU student; same results as one after "
                        "another)")
    _add_progress_arg(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="the offline demo: tiny shipped teacher and student, every variant, the "
                                    "results table (minutes on a laptop CPU)",
                       description="Run the whole method offline on the synthetic arithmetic task with the tiny "
                                   "teacher and student shipped in the package. Refuses an --out folder that "
                                   "holds a run with other settings.")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo; --quick needs its own)")
    p.add_argument("--quick", action="store_true", help="fewer questions and one seed (about a minute)")
    p.add_argument("--workers", type=_positive, default=None, metavar="N",
                   help="train the variant x seed jobs in N processes side by side (sets run.workers; default: "
                        "one per CPU core)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="change keys of the demo config, e.g. "
                                                                     "trainer.epochs=1")
    _add_progress_arg(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("traces", help="sample teacher / initial-student traces into the run's trace store, or "
                                      "show its stats, or export it")
    tsub = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    for what, text in (("teacher", "sample the teacher's K traces per train question (only what the store lacks)"),
                       ("student", "sample the initial student's traces per train question (source 'initial')")):
        q = tsub.add_parser(what, help=text, description=text + "; an interrupted call resumes where it stopped.")
        _add_config_args(q)
        _add_progress_arg(q)
        q.set_defaults(func=cmd_traces)
    q = tsub.add_parser("stats", help="counts per role, correct/unparsed/duplicate rates, tokens and cost")
    q.add_argument("config", metavar="CONFIG|STORE", help="a run config, or a traces.sqlite file")
    q.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (with a config)")
    q.add_argument("--json", action="store_true", help="print the stats as JSON")
    q.set_defaults(func=cmd_traces)
    q = tsub.add_parser("export", help="write every trace as JSON lines")
    q.add_argument("config", metavar="CONFIG|STORE", help="a run config, or a traces.sqlite file")
    q.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (with a config)")
    q.add_argument("--out", required=True, help="the JSONL file to write")
    q.set_defaults(func=cmd_traces)

    p = sub.add_parser("config", help="print a config with every default filled in (`show`), or the reference "
                                      "of every key (`reference`)")
    p.add_argument("what", choices=["show", "reference"],
                   help="show: the resolved config (CONFIG + overrides, or the defaults without CONFIG), as YAML "
                        "you can save and edit; reference: every key with its type, default and meaning")
    p.add_argument("config", nargs="?", default=None, help="the YAML config to resolve (show only)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides applied before showing")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("eval", help="accuracy of any model on a task's data (greedy, or majority vote over k "
                                    "samples); writes predictions you can re-`score`")
    p.add_argument("--model", required=True, help="hub id or local folder of the model (transformers)")
    _add_task_args(p)
    p.add_argument("--majority-k", type=_positive, default=1, metavar="K",
                   help="K > 1: majority vote over K samples per question (default 1: greedy)")
    p.add_argument("--temperature", type=_positive_float, default=None,
                   help="sampling temperature for --majority-k > 1 (default 0.8)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed for --majority-k > 1 (default 0)")
    p.add_argument("--limit", type=_positive, default=None, metavar="N", help="evaluate only the first N questions")
    p.add_argument("--max-new-tokens", type=_positive, default=512, metavar="N",
                   help="longest answer generated per question (default 512)")
    p.add_argument("--batch-size", type=_positive, default=32, metavar="N",
                   help="questions per generation batch (default 32; lower it on out-of-memory)")
    p.add_argument("--template", choices=["auto", "chat", "plain"], default="auto",
                   help="the model's chat template, or the plain one for base models (auto: chat if it has one)")
    p.add_argument("--gguf-file", default=None, help="load weights from this GGUF file inside --model")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument("--out", default=None, help="write DIR/predictions.jsonl and DIR/metrics.json")
    _add_progress_arg(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("train", help="train variants of a run from its stored traces (resumes; skips finished ones)")
    _add_config_args(p)
    p.add_argument("--variant", action="append", default=None, metavar="NAME", choices=VARIANT_CHOICES,
                   help="train only this variant (repeatable; default: run.variants): " + ", ".join(VARIANT_CHOICES))
    p.add_argument("--seed", action="append", type=int, default=None, metavar="N",
                   help="train only this seed (repeatable; default: run.seed .. run.seed + run.seeds - 1)")
    _add_progress_arg(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("report", help="re-render a run's results.md and plots, or one table across several runs")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run folders (each with results.json)")
    p.add_argument("--out", default=None, help="folder for the cross-run report.md, report.json and plot (required "
                                               "with several DIRs); with one DIR and no --out, that run's own "
                                               "results.md and plots/ are rewritten")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("score", help="grade a predictions JSONL (a `completion` per row, in data order); prints "
                                     "one JSON line: accuracy, n, correct, wrong, unparsed")
    _add_task_args(p)
    p.add_argument("--predictions", required=True, help="JSONL with a `completion` field per row")
    p.add_argument("--out", default=None, help="also write one graded JSON row per question here")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("show-prompt", help="the exact prompt of one question and the task's answer line")
    _add_task_args(p)
    p.add_argument("--index", type=_non_negative, default=0, help="0-based position of the question in the data")
    p.add_argument("--model", default=None, help="render with this model's tokenizer (its chat template); "
                                                 "without it: the plain template for base models")
    p.add_argument("--template", choices=["auto", "chat", "plain"], default="auto",
                   help="the model's chat template, or the plain one (auto: chat when --model has one)")
    p.add_argument("--system-prompt", default=None, help="system message for chat templates")
    p.add_argument("--raw", action="store_true", help="print only the prompt, byte for byte")
    p.set_defaults(func=cmd_show_prompt)

    return ap


# ---- the one error path -----------------------------------------------------------------------------------------

def _os_error(e: OSError) -> UserError | None:
    """A full disk or an unwritable path, named, as a user error; None for other OS errors (bugs)."""
    where = f" {e.filename}" if e.filename else ""
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return UserError(f"no space left on the device writing{where}: free disk space and run the same command "
                         "again (finished work is kept)")
    if e.errno == errno.EROFS:
        return UserError(f"cannot write{where}: the file system is read-only; choose another --out "
                         "(run.out_dir) or run.store")
    if e.errno in (errno.EACCES, errno.EPERM):
        return UserError(f"cannot access{where}: {e.strerror}; fix its permissions, or choose another --out "
                         "(run.out_dir) when it is an output")
    return None


def _fail(message: str, code: int, debug: bool) -> int:
    if debug:
        import traceback

        traceback.print_exc()
    print(f"orpo-distill: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        # `run CONFIG --no-progress trainer.lr=1e-5`: argparse cannot resume a positional list after an option,
        # so KEY=VALUE words after options are the overrides they look like
        if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides = [*(args.overrides or []), *extra]
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("orpo-distill: interrupted; everything written so far is kept, run the same command to resume",
              file=sys.stderr)
        return 130
    except OrpoDistillError as e:
        return _fail(str(e), e.exit_code, debug)
    except sqlite3.Error as e:  # the trace store is the only SQLite file; commands name its path when they can
        from .pipeline import _store_hint

        return _fail(f"trace store: {e}; {_store_hint(str(e))}", 2, debug)
    except OSError as e:
        err = _os_error(e)
        if err is None:
            raise
        return _fail(str(err), err.exit_code, debug)


__all__ = ["ConfigError", "build_parser", "main"]


if __name__ == "__main__":
    sys.exit(main())
