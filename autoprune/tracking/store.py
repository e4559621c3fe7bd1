"""Where MLflow's data lives, and a client that survives SQLite's lock and keeps MLflow's INFO lines quiet.

By default everything lives under ``./mlruns`` (``mlruns/mlflow.db`` and ``mlruns/artifacts``), so one
folder holds a project's history. ``tracking_uri`` or ``MLFLOW_TRACKING_URI`` point elsewhere: a database
or server URI as MLflow knows them, or a plain folder, which gets the same layout as ``./mlruns``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import socket
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from autoprune.files import atomic_path, cache_root
from autoprune.processes import alive

DEFAULT_DIR = "mlruns"
REGISTRY_ENV = "MLFLOW_REGISTRY_URI"
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
# SQLite already waits 20 s for a lock (MLflow sets busy_timeout); these retries cover longer bursts of
# several worker processes writing at once.
LOCK_RETRIES = 6
# MLflow and alembic log schema creation and migrations at INFO ("Creating initial MLflow database
# tables..."): bookkeeping of the store, not something a user of the search acts on.
_CHATTY_LOGGERS = ("mlflow.store.db.utils", "mlflow.store.sqlalchemy_store", "alembic", "alembic.runtime.migration")


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the SQLite store under ``./mlruns``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or sqlite_uri(Path.cwd() / DEFAULT_DIR / DB_FILE)


def sqlite_uri(db: Path) -> str:
    return f"sqlite:///{db.expanduser().resolve()}"


def resolve_store(tracking_uri: str | None = None) -> tuple[str, Path | None]:
    """(tracking URI, artifact folder); the folder is None where the store chooses (servers, other databases).

    SQLite paths become absolute, so that worker processes and the UI find the same file whatever their
    working directory, and the artifacts sit next to the database.
    """
    uri = tracking_uri or default_tracking_uri()
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return sqlite_uri(db), db.expanduser().resolve().parent / ARTIFACTS_DIR
    if "://" not in uri and not uri.startswith(("file:", "sqlite:", "databricks")):
        folder = Path(uri).expanduser().resolve()
        return sqlite_uri(folder / DB_FILE), folder / ARTIFACTS_DIR
    return uri, None


def check_readable(tracking_uri: str | None) -> None:
    """Refuse a SQLite store whose folder does not exist, the default ``./mlruns`` included: there is
    nothing to read, and a reader (the UI) must not create one. A search creates its store's folder."""
    from autoprune.errors import AutopruneError

    uri, _ = resolve_store(tracking_uri)
    folder = Path(uri.removeprefix("sqlite:///")).parent
    if uri.startswith("sqlite:///") and not folder.is_dir():
        why = "is a file, not a folder" if folder.exists() else "does not exist"
        raise AutopruneError("--tracking-uri", tracking_uri or uri, f"holds no MLflow store ({folder} {why}): run a search first, or point it at one")


