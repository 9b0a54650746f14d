"""The generated demo dataset: deterministic, balanced, and its variants differ as intended."""
import numpy as np
import pytest

from teacher_cache.shapes import SHAPES, make_shapes


def test_deterministic_and_seed_dependent():
    a, b = make_shapes(60, 32, seed=3), make_shapes(60, 32, seed=3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    c = make_shapes(60, 32, seed=4)
    assert not np.array_equal(a["images"], c["images"])


def test_balanced_classes_and_formats():
    d = make_shapes(103, 24, seed=0)
    counts = np.bincount(d["labels"], minlength=len(SHAPES))
    assert counts.max() - counts.min() <= 1
    assert d["images"].shape == (103, 24, 24, 3) and d["images"].dtype == np.uint8
    assert d["masks"].shape == (103, 24, 24) and d["masks"].dtype == bool
    # every shape is visible: it covers a reasonable part of the image
    cover = d["masks"].mean(axis=(1, 2))
    assert cover.min() > 0.03 and cover.max() < 0.8


def test_texture_correlation_controls_the_shortcut():
    d = make_shapes(2000, 16, seed=0, texture_correlation=0.85)
    agree = (d["texture_labels"] == d["labels"]).mean()
    assert 0.83 < agree < 0.90  # 0.85 + 0.15 / 10 by chance
    t = make_shapes(500, 16, seed=0, variant="texture")
    assert (t["texture_labels"] != t["labels"]).all()  # cue conflict in every image


def test_occluded_is_clean_with_patches_covered():
    clean = make_shapes(50, 32, seed=1, variant="clean")
    occ = make_shapes(50, 32, seed=1, variant="occluded", occlusion_fraction=0.4)
    assert np.array_equal(clean["labels"], occ["labels"])
    changed = (clean["images"] != occ["images"]).any(-1)
    # patches of 4x4 on an 8x8 grid: about 40% of the pixels, never all
    assert 0.3 < changed.mean() < 0.45
    assert np.array_equal(clean["masks"], occ["masks"])


def test_train_and_test_are_different_images():
    tr, te = make_shapes(50, 32, seed=0, variant="train"), make_shapes(50, 32, seed=0, variant="clean")
    assert not np.array_equal(tr["images"], te["images"])


def test_unknown_variant():
    with pytest.raises(ValueError, match="variant"):
        make_shapes(10, 16, seed=0, variant="blurred")


def test_shape_bias_only_where_textures_are_class_labels():
    from analysis.evaluate import plan_tasks
    from infra.config import CONFIG_DIR, load_config
    from teacher_cache.bias import shape_bias_note

    demo_tasks = plan_tasks(load_config(None, []))
    assert ("teacher_vit", "shape_bias", "texture") in demo_tasks
    assert shape_bias_note("shapes")[0]
    # FashionMNIST's background textures belong to no class: the texture variant keeps its accuracy task only
    fmnist_tasks = plan_tasks(load_config(CONFIG_DIR / "paper_fashionmnist.yaml", []))
    assert ("teacher_vit", "accuracy", "texture") in fmnist_tasks
    assert not [t for t in fmnist_tasks if t[1] == "shape_bias"]
    applies, note = shape_bias_note("fashionmnist")
    assert not applies and note.startswith("not measured")
    assert not shape_bias_note("cifar10")[0]
