"""The offline demo's shipped models: loadable, different architectures and tokenizers, small, hashes as built,
teacher measurably better than student; the build script is deterministic; the demo config is valid."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from orpo_distill.demo import assets_dir
from orpo_distill.tasks.prompts import render_prompt
from orpo_distill.tasks.synthetic import SyntheticTask

ASSETS = assets_dir()
ROLES = ("teacher", "student")
CONFIG = Path(__file__).resolve().parents[1] / "src" / "orpo_distill" / "configs" / "demo.yaml"
# The demo's task: chains of 3-4 steps with numbers up to 20 (the student was pretrained on 1-2 steps only).
DEMO_TASK = {"min_steps": 3, "max_steps": 4, "max_number": 20}


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def build_info() -> dict:
    return json.loads((ASSETS / "BUILD.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def loaded():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return {r: (AutoModelForCausalLM.from_pretrained(ASSETS / r).eval(), AutoTokenizer.from_pretrained(ASSETS / r))
            for r in ROLES}


def test_assets_are_small_safetensors_hf_folders():
    total = 0
    for r in ROLES:
        d = ASSETS / r
        names = {f.name for f in d.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names, names
        assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
        total += sum(f.stat().st_size for f in d.iterdir())
    assert total < 10 * 1024 * 1024, total


def test_hashes_match_build_json(build_info):
    for r in ROLES:
        files = build_info["models"][r]["files"]
        assert "model.safetensors" in files
        on_disk = {f.name: _sha(f) for f in (ASSETS / r).iterdir() if f.is_file()}
        assert on_disk == files, r
    assert build_info["seed"] == 0 and "orpo_distill.demo.build" in build_info["command"]


def test_different_architectures_and_tokenizers(loaded, build_info):
    (teacher, ttok), (student, stok) = loaded["teacher"], loaded["student"]
    assert teacher.config.model_type == "gpt2" and student.config.model_type == "llama"
    assert type(ttok.backend_tokenizer.model).__name__ == "BPE"  # byte-level (GPT-2 style)
    assert type(stok.backend_tokenizer.model).__name__ == "BPE"  # Metaspace words, one token per digit
    assert ttok.get_vocab() != stok.get_vocab()
    text = "Ann has 12 pens. 12 + 7 = 19."
    s_tokens = stok.convert_ids_to_tokens(stok(text)["input_ids"])
    assert ttok.convert_ids_to_tokens(ttok(text)["input_ids"]) != s_tokens
    assert s_tokens[0] == stok.bos_token and "1" in s_tokens and "9" in s_tokens  # digits split
    assert not any(any(ch.isdigit() for ch in t) and len(t.strip("\u2581")) > 1 for t in stok.get_vocab())
    for r, (m, _) in loaded.items():
        assert sum(p.numel() for p in m.parameters()) == build_info["models"][r]["params"]


def test_tokenization_round_trips_and_splits_cleanly(loaded):
    """Traces cross as text: decode(encode(completion)) is the completion, and prompt+completion tokenize as
    the prompt's ids followed by the completion's (how the samplers and the pair tokenizer see them)."""
    task = SyntheticTask(DEMO_TASK)
    for _, tok in loaded.values():
        for q in task.load_questions("validation", limit=30):
            prompt = render_prompt(tok, task.user_message(q), "plain")
            p = tok(prompt)["input_ids"]
            c = tok(q.rationale, add_special_tokens=False)["input_ids"]
            assert tok(prompt + q.rationale)["input_ids"] == p + c
            assert tok.decode(c, skip_special_tokens=True) == q.rationale
            assert tok.unk_token_id not in p + c or tok.unk_token_id == tok.eos_token_id


def test_models_load_through_the_project_loader():
    from orpo_distill.config import ModelConfig
    from orpo_distill.models import load_model, load_tokenizer

    for r in ROLES:
        cfg = ModelConfig(model=str(ASSETS / r), template="plain", device="cpu")
        assert load_model(cfg).training is False
        assert load_tokenizer(cfg).pad_token is not None


@torch.no_grad()
def _greedy_correct(model, tok, task, questions, max_new_tokens: int = 80) -> int:
    tok.padding_side = "left"
    prompts = [render_prompt(tok, task.user_message(q), "plain") for q in questions]
    enc = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(task.grade(q, t).verdict == "correct" for q, t in zip(questions, texts))


def test_teacher_is_measurably_better_than_student(loaded):
    torch.set_num_threads(1)
    task = SyntheticTask(DEMO_TASK)
    qs = task.load_questions("validation", limit=48)
    t = _greedy_correct(*loaded["teacher"], task, qs)
    s = _greedy_correct(*loaded["student"], task, qs)
    # Build-time measurement on 200 validation questions: see BUILD.json. Here: a clear gap on 48.
    assert t >= 0.75 * len(qs), (t, s)
    assert 0 < s <= t - 0.3 * len(qs), (t, s)


def test_demo_config_is_valid_and_points_at_the_assets(tmp_path):
    from orpo_distill.config import load_config

    data = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    quick = data.pop("quick", None) or {}
    p = tmp_path / "demo.yaml"
    p.write_text(yaml.safe_dump(data), encoding="utf-8")
    cfg = load_config(p)
    assert cfg.task.name == "synthetic" and cfg.teacher.template == "plain" and cfg.student.template == "plain"
    assert cfg.run.seeds >= 2 and cfg.task.synthetic["n_test"] >= 200 and cfg.eval.split == "test"
    assert {k: cfg.task.synthetic[k] for k in DEMO_TASK} == DEMO_TASK
    # the build measured the models on the same task, and the student never saw chains that long
    from orpo_distill.demo.build import BuildSpec

    spec = BuildSpec()
    assert spec.eval_task_options == DEMO_TASK
    assert spec.student.task_overrides["max_steps"] < DEMO_TASK["min_steps"]
    assert not spec.teacher.task_overrides  # the teacher: 2-4 steps, numbers up to 40
    # The quick variant is only overrides of the same schema.
    assert load_config(p, [f"{k}={json.dumps(v)}" for k, v in quick.items()]).run.out_dir
    # The models come from the package (orpo_distill.demo.assets_dir()), wherever it is installed.
    from orpo_distill.pipeline import demo_config

    full, fast = demo_config(tmp_path / "out"), demo_config(tmp_path / "q", quick=True)
    for r in ROLES:
        assert getattr(full, r).model == str(assets_dir() / r)
        assert (Path(getattr(full, r).model) / "config.json").is_file()
    assert fast.run.seeds <= full.run.seeds and fast.task.synthetic["n_train"] < full.task.synthetic["n_train"]


def test_build_is_bit_for_bit_deterministic(tmp_path):
    """Two builds with the same seed (few steps, shipped sizes) give identical weight and tokenizer files."""
    from orpo_distill.demo.build import BuildSpec, build

    spec = BuildSpec(seed=3, tokenizer_texts=300)
    spec = replace(spec, teacher=replace(spec.teacher, steps=3, n_questions=200),
                   student=replace(spec.student, steps=3, n_questions=200))
    before = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads())
    a = build(tmp_path / "a", spec, measure_models=False, log_every=0)
    b = build(tmp_path / "b", spec, measure_models=False, log_every=0)
    assert (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()) == before
    for r in ROLES:
        assert a["models"][r]["files"] == b["models"][r]["files"]
        assert a["models"][r]["files"]["model.safetensors"] == _sha(tmp_path / "b" / r / "model.safetensors")
    c = build(tmp_path / "c", replace(spec, seed=4), measure_models=False, log_every=0)
    assert c["models"]["teacher"]["files"]["model.safetensors"] != a["models"]["teacher"]["files"]["model.safetensors"]


def test_estimate_multiplies_out_the_work():
    """The demo-size estimate: counts x unit costs, per stage (no models needed)."""
    from orpo_distill.config import config_from_dict
    from orpo_distill.demo.estimate import estimate

    cfg = config_from_dict({"run": {"seeds": 2, "variants": ["zero_shot", "sft_single", "orpo_on"]},
                            "task": {"synthetic": {"n_train": 100, "n_test": 50}},
                            "sampling": {"k": 4}, "trainer": {"epochs": 3}, "pairs": {"max_pairs_per_question": 2}})
    units = {"teacher_s_per_sample": 0.01, "student_s_per_sample": 0.002, "greedy_s_per_question": 0.01,
             "sft_s_per_sequence": 0.01, "orpo_s_per_pair": 0.02, "teacher_correct_share": 0.5,
             "kept_positives_per_question": 3.0, "questions_with_positive": 1.0, "student_wrong_share": 0.75}
    est = estimate(cfg, units)
    assert est["teacher_traces"] == 4.0 and est["initial_student_traces"] == 0.8
    assert est["zero_shot"] == 2 * 0.5
    assert est["sft_single"] == 2 * (3 * 100 * 0.01 + 3 * 0.5)
    # on-policy: 2 pairs/question (capped), 2 refreshes of 4 samples per question
    assert est["orpo_on"] == round(2 * (3 * 100 * 2 * 0.02 + 3 * 0.5 + 2 * 100 * 4 * 0.002), 1)
    assert est["total"] == round(sum(v for k, v in est.items() if k != "total"), 1)


def test_build_keeps_a_role_only_when_built_with_the_same_spec(tmp_path):
    """`--roles student` keeps the teacher only when BUILD.json records it built with this very spec, and its
    files still have the recorded hashes; the student then comes out as in a full build."""
    from orpo_distill.demo.build import BuildSpec, build

    spec = BuildSpec(seed=3, tokenizer_texts=300)
    spec = replace(spec, teacher=replace(spec.teacher, steps=2, n_questions=200),
                   student=replace(spec.student, steps=2, n_questions=200))
    full = build(tmp_path / "a", spec, measure_models=False, log_every=0)
    part = build(tmp_path / "a", spec, measure_models=False, log_every=0, roles=("student",))
    assert part["models"]["teacher"]["kept_from_previous_build"] is True
    assert part["models"]["student"]["files"] == full["models"]["student"]["files"]
    assert part["models"]["teacher"]["files"] == full["models"]["teacher"]["files"]
    other = replace(spec, teacher=replace(spec.teacher, steps=3))
    with pytest.raises(ValueError, match="not built with this spec"):
        build(tmp_path / "a", other, measure_models=False, log_every=0, roles=("student",))
    (tmp_path / "a" / "teacher" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="files differ"):
        build(tmp_path / "a", spec, measure_models=False, log_every=0, roles=("student",))
