"""The task kinds: how a dataset row becomes a `Question`, how it is asked, and how a completion is graded.

One class per kind: `MultipleChoiceTask`, `NumericTask`, `YesNoTask`, `ExactTask`, `CustomTask` (a user's
`module:function` grader). Each implements the `Task` protocol of `base.py` plus `question_from_row`, which the
loader calls with the row, the field map and the row's "file:line" (a bad row raises `RowError` naming the
field). All kinds share the paper's "reason, then answer" instruction and one fixed answer line
("The answer is (C)." / "The answer is 18." / "The answer is yes." / "The answer is Paris."), and all extract the
final answer with `answers.find_answer` (the last answer statement wins; two answers in it are wrong). The kinds
are usable on their own with any list of Questions: `NumericTask().grade(Question(..., gold="18"), text)`.
A Question's `rationale`, when the dataset has one, is a complete gold completion ending in the answer line.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from . import answers as A
from .base import Grade, Question

# Our field names and, per name, the dataset fields tried in order when the config does not map it.
FIELD_NAMES = ("question", "options", "answer", "id", "rationale")
GENERIC_FIELDS: dict[str, tuple[str, ...]] = {
    "question": ("question", "question_stem", "problem", "prompt", "input"),
    "options": ("options", "choices"),
    "answer": ("answer", "answerKey", "answer_idx", "label", "target", "output"),
    "id": ("id", "qid", "question_id", "uid"),
    "rationale": ("rationale", "explanation", "solution"),
}
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

REASON_THEN_ANSWER = "Think step by step, then give the final answer on the last line as {form}"


class RowError(ValueError):
    """A row that cannot become a Question. `field` is the dataset's field name at fault (None: the row)."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message

    def where(self, source: str) -> str:
        """'file:line: field 'x': message' (what the loader raises or reports)."""
        return f"{source}: field {self.field!r}: {self.message}" if self.field else f"{source}: {self.message}"


@dataclass(frozen=True)
class HubSource:
    """Where a built-in task lives on the Hugging Face hub (used when a split's `path` is not set)."""

    name: str
    config: str | None = None


# ------------------------------------------------------------------------------------------ field access

def resolve_fields(defaults: Mapping[str, Sequence[str]], user: Mapping[str, str] | None) -> dict[str, tuple[str, ...]]:
    """Our field name -> dataset field names to try; the user's mapping replaces the defaults it names."""
    out = {k: tuple(defaults.get(k, GENERIC_FIELDS[k])) for k in FIELD_NAMES}
    for k, v in (user or {}).items():
        if k not in FIELD_NAMES:
            raise ValueError(f"fields: unknown name {k!r}; allowed: {', '.join(FIELD_NAMES)} "
                             f"(map ours to yours, e.g. question=prompt)")
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"fields.{k}: must be a dataset field name, got {v!r}")
        out[k] = (v.strip(),)
    return out


def _lookup(row: Mapping[str, Any], name: str) -> tuple[bool, Any]:
    if name in row:
        return True, row[name]
    node: Any = row
    for part in name.split("."):  # "choices.text"-style paths into nested rows
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        else:
            return False, None
    return "." in name, node


def get_field(row: Mapping[str, Any], names: Sequence[str], ours: str, required: bool = True) -> tuple[str, Any]:
    """(dataset field name, value) of the first of `names` present and not None/empty."""
    for name in names:
        ok, value = _lookup(row, name)
        if ok and value is not None and not (isinstance(value, str) and value.strip() == ""):
            return name, value
        if ok and required and len(names) == 1:
            raise RowError(name, "is empty")
    if required:
        have = ", ".join(map(str, list(row)[:12])) or "nothing"
        tried = " / ".join(names)
        raise RowError(names[0], f"missing (tried {tried}; the row has: {have}); map yours with "
                                 f"--fields {ours}=NAME or task.fields.{ours}")
    return names[0], None


def get_text(row: Mapping[str, Any], names: Sequence[str], ours: str) -> tuple[str, str]:
    name, value = get_field(row, names, ours)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise RowError(name, f"must be text, got {type(value).__name__}")
    value = value.strip()
    if not value:
        raise RowError(name, "is empty")
    return name, value


