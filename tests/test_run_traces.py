"""Which stored traces belong to a run: a store shared by two revisions of the same teacher and student (another
prompt format, a student folder updated in place) gives each run exactly its own traces, in the trainer, in
`check_traces` and in the negative pools."""

from __future__ import annotations

import shutil

import pytest
from test_train import ArithTask, make_questions, make_store, tiny_config


@pytest.fixture
def two_revisions(tmp_path, tiny_llama_dir):
    """One store with the traces of run A and of run B: B's teacher has a system prompt (revision +fmt:...) and
    B's student is A's folder with its weights changed in place."""
    import torch
    from transformers import AutoModelForCausalLM

    student = tmp_path / "student"
    shutil.copytree(tiny_llama_dir, student)
    store_file = tmp_path / "shared.sqlite"
    task, qs = ArithTask(), make_questions(8)
    cfg_a = tiny_config(student, tmp_path / "a", **{"run.store": str(store_file), "trainer.epochs": 1})
    make_store(cfg_a, qs, task, student_all_right={"q7"}).close()
    m = AutoModelForCausalLM.from_pretrained(student)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01)
    m.save_pretrained(student)  # the same folder, other weights: another revision
    cfg_b = tiny_config(student, tmp_path / "b", **{"run.store": str(store_file), "trainer.epochs": 1,
                                                    "teacher.system_prompt": "Be brief."})
    store = make_store(cfg_b, qs, task)
    yield cfg_a, cfg_b, task, qs, store
    store.close()


def test_queries_select_one_revision(two_revisions):
    from orpo_distill.run_traces import initial_student_query, select, teacher_query
    from orpo_distill.train import make_loader, teacher_chosen

    cfg_a, cfg_b, task, qs, store = two_revisions
    ids = [q.id for q in qs]
    assert len(store.traces(role="teacher")) == 2 * 8 * 4  # both revisions are in the store
    ta, tb = teacher_query(cfg_a), teacher_query(cfg_b)
    assert ta.model_id == tb.model_id and ta.revision != tb.revision and "+fmt:" in tb.revision
    # the student folder changed in place: both configs now name its new revision; the old traces are stale
    sa, sb = initial_student_query(cfg_a), initial_student_query(cfg_b)
    assert sa == sb and len({t.revision for t in store.traces(role="student")}) == 2
    for cfg, tq in ((cfg_a, ta), (cfg_b, tb)):
        chosen = teacher_chosen(cfg, store, ids)
        assert all(len(chosen[q]) == 3 for q in ids), {q: len(v) for q, v in chosen.items()}
        assert {t.revision for t in select(store, tq, ids)} == {tq.revision}
    load_a, load_b = make_loader(cfg_a, store, "orpo_off", 0), make_loader(cfg_b, store, "orpo_off", 0)
    neg_a, neg_b = load_a("initial", ids), load_b("initial", ids)
    assert neg_a == neg_b and "q7" in neg_b  # the old student got q7 right; its traces are not used
    assert all(len(v) == 2 for v in neg_b.values())
    assert {t.key for v in neg_b.values() for t in v} == {t.key for t in select(store, sb, ids)}
    assert all(len(v) == 1 for v in load_a("teacher", ids).values())


def test_training_and_check_traces_use_only_their_revision(two_revisions, tmp_path):
    from orpo_distill.train import MissingTraces, check_traces, train_variant, variant_dir

    cfg_a, cfg_b, task, qs, store = two_revisions
    ids = [q.id for q in qs]
    res = train_variant(cfg_b, "orpo_off", 0, variant_dir(cfg_b, "orpo_off", 0), task=task, train_questions=qs,
                        eval_questions=None, store=store, progress=False)
    pairs = res["per_epoch"][0]["pairs"]
    assert pairs["pairs"] == 24 and res["per_epoch"][0]["pool"]["negatives"] == 16  # not 2x from the other run
    check_traces(cfg_a, store, ["orpo_mixed"], ids)
    other = cfg_b.model_copy(deep=True)
    other.student.system_prompt = "Think."  # a prompt format nobody sampled the student with
    with pytest.raises(MissingTraces, match="other revisions") as err:
        check_traces(other, store, ["orpo_mixed"], ids)
    assert "orpo-distill traces student" in str(err.value)
    other.teacher.template = "plain"
    with pytest.raises(MissingTraces, match="orpo-distill traces teacher"):
        check_traces(other, store, ["sft_single"], ids)


def test_the_query_names_the_revision_the_sampler_records(tiny_llama_dir):
    """The trainer's query and the sampler that wrote the traces must agree on the revision (local folder, prompt
    format), or no trace would ever be found."""
    from orpo_distill.config import ModelConfig
    from orpo_distill.run_traces import model_revision
    from orpo_distill.sampling.hf import HFGenerator

    for cfg in (ModelConfig(model=str(tiny_llama_dir), device="cpu"),
                ModelConfig(model=str(tiny_llama_dir), device="cpu", template="plain", system_prompt="Be brief.")):
        gen = HFGenerator.from_config(cfg)
        assert model_revision(cfg) == (gen.model_id, gen.revision)


def test_an_unpinned_hub_model_is_identified_by_its_cached_commit(tmp_path, monkeypatch):
    """transformers 5 no longer records the resolved commit on the config: the identity reads it from the local
    Hugging Face cache, so a model updated upstream (a new commit in the cache) does not reuse the old traces; a
    model behind an API stays "unpinned"."""
    import huggingface_hub.constants as hf_constants

    from orpo_distill.config import config_from_dict
    from orpo_distill.sampling.stage import model_identity

    def cache(commit: str) -> None:
        repo = tmp_path / "hub" / "models--org--tiny"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = config_from_dict({"teacher": {"model": "org/tiny", "backend": "hf"}, "student": {"model": "s"}})
    assert model_identity(cfg.teacher)[1] == "unpinned"  # not cached yet
    cache("a" * 40)
    assert model_identity(cfg.teacher)[1] == "a" * 40
    cache("b" * 40)  # the model was updated upstream and downloaded again
    assert model_identity(cfg.teacher)[1] == "b" * 40
    api = config_from_dict({"teacher": {"model": "org/tiny", "backend": "openai"}, "student": {"model": "s"}})
    assert model_identity(api.teacher)[1] == "unpinned"
