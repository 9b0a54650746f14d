"""Teacher heads: the linear probe used for real teachers, and the saved, weights-only fit."""
import json

import torch

from infra.config import load_config
from teacher_cache.fit import fit_teacher, head_mode, load_fitted


def test_linear_probe_learns_from_frozen_features(tmp_path):
    # a randomly initialised backbone: the probe alone must lift accuracy well above chance (10%)
    cfg = load_config(None, ["data.train_size=400", "data.test_size=200", "teacher_cnn.head=probe"])
    assert head_mode(cfg.teacher_cnn, cfg.data) == "probe" and head_mode(cfg.teacher_vit, cfg.data) == "pretrained"
    torch.manual_seed(0)
    info = fit_teacher(cfg, "teacher_cnn", tmp_path)
    assert info["mode"] == "probe"
    assert info["clean_accuracy"] > 0.3
    saved = json.loads((tmp_path / "teachers" / "teacher_cnn.json").read_text())
    assert saved["clean_accuracy"] == info["clean_accuracy"]
    teacher = load_fitted(cfg, "teacher_cnn", tmp_path)
    # the backbone stayed frozen: only the head differs from a fresh build with the same seed
    torch.manual_seed(cfg.seed)
    fresh = type(teacher)(teacher.spec, 10, cfg.data.image_size)
    changed = {k for k, v in teacher.state_dict().items() if not torch.equal(v, fresh.state_dict()[k])}
    assert changed == {"net.fc.weight", "net.fc.bias"}