def _row_id(row: Mapping[str, Any], names: Sequence[str]) -> str | None:
    _, value = get_field(row, names, "id", required=False)
    if value is None or isinstance(value, (dict, list)):
        return None
    return str(value).strip() or None


def content_id(kind: str, text: str, gold: str) -> str:
    """A stable id for rows without one: a hash of what the model sees and the gold answer."""
    return "h" + hashlib.sha256(f"{kind}\x1f{text}\x1f{gold}".encode()).hexdigest()[:16]


def _rationale(row: Mapping[str, Any], names: Sequence[str]) -> str | None:
    _, value = get_field(row, names, "rationale", required=False)
    if isinstance(value, list):
        value = " ".join(str(v).strip() for v in value if str(v).strip())
    if value is None or not str(value).strip():
        return None
    return str(value).strip()


def with_answer_line(reasoning: str, line: str) -> str:
    """A gold rationale as a complete "reason, then answer" completion."""
    return f"{reasoning.rstrip()}\n{line}" if reasoning.strip() else line


# ------------------------------------------------------------------------------------------------- kinds

@dataclass
class _BaseTask:
    name: str = ""  # empty: the kind's name
    default_fields: dict[str, tuple[str, ...]] = field(default_factory=dict)
    hub: HubSource | None = None
    kind: str = ""
    answer_form: str = '"The answer is X.", where X is the answer.'

    def __post_init__(self) -> None:
        if not self.name:
            self.name = self.kind

    def instruction(self) -> str:
        return REASON_THEN_ANSWER.format(form=self.answer_form)

    def user_message(self, q: Question) -> str:
        """The question (options included) followed by the reason-then-answer instruction."""
        return f"{q.text}\n\n{self.instruction()}"

    def answer_line(self, answer: str) -> str:
        return f"The answer is {answer}."

    def fields(self, user: Mapping[str, str] | None = None) -> dict[str, tuple[str, ...]]:
        return resolve_fields(self.default_fields, user)

    def _finish(self, row: Mapping[str, Any], f: Mapping[str, Sequence[str]], source: str, text: str, gold: str,
                options: dict[str, str] | None = None, rationale: str | None = None,
                meta: dict[str, Any] | None = None) -> Question:
        qid = _row_id(row, f["id"]) or content_id(self.kind, text, gold)
        if rationale is None:
            reasoning = _rationale(row, f["rationale"])
            rationale = with_answer_line(reasoning, self.answer_line(gold)) if reasoning else None
        return Question(id=qid, text=text, gold=gold, options=options, rationale=rationale, source=source,
                        meta=dict(meta or {}))


@dataclass
class MultipleChoiceTask(_BaseTask):
    """Lettered options; gold and answers are letters. Options are relabelled A, B, C... in dataset order."""

    kind: str = "multiple_choice"
    answer_form: str = '"The answer is (X).", where X is the letter of the correct option.'

    def answer_line(self, answer: str) -> str:
        return f"The answer is ({answer})."

    @staticmethod
    def format_text(question: str, options: Mapping[str, str]) -> str:
        return question + "\n" + "\n".join(f"({k}) {v}" for k, v in options.items())

    def grade(self, q: Question, completion: str) -> Grade:
        opts = q.options or {}
        ans, ambiguous = A.find_answer(completion, lambda c: A.choice_candidates(c, opts),
                                       lambda line: A.bare_choice(line, opts), lambda t: A.whole_option(t, opts))
        if ans is None:
            return Grade("unparsed", None)
        gold = q.gold.strip().upper()
        named = ans.split(" or ") if ambiguous else [ans]
        # Two letters for one repeated option text are one answer, not two.
        if ambiguous and not all(A.same_option(x, named[0], opts) for x in named):
            return Grade("wrong", ans)
        hit = next((x for x in named if A.same_option(x, gold, opts)), None)
        return Grade("correct", gold) if hit is not None else Grade("wrong", named[0])

    def question_from_row(self, row: Mapping[str, Any], fields: Mapping[str, Sequence[str]] | None,
                          source: str) -> Question:
        f = fields or self.fields()
        _, question = get_text(row, f["question"], "question")
        labels, texts, opt_field = read_options(row, f["options"])
        options = {LETTERS[i]: t for i, t in enumerate(texts)}
        ans_field, raw = get_field(row, f["answer"], "answer")
        gold = resolve_answer_key(raw, labels, texts, ans_field)
        meta: dict[str, Any] = {}
        if labels != list(options):
            meta["original_labels"] = labels
        return self._finish(row, f, source, self.format_text(question, options), gold, options=options, meta=meta)


