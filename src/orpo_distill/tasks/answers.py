"""Finding the final answer in what a model wrote, per answer kind (letter, number, yes/no, free text).

Every kind shares one rule for *where* the answer is: the last answer statement wins ("The answer is ...",
"Final answer: ...", "Answer: ...", "#### ...", `\\boxed{...}`, "(C) is the correct answer"); its span runs from
the marker to the end of that sentence or line (or, before a trailing marker, from the sentence start), and
the first clause (last, before a trailing marker) of the span that names an answer decides (so "(B), not (C)" is B). Two
different answers in that clause ("(B) or (C)", "17 or 18") make the completion wrong, not a guess. When no
marker names an answer, a last line that is nothing but an answer ("(C)", "$18.", "Yes") counts; otherwise the
completion is unparsed. Text after the plain template's next "\\nQuestion:" (a base model starting a new
question) or a leaked end-of-turn token is ignored. *What* counts as an answer is per kind: `choice_candidates`
(letters, "option C", the option's text), `number_candidates` (commas, currency, units, decimals, fractions,
negatives, LaTeX), `yes_no_candidates`, and `normalize_text` for exact match. The numeric parser is exact
(fractions), cheap, and falls back to math-verify only for LaTeX it cannot read itself.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from fractions import Fraction

# ---------------------------------------------------------------------------------------------------- spans

# Where a completion stops being an answer to *this* question: the plain template's next question, or an
# end-of-turn token some APIs leave in the text.
_RUNON = re.compile(r"\n\s*Question\s*:|<\|im_end\|>|<\|eot_id\|>|<\|endoftext\|>|</s>|<end_of_turn>")

# "The answer is not 17" / "isn't (B)" deny an answer rather than give one ("not hungry" can be an option).
_NOT = r"(?!n['’]t)(?!\s+not\s+(?:\(?[A-Za-z]\)?(?:[\s.,;)]|$)|[-+$€£]?\d|yes\b|no\b|true\b|false\b))"
# A marker is found from its keyword (str.find on the lower-cased text, far cheaper than a regex scan), then
# checked with an anchored pattern; only its end matters, the answer follows it.
_ANSWER_TAIL = re.compile(r"answer\b(?:\s+to\s+(?:this|the)\s+(?:question|problem))?[*\s]*(?:is\b" + _NOT
                          + r"|would\s+be\b|will\s+be\b|should\s+be\b|must\s+be\b|=|:)")
_CHOICE_TAIL = re.compile(r"(?:option|choice)\s*(?:is\b" + _NOT + r"|:)")
_FINAL_BEFORE = re.compile(r"\bfinal\s$")  # "Final Answer\n(C)"
_GRADED_BEFORE = re.compile(r"\b(?:correct|right|best)\s$")  # "the correct option is C"
# The answer before its marker: "(C) is the correct answer", "18 is the final answer".
_REVERSE = re.compile(r"(?:correct|right|best|final)\s+(?:answer|option|choice)\b")  # on lower-cased text
_REVERSE_BEFORE = re.compile(r"\s+(?:is|would\s+be|must\s+be)\s+(?:the\s+)?$")
_SENTENCE_START = re.compile(r".*(?:[.!?]\s|\n)", re.DOTALL)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# A sentence ends at . ! ? followed by whitespace or the end (so "3.5" and "1,450.00" stay whole).
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
# Clause boundaries inside an answer sentence: "(C), because ...", "18; that is ...", "yes, it is not true".
_CLAUSE = re.compile(r",\s+|;\s*|\s+(?:because|since|as|which|but|while|whereas|given)\s+", re.IGNORECASE)
_SPAN_MAX = 300


def strip_runon(completion: str) -> str:
    if "Question" not in completion and "<" not in completion:
        return completion
    m = _RUNON.search(completion)
    return completion[: m.start()] if m else completion


def _lower(text: str) -> str:
    """Lower case with every character kept at its index (a few characters lower-case to two)."""
    low = text.lower()
    return low if len(low) == len(text) else "".join(c if len(c.lower()) != 1 else c.lower() for c in text)


def _markers(low: str) -> list[tuple[int, int]]:
    """(start, end) of every forward answer marker in lower-cased text: "the answer is", "Answer:", "####", ..."""
    out: list[tuple[int, int]] = []
    for kw in ("answer", "option", "choice", "####"):
        p = low.find(kw)
        while p >= 0:
            if kw == "####":
                out.append((p, p + 4))
            elif p == 0 or not (low[p - 1].isalnum() or low[p - 1] == "_"):
                before = low[max(0, p - 10): p]
                if kw == "answer":
                    m = _ANSWER_TAIL.match(low, p)
                    if m:
                        out.append((p, m.end()))
                    elif _FINAL_BEFORE.search(before) and not low[p + 6: p + 7].isalnum():
                        out.append((p, p + 6))
                else:
                    m = _CHOICE_TAIL.match(low, p)
                    if m and _GRADED_BEFORE.search(before):
                        out.append((p, m.end()))
            p = low.find(kw, p + 1)
    return out


def _balanced(text: str, open_at: int) -> tuple[str, int]:
    """The text inside the brace that opens at `open_at - 1`, and the index after its closing brace."""
    depth, i = 1, open_at
    while i < len(text):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[open_at:i], i + 1
        i += 1
    return text[open_at:], len(text)


def unbox(text: str) -> str:
    """`\\boxed{X}` -> X (nested braces kept), everywhere in `text`."""
    out, pos = [], 0
    for m in _BOXED.finditer(text):
        if m.start() < pos:
            continue
        inner, end = _balanced(text, m.end())
        out.append(text[pos: m.start()])
        out.append(inner)
        pos = end
    out.append(text[pos:])
    return "".join(out)


def _clean_span(s: str) -> str:
    s = s.replace("**", "").replace("__", "").replace("`", "")
    s = s.lstrip(" \t\n*:#,>\"'“")
    s = re.sub(r"^[-–—]\s+", "", s)  # a bullet, not a minus sign
    return s


def _rest_of_line(text: str, start: int) -> str:
    """From `start`: skip blank space (the answer may be on the next line), then up to the end of that line."""
    rest = _clean_span(text[start: start + 4 * _SPAN_MAX])
    nl = rest.find("\n")
    return (rest if nl < 0 else rest[:nl])[: 2 * _SPAN_MAX].strip()


def _sentence(line: str) -> str:
    """The first sentence of `line`, closing quotes and markdown stripped."""
    m = _SENTENCE_END.search(line)
    if m:
        line = line[: m.start()]
    return line[:_SPAN_MAX].strip().rstrip("\"'”*").strip()


@dataclass(frozen=True)
class Statement:
    """One answer statement: `span` is its first sentence, `line` the whole rest of its line."""

    span: str
    line: str
    reverse: bool = False  # the answer came before the marker: its last clause decides


def answer_statements(completion: str) -> list[Statement]:
    """Every answer statement in `completion`, last first."""
    text = strip_runon(completion)
    found: list[tuple[int, Statement]] = []
    for m in _BOXED.finditer(text):
        inner, _ = _balanced(text, m.end())
        found.append((m.start(), Statement(inner.strip(), inner.strip())))
    low = _lower(text)
    for start, end in _markers(low):
        line = unbox(_rest_of_line(text, end))
        found.append((start, Statement(_sentence(line), line.rstrip(".!").strip())))
    for m in _REVERSE.finditer(low):
        lead = _REVERSE_BEFORE.search(low, max(0, m.start() - 24), m.start())
        if lead is None:
            continue
        # The answer is what precedes "is the correct answer" in its sentence (at most _SPAN_MAX characters).
        before = text[max(0, lead.start() - _SPAN_MAX): lead.start()]
        start = _SENTENCE_START.match(before)
        pre = unbox(_clean_span(before[start.end():] if start else before)).strip()
        if pre:
            found.append((lead.start(), Statement(pre, pre, reverse=True)))
    found.sort(key=lambda t: t[0])
    return [st for _, st in reversed(found)]


def last_line(completion: str) -> str:
    """The last non-empty line, markdown and trailing punctuation stripped (the no-marker fallback)."""
    lines = [ln for ln in strip_runon(completion).splitlines() if ln.strip()]
    if not lines:
        return ""
    s = unbox(lines[-1]).replace("**", "").replace("`", "").strip()
    return s.strip("$").rstrip(".!").strip()


def clauses(span: str) -> list[str]:
    return [c for c in _CLAUSE.split(span) if c.strip()]


def find_answer(completion: str, candidates: Callable[[str], list[str]], bare: Callable[[str], str | None],
                whole: Callable[[str], str | None] | None = None) -> tuple[str | None, bool]:
    """(answer, ambiguous): the first answer statement, last first, that names an answer.

    `whole(text)` may recognise a whole statement line or sentence at once (an option's full text, commas and
    all); otherwise `candidates(clause)` lists the distinct answers a clause names and the first clause naming
    any decides: two or more -> (those answers joined with " or ", True). When no statement names an answer,
    `bare(last line)` may still find one; else (None, False).
    """
    for st in answer_statements(completion):
        if whole is not None:
            hit = whole(st.line) or whole(st.span)
            if hit:
                return hit, False
        parts = clauses(st.span)
        for clause in reversed(parts) if st.reverse else parts:
            found = candidates(clause)
            if found:
                if len(found) > 1:
                    return " or ".join(found), True
                return found[0], False
    line = last_line(completion)
    return (bare(line) if line else None), False


def _dedupe(items: Iterator[str]) -> list[str]:
    out: list[str] = []
    for x in items:
        if x not in out:
            out.append(x)
    return out


# ---------------------------------------------------------------------------------------------- letters

_LETTER_STRONG = [
    re.compile(r"(?<![A-Za-z0-9])\(\s*([A-Za-z])\s*\)"),  # (C) (c)
    re.compile(r"(?<![A-Za-z0-9])\[\s*([A-Za-z])\s*\]"),  # [C]
    re.compile(r"(?<![^\s*\"'“])([A-Za-z])\)"),  # C)  c)  (not "SS-B)", "D&E)")
    re.compile(r"\b(?:option|choice|letter|answer)\s*[:#]?\s*\(?([A-Za-z])\b(?!['’])", re.IGNORECASE),
]
_LETTER_LEAD = re.compile(r"^\s*([A-Z])(?:\s*[.:)\-–]|\s*$)")  # "C. text", "C: text", "C"
_LETTER_WEAK = re.compile(r"(?<![A-Za-z0-9'’])([A-Z])(?![A-Za-z0-9'’])")


def normalize_text(s: str) -> str:
    """Lower case, punctuation to spaces, articles dropped, whitespace collapsed (SQuAD-style)."""
    s = s.lower().translate(_PUNCT_TO_SPACE)
    return " ".join(w for w in s.split() if w not in ("a", "an", "the"))


_PUNCT_TO_SPACE = str.maketrans({c: " " for c in string.punctuation + "“”‘’–—"})
# Symbols that tell options apart ("charge of +3" / "charge of -3", "LOD score > 3" / "< 3") become words.
_SYMBOLS = [(re.compile(r"(?<![\w])[-−](?=\d)"), " minus "), (re.compile(r"\+"), " plus "),
            (re.compile(r"<"), " lt "), (re.compile(r">"), " gt "), (re.compile(r"="), " eq "),
            (re.compile(r"%"), " percent ")]


def normalize_option(s: str, keep_case: bool = False) -> str:
    """`normalize_text` that keeps the signs and comparisons (and, if asked, the case) that tell options apart."""
    for rx, word in _SYMBOLS:
        s = rx.sub(word, s)
    if keep_case:
        return " ".join(w for w in s.translate(_PUNCT_TO_SPACE).split() if w.lower() not in ("a", "an", "the"))
    return normalize_text(s)


def choice_candidates(clause: str, options: Mapping[str, str]) -> list[str]:
    """The option letters `clause` names: explicit letters first, then an option's text, then a lone capital."""
    labels = set(options)
    strong: list[tuple[int, str]] = []
    for rx in _LETTER_STRONG:
        for m in rx.finditer(clause):
            ch = m.group(1)
            # A capital is a letter answer even outside the options (a wrong answer, not an unparsed one);
            # a lower-case one only when it is an option ("(s)" in "tree(s)" is not an answer).
            if ch.isupper() or ch.upper() in labels:
                strong.append((m.start(), ch.upper()))
    if strong:
        return _dedupe(c for _, c in sorted(strong))
    m = _LETTER_LEAD.match(clause) or re.fullmatch(r"\s*([a-z])\s*[.:)]?\s*", clause)
    if m and m.group(1).upper() in labels and not _is_article(clause, m.start(1)):
        return [m.group(1).upper()]
    by_text = option_text_candidates(clause, options)
    if by_text:
        return by_text
    weak = [m.group(1) for m in _LETTER_WEAK.finditer(clause)
            if m.group(1) in labels and not _is_article(clause, m.start(1))]
    return _dedupe(iter(weak))


