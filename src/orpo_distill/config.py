"""The typed configuration of a whole run: every default once, with the paper's values.

One YAML file describes a run (task and data, teacher, student, sampling, pairing, negative policy, objective,
optimisation, evaluation, output). `load_config` reads it, applies dotted command-line overrides
(`trainer.lr=1e-5`), and validates everything at load time: an unknown key, a wrong type or an out-of-range value
raises `ConfigError` naming the file, the dotted key and what is allowed. Defaults that come from ORPO-Distill
(arXiv 2509.25100) are marked "paper"; choices the paper leaves open are marked "ours" (see docs/METHOD.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from .errors import UserError
from .secrets import check_env_var_name, check_no_secret, check_url, redact_override

VARIANTS = ("zero_shot", "sft_single", "sft_diverse", "orpo_teacher_neg", "orpo_off", "orpo_on", "orpo_mixed")
# Beyond the paper (docs/METHOD.md): mixed-policy ORPO with objective.rejected_scope after_prefix /
# after_first_error, and with policy.schedule adaptive. Not in the default run.variants (the paper's rows).
EXTRA_VARIANTS = ("orpo_mixed_prefix", "orpo_mixed_firsterr", "orpo_adaptive")
ALL_VARIANTS = VARIANTS + EXTRA_VARIANTS
Variant = Literal["zero_shot", "sft_single", "sft_diverse", "orpo_teacher_neg", "orpo_off", "orpo_on", "orpo_mixed",
                  "orpo_mixed_prefix", "orpo_mixed_firsterr", "orpo_adaptive"]


class ConfigError(UserError):
    """A config that cannot be used; the message names the file, the key and what is allowed (exit 2)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataSplit(_Section):
    """Where one split's rows come from: a local file/folder or a hub dataset name."""

    path: str | None = Field(None, description="JSONL/JSON/CSV/Parquet file, `save_to_disk` folder, or hub dataset name")
    split: str | None = Field(None, description="split name inside a hub dataset or `save_to_disk` DatasetDict")
    subset: str | None = Field(None, description="hub dataset configuration name (e.g. `main` for openai/gsm8k)")
    limit: int | None = Field(None, ge=1, description="keep at most this many rows")
    sample_seed: int | None = Field(None, description="with `limit`: a seeded random sample instead of the first N")


class TaskConfig(_Section):
    """Which task: a built-in one (`gsm8k`, `medqa`, ...) or a generic kind over your own fields."""

    name: str = Field("synthetic", description="built-in task name, or a free name for a generic `kind`")
    kind: Literal["auto", "multiple_choice", "numeric", "yes_no", "exact", "custom"] = Field(
        "auto", description="grading kind; `auto` takes the built-in task's kind")
    train: DataSplit = Field(default_factory=DataSplit)
    validation: DataSplit = Field(default_factory=DataSplit)
    test: DataSplit = Field(default_factory=DataSplit)
    fields: dict[str, str] = Field(default_factory=dict,
                                   description="map of our field names (question, options, answer, id, rationale) to yours")
    grader: str | None = Field(None, description="`module:function` grading a completion, for kind=custom")
    skip_invalid: bool = Field(False, description="skip malformed rows (and report them) instead of failing")
    synthetic: dict[str, Any] = Field(default_factory=dict, description="options of the synthetic task generator")

    @model_validator(mode="after")
    def _synthetic_reads_no_files(self) -> TaskConfig:
        # The synthetic task generates its questions: a data path would be recorded but never read.
        if self.name == "synthetic":
            for split in ("train", "validation", "test"):
                if getattr(self, split).path:
                    raise ValueError(f"task.{split}.path: the synthetic task generates its questions and reads no "
                                     "data file; remove the path, or name your task (task.name, task.kind) to "
                                     "use your file")
        return self


