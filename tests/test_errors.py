"""Every failure is one line: errors inside Ray tasks unwrapped, a full or read-only disk named with its path,
an unreadable image named with the fix; the traceback in a log file the line names."""
from __future__ import annotations

import errno
import io
import json

import numpy as np
import pytest
from PIL import Image

from conftest import TINY
from infra import failures, pipeline, storage
from infra.cli import main
from infra.config import DataConfig
from teacher_cache.real_datasets import UnreadableData, load_real


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("hakd: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _log_of(line: str) -> str:
    assert "(traceback: " in line, line
    path = line.rsplit("(traceback: ", 1)[1].rstrip(")")
    with open(path) as f:
        return f.read()


@pytest.mark.slow
@pytest.mark.parametrize("raised, status", [(pipeline.StageInputs("OUT/teachers/teacher_vit.pt is missing: run `hakd cache`"), 2),
                                            (ValueError("boom\nsecond line"), 1)])
def test_an_error_raised_in_a_ray_task_is_the_task_own_line(ray_session, tmp_path, monkeypatch, capsys, raised,
                                                            status):
    @ray_session.remote
    def run_task():
        raise raised

    def stage(cfg, out, overwrite=False, **_):
        return ray_session.get(run_task.remote())
    monkeypatch.setattr(pipeline, "stage_cache", stage)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["cache", "--out", str(out), *TINY]) == status
    line = _one_line(capsys.readouterr().err)
    assert "ray::" not in line and "pid=" not in line
    expected = str(raised) if status == 2 else "ValueError: boom"
    assert line.startswith(f"hakd: error: {expected} (traceback: {out / 'logs' / 'error-cache-'}")
    log = _log_of(line)
    assert "Traceback" in log and "run_task" in log and "raise raised" in log  # the task's own frames


def test_a_user_error_of_the_driver_is_its_message_alone_and_leaves_no_out(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["cache", "--out", str(out), "train.epochs=0"]) == 2
    assert _one_line(capsys.readouterr().err) == "hakd: error: train.epochs: must be >= 1"
    assert not out.exists()