def check_writable_store(tracking_uri: str | None, *, field: str = "--tracking-uri", damage: bool = True) -> None:
    """Refuse a SQLite store this process could not write (a read-only file, a folder under a file, a folder it
    may not write), before the work whose results it would log; ``damage``: a damaged store is refused too
    (an export's models; a search goes on untracked and says so instead)."""
    from autoprune.errors import AutopruneError

    uri, artifacts = resolve_store(tracking_uri)
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri.removeprefix("sqlite:///"))
    given = tracking_uri or uri
    if db.is_dir():
        raise AutopruneError(field, given, f"names a folder as the database file ({db})")
    if db.exists() and not os.access(db, os.W_OK):
        raise AutopruneError(field, given, f"is read-only ({db} cannot be written)")
    for folder in (db.parent, artifacts):
        if folder is None:
            continue
        existing = folder
        while not existing.exists() and existing.parent != existing:
            existing = existing.parent
        if not existing.is_dir():
            raise AutopruneError(field, given, f"cannot hold a store: {existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise AutopruneError(field, given, f"is read-only (the folder {existing} cannot be written)")
    problem = store_damage(db) if damage else None
    if problem:
        raise AutopruneError(field, given, f"is damaged ({problem}): move it aside (a new one is made) or point --tracking-uri elsewhere")


# Above this size the store is checked by its header alone: a full check reads every page.
FULL_CHECK_BYTES = 64 * 2**20


def store_damage(db: Path) -> str | None:
    """Why the SQLite file ``db`` cannot be an MLflow store (not SQLite, cut short, corrupt), or None when it
    looks whole or does not exist. A damaged store made every MLflow call fail, one by one, in silence."""
    if not db.is_file():
        return None
    size = db.stat().st_size
    if size == 0:
        return None  # SQLite makes an empty file a new database
    with db.open("rb") as handle:
        header = handle.read(100)
    if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
        return "not an SQLite database"
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    # the header's page count is valid when its change counter matches the one it was written with; with a
    # write-ahead log beside it, the file may lag the header while a checkpoint runs, and the check below says
    wal = db.with_name(db.name + "-wal")
    settled = not (wal.is_file() and wal.stat().st_size > 0)
    if settled and header[24:28] == header[92:96] and pages * page_size > size:
        return f"cut short: {size} of {pages * page_size} bytes"
    if size <= FULL_CHECK_BYTES:
        try:
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=20)) as connection:
                row = connection.execute("PRAGMA quick_check(1)").fetchone()
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                return None  # another process writes it: alive, not damaged
            return str(exc)
        except sqlite3.DatabaseError as exc:
            return str(exc)
        if row and row[0] != "ok":
            return str(row[0])
    return None


class DamagedStore(Exception):
    """The tracking store exists but cannot be read as one: tracking stops, said in one line, the search goes on."""


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


def quiet_mlflow() -> None:
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def create_whole(tracking_uri: str) -> None:
    """Create a SQLite store that does not exist yet complete, or not at all.

    MLflow builds a new store's schema in dozens of steps, each committed on its own: a search killed in
    those seconds left a database that every later search and the UI refused ("table ... already exists").
    The schema is built in a scratch file beside the store and hard-linked into place, which either creates
    the store whole or fails because another process created it first.
    """
    if not tracking_uri.startswith("sqlite:///"):
        return
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    if db.exists() and not _empty(db):
        return
    if db.exists():
        # An empty file (a store cut to nothing, a `touch`) is a new database to SQLite, and MLflow would build
        # its schema in place, step by step: it is replaced whole like a missing one, and said so, since a
        # store that held runs has lost them (a resumed study logs its trials again).
        print(
            f"autoprune: the MLflow store {db} is empty (0 bytes): a new one is made there; the runs it held are lost, "
            "a resumed search logs its study's trials again",
            file=sys.stderr,
            flush=True,
        )
        db.unlink(missing_ok=True) if _empty(db) else None
        if db.exists():
            return
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    _, artifacts = resolve_store(tracking_uri)
    db.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    _remove_dead_scratch(db, host)
    scratch = db.with_name(f".{db.name}.{host}.{os.getpid()}.{threading.get_ident()}.new")
    root = artifacts.as_uri() if artifacts else None
    try:
        if not _from_schema_copy(scratch, root):
            SqlAlchemyStore(sqlite_uri(scratch), root).engine.dispose()
            _keep_schema(scratch)
        try:
            os.link(scratch, db)
        except FileExistsError:
            pass
    finally:
        scratch.unlink(missing_ok=True)


def _empty(db: Path) -> bool:
    try:
        return db.stat().st_size == 0
    except FileNotFoundError:
        return False


def _schema_copy() -> Path:
    """An empty store of this MLflow version, kept in the cache: MLflow builds a new store's schema through
    its whole migration history (measured here: 1.3 s of the tracker's CPU, taken from the first trials),
    while a copy opens in 30 ms. The copy holds no experiment, so opening it makes MLflow's Default
    experiment with the new store's own artifact folder."""
    import mlflow

    return cache_root() / "mlflow" / f"empty-store-{mlflow.__version__}.db"


