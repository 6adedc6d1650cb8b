"""Keeping API keys out of everything orpo-distill writes or prints: one place that knows what a secret looks like.

`redact_url` hides the credentials a URL can carry (userinfo `user:pass@`, query parameters such as `api_key=`,
`key=`, `token=`, `access_token=`, and any key-shaped value); `redact_text` does that for every URL inside a text
and also hides key-shaped tokens (`sk-...`, `Bearer ...`, `hf_...`) and any known secret values passed to it;
`check_env_var_name` accepts only an environment variable NAME where one is expected (`api_key_env`) and refuses
anything else without ever repeating the value; `check_url` refuses a URL that carries credentials (a config may
only name where the key lives). Every log line, error message, stored provenance field and config dump goes
through these.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

from .errors import UserError

MASK = "***"

ENV_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# Query parameter names whose value is a credential (compared lower-case, with '-' read as '_').
SECRET_PARAMS = frozenset({
    "key", "api_key", "apikey", "token", "access_token", "refresh_token", "id_token", "auth", "auth_token",
    "authorization", "password", "passwd", "pwd", "secret", "client_secret", "api_secret", "sig", "signature",
    "x_api_key", "subscription_key", "session", "sessionid", "session_token", "credential", "credentials",
    "private_key", "code",
})

# Key-shaped tokens, whatever they are attached to. Prefixes of common providers, then a generic rule below.
_KEY_TOKEN = re.compile(
    r"(?<![A-Za-z0-9])(?:"
    r"sk-[A-Za-z0-9_\-]{20,}"  # OpenAI / Anthropic / many OpenAI-compatible providers (see _keyish)
    r"|sk_(?:live|test)_[A-Za-z0-9]{16,}"
    r"|hf_[A-Za-z0-9]{20,}"  # Hugging Face
    r"|gh[pousr]_[A-Za-z0-9]{20,}"  # GitHub
    r"|xox[abprs]-[A-Za-z0-9\-]{10,}"  # Slack
    r"|AIza[0-9A-Za-z_\-]{30,}"  # Google
    r"|AKIA[0-9A-Z]{16}"  # AWS access key id
    r"|gsk_[A-Za-z0-9]{20,}"  # Groq
    r"|r8_[A-Za-z0-9]{20,}"  # Replicate
    r")")


def _keyish(token: str) -> bool:
    """A `sk-` match is a key only when it is random-looking (digits, upper and lower case), so that a model
    named `org/model-sk-finetuned-version` is not mistaken for one; the other prefixes are specific enough."""
    if not token.startswith("sk-"):
        return True
    return all(re.search(p, token[3:]) for p in (r"[0-9]", r"[a-z]", r"[A-Z]"))


def _mask_keys(text: str) -> str:
    return _KEY_TOKEN.sub(lambda m: MASK if _keyish(m.group(0)) else m.group(0), text)


_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=\-]{6,}")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")
# `api_key=...`, `"token": "..."` outside a URL (an echoed request, a dumped dict).
_ASSIGNED = re.compile(
    r"(?i)(?<![A-Za-z0-9_])((?:x[-_])?(?:api[-_]?key|access[-_]?token|auth[-_]?token|token|secret|password|"
    r"client[-_]?secret)['\"]?\s*[:=]\s*['\"]?)([^\s'\"&,;}]{4,})")


def looks_like_key(value: str) -> bool:
    """Whether `value` is shaped like an API key rather than a name: a known provider prefix, or a long mix of
    upper case, lower case and digits (environment variable names are words, not random strings)."""
    v = value.strip()
    if any(_keyish(m.group(0)) for m in _KEY_TOKEN.finditer(v)) or _BEARER.search(v):
        return True
    # Model names and paths have '-', '.' or '/' between words; random keys are one run of letters and digits.
    if len(v) >= 24 and re.fullmatch(r"[A-Za-z0-9_+=]+", v):
        classes = sum(bool(re.search(p, v)) for p in (r"[a-z]", r"[A-Z]", r"[0-9]"))
        return classes == 3
    return False


def _secret_param(name: str) -> bool:
    n = name.strip().lower().replace("-", "_")
    return n in SECRET_PARAMS or n.endswith(("_key", "_token", "_secret", "_password"))


def redact_url(url: str) -> str:
    """`url` with its credentials replaced by `***`: the userinfo (`user:pass@host` -> `***@host`), the value of
    every secret-named query parameter (`?api_key=`, `key=`, `token=`, `access_token=`, ...) or key-shaped one,
    and key-shaped path segments or fragments. A URL without credentials comes back unchanged."""
    if not isinstance(url, str) or not url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:  # not parseable as a URL: fall back to token rules
        return _redact_tokens(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = MASK + "@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_secret_param(k) or looks_like_key(v) for k, v in pairs):
            query = "&".join(
                f"{quote(k, safe='')}=" + (MASK if (_secret_param(k) or looks_like_key(v)) and v
                                          else quote(v, safe=""))
                for k, v in pairs)
    path = _redact_tokens(parts.path)
    fragment = _redact_tokens(parts.fragment) if parts.fragment else parts.fragment
    if (netloc, query, path, fragment) == (parts.netloc, parts.query, parts.path, parts.fragment):
        return url
    return urlunsplit((parts.scheme, netloc, path, query, fragment))


def _redact_tokens(text: str) -> str:
    text = _mask_keys(text)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {MASK}", text)
    return _ASSIGNED.sub(lambda m: m.group(1) + MASK, text)


def redact_text(text: str, secrets: Iterable[str | None] = ()) -> str:
    """`text` with every URL's credentials (`redact_url`), key-shaped tokens, `api_key=...`-style assignments,
    and each of the exact `secrets` given (e.g. the key read from the environment) replaced by `***`."""
    if not isinstance(text, str) or not text:
        return text
    for s in secrets:
        if s and len(s) >= 4 and s != "EMPTY":
            text = text.replace(s, MASK)
    text = _URL.sub(lambda m: redact_url(m.group(0)), text)
    return _redact_tokens(text)


def check_env_var_name(name: str | None, key: str = "api_key_env") -> str | None:
    """`name` when it is an environment variable NAME (`[A-Za-z_][A-Za-z0-9_]*`, not key-shaped); else UserError.

    The message never repeats the value: when someone pastes the key itself here, printing it would leak it."""
    if name is None:
        return None
    if not isinstance(name, str) or not ENV_VAR_NAME.fullmatch(name) or looks_like_key(name):
        what = "looks like an API key itself" if isinstance(name, str) and looks_like_key(name) else \
            "is not a valid variable name"
        raise UserError(f"{key} must be the NAME of an environment variable that holds the API key (letters, "
                        f"digits and underscores, not starting with a digit; e.g. OPENAI_API_KEY), but the value "
                        f"given {what} (not shown). Put the key in the environment (export OPENAI_API_KEY=...) "
                        f"and write only the variable's name in {key}; if a real key was written into a file, "
                        "revoke it.")
    return name


def check_url(url: str | None, key: str = "base_url") -> str | None:
    """`url` when it carries no credentials; else UserError showing it redacted. A key goes in the environment
    (named by `api_key_env`) and is sent as the Authorization header, never in the URL."""
    if url is None:
        return None
    red = redact_url(url)
    if red != url:
        raise UserError(f"{key} {red} carries a credential (user:password@, a key or token query parameter, or a "
                        "key-shaped value; shown as ***). Remove it from the URL, put the key in an environment "
                        "variable and name that variable in api_key_env; it is sent as the Authorization header. "
                        "If a real key was written into a file, revoke it.")
    return url


def check_no_secret(value: str | None, key: str) -> str | None:
    """`value` (a model name, a path) when it contains nothing key-shaped or URL credentials; else UserError."""
    if value is None:
        return None
    if redact_text(value) != value:
        raise UserError(f"{key} contains something that looks like an API key or a credential (not shown); put "
                        "keys in an environment variable named by api_key_env, never in the config")
    return value


def redact_override(item: str) -> str:
    """A command-line override `a.b=value` safe to print: secret-bearing values masked."""
    key, sep, value = item.partition("=")
    if not sep:
        return redact_text(item)
    if key.strip().endswith("api_key_env") and not (ENV_VAR_NAME.fullmatch(value) and not looks_like_key(value)):
        return f"{key}={MASK}"
    return f"{key}={redact_text(value)}"


__all__ = ["MASK", "check_env_var_name", "check_no_secret", "check_url", "looks_like_key", "redact_override",
           "redact_text", "redact_url"]
