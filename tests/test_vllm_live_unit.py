"""The live engine's pure parts, without vLLM (default suite): the memory budget, the push check against the
checkpoint, the weights that are sent (engine dtype, tied head left out), the worker protocol and its errors."""

from __future__ import annotations

import io
import json
import struct
import sys

import pytest
import torch
from conftest import tiny_llama

from orpo_distill.errors import UserError
from orpo_distill.sampling import vllm_live as vl


def test_memory_budget_is_a_fraction_of_what_is_free():
    spec = vl.EngineSpec(model="m", memory_fraction=0.5)
    gib = 2**30
    # GPU: 40 of 80 GiB free -> half of it, as a fraction of the total
    assert vl.memory_kwargs(spec, device="cuda", free_bytes=40 * gib, total_bytes=80 * gib) == {
        "gpu_memory_utilization": 0.25}
    # CPU: half the available RAM for the KV cache, at most 4 GiB
    assert vl.memory_kwargs(spec, device="cpu", free_bytes=2 * gib, total_bytes=16 * gib) == {
        "kv_cache_memory_bytes": gib}
    assert vl.memory_kwargs(spec, device="cpu", free_bytes=64 * gib, total_bytes=128 * gib) == {
        "kv_cache_memory_bytes": vl.CPU_KV_CACHE_CAP}
    # the user's own setting wins
    own = vl.EngineSpec(model="m", vllm_args={"gpu_memory_utilization": 0.3})
    assert vl.memory_kwargs(own, device="cuda", free_bytes=gib, total_bytes=80 * gib) == {}
    with pytest.raises(UserError, match="memory_fraction"):
        vl.EngineSpec(model="m", memory_fraction=0.0)


def test_memory_fraction_comes_from_the_config():
    from orpo_distill.config import ConfigError, config_from_dict

    cfg = config_from_dict({"student": {"model": "m", "backend": "vllm"}})
    assert vl.StudentEngineHooks(cfg, "orpo_mixed", 0, task=None).memory_fraction == vl.DEFAULT_MEMORY_FRACTION == 0.5
    cfg = config_from_dict({"student": {"model": "m", "backend": "vllm", "vllm_memory_fraction": 0.3}})
    assert vl.StudentEngineHooks(cfg, "orpo_mixed", 0, task=None).memory_fraction == 0.3
    assert vl.StudentEngineHooks(cfg, "orpo_mixed", 0, task=None, memory_fraction=0.2).memory_fraction == 0.2
    for bad in (0, 1.5):
        with pytest.raises(ConfigError, match="student.vllm_memory_fraction"):
            config_from_dict({"student": {"model": "m", "vllm_memory_fraction": bad}})


def test_lora_rank_maps_to_a_rank_vllm_serves():
    assert [vl.max_lora_rank(r) for r in (1, 4, 8, 9, 64)] == [1, 8, 8, 16, 64]
    with pytest.raises(UserError, match="LoRA rank"):
        vl.EngineSpec(model="m", lora_rank=1024)


def test_push_check_names_missing_unexpected_and_reshaped_tensors(tmp_path, unigram_tokenizer):
    model = tiny_llama(unigram_tokenizer, hidden=64)
    model.save_pretrained(tmp_path)
    expected = vl._safetensors_names(tmp_path)
    sent = {k: list(v.shape) for k, v in vl.student_state(model, "float32")}
    assert sent == expected == vl.student_shapes(model)  # the trainer sends exactly what the checkpoint holds
    vl.check_push(expected, sent)
    with pytest.raises(vl.EngineError, match=r"missing \['lm_head.weight'\]"):
        vl.check_push(expected, {k: v for k, v in sent.items() if k != "lm_head.weight"})
    with pytest.raises(vl.EngineError, match=r"unexpected \['extra'\]"):
        vl.check_push(expected, {**sent, "extra": [1]})
    with pytest.raises(vl.EngineError, match="other shape"):
        vl.check_push(expected, {**sent, "lm_head.weight": [1, 1]})