def read_options(row: Mapping[str, Any], names: Sequence[str]) -> tuple[list[str], list[str], str]:
    """(labels as the dataset writes them, option texts, field name) from any of the usual option layouts.

    Accepted: {"A": text, ...}; {"label": [...], "text": [...]} (ARC/OpenBookQA/CommonsenseQA); a list of texts;
    a list of {"label", "text"}; any of these as a JSON string (CSV); or several columns named "A,B,C,D".
    """
    if len(names) == 1 and "," in names[0]:
        cols = [c.strip() for c in names[0].split(",") if c.strip()]
        texts = []
        for c in cols:
            _, t = get_text(row, (c,), "options")
            texts.append(t)
        labels = cols if all(len(c) == 1 for c in cols) else [LETTERS[i] for i in range(len(cols))]
        return _check_options(labels, texts, names[0])
    name, value = get_field(row, names, "options")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RowError(name, "must be a list or mapping of options (or one as JSON text)") from None
    labels: list[str]
    texts: list[Any]
    if isinstance(value, Mapping) and "text" in value and isinstance(value.get("text"), list):
        texts = list(value["text"])
        labels = list(value.get("label") or [LETTERS[i] for i in range(len(texts))])
        if len(labels) != len(texts):
            raise RowError(name, f"has {len(labels)} labels for {len(texts)} texts")
    elif isinstance(value, Mapping):
        labels, texts = list(value.keys()), list(value.values())
    elif isinstance(value, list) and all(isinstance(v, Mapping) for v in value) and value:
        try:
            labels = [v["label"] for v in value]
            texts = [v["text"] for v in value]
        except KeyError:
            raise RowError(name, 'a list of options must hold {"label", "text"} objects or plain texts') from None
    elif isinstance(value, list):
        texts = list(value)
        labels = [LETTERS[i] for i in range(len(texts))] if len(texts) <= len(LETTERS) else []
    else:
        raise RowError(name, f"must be a list or mapping of options, got {type(value).__name__}")
    return _check_options([str(x).strip() for x in labels], texts, name)


def _check_options(labels: list[str], texts: list[Any], name: str) -> tuple[list[str], list[str], str]:
    if len(texts) < 2:
        raise RowError(name, f"needs at least 2 options, got {len(texts)}")
    if len(texts) > len(LETTERS):
        raise RowError(name, f"at most {len(LETTERS)} options are supported, got {len(texts)}")
    out = []
    for lab, t in zip(labels, texts):
        if isinstance(t, (int, float)) and not isinstance(t, bool):
            t = str(t)
        if not isinstance(t, str) or not t.strip():
            raise RowError(name, f"option {lab!r} is empty or not text ({t!r})")
        out.append(" ".join(t.split()))
    if len(set(labels)) != len(labels):
        raise RowError(name, f"repeated option labels {labels}")
    return labels, out, name


