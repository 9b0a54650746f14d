"""The teacher registry: every teacher builds and extracts its layers; weights files are found and loaded."""
from __future__ import annotations

import pytest
import torch

from teacher_cache.teachers import (TEACHERS, Teacher, WeightsMissing, find_weights, get_spec,
                                    load_backbone_weights)

REAL = {name for name, spec in TEACHERS.items() if not spec.demo}


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.timeout(60), pytest.mark.slow] if n in REAL else [])
                                  for n in TEACHERS])
def test_registry_builds_and_extracts(name):
    torch.manual_seed(0)
    spec = get_spec(name)
    teacher = Teacher(spec, 10, 32).eval()
    assert teacher.input_size == (spec.input_size or 32)
    b = 1 if name in REAL else 2
    layers = teacher.default_layers()
    assert len(layers) == 1
    with torch.no_grad():
        out = teacher.extract(torch.rand(b, 3, teacher.input_size, teacher.input_size), layers)
    assert set(out) == {"logits", *layers}
    assert out["logits"].shape == (b, 10)
    feat = out[layers[0]]
    if spec.kind == "vit":
        net = teacher.net
        assert layers == [f"blocks.{len(net.blocks) - 2}"]
        assert feat.shape == (b, net.patch_embed.num_patches + 1, net.embed_dim)
    else:
        assert spec.kind == "cnn" and feat.dim() == 4 and feat.shape[0] == b
        assert feat.shape[2] == feat.shape[3] and feat.shape[2] < teacher.input_size
    assert torch.isfinite(feat).all()
    assert teacher.head().out_features == 10
    with pytest.raises(KeyError, match="no layer 'nope'"):
        teacher.extract(torch.rand(1, 3, teacher.input_size, teacher.input_size), ["nope"])


def test_find_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    for name in sorted(REAL):
        spec = get_spec(name)
        with pytest.raises(WeightsMissing) as e:
            find_weights(spec, None)
        msg = str(e.value)
        assert name in msg and spec.weights_hint in msg and "teacher_*.weights" in msg
        assert str(tmp_path / "torch") in msg
        with pytest.raises(WeightsMissing, match="does not exist"):
            find_weights(spec, str(tmp_path / "nowhere.pth"))
    spec = get_spec("wrn101")
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / spec.hub_files[0]).write_bytes(b"")
    assert find_weights(spec, None) == hub / spec.hub_files[0]
    given = tmp_path / "mine.pth"
    given.write_bytes(b"")
    assert find_weights(spec, str(given)) == given


@pytest.mark.parametrize("name,suffix", [("vit_demo", ".pt"), ("vit_demo", ".safetensors"), ("wrn_demo", ".pt")])
def test_load_backbone_weights(tmp_path, name, suffix):
    torch.manual_seed(1)
    source = Teacher(get_spec(name), 10, 32)
    state = {k: v.contiguous() for k, v in source.net.state_dict().items()}
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state} if name == "wrn_demo" else state, path)
    torch.manual_seed(2)
    target = Teacher(get_spec(name), 10, 32)
    fresh = {k: v.clone() for k, v in target.net.state_dict().items()}
    load_backbone_weights(target, path)
    prefix = get_spec(name).head_prefix
    loaded = target.net.state_dict()
    for k, v in loaded.items():
        if k.startswith(prefix):
            assert torch.equal(v, fresh[k]), f"head {k} must stay fresh"
        else:
            assert torch.equal(v, state[k]), k
    assert any(not torch.equal(loaded[k], fresh[k]) for k in loaded if not k.startswith(prefix))


def test_load_backbone_weights_mismatch(tmp_path):
    from teacher_cache.small_nets import SmallResNet
    cnn = tmp_path / "cnn.pt"
    torch.save(Teacher(get_spec("wrn_demo"), 10, 32).net.state_dict(), cnn)
    with pytest.raises(ValueError, match=r"teacher vit_demo: weights file .*cnn\.pt does not fit the architecture"):
        load_backbone_weights(Teacher(get_spec("vit_demo"), 10, 32), cnn)
    narrow = tmp_path / "narrow.pt"  # same names, other widths
    torch.save(SmallResNet(10, widths=(16, 32, 64, 128)).state_dict(), narrow)
    with pytest.raises(ValueError, match=r"teacher wrn_demo: weights file .*narrow\.pt does not fit.*size mismatch"):
        load_backbone_weights(Teacher(get_spec("wrn_demo"), 10, 32), narrow)
