"""The cache checks its storage location from every node an actor may run on before fitting any teacher."""
from __future__ import annotations

import pytest

from infra import storage
from infra.config import load_config
from teacher_cache import job

from conftest import TINY


@pytest.mark.slow
def test_probe_runs_on_the_actor_nodes_and_names_a_node_that_cannot_see_the_location(ray_session, tmp_path,
                                                                                       monkeypatch):
    cfg = load_config(None, TINY)
    assert job.actor_nodes(cfg, gpus=0) == [ray_session.get_runtime_context().get_node_id()]
    job.probe_actor_nodes(cfg, tmp_path, gpus=0)  # the location is shared: passes, and leaves nothing behind
    assert not list(tmp_path.iterdir())
    # a location each node has its own copy of: the driver's mark is not there for the node to read
    monkeypatch.setattr(storage, "leave_mark", lambda location: (str(tmp_path / "only-on-the-driver"), "x"))
    with pytest.raises(storage.StorageError, match=r"node .* cannot use the storage location .* does not see"):
        job.probe_actor_nodes(cfg, tmp_path, gpus=0)


@pytest.mark.slow
def test_a_node_that_cannot_write_fails_before_any_teacher_is_fitted(ray_session, tmp_path, monkeypatch):
    fitted = []

    def unusable(cfg, out, gpus):
        raise storage.StorageError("node n cannot use the storage location L: no such mount")
    monkeypatch.setattr(job, "probe_actor_nodes", unusable)
    monkeypatch.setattr(job, "ensure_teacher", lambda *a, **k: fitted.append(a))
    with pytest.raises(storage.StorageError, match="no such mount"):
        job.run_cache(load_config(None, TINY), tmp_path / "out")
    assert fitted == []