def _is_article(s: str, i: int) -> bool:
    """'A' followed by a lower-case word is the article ("A marsh"), not option A."""
    return s[i] == "A" and re.match(r"A\s+[a-z]", s[i:]) is not None


def option_text_candidates(clause: str, options: Mapping[str, str]) -> list[str]:
    """Options whose whole normalised text occurs in `clause`; a match inside a longer match does not count."""
    c = f" {normalize_option(clause)} "
    if not c.strip():
        return []
    hits = []
    for label, text in options.items():
        t = normalize_option(text)
        if t and f" {t} " in c:
            hits.append((label, t))
    keep = [lab for lab, t in hits if not any(t != u and f" {t} " in f" {u} " for _, u in hits)]
    return _dedupe(iter(keep))


def whole_option(text: str, options: Mapping[str, str]) -> str | None:
    """The option whose whole text `text` is (normalised), e.g. a statement line that is just the option.

    Options with the same text are one answer: the first of them stands for all (see `same_option`). A text
    that is a letter form ("C", "(C)", "option C") is a letter, never an option's text.
    """
    if _LETTER_LEAD.fullmatch(text.strip()) or any(rx.search(text) for rx in _LETTER_STRONG):
        return None
    n = normalize_option(text)
    hits = [lab for lab, t in options.items() if n and normalize_option(t) == n]
    if len({normalize_option(options[h], keep_case=True) for h in hits}) > 1:
        # "CC or Cc" vs "Cc or cc": only the exact case tells them apart.
        exact = normalize_option(text, keep_case=True)
        hits = [h for h in hits if normalize_option(options[h], keep_case=True) == exact]
    return hits[0] if hits else None