class ModelConfig(_Section):
    """A model that generates text (the teacher) or is trained (the student)."""

    model: str = Field("", description="hub id or local path (for backend=openai: the served model name)")
    revision: str | None = Field(None, description="hub revision / commit; recorded with every trace")
    gguf_file: str | None = Field(None, description="load weights from this GGUF file inside `model` (needs `gguf`)")
    backend: Literal["hf", "openai", "vllm"] = Field("hf", description="how it generates text")
    template: Literal["auto", "chat", "plain"] = Field(
        "auto", description="prompt format: the model's own chat template, or a plain one for base models")
    system_prompt: str | None = Field(None, description=(
        "optional system message (chat templates); with the plain template, text written before the question "
        "(instructions, few-shot examples)"))
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights dtype for sampling; auto: bf16 on a GPU that has it, else float32")
    device: str = Field("auto", description="`auto`, `cpu`, `cuda`, `cuda:1`, ...")
    trust_remote_code: bool = Field(False, description="never on unless you ask for it")
    batch_size: int = Field(32, ge=1, description="prompts per generation batch (hf backend halves it on OOM)")
    # OpenAI-compatible HTTP backend
    base_url: str | list[str] | None = Field(
        None, description="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1; a list: replicas serving the "
        "same model (requests go to the least busy one, a failing one is skipped for `replica_cooldown_s`; the "
        "traces do not depend on which replica answered)")
    replica_cooldown_s: float = Field(30.0, ge=0, description="with several base_url: seconds a replica that "
                                      "failed (connection refused, 5xx, timeout) is skipped while others answer")
    api_key_env: str | None = Field(None, description="NAME of the environment variable holding the API key")
    endpoint: Literal["chat", "completions"] = Field(
        "chat", description="chat: the server applies the model's chat template; completions: the plain template")
    concurrency: int = Field(8, ge=1, description="requests in flight at once")
    max_retries: int = Field(6, ge=0, description="retries of a request on 429/5xx/timeouts/bad responses, "
                                                         "with exponential backoff and jitter")
    timeout_s: float = Field(120.0, gt=0, description="per-request timeout")
    requests_per_minute: float | None = Field(None, gt=0, description="client-side request rate limit")
    tokens_per_minute: float | None = Field(None, gt=0, description="client-side token rate limit")
    cost_per_1k_input: float = Field(0.0, ge=0, description="USD per 1000 prompt tokens, for cost accounting")
    cost_per_1k_output: float = Field(0.0, ge=0, description="USD per 1000 completion tokens")
    # vLLM offline engine
    vllm_args: dict[str, Any] = Field(default_factory=dict, description="extra `vllm.LLM(...)` arguments")

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secret(cls, data: Any) -> Any:
        # Keys live in the environment only (secrets.py): a URL with credentials, a key-shaped model name, or a
        # key pasted where a variable NAME belongs is refused, so it is never written to config.yaml or printed.
        # A section-level check: its error shows the section, never the offending value.
        if isinstance(data, dict):
            for k, check in (("base_url", check_url), ("api_key_env", check_env_var_name),
                             ("model", check_no_secret)):
                v = data.get(k)
                if isinstance(v, str):
                    check(v, k)
                elif k == "base_url" and isinstance(v, list):
                    if not v:
                        raise ValueError("base_url: an empty list; give one URL or a list of replica URLs")
                    for i, u in enumerate(v):
                        check_url(str(u), f"base_url[{i}]")
                elif v is not None and k == "api_key_env":
                    check_env_var_name(str(v), k)
        return data

    @property
    def base_urls(self) -> list[str | None]:
        """The endpoint replicas: `base_url` as a list (one None when no URL is set)."""
        return list(self.base_url) if isinstance(self.base_url, list) else [self.base_url]


class StudentConfig(ModelConfig):
    """The student: a model that is trained, and how its live copy is sampled between epochs."""

    vllm_memory_fraction: float = Field(
        0.5, gt=0, le=1, description="backend vllm: the live engine's share of the memory left free when it is "
        "built (after the trainer's weights are resident; GPU: gpu_memory_utilization = share x free / total; "
        "CPU: KV cache = share x available RAM, at most 4 GiB); leave room for the optimiser's state. An explicit "
        "gpu_memory_utilization or kv_cache_memory_bytes in vllm_args wins")


