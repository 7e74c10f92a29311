"""One archive per GPU call: the runs' logs out of an output directory (``pack``), and back into a results tree
(``unpack``).

A call of the GPU machine returns at most 8 files of 16 MiB, and nothing on it survives the call; the checkpoints
(hundreds of MB with the optimizer) cannot come back and are not needed to draw the charts. ``pack`` therefore writes
only ``runs/<name>/log.json`` (complete or not: an unfinished run's log still holds its measured wall time per step)
and the call's console logs and summary (``calls/*``) into one ``.tar.gz``. ``unpack`` merges archives from several
calls and sessions into one results tree, where ``plot`` draws from them and ``call --results`` skips what is done.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .jsonio import write_json
from .train import LOG_NAME

__all__ = ["ARCHIVE_LIMIT_BYTES", "completed_runs", "pack", "unpack"]

#: The most one returned file may hold (16 MiB); ``pack`` refuses to write a larger archive.
ARCHIVE_LIMIT_BYTES = 16 * 2**20

# Names allowed for runs and call files inside an archive: no separators, no "..", nothing hidden.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _members(out: Path) -> list[tuple[str, Path]]:
    """``(archive name, file)`` of what ``pack`` takes from ``out``: run logs and call files, sorted."""
    found = []
    runs = out / "runs"
    if runs.is_dir():
        for run_dir in sorted(runs.iterdir()):
            log = run_dir / LOG_NAME
            if _NAME.fullmatch(run_dir.name) and log.is_file():
                found.append((f"runs/{run_dir.name}/{LOG_NAME}", log))
    calls = out / "calls"
    if calls.is_dir():
        for path in sorted(calls.iterdir()):
            if _NAME.fullmatch(path.name) and path.is_file():
                found.append((f"calls/{path.name}", path))
    return found


def pack(out: str | os.PathLike[str], archive: str | os.PathLike[str], runs: Iterable[str] | None = None) -> list[str]:
    """Write the logs of ``out`` (``runs/*/log.json``, ``calls/*``) into a ``.tar.gz``; never a checkpoint.

    Args:
        out: an output directory of ``sweep``/``call``. archive: the file to write (its directory is created).
        runs: only these runs' logs (default: every run under ``out/runs``); call files are always included.

    Returns:
        The archive's member names.

    Raises:
        ValueError: nothing to pack, or the archive is larger than :data:`ARCHIVE_LIMIT_BYTES` (it is removed).
    """
    out, archive = Path(out), Path(archive)
    wanted = None if runs is None else set(runs)
    members = [
        (name, path)
        for name, path in _members(out)
        if wanted is None or not name.startswith("runs/") or name.split("/")[1] in wanted
    ]
    if not members:
        raise ValueError(f"nothing to pack in {out} (no runs/*/{LOG_NAME}, no calls/*)")
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_name(archive.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for name, path in members:
            # A log is rewritten atomically while a run trains; reading it whole once gives a consistent copy.
            data = path.read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), int(path.stat().st_mtime), 0o644
            tar.addfile(info, io.BytesIO(data))
    size = tmp.stat().st_size
    if size > ARCHIVE_LIMIT_BYTES:
        tmp.unlink()
        raise ValueError(f"{archive}: {size} bytes, over the {ARCHIVE_LIMIT_BYTES} a returned file may hold")
    os.replace(tmp, archive)
    return [name for name, _ in members]


def completed_runs(results: str | os.PathLike[str] | None) -> dict[str, dict[str, Any]]:
    """The completed runs' logs under ``<results>/runs/`` (empty when ``results`` is None or missing).

    Args:
        results: a results tree (as written by ``sweep`` or ``unpack``).

    Returns:
        ``{run name: log}`` for logs with ``completed`` true.
    """
    found: dict[str, dict[str, Any]] = {}
    if results is None or not (Path(results) / "runs").is_dir():
        return found
    for run_dir in sorted((Path(results) / "runs").iterdir()):
        path = run_dir / LOG_NAME
        if path.is_file():
            log = json.loads(path.read_text(encoding="utf-8"))
            if log.get("completed"):
                found[run_dir.name] = log
    return found


def unpack(archive: str | os.PathLike[str], into: str | os.PathLike[str]) -> dict[str, str]:
    """Merge one archive of :func:`pack` into the results tree ``into``.

    Run logs go to ``into/runs/<name>/log.json``: a completed log replaces a missing or unfinished one; an unfinished
    log replaces only a missing one or an unfinished one with fewer records; a completed run already there stays (a
    second copy of a finished run is not a second seed). Call files go to ``into/calls/<archive name>/``, so calls of
    several sessions do not overwrite each other. Members other than these (any other path, links,
    directories, checkpoints) are skipped.

    Args:
        archive: the ``.tar.gz``. into: the results tree (created).

    Returns:
        ``{member name: what happened}``: ``"added"``, ``"replaced unfinished"``, ``"kept existing"``, ``"skipped"``.

    Raises:
        ValueError: a completed log in the archive and one in ``into`` with different configurations, or a run log
            whose ``name`` is not its directory's.
    """
    into = Path(into)
    stem = Path(archive).name.removesuffix(".tar.gz").removesuffix(".tgz")
    actions: dict[str, str] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            is_log = len(parts) == 3 and parts[0] == "runs" and parts[2] == LOG_NAME and _NAME.fullmatch(parts[1])
            is_call = len(parts) == 2 and parts[0] == "calls" and _NAME.fullmatch(parts[1])
            if not member.isfile() or not (is_log or is_call):
                actions[member.name] = "skipped"
                continue
            handle = tar.extractfile(member)
            assert handle is not None  # a regular file always has one
            data = handle.read()
            if is_call:
                dest = into / "calls" / stem / parts[1]
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)
                actions[member.name] = "added"
                continue
            log = json.loads(data)
            if log.get("name") != parts[1]:
                raise ValueError(f"{archive}: {member.name} holds the log of {log.get('name')!r}")
            dest = into / "runs" / parts[1] / LOG_NAME
            existing = json.loads(dest.read_text(encoding="utf-8")) if dest.is_file() else None
            if existing is None:
                action = "added"
            elif existing.get("completed"):
                if log.get("completed") and log["identity"] != existing["identity"]:
                    raise ValueError(f"{parts[1]}: {archive} and {dest} hold completed runs of other configurations")
                action = "kept existing"
            elif log.get("completed"):
                action = "replaced unfinished"
            else:
                # Two unfinished copies (a run stopped at a deadline twice): the one that got further.
                further = len(log.get("records", [])) > len(existing.get("records", []))
                action = "replaced unfinished" if further else "kept existing"
            if action != "kept existing":
                dest.parent.mkdir(parents=True, exist_ok=True)
                write_json(dest, log)
            actions[member.name] = action
    return actions
