"""Weights found in the hub caches belong to the teacher's own model id and file name, nothing else."""
import pytest

from teacher_cache.teachers import WeightsMissing, find_weights, get_spec


def _snapshot(hf_cache, repo: str, revision: str, name: str):
    folder = hf_cache / ("models--" + repo.replace("/", "--")) / "snapshots" / revision
    folder.mkdir(parents=True)
    (folder / name).write_bytes(b"weights")
    return folder / name


def test_hf_cache_is_matched_by_model_id_and_file_name(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    spec = get_spec("vit_b16_clip")
    # another model's file of a name the ViT teacher also uses, and a stray copy outside any snapshot
    _snapshot(tmp_path / "hf", "google/vit-base-patch16-224", "abc", "model.safetensors")
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"stray")
    with pytest.raises(WeightsMissing) as e:
        find_weights(spec, None)
    assert "models--timm--vit_base_patch16_clip_224.openai/snapshots" in str(e.value)
    old = _snapshot(tmp_path / "hf", spec.hf_repo, "old", "open_clip_pytorch_model.bin")
    assert find_weights(spec, None) == old
    main = _snapshot(tmp_path / "hf", spec.hf_repo, "rev2", "open_clip_pytorch_model.bin")
    refs = tmp_path / "hf" / "models--timm--vit_base_patch16_clip_224.openai" / "refs"
    refs.mkdir()
    (refs / "main").write_text("rev2\n")
    assert find_weights(spec, None) == main  # the revision refs/main names