def test_student_state_casts_to_the_engine_dtype_and_drops_a_tied_head(unigram_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(unigram_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    state = dict(vl.student_state(model, "bfloat16"))
    assert "lm_head.weight" not in state and "model.embed_tokens.weight" in state
    assert vl.student_shapes(model) == {k: list(v.shape) for k, v in state.items()}
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert torch.equal(state["model.norm.weight"], model.model.norm.weight.detach().to(torch.bfloat16))


def _frames(*msgs) -> io.BytesIO:
    buf = io.BytesIO()
    for m in msgs:
        vl._send(buf, m)
    buf.seek(0)
    return buf


def _replies(buf: io.BytesIO) -> list:
    buf.seek(0)
    out = []
    while True:
        try:
            out.append(vl._recv(buf))
        except EOFError:
            return out


def test_worker_protocol_answers_each_request_and_reports_errors():
    out = io.BytesIO()
    vl.serve(_frames({"cmd": "generate", "requests": [], "params": {}}, {"cmd": "close"}), out)
    assert _replies(out) == [{"ok": False, "error": "EngineError: 'generate' before start"},
                             {"ok": False, "error": "EngineError: 'close' before start"}]
    # a truncated frame is the end of input, not a crash
    data = json.dumps({"cmd": "sleep"}).encode()
    out = io.BytesIO()
    vl.serve(io.BytesIO(struct.pack(">Q", len(data) + 10) + data), out)
    assert _replies(out) == []


def test_missing_vllm_environment_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.delenv(vl.PYTHON_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="make vllm-venv.*ORPO_DISTILL_VLLM_PYTHON"):
        vl.vllm_python()
    monkeypatch.setenv(vl.PYTHON_ENV, sys.executable)
    assert str(vl.vllm_python()) == sys.executable


def test_a_worker_that_dies_is_an_engine_error_not_a_hang(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'vllm: cannot start' >&2\nexit 7\n")
    fake.chmod(0o755)
    # it may be gone before the first request is written, or while the client waits for the reply
    with pytest.raises(vl.EngineError, match=r"(died during|had exited before) 'start' \(exit code 7"):
        vl.ProcessEngine(vl.EngineSpec(model="m"), python=fake)


def test_a_worker_error_reply_is_raised_with_its_message(tmp_path):
    # A worker without vllm: "start" fails inside EngineCore and the client raises the worker's message.
    py = tmp_path / "python"
    py.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'import sys; sys.modules[\"vllm\"] = None; "
                  "from orpo_distill.sampling.vllm_live import _main; _main()'\n")
    py.chmod(0o755)
    with pytest.raises(vl.EngineError, match=r"vLLM worker, 'start': .*vllm"):
        vl.ProcessEngine(vl.EngineSpec(model="m"), python=py)


def test_the_worker_exits_when_its_trainer_is_killed(tmp_path):
    """kill -9 of the trainer closes the worker's stdin: the worker ends instead of holding the engine's memory."""
    import os
    import signal
    import subprocess
    import time
    from pathlib import Path

    if not Path("/proc").is_dir():
        pytest.skip("reads the worker's state from /proc")
    parent = tmp_path / "parent.py"
    parent.write_text(
        "import subprocess, sys, time\n"
        "c = subprocess.Popen([sys.executable, '-m', 'orpo_distill.sampling.vllm_live'], stdin=subprocess.PIPE,"
        " stdout=subprocess.PIPE)\n"
        "print(c.pid, flush=True)\n"
        "time.sleep(120)\n")
    p = subprocess.Popen([sys.executable, str(parent)], stdout=subprocess.PIPE, text=True)
    child = int(p.stdout.readline())
    os.kill(p.pid, signal.SIGKILL)
    p.wait()

    def alive() -> bool:
        try:
            state = open(f"/proc/{child}/status").read().split("State:")[1].split()[0]
        except (FileNotFoundError, IndexError):
            return False
        return state not in ("Z", "X")

    for _ in range(200):
        if not alive():
            break
        time.sleep(0.1)
    assert not alive()