class TeacherConfig(ModelConfig):
    """One entry of a list of teachers: a model with its own K and sampling settings (unset: `sampling.*`)."""

    name: str | None = Field(None, description="teacher list entry: a label for tables (default: the model)")
    k: int | None = Field(None, ge=1, description="teacher list entry: traces per question (default: sampling.k)")
    temperature: float | None = Field(None, ge=0, description="teacher list entry: default sampling.temperature")
    top_p: float | None = Field(None, gt=0, le=1, description="teacher list entry: default sampling.top_p")
    max_new_tokens: int | None = Field(None, ge=1, description="teacher list entry: default "
                                       "sampling.max_new_tokens")

    @property
    def label(self) -> str:
        return self.name or self.model


class TeacherList(list):
    """Several teachers (config order). `model` and `backend` are display labels joined with " + " (a model card or
    a results header naming "the teacher"); code that samples or selects traces walks the entries
    (`teachers_of`)."""

    @property
    def model(self) -> str:
        return " + ".join(t.label for t in self)

    @property
    def backend(self) -> str:
        return " + ".join(t.backend for t in self)


def _teacher_list(v: list[TeacherConfig]) -> TeacherList:
    if not v:
        raise ValueError("an empty list; give one teacher section, or a list of them")
    # Two entries with the same identity and sampling settings would be the same traces counted twice.
    seen: dict[tuple, int] = {}
    for i, t in enumerate(v):
        ident = (t.model, t.gguf_file, t.revision, t.template, t.system_prompt, t.endpoint, t.temperature,
                 t.top_p, t.max_new_tokens)
        if ident in seen:
            raise ValueError(f"entry [{i}] repeats entry [{seen[ident]}] (same model, revision, prompt format and "
                             "sampling settings: the same traces); remove it, or raise that entry's k")
        seen[ident] = i
    return TeacherList(v)


# `teacher:` is one model section (as always) or a list of them; the tag only picks the validator, and error
# messages drop it (`teacher[1].k`, not `teacher.many.1.k`).
TeacherField = Annotated[
    Annotated[ModelConfig, Tag("one")] | Annotated[list[TeacherConfig], AfterValidator(_teacher_list), Tag("many")],
    Discriminator(lambda v: "many" if isinstance(v, (list, tuple)) else "one"),
]
_UNION_TAGS = ("one", "many")


class SamplingConfig(_Section):
    """How teacher and student traces are sampled (paper: K=8 at T=0.8)."""

    k: int = Field(8, ge=1, description="traces per question for the teacher (paper: 8)")
    student_k: int | None = Field(None, ge=1, description="traces per question for the student (default: k)")
    temperature: float = Field(0.8, ge=0, description="paper: 0.8")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling")
    max_new_tokens: int = Field(512, ge=1, description="longest trace sampled (truncated traces are recorded)")
    stop: list[str] = Field(default_factory=list, description="stop strings, besides the EOS token")
    seed: int = Field(0, description="sampling seed; each sample has its own stream from (seed, prompt, index)")
    rouge_threshold: float = Field(0.8, ge=0, le=1, description="drop teacher traces with ROUGE-L F1 above this "
                                                                "against a kept trace of the same question (paper)")
    allow_failed_prompts: bool = Field(False, description="go on when some prompts fail for good (e.g. HTTP 400 "
                                                          "on a too-long prompt): train without those questions; "
                                                          "off: stop with exit 3 (a re-run retries only them)")


class PairsConfig(_Section):
    """How chosen (teacher, correct) and rejected (student, wrong) traces become pairs (ours)."""

    strategy: Literal["cycle", "all", "random", "hardest"] = Field(
        "cycle", description="cycle: each positive with a distinct negative, cycling the shorter list")
    max_pairs_per_question: int | None = Field(
        None, ge=1, description="cap on ORPO pairs per question (random: sample size); SFT examples use every kept trace")
    max_length: int = Field(1024, ge=8, description="prompt + completion tokens; longer pairs are truncated")
    max_prompt_length: int = Field(512, ge=4, description="prompts longer than this are cut from the left")