def same_option(a: str, b: str, options: Mapping[str, str]) -> bool:
    """Whether letters `a` and `b` name the same option text (datasets do repeat an option)."""
    if a == b:
        return True
    ta, tb = options.get(a), options.get(b)
    return ta is not None and tb is not None and normalize_option(ta, True) == normalize_option(tb, True)


def bare_choice(line: str, options: Mapping[str, str]) -> str | None:
    m = re.fullmatch(r"\(?\s*([A-Za-z])\s*\)?[.:]?", line.strip())
    if m and m.group(1).upper() in options and (m.group(1).isupper() or "(" in line or ")" in line):
        return m.group(1).upper()
    return whole_option(line, options)


# ---------------------------------------------------------------------------------------------- numbers

_NUMBER = re.compile(
    r"(?<![\w.,/^])(?P<sign>[-+])?\s?"
    r"(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)?(?P<dec>\.\d+)?"
    r"(?:\s*/\s*(?P<den>\d+(?:\.\d+)?)(?![\d.]))?"
)
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*([^{}]*)\}\s*\{\s*([^{}]*)\}")
_LATEX_TEXT = re.compile(r"\\(?:text|mathrm|textbf|mbox)\s*\{([^{}]*)\}")
_LATEX_LEFT = re.compile(r"\\[a-zA-Z]+|\^")  # LaTeX the cheap parser does not read: \sqrt, 2^{3}, \pi
_PAREN = re.compile(r"\([^()]*\)")
_WORD_NUMBERS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_WORD_NUMBERS.update({"thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80,
                      "ninety": 90, "hundred": 100})


