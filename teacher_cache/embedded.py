"""Teacher weights that ship with hakd, each checked against its recorded sha256 before it is loaded.

`vit_demo_shape.safetensors` is `vit_demo` pretrained on shape-only data by `teacher_cache/pretrain_demo.py`
(the demo's stand-in for a pretrained CLIP ViT: shape-biased where the pipeline's own training on
the shortcut data makes it texture-biased). A config uses it through `teacher_*.embedded`.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from infra.errors import UserError
from infra.shipped_weights import EMBEDDED, uses_embedded  # noqa: F401 (fit and the tests read them from here)

WEIGHTS_DIR = Path(__file__).parent / "weights"  # the files of infra.shipped_weights.EMBEDDED


class EmbeddedWeightsError(UserError, ValueError):
    """The embedded weights file is missing or is not the file hakd was shipped with."""


def embedded_identity(tc, data) -> str:
    """":<sha256>" of the embedded weights `tc` starts from, else "": part of a fit's identity, so that
    regenerated weights are refitted rather than reused."""
    return f":{EMBEDDED[tc.name][1]}" if uses_embedded(tc, data) else ""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def embedded_weights(name: str) -> Path:
    """The embedded weights file of teacher `name`, after checking its sha256 against the recorded one."""
    if name not in EMBEDDED:
        raise EmbeddedWeightsError(f"hakd ships weights for {', '.join(EMBEDDED)} only, not {name}")
    file, expected, _ = EMBEDDED[name]
    path = WEIGHTS_DIR / file
    record = f'EMBEDDED["{name}"] in infra/shipped_weights.py'
    if not path.is_file():
        raise EmbeddedWeightsError(
            f"embedded weights {path} are missing; reinstall hakd, or retrain them with `python -m "
            f"teacher_cache.pretrain_demo --out {path}` and record the sha256 it prints in {record}")
    actual = sha256_file(path)
    if actual != expected:
        # a retrained file differs from the released one by machine (floating-point order), so the fix for
        # a deliberate retraining is to record its hash, and for anything else to restore the released file
        raise EmbeddedWeightsError(
            f"embedded weights {path} are not the file this hakd was released with (sha256 {actual}, recorded "
            f"{expected[:16]}...); if you retrained them with `python -m teacher_cache.pretrain_demo`, update "
            f"the recorded hash in {record} to {actual}; otherwise reinstall hakd")
    return path


def load_embedded(teacher) -> None:
    """Load the verified embedded weights into a `Teacher` (tensors only), its head too when the class count fits."""
    from safetensors.torch import load_file
    state = load_file(str(embedded_weights(teacher.spec.name)))
    prefix = teacher.spec.head_prefix
    if state[f"{prefix}weight"].shape[0] != teacher.head().out_features:  # another dataset: the head stays fresh
        state = {k: v for k, v in state.items() if not k.startswith(prefix)}
    missing, unexpected = teacher.net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(prefix)]
    if missing or unexpected:  # cannot happen for the recorded file and the registered architecture
        raise EmbeddedWeightsError(f"embedded weights of {teacher.spec.name} do not fit its architecture "
                                   f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