class PolicyConfig(_Section):
    """Where each epoch's rejected traces come from: initial vs current student (paper: phi=0.5, mixed)."""

    phi: float = Field(0.5, ge=0, le=1, description="probability a question's negatives come from the current "
                                                    "student (0 off-policy, 1 on-policy)")
    schedule: Literal["constant", "linear", "adaptive"] = Field(
        "constant", description="linear: phi_start -> phi_end over epochs; adaptive: phi from how far the student "
        "moved away from its initial negatives (ours, docs/METHOD.md)")
    phi_start: float = Field(0.0, ge=0, le=1, description="schedule=linear: phi after the first epoch")
    phi_end: float = Field(1.0, ge=0, le=1, description="schedule=linear: phi after the last epoch")
    teacher_negatives_fallback: bool = Field(True, description="use the teacher's wrong traces when neither student "
                                                               "source has a wrong trace (ours)")
    gold_rationale_fallback: bool = Field(False, description="questions with no correct teacher trace use the "
                                                             "dataset's gold rationale as chosen (ours)")
    unparsed_negatives: bool = Field(False, description="also use traces whose final answer could not be parsed "
                                                        "as rejected (paper: only wrong answers; ours)")
    adaptive_probe: int = Field(64, ge=1, description="schedule=adaptive: (chosen, initial negative) pairs scored "
                                "before each epoch to set phi (ours)")


class ObjectiveConfig(_Section):
    """The ORPO objective L = NLL + lam * L_OR."""

    lam: float = Field(1.0, ge=0, description="weight of the odds-ratio term (paper: 1; ORPO/TRL default 0.1)")
    nll_scope: Literal["completion", "all"] = Field(
        "completion", description="NLL over completion tokens (paper) or prompt+completion (TRL)")
    nll_reduction: Literal["sequence", "token"] = Field(
        "sequence", description="mean of per-sequence means (paper's -log q) or pooled over tokens (TRL/HF)")
    chunk_size: int = Field(1024, ge=1, description="positions per LM-head chunk in the log-prob computation")
    rejected_scope: Literal["all", "after_prefix", "after_first_error"] = Field(
        "all", description="tokens the rejected trace's mean log-prob covers: all (paper), after its longest common "
        "prefix with a chosen trace, or from the task's first located wrong step (ours, docs/METHOD.md)")


class LoraConfig(_Section):
    enabled: bool = Field(False, description="paper: full fine-tuning")
    r: int = Field(16, ge=1, description="LoRA rank")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout")
    target_modules: list[str] | str = Field("all-linear", description="modules that get adapters (PEFT names)")
    merge_on_save: bool = Field(True, description="save the final student with the adapter merged in")


class TrainerConfig(_Section):
    epochs: int = Field(5, ge=1, description="paper: 5")
    lr: float = Field(5e-6, gt=0, description="peak learning rate (AdamW)")
    batch_size: int = Field(8, ge=1, description="pairs (or SFT sequences) per optimiser step: the GLOBAL batch, "
                            "split over the data-parallel processes and then into grad_accum micro-batches (each "
                            "rank's micro-batch is about batch_size / (processes x grad_accum)); results do not "
                            "depend on the number of processes")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimiser step on each process (memory: the "
                            "step's examples are the same)")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="share of all steps spent warming up")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after warm-up")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; null: off")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward to save memory")
    packing: bool = Field(False, description="padding-free batches: each micro-batch's real tokens packed into rows "
                          "without pads (positions restart per sequence), checked once against the padded path; "
                          "same losses, less compute when lengths vary")
    group_by_length: bool = Field(True, description="batch examples of similar length (less padding)")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    save_every_steps: int | None = Field(None, ge=1, description="checkpoint every N optimiser steps (and each epoch)")
    log_every_steps: int = Field(1, ge=1, description="optimiser steps between metrics log lines")
    report_to: list[Literal["jsonl", "tensorboard", "wandb"]] = Field(
        default_factory=lambda: ["jsonl", "tensorboard"], description="metric sinks; wandb only when installed")


class EvalConfig(_Section):
    split: Literal["test", "validation"] = Field("test", description="split the variants are evaluated on")
    max_new_tokens: int | None = Field(None, ge=1, description="default: sampling.max_new_tokens")
    batch_size: int = Field(32, ge=1, description="questions per generation batch")
    majority_k: int = Field(1, ge=1, description=">1: majority vote over k samples at sampling.temperature")
    every_epoch: bool = Field(True, description="evaluate after every epoch (else after the last)")