def resolve_answer_key(raw: Any, labels: Sequence[str], texts: Sequence[str], field_name: str) -> str:
    """The gold letter (after relabelling to A, B, ...) from a label, a 0-based index, or the option's text."""
    if isinstance(raw, bool):
        raise RowError(field_name, f"must name an option, got {raw!r}")
    if isinstance(raw, str):
        key = raw.strip()
        key = re.sub(r"^\((\w)\)$", r"\1", key)
        for cand in (key, key.upper()):
            if cand in labels:
                return LETTERS[list(labels).index(cand)]
        norm = A.normalize_text(key)
        hits = [i for i, t in enumerate(texts) if A.normalize_text(t) == norm]
        if len(hits) == 1:
            return LETTERS[hits[0]]
        if key.isdigit():
            raw = int(key)
        else:
            raise RowError(field_name, f"{raw!r} is not among the options {', '.join(labels)}")
    if isinstance(raw, int):
        if str(raw) in labels:
            return LETTERS[list(labels).index(str(raw))]
        if 0 <= raw < len(texts):
            return LETTERS[raw]
        raise RowError(field_name, f"{raw!r} is not among the options {', '.join(labels)} (nor a 0-based index)")
    raise RowError(field_name, f"must be an option label, index or text, got {type(raw).__name__}")


@dataclass
class NumericTask(_BaseTask):
    """A number as the answer (GSM8K and the like); exact comparison of values (18 = 18.00 = $18; 0.75 = 3/4)."""

    kind: str = "numeric"
    answer_form: str = '"The answer is N.", where N is a number.'

    def grade(self, q: Question, completion: str) -> Grade:
        ans, ambiguous = A.find_answer(completion, A.number_candidates, A.bare_number)
        if ans is None:
            return Grade("unparsed", None)
        if ambiguous:
            return Grade("wrong", ans)
        gold = A.to_number(q.gold)
        try:
            value = Fraction(ans)
        except (ValueError, ZeroDivisionError):
            return Grade("wrong", ans)
        return Grade("correct" if gold is not None and value == gold else "wrong", ans)

    def first_error_offset(self, q: Question, completion: str) -> int | None:
        """The character offset of the first wrong written result of an equation (`a op b = c`, GSM8K's
        `<<a*b=c>>` notes, chains `a + b + c = d`; `answers.first_arithmetic_error`), or None when every
        equation checks out (the error is elsewhere: a wrong step in words, a wrong plan)."""
        return A.first_arithmetic_error(A.strip_runon(completion))

    def question_from_row(self, row: Mapping[str, Any], fields: Mapping[str, Sequence[str]] | None,
                          source: str) -> Question:
        f = fields or self.fields()
        _, question = get_text(row, f["question"], "question")
        ans_field, raw = get_field(row, f["answer"], "answer")
        rationale = None
        if isinstance(raw, str) and "####" in raw:
            # GSM8K: a worked solution ending in "#### 18"; the solution (calculator notes removed) is the
            # gold rationale.
            solution, raw = raw.rsplit("####", 1)
            solution = re.sub(r"<<[^<>]*>>", "", solution).strip()
        else:
            solution = ""
        value = A.to_number(raw)
        if value is None:
            raise RowError(ans_field, f"{raw!r} is not a number")
        gold = A.format_number(value)
        if solution:
            rationale = with_answer_line(solution, self.answer_line(gold))
        return self._finish(row, f, source, question, gold, rationale=rationale)


@dataclass
class YesNoTask(_BaseTask):
    """Yes/no questions (StrategyQA); gold from a bool, 0/1 or text; "True"/"False" answers count."""

    kind: str = "yes_no"
    answer_form: str = 'either "The answer is yes." or "The answer is no."'

    def grade(self, q: Question, completion: str) -> Grade:
        ans, ambiguous = A.find_answer(completion, A.yes_no_candidates, A.bare_yes_no)
        if ans is None:
            return Grade("unparsed", None)
        if ambiguous:
            return Grade("wrong", ans)
        return Grade("correct" if ans == A.to_yes_no(q.gold) else "wrong", ans)

    def question_from_row(self, row: Mapping[str, Any], fields: Mapping[str, Sequence[str]] | None,
                          source: str) -> Question:
        f = fields or self.fields()
        _, question = get_text(row, f["question"], "question")
        ans_field, raw = get_field(row, f["answer"], "answer")
        gold = A.to_yes_no(raw)
        if gold is None:
            raise RowError(ans_field, f"{raw!r} is not yes/no (expected true/false, yes/no or 1/0)")
        return self._finish(row, f, source, question, gold)


