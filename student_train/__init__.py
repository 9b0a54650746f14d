"""Students trained from a teacher cache; for your own training loop (docs/api.md):

    from student_train import open_run, KDObjective, PCAProjector, GLProjector, HintRegressor

The names load on first use, so that `hakd` and the Ray workers, which import the submodules, do not
pay for the whole API's imports.
"""
from importlib import import_module

_PUBLIC = {
    "open_run": "student_train.api", "KDData": "student_train.api", "KDBatch": "student_train.api",
    "PackedCacheError": "student_train.api",
    "KDObjective": "student_train.losses",
    "PCAProjector": "student_train.projectors", "GLProjector": "student_train.projectors",
    "HintRegressor": "student_train.projectors",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'student_train' has no attribute {name!r}")
    return getattr(import_module(_PUBLIC[name]), name)
