"""The embedded, shape-pretrained demo ViT: its file is verified before use, and its pretraining is reproducible."""
import shutil

import pytest
import torch

from teacher_cache import embedded
from teacher_cache.embedded import EMBEDDED, EmbeddedWeightsError, embedded_weights, load_embedded
from teacher_cache.pretrain_demo import main
from teacher_cache.shapes import make_shapes
from teacher_cache.teachers import Teacher, get_spec


def test_shipped_weights_verify_and_classify_shapes():
    path = embedded_weights("vit_demo")
    assert path.stat().st_size < 5e6
    teacher = Teacher(get_spec("vit_demo"), 10, EMBEDDED["vit_demo"][2])
    load_embedded(teacher)
    # held-out shape-only images (textures independent of the class): only the shape can be right
    d = make_shapes(200, 32, seed=123, variant="clean", texture_correlation=0.0)
    with torch.no_grad():
        pred = teacher.eval()(torch.from_numpy(d["images"]).permute(0, 3, 1, 2).float() / 255).argmax(1)
    assert (pred.numpy() == d["labels"]).mean() > 0.8  # chance is 0.1; the shipped weights measured 0.976 on 500 such


def test_tampered_or_missing_weights_are_refused_with_the_real_fix(tmp_path, monkeypatch):
    file, recorded, size = EMBEDDED["vit_demo"]
    shutil.copy(embedded.WEIGHTS_DIR / file, tmp_path / file)
    monkeypatch.setattr(embedded, "WEIGHTS_DIR", tmp_path)
    assert embedded_weights("vit_demo") == tmp_path / file
    data = bytearray((tmp_path / file).read_bytes())
    data[-1] ^= 1  # one bit of one weight: what a retraining on another machine looks like to the check
    (tmp_path / file).write_bytes(bytes(data))
    actual = embedded.sha256_file(tmp_path / file)
    with pytest.raises(EmbeddedWeightsError, match="not the file this hakd was released with") as refused:
        load_embedded(Teacher(get_spec("vit_demo"), 10, 32))
    message = str(refused.value)
    assert 'update the recorded hash in EMBEDDED["vit_demo"] in infra/shipped_weights.py to ' + actual in message
    assert "reinstall hakd" in message
    # the fix the message names is the fix: with that hash recorded, the retrained file loads
    monkeypatch.setitem(EMBEDDED, "vit_demo", (file, actual, size))
    assert embedded_weights("vit_demo") == tmp_path / file
    (tmp_path / file).unlink()
    with pytest.raises(EmbeddedWeightsError, match="missing; reinstall hakd, or retrain them with .* infra/shipped_weights.py"):
        embedded_weights("vit_demo")


@pytest.mark.slow
def test_pretraining_is_deterministic_resumable_and_recorded(tmp_path):
    import json
    from safetensors.torch import load_file
    from teacher_cache.pretrain_demo import Recipe, pretrain
    threads = torch.get_num_threads()
    tiny = ["--epochs", "2", "--images-per-epoch", "64", "--batch", "32", "--eval-images", "20"]
    try:
        for name in ("a", "b"):
            assert main(["--out", str(tmp_path / f"{name}.safetensors"), *tiny]) == 0

        class Killed(Exception):
            pass

        def killed_after_first_epoch(line):
            if '"epoch": 0' in line:
                raise Killed
        recipe = Recipe(epochs=2, images_per_epoch=64, batch=32)
        with pytest.raises(Killed):  # killed after epoch 0's checkpoint was written
            pretrain(recipe, eval_images=20, checkpoint=tmp_path / "run.ckpt", log=killed_after_first_epoch)
        resumed, _ = pretrain(recipe, eval_images=20, checkpoint=tmp_path / "run.ckpt", log=lambda line: None)
        with pytest.raises(ValueError, match="another recipe"):
            pretrain(Recipe(epochs=3, images_per_epoch=64, batch=32), checkpoint=tmp_path / "run.ckpt")
    finally:
        torch.set_num_threads(threads)
    # same arguments, same bytes: the recorded sha256 can be reproduced on the machine that made it
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    trained = load_file(str(tmp_path / "a.safetensors"))
    assert all(torch.equal(resumed[k], v) for k, v in trained.items())  # a resumed run is the unbroken run
    torch.manual_seed(0)
    fresh = Teacher(get_spec("vit_demo"), 10, 32).net.state_dict()
    assert trained.keys() == fresh.keys() and not torch.equal(trained["head.weight"], fresh["head.weight"])
    record = json.loads((tmp_path / "a.json").read_text())
    assert record["recipe"]["epochs"] == 2 and record["sha256"] == embedded.sha256_file(tmp_path / "a.safetensors")
    assert {"demo_clean_accuracy", "shape_only_accuracy", "demo_texture_shape_bias"} <= record["measured"].keys()
    assert len(record["history"]) == 2 and record["provenance"]["torch"] == torch.__version__


def test_default_demo_teacher_uses_the_embedded_weights(tmp_path):
    from infra.config import load_config
    from teacher_cache.fit import fit_teacher, head_mode, load_fitted
    from safetensors.torch import load_file

    cfg = load_config(None, ["data.train_size=40", "data.test_size=40"])
    assert head_mode(cfg.teacher_vit, cfg.data) == "pretrained"
    info = fit_teacher(cfg, "teacher_vit", tmp_path)
    assert info["mode"] == "pretrained"
    shipped = load_file(str(embedded_weights("vit_demo")))
    fitted = load_fitted(cfg, "teacher_vit", tmp_path).net.state_dict()
    assert all(torch.equal(fitted[k], v) for k, v in shipped.items())


def test_embedded_only_where_it_was_trained():
    from infra.config import ConfigError, load_config
    from teacher_cache.embedded import uses_embedded
    from teacher_cache.fit import head_mode

    demo = load_config(None, [])
    assert uses_embedded(demo.teacher_vit, demo.data) and not uses_embedded(demo.teacher_cnn, demo.data)
    other = load_config(None, ["data.name=cifar10"])  # auto: another dataset trains vit_demo as before
    assert not uses_embedded(other.teacher_vit, other.data) and head_mode(other.teacher_vit, other.data) == "trained"
    probed = load_config(None, ["data.name=cifar10", "teacher_vit.embedded=true"])
    assert head_mode(probed.teacher_vit, probed.data) == "probe"  # the shapes head means nothing there
    for override, key in [(["teacher_cnn.embedded=true"], "teacher_cnn.embedded"),
                          (["teacher_vit.embedded=true", "data.image_size=16"], "teacher_vit.embedded"),
                          (["data.name=cifar10", "teacher_vit.head=pretrained"], "teacher_vit.head")]:
        with pytest.raises(ConfigError, match=key):
            load_config(None, override)