@dataclass
class ExactTask(_BaseTask):
    """Free text compared after normalisation (case, punctuation, articles, spaces); a list gold = aliases."""

    kind: str = "exact"

    def extract(self, completion: str) -> A.Statement | None:
        """The final answer statement (the last one with text), else a one-line completion as one."""
        for st in A.answer_statements(completion):
            if A.normalize_text(st.span):
                return st
        lines = [ln for ln in A.strip_runon(completion).splitlines() if ln.strip()]
        if len(lines) == 1:
            line = A.last_line(completion)
            return A.Statement(line, line)
        return None

    def grade(self, q: Question, completion: str) -> Grade:
        st = self.extract(completion)
        if st is None:
            return Grade("unparsed", None)
        golds = {A.normalize_text(g) for g in [q.gold, *q.meta.get("aliases", [])]}
        # The whole line, its first sentence, or the sentence's first clause ("Paris, the capital of France").
        forms = [A.normalize_text(x) for x in (st.line, st.span, (A.clauses(st.span) or [st.span])[0])]
        hit = next((f for f in forms if f in golds), None)
        return Grade("correct" if hit is not None else "wrong", hit if hit is not None else forms[1])

    def question_from_row(self, row: Mapping[str, Any], fields: Mapping[str, Sequence[str]] | None,
                          source: str) -> Question:
        f = fields or self.fields()
        _, question = get_text(row, f["question"], "question")
        ans_field, raw = get_field(row, f["answer"], "answer")
        aliases = raw if isinstance(raw, list) else [raw]
        golds = [" ".join(str(a).split()) for a in aliases if not isinstance(a, (dict, list)) and str(a).strip()]
        if not golds:
            raise RowError(ans_field, f"must be text (or a list of accepted texts), got {raw!r}")
        meta = {"aliases": golds[1:]} if len(golds) > 1 else {}
        return self._finish(row, f, source, question, golds[0], meta=meta)


GraderFn = Callable[[Question, str], Any]


def load_grader(spec: str) -> GraderFn:
    """`package.module:function` or `path/to/file.py:function` -> the function."""
    if not spec or ":" not in spec:
        raise ValueError(f"grader {spec!r} must look like module:function (or path/to/file.py:function)")
    mod_name, fn_name = spec.rsplit(":", 1)
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise ValueError(f"grader {spec!r}: file {path} not found")
            key = "orpo_distill_grader_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
            module = sys.modules.get(key)
            if module is None:
                s = importlib.util.spec_from_file_location(key, path)
                if s is None or s.loader is None:
                    raise ValueError(f"grader {spec!r}: cannot import {path}")
                module = importlib.util.module_from_spec(s)
                s.loader.exec_module(module)
                sys.modules[key] = module
        else:
            module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"grader {spec!r}: cannot import {mod_name!r} ({e})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"grader {spec!r}: {mod_name} has no function {fn_name!r}")
    return fn


def to_grade(result: Any, spec: str) -> Grade:
    """A custom grader's return value as a Grade: a Grade, a bool, None (unparsed), or (verdict, answer)."""
    if isinstance(result, Grade):
        return result
    if result is None:
        return Grade("unparsed", None)
    if isinstance(result, bool):
        return Grade("correct" if result else "wrong", None)
    if isinstance(result, tuple) and len(result) == 2 and result[0] in ("correct", "wrong", "unparsed"):
        return Grade(result[0], None if result[1] is None else str(result[1]))
    raise TypeError(f"grader {spec}: returned {result!r}; return a Grade, True/False, None (unparsed) or "
                    "(verdict, answer)")


@dataclass
class CustomTask(ExactTask):
    """Rows read like `exact`; grading by the user's `grader(question, completion)` function."""

    kind: str = "custom"
    grader: str = ""
    _fn: GraderFn | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._fn = load_grader(self.grader)

    def grade(self, q: Question, completion: str) -> Grade:
        assert self._fn is not None
        return to_grade(self._fn(q, completion), self.grader)


KINDS: dict[str, type[_BaseTask]] = {
    "multiple_choice": MultipleChoiceTask,
    "numeric": NumericTask,
    "yes_no": YesNoTask,
    "exact": ExactTask,
    "custom": CustomTask,
}
