"""A SpeechBrain ``Checkpointer`` whose checkpoints become visible only once complete.

SpeechBrain 1.1's ``Checkpointer.save_checkpoint`` creates the checkpoint folder, writes its
``CKPT.yaml`` first and the parameter files after it. A process killed in between (pre-emption
while saving) leaves a folder that is listed as a checkpoint but cannot be loaded, and the next run
crashes on it or, worse, resumes from a partly old state. Here ``CKPT.yaml`` is written last and
atomically (temporary file + rename): an interrupted save leaves a folder without it, which is
never loaded and is removed at the next recovery. ``tests/test_reliability.py`` kills a save
midway to check this.

The embedding model is one recoverable (``MODEL_RECOVERABLE``).
"""

from __future__ import annotations

import os
import shutil
import time
import zipfile
from pathlib import Path

import yaml
from speechbrain.utils.checkpoints import CKPT_PREFIX, METAFNAME, Checkpointer
from speechbrain.utils.distributed import ddp_barrier, if_main_process
from speechbrain.utils.logger import get_logger

from recipes.disk import free_mib

logger = get_logger(__name__)


class CheckpointLoadError(RuntimeError):
    """A checkpoint that cannot be loaded: its damaged files, or that it does not fit the model.

    torch's own message ("failed finding central directory") names no file. Only a damaged
    checkpoint is worth deleting; a whole one that does not fit was made with other settings.
    """

    def __init__(self, folder: Path, error: Exception):
        damaged = [p.name for p in sorted(Path(folder).glob("*.ckpt")) if truncated_zip(p)]
        if damaged:
            what = (
                f"damaged (truncated?) file(s): {', '.join(damaged)}. Delete that folder to "
                "resume from an earlier checkpoint"
            )
        else:
            what = (
                "its files are whole, but they do not fit the model these settings build: it "
                "was made with other settings (its run's hyperparams.yaml has them). Do not "
                "delete it; use those settings, or another --output_folder"
            )
        cause = f"{type(error).__name__}: {error}"
        super().__init__(f"cannot load checkpoint {folder}: {what}. ({cause})")


class CheckpointSaveError(RuntimeError):
    """A checkpoint that could not be written, named with its folder and the disk's free space.

    torch's message for a full disk ("[enforce fail at inline_container.cc:672] . unexpected
    pos ...") names neither.
    """

    def __init__(self, folder: Path, error: Exception):
        super().__init__(
            f"cannot save a checkpoint in {folder} ({free_mib(folder):.0f} MiB free on its disk): "
            f"{type(error).__name__}: {error}. The earlier checkpoints are intact and the "
            "incomplete one was removed: free some space and rerun the same command to resume."
        )


def truncated_zip(path: Path) -> bool:
    """Whether ``path`` starts as a ``torch.save`` zip but is not a whole one.

    SpeechBrain's text recoverables (``brain.ckpt``, ``counter.ckpt``) are not zips at all.
    """
    with open(path, "rb") as handle:
        return handle.read(4) == b"PK\x03\x04" and not zipfile.is_zipfile(path)


def write_metafile(path: Path, meta: dict) -> None:
    """Write a checkpoint's ``CKPT.yaml`` atomically (temporary file, fsync, rename)."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write("# yamllint disable\n")
        handle.write(yaml.dump(meta))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


#: The recoverable (and file stem) of the whole ``WavLMSpeakerEmbedder``.
MODEL_RECOVERABLE = "embedding_model"


class AtomicCheckpointer(Checkpointer):
    """``Checkpointer`` that writes each checkpoint's metafile last, atomically."""

    _pending_meta = None

    def _save_checkpoint_metafile(self, fpath, meta_to_include=None, end_of_epoch=True):
        """Called by SpeechBrain before the parameter files: only remember the meta."""
        meta = {"unixtime": time.time(), "end-of-epoch": end_of_epoch, **(meta_to_include or {})}
        self._pending_meta = (Path(fpath), meta)
        return meta

    def save_checkpoint(self, *args, **kwargs):
        """Save all recoverables, then publish the checkpoint by writing its metafile.

        A failed save (a full disk) removes the incomplete folder and says where and why. Under
        ``torchrun`` every process waits for the metafile: the main process alone writes it, and
        a process that went on to ``delete_checkpoints`` without seeing the new checkpoint would
        choose other deletions than the main one, and their collectives would never meet (every
        run of two or more processes hung at its first deleted checkpoint).
        """
        try:
            checkpoint = super().save_checkpoint(*args, **kwargs)
            if self._pending_meta is not None:
                path, meta = self._pending_meta
                write_metafile(path, meta)
        except (OSError, RuntimeError) as error:
            self.remove_incomplete()
            raise CheckpointSaveError(self.checkpoints_dir, error) from error
        finally:
            self._pending_meta = None
        ddp_barrier()
        return checkpoint

    def remove_incomplete(self) -> list[Path]:
        """Delete checkpoint folders that an interrupted save left without a metafile."""
        removed = []
        if not if_main_process() or not self.checkpoints_dir.is_dir():
            return removed
        for folder in self.checkpoints_dir.glob(f"{CKPT_PREFIX}*"):
            if folder.is_dir() and not (folder / METAFNAME).exists():
                logger.warning(f"Removing incomplete checkpoint (interrupted save): {folder}")
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
        return removed

    def _call_load_hooks(self, checkpoint):
        """Load as SpeechBrain does; a failure names the checkpoint and its damaged files."""
        try:
            return super()._call_load_hooks(checkpoint)
        except Exception as error:
            raise CheckpointLoadError(checkpoint.path, error) from error

    def recover_if_possible(self, *args, **kwargs):
        """Clean up interrupted saves, then recover as SpeechBrain does."""
        self.remove_incomplete()
        return super().recover_if_possible(*args, **kwargs)


def trim_train_log(path, completed_epochs: int) -> list[int]:
    """Drop the lines of epochs after ``completed_epochs`` from a run's ``train_log.txt``.

    An epoch is logged just before its checkpoint is saved: a run killed in between (or whose
    save failed, a full disk) trains that epoch again when resumed, and the log would list it
    twice. Called on resuming, with the recovered epoch counter; the file is replaced
    atomically. Returns the dropped epochs.
    """
    path = Path(path)
    if not path.is_file():
        return []
    kept, dropped = [], []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        epoch = _logged_epoch(line)
        if epoch is not None and epoch > completed_epochs:
            dropped.append(epoch)
        else:
            kept.append(line)
    if dropped:
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text("".join(kept), encoding="utf-8")
        os.replace(temporary, path)
    return dropped


def _logged_epoch(line: str) -> int | None:
    """The epoch of a ``FileTrainLogger`` line (``epoch: 3, ...``), None for any other line."""
    head = line.split(",", 1)[0].split(" - ", 1)[0]
    key, _, value = head.partition(":")
    return int(value) if key.strip() == "epoch" and value.strip().isdigit() else None