def _from_schema_copy(scratch: Path, artifact_root: str | None) -> bool:
    """Build ``scratch`` from the kept schema; False (and no scratch) when there is none or it fails to open.
    The copy is opened under a name of its own: MLflow keeps an engine per URI, and one left holding a
    refused file must not serve the store built next under the scratch's name."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    copy = scratch.with_name(f"{scratch.name}-copy")
    try:
        shutil.copyfile(_schema_copy(), copy)
        SqlAlchemyStore(sqlite_uri(copy), artifact_root).engine.dispose()
        copy.replace(scratch)
    except Exception:  # noqa: BLE001 - none kept yet, or one this MLflow refuses: build the schema instead
        return False
    finally:
        copy.unlink(missing_ok=True)
    return True


def _keep_schema(store: Path) -> None:
    """Keep a just-built store, less its Default experiment (whose artifact folder is that store's), as the
    schema later stores copy. Best effort: without it, the next store is built as this one was."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    try:
        with atomic_path(_schema_copy()) as tmp:
            shutil.copyfile(store, tmp)
            with contextlib.closing(sqlite3.connect(tmp)) as connection, connection:
                connection.execute("DELETE FROM experiments WHERE experiment_id = ?", (int(SqlAlchemyStore.DEFAULT_EXPERIMENT_ID),))
    except (OSError, sqlite3.Error):
        pass


def _remove_dead_scratch(db: Path, host: str) -> None:
    """Scratch files (and their journals) that a process of this host killed mid-creation left behind.
    Another host's are left alone: its process ids mean nothing here."""
    for path in db.parent.glob(f".{db.name}.{host}.*.new*"):
        pid = path.name.removeprefix(f".{db.name}.{host}.").split(".")[0]
        if pid.isdigit() and not alive(int(pid)):
            path.unlink(missing_ok=True)


def open_client(tracking_uri: str) -> Any:
    """An MlflowClient on ``tracking_uri`` whose calls retry while SQLite reports a lock."""
    from mlflow import MlflowClient

    quiet_mlflow()
    create_whole(tracking_uri)
    if tracking_uri.startswith("sqlite:///"):
        damage = store_damage(Path(tracking_uri.removeprefix("sqlite:///")))
        if damage:
            raise DamagedStore(f"the MLflow store {tracking_uri} is damaged ({damage})")
    if is_server(tracking_uri):
        # MLflow retries an unreachable server for minutes by default; a search should not wait that long.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    return _RetryOnLock(MlflowClient(tracking_uri=tracking_uri))


def all_runs(client: Any, experiment_id: str, filter_string: str) -> Iterator[Any]:
    """Every run of the experiment that matches, page by page (MLflow returns at most 1,000 a call)."""
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


@contextlib.contextmanager
def fluent_store(tracking_uri: str) -> Iterator[Any]:
    """MLflow's process-wide tracking and registry URIs pointed at ``tracking_uri`` for the block (logging a
    model goes through MLflow's fluent API, which reads only those), then put back as they were, unset ones
    unset. Setting back what ``get_tracking_uri`` returned would pin MLflow's resolved default and export it
    as ``MLFLOW_TRACKING_URI``: a later search in the same process would then track there, not to ./mlruns,
    and a client opened on another store would read the registry of this one."""
    import mlflow
    from mlflow.tracking import is_tracking_uri_set

    tracking = mlflow.get_tracking_uri() if is_tracking_uri_set() else None
    registry = os.environ.get(REGISTRY_ENV)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield mlflow
    finally:
        mlflow.set_tracking_uri(tracking)  # None: MLflow drops its URI and unsets MLFLOW_TRACKING_URI
        mlflow.set_registry_uri(registry or "")
        if registry is None:
            os.environ.pop(REGISTRY_ENV, None)


def _is_locked(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen).lower()
        if "database is locked" in text or "database is busy" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class _RetryOnLock:
    """Wraps an MlflowClient: every call retries, with jittered backoff, while SQLite reports a lock."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            attempt = 0
            while True:
                try:
                    return method(*args, **kwargs)
                except Exception as exc:
                    attempt += 1
                    if attempt >= LOCK_RETRIES or not _is_locked(exc):
                        raise
                    time.sleep(min(5.0, 0.2 * 2**attempt) * (0.5 + random.random()))

        return call


__all__ = [
    "DamagedStore", "check_writable_store", "store_damage", "default_tracking_uri", "resolve_store", "check_readable", "is_server", "open_client", "quiet_mlflow", "DEFAULT_DIR", "DB_FILE", "ARTIFACTS_DIR",
]