class RunConfig(_Section):
    out_dir: str = Field("runs/default", description="everything the run writes lives here")
    store: str | None = Field(None, description="trace store file (default `<out_dir>/traces.sqlite`); runs that "
                                                "share one never sample the same trace twice")
    seed: int = Field(0, description="first training seed; the seeds are seed, seed+1, ...")
    seeds: int = Field(1, ge=1, description="train and evaluate each variant with this many seeds")
    threads: int | None = Field(None, ge=1, description="torch CPU threads for `run`/`demo` (default: torch's "
                                                         "choice; 1 is faster on a busy small CPU)")
    workers: int | None = Field(None, ge=1, description="processes that train the variant x seed jobs side by "
                                "side, sharing the trace store; results equal a sequential run's with the same "
                                "run.threads. Default: one per CPU core for a CPU student, as many as the free "
                                "memory holds (~16 bytes a parameter + 1 GiB each), 1 for a GPU student. Each "
                                "worker uses run.threads torch threads (default: the cores shared out, 1 each "
                                "with one worker per core). Ignored under torchrun / accelerate launch (the "
                                "ranks already share each job) and with student.backend vllm")
    variants: list[Variant] = Field(default_factory=lambda: list(VARIANTS), min_length=1,
                                    description="rows of the results table to train and evaluate (at least one)")


class Config(_Section):
    """A whole ORPO-Distill run."""

    run: RunConfig = Field(default_factory=RunConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    teacher: TeacherField = Field(default_factory=ModelConfig, description="one model section, or a list of "
                                  "them (several teachers: each with its own K, backend and sampling settings; "
                                  "their chosen traces are pooled)")
    student: StudentConfig = Field(default_factory=StudentConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)


def teachers_of(cfg: Config) -> list[TeacherConfig]:
    """The configured teachers in config order: a single `teacher:` mapping is one entry whose K and sampling
    settings all come from `sampling` (the same traces and identity as before lists existed)."""
    if isinstance(cfg.teacher, list):
        return list(cfg.teacher)
    return [TeacherConfig.model_validate(cfg.teacher.model_dump())]


def is_multi_teacher(cfg: Config) -> bool:
    return isinstance(cfg.teacher, list)


def section_model(annotation: Any) -> type[BaseModel] | None:
    """The section class of a field's annotation (the teacher's: `TeacherConfig`, whose keys include the ones a
    single mapping has); None for a leaf."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if annotation == Config.model_fields["teacher"].annotation:
        return TeacherConfig
    return None


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value), the value parsed as YAML (so 1e-5, true, [1,2] work)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads `1e-5` as a string (no dot); users mean a number.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in "eE.") else value
        except ValueError:
            pass
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with each dotted override set (pure: `data` is not modified). A number indexes a
    list of sections: `teacher.1.k=4` sets the second teacher's k."""
    import copy

    out = copy.deepcopy(data)
    for item in overrides:
        parts, value = parse_override(item)
        node: Any = out
        for i, p in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not (p.isdigit() and int(p) < len(node)):
                    raise ConfigError(f"override {item!r}: {'.'.join(parts[:i])} is a list of {len(node)} "
                                      f"entries; index it with 0..{len(node) - 1}")
                if last:
                    node[int(p)] = value
                    break
                node = node[int(p)]
                if not isinstance(node, dict):
                    raise ConfigError(f"override {item!r}: {'.'.join(parts[:i + 1])} is a value, not a section")
                continue
            if last:
                node[p] = value
                break
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, (dict, list)):
                raise ConfigError(f"override {item!r}: {p!r} is a value, not a section")
            node = child
    return out


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """A pydantic error location without the teacher union's tags ("one"/"many")."""
    return tuple(p for i, p in enumerate(loc) if not (i > 0 and loc[i - 1] == "teacher" and p in _UNION_TAGS))