def _delatex(s: str) -> str:
    s = unbox(s)
    s = _LATEX_TEXT.sub(r" \1", s)
    s = _LATEX_FRAC.sub(r"(\1)/(\2)", s)
    s = re.sub(r"\((-?\d+(?:\.\d+)?)\)/\((\d+(?:\.\d+)?)\)", r"\1/\2", s)
    for a, b in (("\\$", ""), ("$", " "), ("\\(", " "), ("\\)", " "), ("\\[", " "), ("\\]", " "), ("\\,", ""),
                 ("\\!", ""), ("\\%", "%"), ("{,}", ","), ("−", "-"), ("–", "-"), ("\u00a0", " "),
                 ("\u202f", "")):
        s = s.replace(a, b)
    return s


def parse_number(m: re.Match[str]) -> Fraction | None:
    if m.group("int") is None and m.group("dec") is None:
        return None
    try:
        v = Fraction((m.group("int") or "0").replace(",", "") + (m.group("dec") or ""))
        if m.group("den") is not None:
            den = Fraction(m.group("den"))
            if den == 0:
                return None
            v /= den
    except (ValueError, ZeroDivisionError):
        return None
    return -v if m.group("sign") == "-" else v


def numbers_in(s: str) -> list[Fraction]:
    return [v for m in _NUMBER.finditer(s) if (v := parse_number(m)) is not None]


