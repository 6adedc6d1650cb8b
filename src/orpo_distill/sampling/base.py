"""The one generator interface, used for teachers and students alike, whatever the backend.

A `Generator` takes *user messages* (the task's instruction + question; each backend formats them for its own
model: chat template, plain template, or an OpenAI chat message) and `SamplingParams`, and returns `n`
`Completion`s per prompt with token counts, finish reasons and latency. Backends: `hf.py` (in-process
transformers, the only one that can sample the student while it trains), `openai_api.py` (any
OpenAI-compatible server or commercial API), `vllm_engine.py` (vLLM offline engine, optional extra).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

from ..errors import EndpointError


@dataclass(frozen=True)
class SamplingParams:
    n: int = 8
    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int = 512
    stop: tuple[str, ...] = ()
    seed: int = 0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d


@dataclass(frozen=True)
class Completion:
    text: str
    n_tokens: int  # generated tokens (the backend's own tokenizer)
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    latency_s: float = 0.0
    prompt_tokens: int = 0


class Generator(Protocol):
    model_id: str  # recorded with every trace and part of its content key
    revision: str  # weights identity: hub revision, checkpoint path + step, or a hash

    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[list[Completion]]:
        """`params.n` completions for each user message in `prompts`, in order.

        The backends of this package also accept `sample_indices=[[i, ...], ...]` (one list per prompt): produce
        exactly those sample indices (default `range(params.n)`), so that a resumed run samples only what the
        store lacks and sample i is the same whichever others are asked for.
        """
        ...


def sample_seed(seed: int, prompt: str, sample_index: int) -> int:
    """A 64-bit seed for ONE sample: a function of the run seed, the user message and the sample index only.

    Backends that can seed each sample (transformers here, vLLM per request, OpenAI-compatible servers that honour
    `seed`) derive its random stream from this, so a sample does not depend on which other prompts share its batch,
    on the batch size, or on whether the run was interrupted and resumed.
    """
    import hashlib

    h = hashlib.sha256(f"{int(seed)}\x00{int(sample_index)}\x00{prompt}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


class GenerationFailed(EndpointError, RuntimeError):
    """A backend gave up (for example the endpoint stayed down after every retry): exit code 3 when it reaches the
    command line (the sampling stage turns it into `SamplingAborted` after writing what was obtained).

    `partial[i]` holds the completions obtained for prompt i before giving up (None for prompts that failed), so
    the caller can keep the work already paid for. The message never contains credentials.
    """

    def __init__(self, message: str, partial: list[list[Completion] | None] | None = None) -> None:
        super().__init__(message)
        self.partial = partial or []


def resolve_sample_indices(n_prompts: int, params: SamplingParams,
                           sample_indices: Sequence[Sequence[int]] | None) -> Sequence[Sequence[int]]:
    """The sample indices each backend draws per prompt: all of range(params.n) unless told which (a resumed run
    draws exactly the missing ones); one entry per prompt."""
    if sample_indices is None:
        return [range(params.n)] * n_prompts
    if len(sample_indices) != n_prompts:
        raise ValueError(f"sample_indices has {len(sample_indices)} entries for {n_prompts} prompts")
    return sample_indices