def _dotted(loc: tuple[Any, ...]) -> str:
    """`("teacher", 1, "k")` -> `teacher[1].k` (an entry of the teacher list; other list items stay `key.0`)."""
    out = ""
    for i, p in enumerate(loc):
        if isinstance(p, int) and i > 0 and loc[i - 1] == "teacher":
            out += f"[{p}]"
        else:
            out += f".{p}" if out else str(p)
    return out


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """The field names allowed at the section that holds `loc` (for 'unknown key' messages)."""
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        if isinstance(part, int):  # an entry of a list of teachers
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        sub = section_model(field.annotation)
        if sub is None:
            return []
        model = sub
    names = set(model.model_fields)
    if model is TeacherConfig and not (len(loc) > 2 and isinstance(loc[1], int)):
        names -= set(TeacherConfig.model_fields) - set(ModelConfig.model_fields)  # list-entry keys only
    return sorted(names)


def yaml_line(text: str, loc: tuple[Any, ...]) -> int | None:
    """The 1-based line of the key (or list entry) at `loc` in YAML `text`, or of its closest existing parent;
    None when the text does not parse or `loc` is not there at all (a default, an override)."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            hit = next(((k, v) for k, v in node.value if getattr(k, "value", None) == str(part)), None)
            if hit is None:
                break
            line, node = hit[0].start_mark.line + 1, hit[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _shown_input(value: Any) -> str:
    """The offending value as an error message shows it: scalars and short lists only. A whole section (what a
    section-level check receives) is never echoed: it may hold a secret the check is complaining about."""
    if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict) for v in value)):
        return ""
    text = repr(value)
    return f" (got {text if len(text) <= 80 else text[:77] + '...'})"


def format_validation_error(err: ValidationError, source: str, text: str | None = None) -> str:
    """One line per problem, naming the dotted key (`teacher[1].k` in a list of teachers) and, when the config's
    YAML `text` is given, the line of the file it is on."""
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        loc = _clean_loc(tuple(e["loc"]))
        key = _dotted(loc) or "(top level)"
        line = yaml_line(text, loc) if text is not None else None
        at = f"line {line}: " if line is not None else ""
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc)
            lines.append(f"  {at}{key}: unknown key; allowed here: {', '.join(allowed)}")
        else:
            msg = str(e["msg"]).removeprefix("Value error, ")
            where = "" if msg.startswith(f"{key}.") else f"{key}: "  # a section's check names its own key
            lines.append(f"  {at}{where}{msg}{_shown_input(e.get('input'))}")
    return "\n".join(lines)


def config_from_dict(data: dict[str, Any], source: str = "<dict>", text: str | None = None) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, text)) from None


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from defaults when `path` is None), apply overrides, validate."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    text: str | None = None
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            text = p.read_text(encoding="utf-8")
            loaded = yaml.safe_load(text)
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text ({e})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if loaded is None:  # an empty file is a mistake (a wrong path, a truncated copy), not "all defaults"
            raise ConfigError(f"{p}: the config file is empty; start from `orpo-distill config show` (every key "
                              "with its default) or a file in examples/")
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        data = loaded
    if overrides:
        data = apply_overrides(data, overrides)
        source += " + overrides " + " ".join(redact_override(o) for o in overrides)
    return config_from_dict(data, source, text)


def dump_config(cfg: Config) -> str:
    """The config as YAML, every default written out (what a run records in its output dir)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def config_reference() -> str:
    """A Markdown reference of every key, generated from the schema so that it cannot drift."""
    lines = ["| key | type | default | description |", "| --- | --- | --- | --- |"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            key = f"{prefix}{name}"
            sub = section_model(ann)
            if sub is not None:
                if field.description:
                    lines.append(f"| `{key}` | section or list | | {field.description} |")
                walk(sub, key + ".")
                continue
            default = field.get_default(call_default_factory=True)
            tname = str(ann).replace("typing.", "").replace("<class '", "").replace("'>", "")
            desc = (field.description or "").replace("|", "\\|")
            tname = tname.replace("|", "\\|")
            lines.append(f"| `{key}` | {tname} | `{default!r}` | {desc} |")

    walk(Config, "")
    return "\n".join(lines) + "\n"
