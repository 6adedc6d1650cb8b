"""What the config hash covers: every key of the config schema is classified (a new key fails here until it is),
cosmetic keys (logging, checkpoint cadence, batch sizes of sampling/eval, concurrency) keep the hash, and keys that
change the trained weights change it; eval keys change the eval fingerprint only."""

from __future__ import annotations

import pytest
from conftest import set_dotted

from orpo_distill.config import Config, config_from_dict


def test_every_config_key_is_classified():
    from orpo_distill.train import HASH_CLASSES, config_leaves

    leaves = config_leaves(Config)
    missing = [k for k in leaves if k not in HASH_CLASSES]
    assert not missing, f"decide whether these keys change the trained weights (train.HASH_CLASSES): {missing}"
    assert not set(HASH_CLASSES) - set(leaves), "HASH_CLASSES names keys the config no longer has"
    assert set(HASH_CLASSES.values()) == {"weights", "eval", "neither"}


def _cfg(**over) -> Config:
    d: dict = {"teacher": {"model": "t", "backend": "openai"}, "student": {"model": "s"}}
    return config_from_dict(set_dotted(d, over))


COSMETIC = {"trainer.report_to": ["jsonl"], "trainer.save_every_steps": 7, "trainer.log_every_steps": 5,
            "student.batch_size": 3, "teacher.batch_size": 3, "eval.batch_size": 5, "teacher.concurrency": 2,
            "teacher.max_retries": 1, "teacher.api_key_env": "KEY", "run.out_dir": "elsewhere", "run.threads": 1,
            "run.store": "s.sqlite", "run.seeds": 3, "run.variants": ["orpo_off"], "objective.chunk_size": 64,
            "trainer.gradient_checkpointing": True, "student.device": "cpu"}
WEIGHTS = {"trainer.lr": 1e-3, "trainer.epochs": 2, "trainer.batch_size": 3, "trainer.grad_accum": 2,
           "objective.lam": 0.1, "policy.phi": 0.2, "pairs.max_pairs_per_question": 2, "sampling.k": 4,
           "sampling.temperature": 0.5, "teacher.model": "t2", "teacher.system_prompt": "x", "student.model": "s2",
           "student.template": "plain", "task.train.limit": 5, "trainer.lora.enabled": True,
           "trainer.max_grad_norm": None}
EVAL = {"eval.split": "validation", "eval.majority_k": 3, "eval.max_new_tokens": 9, "task.test.limit": 10}


@pytest.mark.parametrize("key", sorted(COSMETIC))
def test_cosmetic_changes_keep_the_hash(key):
    from orpo_distill.train import config_hash, eval_fingerprint

    base = _cfg()
    changed = _cfg(**{key: COSMETIC[key]})
    assert changed != base
    assert config_hash(changed) == config_hash(base)
    assert eval_fingerprint(changed) == eval_fingerprint(base)


@pytest.mark.parametrize("key", sorted(WEIGHTS))
def test_weight_changes_change_the_hash(key):
    from orpo_distill.train import config_hash, student_revision

    base, changed = _cfg(), _cfg(**{key: WEIGHTS[key]})
    assert config_hash(changed) != config_hash(base)
    assert student_revision(changed, "orpo_on", 0, 1) != student_revision(base, "orpo_on", 0, 1)


@pytest.mark.parametrize("key", sorted(EVAL))
def test_eval_changes_change_only_the_eval_fingerprint(key):
    from orpo_distill.train import config_hash, eval_fingerprint

    base, changed = _cfg(), _cfg(**{key: EVAL[key]})
    assert config_hash(changed) == config_hash(base)
    assert eval_fingerprint(changed) != eval_fingerprint(base)