def to_number(value: object) -> Fraction | None:
    """A gold value (int, float or text such as '1,450,000', '$18', '3/4', '-2.50') as an exact number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return Fraction(value)
    if isinstance(value, float):
        return Fraction(str(value)) if value == value and abs(value) != float("inf") else None
    if not isinstance(value, str):
        return None
    found = _dedupe(iter(str(v) for v in numbers_in(_delatex(value))))
    return Fraction(found[0]) if len(found) == 1 else None


def format_number(v: Fraction) -> str:
    """Canonical text: '18', '-3.5', '0.125', '1/3' (a decimal whenever it terminates)."""
    if v.denominator == 1:
        return str(v.numerator)
    d = v.denominator
    while d % 2 == 0:
        d //= 2
    while d % 5 == 0:
        d //= 5
    if d != 1:
        return f"{v.numerator}/{v.denominator}"
    places = 0
    x = v
    while x.denominator != 1:
        x *= 10
        places += 1
    sign = "-" if v < 0 else ""
    digits = str(abs(x.numerator)).rjust(places + 1, "0")
    return f"{sign}{digits[:-places]}.{digits[-places:]}"


def number_candidates(clause: str) -> list[str]:
    """The distinct numbers a clause names, canonical text; '... = 18' counts only what follows the last '='."""
    s = _delatex(clause)
    if _LATEX_LEFT.search(s):
        found = _math_verify_numbers(s.rsplit("=", 1)[-1])
        if found:
            return found
    if "=" in s:
        s = s.rsplit("=", 1)[1]
    outside = _PAREN.sub(" ", s)
    if numbers_in(outside):
        s = outside  # "$18 (9 eggs x $2)": the parenthesis explains, it does not answer
    vals = numbers_in(s)
    if not vals:
        w = normalize_text(s)
        if w in _WORD_NUMBERS:
            return [str(_WORD_NUMBERS[w])]
        return []
    return _dedupe(format_number(v) for v in vals)


def _math_verify_numbers(text: str) -> list[str]:
    """LaTeX the cheap parser cannot read ('\\sqrt{16}', '2^{3}'): let math-verify evaluate it, if it can."""
    try:
        from math_verify import parse
    except ImportError:  # pragma: no cover - math-verify is a dependency
        return []
    try:
        parsed = parse(text if "$" in text else f"${text}$")
    except Exception:  # math-verify raises many kinds on odd input; odd input is simply not a number
        return []
    for item in parsed:
        try:
            if getattr(item, "is_number", False):
                v = Fraction(str(item.evalf(30) if not item.is_Rational else item)).limit_denominator(10**9)
                return [format_number(v)]
        except (TypeError, ValueError, ZeroDivisionError, AttributeError):
            continue
    return []


def bare_number(line: str) -> str | None:
    s = _delatex(line).strip()
    m = re.fullmatch(r"[$€£¥]?\s*(?P<n>[-+]?[\d.,/ ]+?)\s*%?", s)
    if not m:
        return None
    vals = numbers_in(m.group("n"))
    return format_number(vals[0]) if len(vals) == 1 else None


# ---------------------------------------------------------------------------------------------- yes / no

_YES_NO = re.compile(r"\b(yes|no|true|false)\b", re.IGNORECASE)
_YES_NO_MAP = {"yes": "yes", "true": "yes", "no": "no", "false": "no"}


def yes_no_candidates(clause: str) -> list[str]:
    return _dedupe(_YES_NO_MAP[m.group(1).lower()] for m in _YES_NO.finditer(clause))


def to_yes_no(value: object) -> str | None:
    """A gold value (bool, 0/1, 'yes', 'False', ...) as 'yes' / 'no'."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) and value in (0, 1):
        return "yes" if value else "no"
    if isinstance(value, str):
        return {"yes": "yes", "true": "yes", "1": "yes", "y": "yes", "no": "no", "false": "no", "0": "no",
                "n": "no"}.get(value.strip().lower().rstrip("."))
    return None


