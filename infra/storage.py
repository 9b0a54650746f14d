"""Where the cache stores and fitted teachers live: a local or shared-filesystem path, or an object-store URL.

`cache.location` names the root (None: OUT); under it `cache/<teacher>.zarr` and `teachers/<role>.pt|json`.
A path is used as it is; a URL (`s3://bucket/prefix`) goes through fsspec (s3fs), and zarr opens it with
its own `FsspecStore`. Credentials come from the usual places (AWS_* variables, ~/.aws, an instance role),
the endpoint of an S3-compatible server from AWS_ENDPOINT_URL. Durability: a local file is fsynced before
it counts as written; an object-store PUT is durable once it returns (S3 acknowledges only stored objects).
Failures to reach a location become one-line StorageErrors that say what is wrong and how to fix it.
"""
from __future__ import annotations

import io
import os
import socket
import uuid
from contextlib import contextmanager, suppress
from pathlib import Path

from infra import failures
from infra.errors import UserError


class StorageError(UserError, RuntimeError):
    """A storage location that cannot be used; the message names the location (and node) and the fix."""


def is_url(path) -> bool:
    return "://" in str(path)


def root(location: str | None, out) -> str:
    """The root of the stores and teachers: `cache.location`, else OUT."""
    return location.rstrip("/") if location else str(out)


def join(base, *parts: str) -> Path | str:
    """`base` / parts: a Path for a local path, a str for a URL (pathlib would fold `s3://` into `s3:/`)."""
    return "/".join([str(base).rstrip("/"), *parts]) if is_url(base) else Path(base, *parts)


def _fs(path: str):
    import fsspec
    return fsspec.core.url_to_fs(path)


def explain(e: BaseException) -> str:
    """A short reason for a storage failure, with the usual fix."""
    name = type(e).__name__
    text = str(e).splitlines()[0] if str(e) else name
    if name in ("NoCredentialsError", "PartialCredentialsError") or "credentials" in text.lower():
        return ("no credentials for the object store: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE / an instance role)")
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower() or "specified bucket" in text.lower():
        return f"the bucket does not exist ({text}): create it or fix cache.location"
    if isinstance(e, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return f"access denied ({text}): check the credentials and the bucket's policy"
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionError") \
            or isinstance(e, ConnectionError):
        return f"the endpoint cannot be reached ({text}): check AWS_ENDPOINT_URL and the network"
    return f"{name}: {text}"


@contextmanager
def reported(what: str, missing: bool = False):
    """Turn any failure of the storage layer inside the block into a one-line StorageError about `what`
    (with `missing`, a FileNotFoundError stays one: the caller reports a missing file its own way)."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError:
        if missing:
            raise
        # writing or listing: on an object store only a missing bucket makes the path not found
        raise StorageError(f"{what}: the bucket does not exist: create it or fix cache.location") from None
    except Exception as e:
        raise StorageError(f"{what}: {explain(e)}") from None


def exists(path: Path | str) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    with reported(f"cannot reach {path}"):
        fs, p = _fs(path)
        return fs.exists(p)


def read_bytes(path: Path | str) -> bytes:
    if not is_url(path):
        return Path(path).read_bytes()
    with reported(f"cannot read {path}", missing=True):
        fs, p = _fs(path)
        return fs.cat_file(p)


def write_bytes(path: Path | str, data: bytes) -> None:
    """Write a whole file: locally to a temporary name, fsynced, then renamed (never half-written under
    its name); to an object store as one PUT, which is atomic and durable once it returns."""
    if is_url(path):
        with reported(f"cannot write {path}"):
            fs, p = _fs(path)
            fs.pipe_file(p, data)
        return
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as e:  # a full disk fails the write without a file name: the error names the target
        with suppress(OSError):  # the part written would only take room
            tmp.unlink(missing_ok=True)
        if e.filename in (None, str(tmp)):
            raise OSError(e.errno, e.strerror, str(target)) from e
        raise


def delete(path: Path | str) -> None:
    if not is_url(path):
        Path(path).unlink(missing_ok=True)
        return
    with reported(f"cannot delete {path}"):
        fs, p = _fs(path)
        if fs.exists(p):
            fs.rm(p, recursive=True)


def load_tensors(path: Path | str) -> dict:
    """A torch state dict from a local path or URL, unpickling nothing but tensors."""
    import torch
    return torch.load(io.BytesIO(read_bytes(path)), map_location="cpu", weights_only=True)


def save_tensors(state: dict, path: Path | str) -> None:
    import torch
    buf = io.BytesIO()
    torch.save(state, buf)
    write_bytes(path, buf.getvalue())


def zarr_store(path: Path | str):
    """zarr's own store for `path`: LocalStore for a path, FsspecStore for a URL."""
    from zarr.storage import FsspecStore, LocalStore
    if not is_url(path):
        return LocalStore(str(path))
    with reported(f"cannot open {path}"):
        return FsspecStore.from_url(str(path), read_only=False)


def node_name() -> str:
    """This process's node: its Ray node id (when inside Ray) and host name."""
    host = socket.gethostname()
    try:
        import ray
        if ray.is_initialized():
            return f"{host} (Ray node {ray.get_runtime_context().get_node_id()[:12]})"
    except Exception:  # outside Ray the host name says enough
        pass
    return host


def leave_mark(location: str) -> tuple[str, str]:
    """Write a small object under `location` that every node must then see: (its key, its content)."""
    key, payload = str(join(location, f".hakd-mark-{uuid.uuid4().hex}")), uuid.uuid4().hex
    write_bytes(key, payload.encode())
    return key, payload


def probe(location: str, node: str | None = None, mark: tuple[str, str] | None = None) -> None:
    """Write, read back and delete a small object under `location`, and read the driver's `mark` there (a path
    that is only local to each node passes the first check, not the second); a StorageError names the node."""
    node = node or node_name()
    key = join(location, f".hakd-probe-{uuid.uuid4().hex}")
    payload = uuid.uuid4().bytes
    try:
        write_bytes(key, payload)
        if read_bytes(key) != payload:
            raise StorageError("what was read back differs from what was written")
        delete(key)
        if mark is not None and (not exists(mark[0]) or read_bytes(mark[0]).decode() != mark[1]):
            raise StorageError(f"it does not see {mark[0]}, which the driver wrote: the location is not shared; "
                               f"mount the same filesystem there on every node, or use an s3:// URL")
    except StorageError as e:
        raise StorageError(f"node {node} cannot use the storage location {location}: {_reason(e)}") from None
    except OSError as e:  # a local or mounted path
        if e.errno in failures.DISK_ERRNOS:  # a full, read-only or forbidden disk: mounting elsewhere is no fix
            raise StorageError(f"node {node} cannot use the storage location {location}: "
                               f"{failures.disk_message(e, location)}") from None
        raise StorageError(f"node {node} cannot use the storage location {location}: {e}; mount the shared "
                           f"filesystem there on every node, or set cache.location to a URL all nodes reach") from None


def _reason(e: StorageError) -> str:
    text = str(e)
    return text.split(": ", 1)[1] if ": " in text and text.startswith("cannot ") else text
