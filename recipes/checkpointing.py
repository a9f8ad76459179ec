"""A SpeechBrain ``Checkpointer`` whose checkpoints become visible only once complete.

SpeechBrain 1.1's ``Checkpointer.save_checkpoint`` creates the checkpoint folder, writes its
``CKPT.yaml`` first and the parameter files after it. A process killed in between (pre-emption
while saving) leaves a folder that is listed as a checkpoint but cannot be loaded, and the next run
crashes on it or, worse, resumes from a partly old state. Here ``CKPT.yaml`` is written last and
atomically (temporary file + rename): an interrupted save leaves a folder without it, which is
never loaded and is removed at the next recovery. ``tests/test_reliability.py`` kills a save
midway to check this.
"""

from __future__ import annotations

import os
import shutil
import time
import zipfile
from pathlib import Path

import yaml
from speechbrain.utils.checkpoints import CKPT_PREFIX, METAFNAME, Checkpointer
from speechbrain.utils.distributed import if_main_process
from speechbrain.utils.logger import get_logger

logger = get_logger(__name__)


class CheckpointLoadError(RuntimeError):
    """A checkpoint that cannot be loaded, with the files that are not whole ``torch.save`` zips.

    torch's own message ("failed finding central directory") names no file.
    """

    def __init__(self, folder: Path, error: Exception):
        damaged = [p.name for p in sorted(Path(folder).glob("*.ckpt")) if not zipfile.is_zipfile(p)]
        what = f"damaged (truncated?) file(s): {', '.join(damaged)}" if damaged else str(error)
        super().__init__(
            f"cannot load checkpoint {folder}: {what}. Delete that folder to resume from an "
            f"earlier checkpoint. ({type(error).__name__}: {error})"
        )


class AtomicCheckpointer(Checkpointer):
    """``Checkpointer`` that writes each checkpoint's metafile last, atomically."""

    _pending_meta = None

    def _save_checkpoint_metafile(self, fpath, meta_to_include=None, end_of_epoch=True):
        """Called by SpeechBrain before the parameter files: only remember the meta."""
        meta = {"unixtime": time.time(), "end-of-epoch": end_of_epoch, **(meta_to_include or {})}
        self._pending_meta = (Path(fpath), meta)
        return meta

    def save_checkpoint(self, *args, **kwargs):
        """Save all recoverables, then publish the checkpoint by writing its metafile."""
        checkpoint = super().save_checkpoint(*args, **kwargs)
        if self._pending_meta is not None:
            path, meta = self._pending_meta
            self._pending_meta = None
            temporary = path.with_name(f".{path.name}.tmp")
            with open(temporary, "w", encoding="utf-8") as handle:
                handle.write("# yamllint disable\n")
                handle.write(yaml.dump(meta))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
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