def bare_yes_no(line: str) -> str | None:
    w = line.strip().lower().rstrip(".!")
    return _YES_NO_MAP.get(w)


# ---------------------------------------------------------------------------------------------------- arithmetic
# The first wrong step of a worked solution (`objective.rejected_scope: after_first_error`): every written equation
# `a op b [op c ...] = d` is recomputed exactly (fractions) and the first result that disagrees is located. Only
# what is unambiguous is checked, so a correct solution is never flagged: the left side is the longest run of
# numbers and operators (+ - * / x × ÷, parentheses, `$`, `%`, thousands commas, decimals such as `.2`) that ends
# at the "=" and starts at a number or "(" (a run that starts with an operator continues into words, "2 hours x 3
# = 6": skipped), with at least one operator; the right side is the number after the "=" (a `$`, or a GSM8K
# calculator note `<<a*b=c>>`, may come between). GSM8K's calculator notes are equations themselves, and the
# number written right after a note must equal the note's result.

_ARITH_CHARS = set("0123456789.,+-–−*/x×÷·()$% \t")
_ARITH_TOKEN = re.compile(r"\s+|(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(%?)|([-–−+*/x×÷·()])|(\$)")
# What must not come right before a left-hand run: what could still belong to the expression ("2^3 = 8", "¾ x 3",
# "√9 + 1", "pages x 1/3"): the expression would start before the run, so it is not checked
_RUN_NOT_AFTER = set("xX^!√∛")
_RIGHT_NUMBER = re.compile(r"[ \t]*\$?[ \t]*(?:<<[^<>\n]*>>)?[ \t]*\$?[ \t]*(-?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?"
                           r"|\d+(?:\.\d+)?|\.\d+)(?:/\d+(?![.\d]))?)(%?)")
_NOTE = re.compile(r"<<([^<>=\n]*)=([^<>\n]*)>>[ \t]*\$?[ \t]*(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)?"
                   r"(/\d+)?")
_OPS = {"+", "-", "*", "/", "x", "×", "÷", "·", "–", "−"}
_TIMES = ("*", "x", "×", "·")


def _arith_tokens(run: str) -> list[str | Fraction] | None:
    """Numbers (as Fractions, `%` applied) and operator characters of a left-hand run; None when a character is
    not part of arithmetic. A stray character (a list comma, a sentence's full stop) restarts the expression."""
    out: list[str | Fraction] = []
    pos = 0
    while pos < len(run):
        m = _ARITH_TOKEN.match(run, pos)
        if m is None or m.end() == pos:
            out = []  # the expression starts after this character
            pos += 1
            continue
        if m.group(1):
            v = Fraction(m.group(1).replace(",", ""))
            out.append(v / 100 if m.group(2) else v)
        elif m.group(3):
            out.append("-" if m.group(3) in "–−" else m.group(3))
        pos = m.end()
    return out


def _evaluate(tokens: list[str | Fraction]) -> Fraction | None:
    """The exact value of a flat arithmetic expression (usual precedence, parentheses); None if it is not one."""
    pos = 0

    def peek() -> str | Fraction | None:
        return tokens[pos] if pos < len(tokens) else None

    def factor() -> Fraction:
        nonlocal pos
        t = peek()
        if isinstance(t, Fraction):
            pos += 1
            return t
        if t == "-":
            pos += 1
            return -factor()
        if t == "(":
            pos += 1
            v = expr()
            if peek() != ")":
                raise ValueError("unbalanced")
            pos += 1
            return v
        raise ValueError("not a factor")

    def term() -> Fraction:
        nonlocal pos
        v = factor()
        while peek() in ("*", "/", "x", "×", "÷", "·"):
            op = peek()
            pos += 1
            w = factor()
            v = v * w if op in _TIMES else v / w
        return v

    def expr() -> Fraction:
        nonlocal pos
        v = term()
        while peek() in ("+", "-"):
            op = peek()
            pos += 1
            w = term()
            v = v + w if op == "+" else v - w
        return v

    try:
        v = expr()
    except (ValueError, ZeroDivisionError):
        return None
    return v if pos == len(tokens) else None


def _times_x(text: str, i: int) -> bool:
    """Whether the "x" at `text[i]` is a multiplication sign: a number or ")" before it and a number, "(" or "$"
    after it (spaces allowed); "4x-13" and "9x = 360" are algebra, "box" a word."""
    a = text[:i].rstrip(" \t")
    b = text[i + 1:].lstrip(" \t")
    return bool(a) and (a[-1].isdigit() or a[-1] in ")%") and bool(b) and (b[0].isdigit() or b[0] in "($.")