def test_a_full_disk_names_the_file_and_leaves_no_partial_file(tmp_path, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")  # what a full disk raises: no file name
    monkeypatch.setattr(storage.os, "fsync", no_space)
    target = tmp_path / "teachers" / "teacher_vit.pt"
    with pytest.raises(OSError) as err:
        storage.write_bytes(target, b"x" * 1000)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(target)
    assert list(target.parent.iterdir()) == []  # the temporary file is removed
    line, status, logged = failures.describe(err.value, tmp_path)
    assert status == 2 and logged
    assert line.startswith(f"no space left writing {target} (the disk mounted at /")
    assert "free of" in line and "run the same command again" in line


def test_a_refused_temporary_file_is_reported_as_its_target(tmp_path, monkeypatch):
    def read_only(path, mode="r", *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(path))
    monkeypatch.setattr(storage, "open", read_only, raising=False)
    with pytest.raises(OSError) as err:
        storage.write_bytes(tmp_path / "config.yaml", b"x")
    assert err.value.errno == errno.EROFS and err.value.filename == str(tmp_path / "config.yaml")  # not *.tmp


@pytest.mark.parametrize("code, words", [(errno.EROFS, "is read-only"), (errno.EACCES, "permission denied on"),
                                         (errno.EDQUOT, "disk quota exceeded")])
def test_other_disk_errors_name_the_path_and_the_fix(tmp_path, code, words):
    e = OSError(code, "refused", str(tmp_path / "report" / "metrics.json"))
    line, status, _ = failures.describe(e, None)
    assert status == 2 and words in line and str(tmp_path / "report" / "metrics.json") in line


def test_an_actor_that_died_of_a_full_disk_is_a_disk_error(tmp_path):
    from ray.exceptions import RayActorError  # an actor keeps only the text of what killed it
    died = RayActorError(error_msg=f"The actor died because of an error raised in its creation task\nTraceback ...\n"
                                   f"OSError: [Errno 28] No space left on device: '{tmp_path}/cache/x.zarr/c/0'")
    line, status, logged = failures.describe(died, tmp_path)
    assert status == 2 and line.startswith(f"no space left writing {tmp_path}/cache/x.zarr/c/0 (the disk mounted at")
    line, status, _ = failures.describe(RayActorError(error_msg="The actor died\nValueError: nope"), tmp_path)
    assert (line, status) == ("a Ray actor failed: ValueError: nope", 1)


def test_a_disk_error_without_a_file_name_names_out(tmp_path):
    line, status, _ = failures.describe(OSError(errno.ENOSPC, "No space left on device"), tmp_path / "out")
    assert status == 2 and f"writing {tmp_path / 'out'} (the disk mounted at" in line


def test_the_log_goes_to_the_temporary_directory_when_out_cannot_take_it(tmp_path, monkeypatch):
    monkeypatch.setattr(failures.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    e = RuntimeError("x")
    assert failures.write_log(e, tmp_path / "absent", "cache").parent == tmp_path / "tmp"  # no OUT is created
    assert not (tmp_path / "absent").exists()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "logs").write_text("a file where the log folder would go")
    assert failures.write_log(e, tmp_path / "out", "cache").parent == tmp_path / "tmp"


@pytest.mark.slow
def test_a_full_disk_while_saving_a_teacher_exits_2_and_the_same_command_then_finishes(ray_session, tmp_path,
                                                                                      monkeypatch, capsys):
    """The issue's case: `hakd cache` fills the disk saving a fitted teacher; once there is room it resumes."""
    real_open = open

    def full_under_teachers(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "w" in mode and "/teachers/" in str(path):
            def write(_data):
                raise OSError(errno.ENOSPC, "No space left on device")
            f.write = write
        return f
    monkeypatch.setattr(storage, "open", full_under_teachers, raising=False)
    out = tmp_path / "out"
    assert main(["cache", "--out", str(out), *TINY]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"no space left writing {out / 'teachers' / 'teacher_vit.pt'} (the disk mounted at" in line
    assert "OSError" in _log_of(line)
    assert not list((out / "teachers").glob("*.tmp"))
    monkeypatch.undo()  # room is made
    assert main(["cache", "--out", str(out), *TINY]) == 0
    assert main(["verify", "--out", str(out)]) == 0


@pytest.mark.slow
def test_packing_onto_a_disk_without_room_is_refused_before_ffcv_starts(tiny_cache, tmp_path, monkeypatch):
    """ffcv's writer processes die on a full disk and leave it waiting forever: the room is checked first."""
    from types import SimpleNamespace

    from student_cache import quiet, stores_of
    from student_train import pack
    cfg, out = tiny_cache
    monkeypatch.setattr(pack.shutil, "disk_usage", lambda p: SimpleNamespace(total=64 << 20, used=63 << 20,
                                                                              free=1 << 20))
    with pytest.raises(OSError) as err:
        pack.pack(stores_of(cfg, out), tmp_path / "train", workers=1, log=quiet)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / "train" / "data.beton.tmp")
    assert "MiB are free" in err.value.strerror and not (tmp_path / "train" / "data.beton.tmp").exists()
    line, status, _ = failures.describe(err.value, tmp_path)
    assert status == 2 and line.startswith(f"no space left writing {tmp_path / 'train' / 'data.beton.tmp'} (the disk")
    assert "; packing needs about " in line


def _imagefolder(root, broken: str) -> DataConfig:
    """root/{train,test}/<class>/*.jpg, 4 + 3 images per class, one of them cut short after half its bytes."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 3)):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buf, format="JPEG")
                (root / split / c / f"{i}.jpg").write_bytes(buf.getvalue())
    data = (root / broken).read_bytes()
    (root / broken).write_bytes(data[:len(data) // 2])
    return DataConfig(name="imagefolder", root=str(root), image_size=24, test_size=0)


def test_a_truncated_jpeg_is_named_with_the_fix(tmp_path):
    data = _imagefolder(tmp_path, "train/dog/2.jpg")
    with pytest.raises(UnreadableData) as err:
        load_real(data, "train")
    assert str(err.value).startswith(f"{tmp_path / 'train' / 'dog' / '2.jpg'} cannot be read as an image (")
    assert "data.skip_unreadable=true" in str(err.value)


def test_skip_unreadable_leaves_the_file_out_and_lists_it(tmp_path):
    data = _imagefolder(tmp_path, "train/dog/2.jpg")
    data.skip_unreadable = True
    split = load_real(data, "train")
    assert len(split["images"]) == len(split["labels"]) == 7
    assert split["labels"].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert split["skipped"] == [str(tmp_path / "train" / "dog" / "2.jpg")]
    assert load_real(data, "clean")["skipped"] == []


@pytest.mark.slow
def test_hakd_cache_on_a_truncated_jpeg_exits_2_or_with_skipping_reports_the_count(ray_session, tmp_path, capsys):
    _imagefolder(tmp_path / "data", "train/cat/1.jpg")
    overrides = [*TINY, "data.name=imagefolder", f"data.root={tmp_path / 'data'}", "data.image_size=32",
                 "cache.shard_size=16", "cache.chunk_size=8"]
    out = tmp_path / "out"
    assert main(["cache", "--out", str(out), *overrides]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"{tmp_path / 'data' / 'train' / 'cat' / '1.jpg'} cannot be read as an image" in line
    assert main(["cache", "--out", str(out), *overrides, "data.skip_unreadable=true"]) == 0
    assert "1 unreadable image(s) skipped" in capsys.readouterr().out
    recorded = json.loads((out / "cache" / "run.json").read_text())["unreadable_skipped"]
    assert recorded == [str(tmp_path / "data" / "train" / "cat" / "1.jpg")]
