"""Run state on disk: the one atomic file write of the package, stage checkpoints and the RNG state.

A checkpoint is a directory ``<run>/checkpoints/stage_NNNNN/`` holding ``state.pt`` (everything needed to
continue the run exactly), optional extra exports (``lora/``) and ``SHA256SUMS`` (a checksum of every other
file in it). ``checkpoints/LATEST`` names the newest one. See docs/ARCHITECTURE.md ("Run directory") for the
crash-safety argument; in short:

* every file is written to a temporary name, fsynced and renamed (:func:`atomic_write`);
* a checkpoint is assembled in a temporary directory and renamed into place only when complete;
* a re-save of an existing stage moves the old copy aside first, and :func:`find` puts it back if a crash
  left the stage missing, so no crash point loses the last intact checkpoint;
* :func:`load` verifies the checksums, and :func:`find` falls back to the newest intact checkpoint when
  ``LATEST`` is missing, names nothing, or names a corrupt one (and says so).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import logging
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("b2diffurl.checkpoint")

VERSION = 1
STATE_FILE = "state.pt"
SUMS_FILE = "SHA256SUMS"
LATEST_FILE = "LATEST"
_PREFIX = "stage_"
_OLD = ".old-"  # an existing stage moved aside during a re-save
_TMP = ".tmp-"  # a checkpoint being assembled


class CheckpointError(Exception):
    """A run directory or checkpoint that cannot be used (not empty for a new run; missing, corrupt, or not
    from this kind of run)."""


# ----------------------------------------------------------------------------------------------- atomic files
def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (best effort: some file systems cannot fsync directories)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path | str, data: str | bytes | Callable[[Path], None]) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new content, never a mix.

    ``data`` is text, bytes, or a callable that writes the temporary path it is given (e.g. ``torch.save``).
    The temporary file is removed if the write fails.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if callable(data):
            data(tmp)
        else:
            with open(tmp, "w" if isinstance(data, str) else "wb") as fh:
                fh.write(data)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(root))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(ckpt: Path) -> list[str]:
    return sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != SUMS_FILE)


def _write_sums(ckpt: Path) -> None:
    lines = [f"{_sha256(ckpt / rel)}  {rel}\n" for rel in _files(ckpt)]
    (ckpt / SUMS_FILE).write_text("".join(lines))


def verify(ckpt: Path) -> str | None:
    """Why ``ckpt`` is not intact (missing state, missing/extra/changed files), or None if it is."""
    if not (ckpt / STATE_FILE).is_file():
        return f"no {STATE_FILE}"
    if not (ckpt / SUMS_FILE).is_file():
        return f"no {SUMS_FILE}"
    want = {}
    for line in (ckpt / SUMS_FILE).read_text().splitlines():
        digest, _, rel = line.partition("  ")
        want[rel] = digest
    have = _files(ckpt)
    if sorted(want) != have:
        return f"files differ from {SUMS_FILE} (listed {sorted(want)}, present {have})"
    bad = [rel for rel in have if _sha256(ckpt / rel) != want[rel]]
    return f"checksum mismatch in {', '.join(bad)}" if bad else None


# ----------------------------------------------------------------------------------------------- run directories
def new_run_dir(root: Path = Path("runs")) -> Path:
    """A fresh, unused ``root/<date>-<time>`` path (not created yet)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = root / stamp, 1
    while path.exists():
        n += 1
        path = root / f"{stamp}-{n}"
    return path


def point_latest(run_dir: Path) -> None:
    """Point ``<parent>/latest`` at ``run_dir`` (replaced atomically; a convenience, not the run's name)."""
    link, tmp = run_dir.parent / "latest", run_dir.parent / f".latest.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(run_dir.name, tmp)
    os.replace(tmp, link)


def open_run(out: Path, resume: str | None, run_config) -> tuple[Path | None, dict | None]:
    """Before any work: a new run needs an empty ``out``; a resumed one gets (checkpoint, verified state),
    and only when ``run_config`` changes nothing but the keys safe to change on resume."""
    from b2diffurl import config

    if resume:
        ckpt = find(resume)
        state = load(ckpt)
        if changed := config.resume_differences(config.from_dict(state["config"]), run_config):
            raise config.ConfigError(
                f"--resume {ckpt}: the configuration differs from the saved run in {'; '.join(changed)}; "
                "drop those overrides (only stages, output and logging keys may change on resume)"
            )
        return ckpt, state
    if why := refuse_existing_run(out):
        raise CheckpointError(why)
    return None, None


def refuse_existing_run(out: Path) -> str | None:
    """Why a new run may not start in ``out`` (it holds files), or None; a run directory is never clobbered."""
    if out.exists() and not out.is_dir():
        return f"--out {str(out)!r} is a file; choose a directory"
    if out.is_dir() and any(out.iterdir()):
        return (
            f"run directory {str(out)!r} is not empty; continue that run with --resume {str(out)!r} "
            "or choose a new --out"
        )
    return None


