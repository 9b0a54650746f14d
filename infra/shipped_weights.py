"""The teacher weights that ship with hakd, as data: which teachers have them and when a config uses them.

The config validates `teacher_*.embedded` against this table; `teacher_cache/embedded.py` verifies
and loads the files (in `teacher_cache/weights/`).
"""
from __future__ import annotations

# teacher name -> (file in teacher_cache/weights, sha256, image size it was trained at). Regenerate with
# `python -m teacher_cache.pretrain_demo --out teacher_cache/weights/vit_demo_shape.safetensors`.
EMBEDDED = {
    "vit_demo": ("vit_demo_shape.safetensors", "e7c1317ad346c20db3d1e05fe356137c921773f2ebbb7e984d4199e8b3b7f974", 32),
}


def uses_embedded(tc, data) -> bool:
    """Whether TeacherConfig `tc` starts from embedded weights on DataConfig `data`: embedded=true, or
    embedded=null when hakd ships weights for this teacher, no weights file is given, and the data is
    what they were trained for (the generated shapes at their image size)."""
    if tc.embedded is not None:
        return tc.embedded
    return (tc.name in EMBEDDED and tc.weights is None and data.name == "shapes"
            and data.image_size == EMBEDDED[tc.name][2])