def _left_run(text: str, eq: int) -> str | None:
    """The characters of arithmetic that end right before `text[eq]`; None when what comes before the run could
    still belong to the expression (an exponent, an unknown operator)."""
    i = eq
    while i > 0 and text[i - 1] in _ARITH_CHARS:
        if text[i - 1] == "x" and not _times_x(text, i - 1):
            break
        i -= 1
    if i > 0 and (text[i - 1] in _RUN_NOT_AFTER or text[i - 1].isnumeric()
                  or (unicodedata.category(text[i - 1]) == "Sm" and text[i - 1] not in "=<>")):
        return None
    return text[i:eq]


def _left_value(text: str, eq: int) -> Fraction | None:
    run = _left_run(text, eq)
    if run is None:
        return None
    tokens = _arith_tokens(run)
    while tokens and tokens[0] == ")":
        tokens = tokens[1:]
    depth = 0  # an opening parenthesis of the sentence ("(5 * 2 = 10)") is not part of the expression
    for t in tokens:
        depth += t == "("
        depth -= t == ")"
    while depth > 0 and tokens and tokens[0] == "(":
        tokens, depth = tokens[1:], depth - 1
    if not tokens or not isinstance(tokens[0], Fraction) and tokens[0] != "(":
        return None  # empty, or starts with an operator: the expression continues into words
    if not any(isinstance(t, str) and t in _OPS for t in tokens):
        return None  # "x = 5", "5 = 5": a definition, not a computation
    return _evaluate(tokens)


def _matches(value: Fraction, written: str, percent: bool) -> bool:
    """Whether `written` is `value`, allowing the rounding its decimals show ("10/3 = 3.33", "= 3.3", "= 3")."""
    num, _, den = written.replace(",", "").partition("/")
    try:
        w = Fraction(num) / Fraction(den) if den else Fraction(num)
    except ZeroDivisionError:
        return False
    decimals = len(written.split(".", 1)[1]) if "." in written else 0
    tol = Fraction(0) if "/" in written else Fraction(1, 2 * 10 ** decimals)  # a written fraction is exact
    candidates = (w / 100, w) if percent else (w,)  # "1/5 = 20%" and "0.2 * 100 = 20%" are both written
    return any(abs(value - c) <= tol for c in candidates)


def arithmetic_errors(text: str) -> list[int]:
    """Character offsets of every wrong written result in `text` (see the section comment), in text order."""
    errors: set[int] = set()
    for m in re.finditer(r"=", text):
        i = m.start()
        if (i > 0 and text[i - 1] in "<>!=") or text[i + 1: i + 2] == "=":
            continue  # <=, >=, !=, ==
        if text.rfind("<<", 0, i) > text.rfind(">>", 0, i):
            inner = True  # inside a calculator note: its right side is up to ">>"
        else:
            inner = False
        value = _left_value(text, i)
        if value is None:
            continue
        r = _RIGHT_NUMBER.match(text, i + 1)
        if r is None or (inner and r.group(0).count("<<")):
            continue
        if _matches(value, r.group(1), bool(r.group(2))):
            continue
        # "10 - 3 = 3 + 4": the right side is itself an expression; accept it when that expression is equal
        j = r.end()
        k = j
        while k < len(text) and text[k] in _ARITH_CHARS and text[k] != "=":
            k += 1
        rest = _arith_tokens(text[r.start(1): k].rstrip(" .,\t"))
        if rest and len(rest) > 1:
            rv = _evaluate(rest)
            if rv is not None and rv == value:
                continue
        errors.add(r.start(1))
    for m in _NOTE.finditer(text):  # the number written after a note is the note's result
        if m.group(3) is None:
            continue
        try:
            note = Fraction(m.group(2).strip().replace(",", ""))
        except (ValueError, ZeroDivisionError):
            continue
        if not _matches(note, m.group(3) + (m.group(4) or ""), False):  # "<<3/4=3/4>>3/4" is a fraction
            errors.add(m.start(3))
    return sorted(errors)


def first_arithmetic_error(text: str) -> int | None:
    """The character offset of the first wrong written result in `text` (the number after "="), or None."""
    errs = arithmetic_errors(text)
    return errs[0] if errs else None