# ----------------------------------------------------------------------------------------------- RNG state
def rng_state(noise_gen: torch.Generator, cpu_gen: torch.Generator) -> dict:
    """Every random stream a run draws from: torch (CPU, CUDA), numpy, python, and the run's two generators."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "noise_gen": noise_gen.get_state(),
        "cpu_gen": cpu_gen.get_state(),
    }


def set_rng_state(state: dict, noise_gen: torch.Generator, cpu_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    noise_gen.set_state(state["noise_gen"])
    cpu_gen.set_state(state["cpu_gen"])


def cpu_copy(obj):
    """A deep copy of ``obj`` with every tensor cloned to the CPU (a state that later training cannot change)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


# ----------------------------------------------------------------------------------------------- save/find/load
def stage_name(next_stage: int) -> str:
    return f"{_PREFIX}{next_stage:05d}"


def save(root: Path, next_stage: int, state: dict, export: Callable[[Path], None] | None = None) -> Path:
    """Write checkpoint ``stage_<next_stage>`` under ``root`` and point ``LATEST`` at it.

    ``export(directory)`` may add files next to ``state.pt`` (they are checksummed too). Every step before
    the final rename works on a temporary directory, which is removed if anything fails.
    """
    root.mkdir(parents=True, exist_ok=True)
    name = stage_name(next_stage)
    final, tmp, old = root / name, root / f"{_TMP}{name}-{os.getpid()}", root / f"{_OLD}{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        torch.save({"version": VERSION, **state}, tmp / STATE_FILE)
        if export is not None:
            export(tmp)
        _write_sums(tmp)
        _fsync_tree(tmp)
        if final.exists():  # re-save of a stage: move the old copy aside; find() restores it after a crash
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            fsync_dir(root)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write(root / LATEST_FILE, name + "\n")
    shutil.rmtree(old, ignore_errors=True)
    return final


def prune(root: Path, keep_newest: int, keep: Path) -> None:
    """Delete all but the newest ``keep_newest`` intact stage checkpoints (never ``keep``); 0 keeps all."""
    if keep_newest <= 0:
        return
    done = sorted(p.name for p in root.glob(f"{_PREFIX}*") if (p / STATE_FILE).is_file())
    for name in done[:-keep_newest]:
        if name != keep.name:
            shutil.rmtree(root / name, ignore_errors=True)


def _repair(root: Path) -> None:
    """Undo what a crash in the middle of :func:`save` can leave behind."""
    for old in root.glob(f"{_OLD}*"):
        final = root / old.name[len(_OLD) :]
        if final.exists():  # the new copy made it: the old one is garbage
            shutil.rmtree(old, ignore_errors=True)
        else:  # crash between the two renames: the old copy is the stage
            os.replace(old, final)
            log.warning("restored %s after an interrupted re-save", final.name)
    for tmp in root.glob(f"{_TMP}*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for tmp in root.glob(".*.tmp"):  # an atomic_write (LATEST) killed before its rename
        tmp.unlink(missing_ok=True)


def find(path: str | Path) -> Path:
    """The checkpoint to resume from: ``path`` itself if it is a checkpoint directory, else the one named by
    ``<path>/checkpoints/LATEST``, falling back (with a warning) to the newest intact stage checkpoint."""
    p = Path(path)
    if (p / STATE_FILE).is_file():
        return p
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    if not root.is_dir():
        raise CheckpointError(f"--resume {str(path)!r}: not a directory")
    _repair(root)
    named = (root / LATEST_FILE).read_text().strip() if (root / LATEST_FILE).is_file() else ""
    candidates = sorted((q for q in root.glob(f"{_PREFIX}*") if q.is_dir()), reverse=True)
    if named and (root / named) in candidates:
        candidates.remove(root / named)
        candidates.insert(0, root / named)
    problems = []
    for cand in candidates:
        why = verify(cand)
        if why is None:
            if cand.name != named:
                log.warning(
                    "LATEST names %r (%s); resuming from the newest intact checkpoint %s",
                    named or "nothing",
                    "; ".join(problems) or "missing",
                    cand.name,
                )
            return cand
        problems.append(f"{cand.name}: {why}")
    detail = f" ({'; '.join(problems)})" if problems else ""
    raise CheckpointError(
        f"--resume {str(path)!r}: no intact checkpoint found{detail}; expected a run directory with "
        "checkpoints/stage_*/ or a checkpoint directory with state.pt"
    )


def load(ckpt: Path) -> dict:
    """The verified state of checkpoint ``ckpt`` (CheckpointError when corrupt or of another version)."""
    why = verify(ckpt)
    if why is not None:
        raise CheckpointError(f"checkpoint {ckpt} is not intact: {why}")
    state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)
    if state.get("version") != VERSION:
        raise CheckpointError(f"{ckpt}: checkpoint version {state.get('version')} != {VERSION}")
    return state
