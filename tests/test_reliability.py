"""Faults a long run meets, and determinism.

A kill mid-epoch or mid-save, non-finite losses, audio that broke after data prep.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import speechbrain.core
import torch
import yaml
from speechbrain.utils.checkpoints import (
    mark_as_loader,
    mark_as_saver,
    register_checkpoint_hooks,
)

from data_prep.deepmine_prepare import prepare_deepmine
from recipes.disk import WriteFailed, named_write_failures
from recipes.evaluation import verification_report
from recipes.evaluation.pretrained import EXPORTED_MODULE
from recipes.evaluation.scoring import EmbeddingTable, trial_metrics
from recipes.evaluation.verification import _save_tables
from recipes.evaluation.verification_report import write_report
from recipes.experiment_lock import LOCK_FILE, FolderInUse, hold_experiment_lock
from recipes.export_model import EXPORT_MARKERS, check_export_target, published
from recipes.tiny_wavlm import build_tiny_wavlm
from recipes.train_speaker_embeddings import SpeakerBrain, build_brain
from recipes.training.checkpointing import (
    AtomicCheckpointer,
    CheckpointLoadError,
    CheckpointSaveError,
    trim_train_log,
)
from recipes.training.preemption import DISTRIBUTED_CHECK_STEPS, Preemption
from recipes.training.resume_guard import (
    FINGERPRINT_FILE,
    MANIFESTS,
    guard_data,
    guard_settings,
)
from tests.conftest import TINY
from tests.helpers import (
    ROOT,
    experiment_record,
    fake_batch,
    free_port,
    load_yaml,
    run_script,
    run_script_command,
)

SLOW_SAVE = textwrap.dedent(
    """
    import sys, time, torch
    sys.path.insert(0, {root!r})
    from speechbrain.utils.checkpoints import (
        mark_as_loader, mark_as_saver, register_checkpoint_hooks)
    from recipes.training.checkpointing import AtomicCheckpointer

    @register_checkpoint_hooks
    class Slow:
        def __init__(self, value, delay):
            self.value, self.delay = value, delay
        @mark_as_saver
        def save(self, path):
            print("saving", flush=True)
            time.sleep(self.delay)
            torch.save({{"value": self.value}}, path)
        @mark_as_loader
        def load(self, path, end_of_epoch=False):
            self.value = torch.load(path)["value"]

    recoverables = {{"model": torch.nn.Linear(2, 2), "slow": Slow(1, 0)}}
    checkpointer = AtomicCheckpointer({folder!r}, recoverables)
    checkpointer.save_checkpoint(meta={{"step": 1}})
    checkpointer.recoverables["slow"] = Slow(2, 60)
    checkpointer.save_checkpoint(meta={{"step": 2}})
    """
)


def test_a_save_killed_midway_leaves_the_previous_checkpoint_usable(tmp_path):
    script = SLOW_SAVE.format(root=str(ROOT), folder=str(tmp_path / "ckpt"))
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "saving"  # first save (fast)
    assert process.stdout.readline().strip() == "saving"  # second save, now sleeping
    process.send_signal(signal.SIGKILL)
    process.wait()
    folders = sorted((tmp_path / "ckpt").glob("CKPT*"))
    assert len(folders) == 2  # the interrupted one exists on disk...
    checkpointer = AtomicCheckpointer(tmp_path / "ckpt", {"model": torch.nn.Linear(2, 2)})
    assert len(checkpointer.list_checkpoints()) == 1  # ...but is not a checkpoint
    recovered = checkpointer.recover_if_possible()
    assert recovered.meta["step"] == 1
    assert [f for f in (tmp_path / "ckpt").glob("CKPT*")] == [recovered.path]  # cleaned up


@register_checkpoint_hooks
class _DiskFull:
    """A recoverable whose save fails as torch's does on a full disk."""

    @mark_as_saver
    def save(self, path):
        """Write a little, then fail."""
        Path(path).write_bytes(b"PK\x03\x04partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4076352")

    @mark_as_loader
    def load(self, path, end_of_epoch=False):
        """Nothing to load."""


def test_a_full_disk_during_a_save_is_named_and_leaves_no_partial_checkpoint(tmp_path):
    checkpointer = AtomicCheckpointer(tmp_path / "ckpt", {"model": torch.nn.Linear(2, 2)})
    first = checkpointer.save_checkpoint(meta={"step": 1})
    checkpointer.add_recoverable("disk", _DiskFull())
    with pytest.raises(CheckpointSaveError) as error:
        checkpointer.save_checkpoint(meta={"step": 2})
    message = str(error.value)
    assert f"cannot save a checkpoint in {tmp_path / 'ckpt'}" in message and "MiB free" in message
    assert "unexpected pos" in message and "rerun the same command to resume" in message
    assert sorted((tmp_path / "ckpt").glob("CKPT*")) == [first.path]  # no partial folder left


def _copy_corpus(tiny_corpus, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_corpus, tmp_path / "corpus"))


def _intra_epoch_checkpoints(out: Path) -> list[Path]:
    found = []
    for folder in sorted((out / "save").glob("CKPT*")):
        meta = folder / "CKPT.yaml"
        if meta.exists() and not yaml.safe_load(meta.read_text())["end-of-epoch"]:
            found.append(folder)
    return found


@pytest.mark.slow
def test_killed_mid_epoch_resumes_from_the_intra_epoch_checkpoint(tmp_path, tiny_corpus):
    out = tmp_path / "exp"
    command = [
        sys.executable, str(ROOT / "recipes" / "train_speaker_embeddings.py"),
        str(ROOT / "hparams" / "synthetic_demo.yaml"), "--output_folder", str(out),
        "--data_folder", str(tiny_corpus), "--synthetic_corpus", "null", "--valid_speakers", "2",
        "--crop_seconds", "1.0", "--batch_size", "4", "--noise_csv", "null", "--emb_dim", "64",
        "--number_of_epochs", "1", "--ckpt_interval_minutes", "0", "--ckpt_interval_steps", "4",
        "--noprogressbar",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT
    )
    deadline = time.time() + 300
    while not _intra_epoch_checkpoints(out) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # pre-emption, a step or so after the checkpoint
    process.wait()
    complete = sorted(c for c in (out / "save").glob("CKPT*") if (c / "CKPT.yaml").exists())
    intra = _intra_epoch_checkpoints(out)
    assert intra and complete == intra  # killed mid-epoch: no end-of-epoch checkpoint yet
    done_before = yaml.safe_load((intra[-1] / "brain.ckpt").read_text())["step"]
    assert done_before >= 4
    # As if the kill came after epoch 1 was logged, before its checkpoint was saved:
    with open(out / "train_log.txt", "a", encoding="utf-8") as log:
        log.write("epoch: 1, wavlm_frozen: False - train loss: 9.99 - valid EER: 99.00\n")

    resumed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-4000:]
    assert f"Loading a checkpoint from {intra[-1]}" in output
    assert "train_log.txt: dropped the line(s) of epoch(s) 1" in output
    logged = (out / "train_log.txt").read_text().splitlines()
    assert len(logged) == 1 and logged[0].startswith("epoch: 1,") and "99.00" not in logged[0]
    final = [c for c in (out / "save").glob("CKPT*") if (c / "CKPT.yaml").exists()]
    assert len(final) >= 1
    last = max(final, key=lambda c: yaml.safe_load((c / "CKPT.yaml").read_text())["unixtime"])
    # 4 training speakers x (10 phrases x 4 reps + free text), batch 4
    steps_per_epoch = 4 * (10 * TINY["reps"] + TINY["free_text_train"]) // 4
    # One epoch's worth of optimizer and scheduler steps in all: the resumed run went on from
    # the checkpoint's position instead of replaying the epoch from its start.
    assert yaml.safe_load((last / "brain.ckpt").read_text())["optimizer_step"] == steps_per_epoch
    assert torch.load(last / "lr_scheduler_head.ckpt")["current_step"] == steps_per_epoch
    for checkpoint in final:  # every checkpoint left on disk loads
        for file in checkpoint.glob("*.ckpt"):
            if file.name not in ("brain.ckpt", "counter.ckpt", "dataloader-TRAIN.ckpt"):  # text
                torch.load(file, map_location="cpu", weights_only=True)


def _exact_resume_command(out: Path, corpus: Path) -> list[str]:
    """The tiny demo with every source of randomness on, checkpointed every 4 steps of batch 4.

    The YAML's noise list (read by two workers), every augmentation, dropout.
    """
    command = run_script_command(
        "train_speaker_embeddings.py", out, corpus, "--number_of_epochs", "1",
        "--ckpt_interval_minutes", "0", "--ckpt_interval_steps", "4", "--num_workers", "2",
    )  # fmt: skip
    command = [arg for arg in command if arg != "--noise_csv=null"]
    return ["--batch_size=4" if arg == "--batch_size=8" else arg for arg in command]


@pytest.mark.slow
def test_sigterm_mid_epoch_checkpoints_exits_143_and_resumes_exactly(tmp_path, tiny_corpus):
    """SIGTERM: the step ends, a mid-epoch checkpoint is saved, exit 143; the rerun resumes.

    It trains exactly as an uninterrupted run (same seed, same machine): the same loss curve,
    bit-identical weights and scores.
    """
    out = tmp_path / "stopped"
    command = _exact_resume_command(out, tiny_corpus)
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT
    )
    deadline = time.time() + 300
    while not _intra_epoch_checkpoints(out) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    first = _intra_epoch_checkpoints(out)  # training is under way (its first interval ckpt)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=300)[0]
    assert first and process.returncode == 143, output[-3000:]
    assert "SIGTERM: mid-epoch checkpoint saved at epoch 1, step" in output
    assert "Traceback" not in output
    stopped = yaml.safe_load((_intra_epoch_checkpoints(out)[-1] / "brain.ckpt").read_text())
    steps_per_epoch = 4 * (10 * TINY["reps"] + TINY["free_text_train"]) // 4
    assert 4 <= stopped["step"] < steps_per_epoch  # saved where it stopped, mid-epoch
    said = re.search(r"checkpoint saved at epoch 1, step (\d+)", output)
    assert int(said.group(1)) == stopped["step"]
    last = _intra_epoch_checkpoints(out)[-1]
    resumed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Loading a checkpoint from {last}" in resumed.stdout + resumed.stderr
    final = _latest_checkpoint(out)
    assert yaml.safe_load((final / "brain.ckpt").read_text())["optimizer_step"] == steps_per_epoch

    whole = tmp_path / "uninterrupted"
    subprocess.run(
        _exact_resume_command(whole, tiny_corpus), check=True, capture_output=True, cwd=ROOT,
        timeout=600,
    )  # fmt: skip
    assert _losses(out) == _losses(whole) and len(_losses(out)) == 1
    weights = [
        torch.load(_latest_checkpoint(run) / "embedding_model.ckpt", weights_only=True)
        for run in (out, whole)
    ]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    for report in ("scores_valid.txt", "scores_eval.txt"):
        assert (out / report).read_bytes() == (whole / report).read_bytes(), report


def test_a_repeated_scheduler_signal_is_one_stop_request_and_a_second_ctrl_c_exits():
    """A forwarded SIGTERM (torchrun, after SLURM signalled the worker) is no second stop."""
    preemption = Preemption()
    previous = preemption.install()
    try:
        with pytest.raises(SystemExit) as inactive:  # outside fit: nothing to save, exit now
            os.kill(os.getpid(), signal.SIGTERM)
        assert inactive.value.code == 143
        preemption.active = True
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # forwarded again: the same request
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preemption.requested("cpu", distributed=False) == signal.SIGTERM
        with pytest.raises(SystemExit) as interrupted:  # Ctrl-C twice: the user wants out
            os.kill(os.getpid(), signal.SIGINT)
        assert interrupted.value.code == 130
    finally:
        preemption.restore(previous)


def test_under_torchrun_the_checkpoint_questions_are_collectives_every_few_steps(monkeypatch):
    # SpeechBrain broadcasts its interval decision: asked after every batch, one collective per
    # step over NCCL. Asked with the stop request: every DISTRIBUTED_CHECK_STEPS optimizer steps.
    collectives = []
    monkeypatch.setattr(speechbrain.core, "is_distributed_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "broadcast_object_list",
                        lambda decision, src: collectives.append("interval"))  # fmt: skip
    brain = SpeakerBrain.__new__(SpeakerBrain)  # the method alone, on a 2-process run's state
    brain.distributed_launch, brain.grad_accumulation_factor, brain.device = True, 2, "cpu"
    brain.checkpointer, brain.ckpt_interval_minutes, brain.ckpt_interval_steps = object(), 15, 0
    brain.preemption = Preemption()
    monkeypatch.setattr(brain.preemption, "requested",
                        lambda device, distributed: collectives.append("stop"))  # fmt: skip
    for step in range(1, 2 * 2 * DISTRIBUTED_CHECK_STEPS + 1):  # 2 batches per optimizer step
        brain.step, brain.optimizer_step = step, step // 2
        assert not brain._should_save_intra_epoch_ckpt(time.time(), step)
    assert collectives == ["stop", "interval"] * 2


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_worker_at_one_checkpoint_and_resumes(
    tmp_path, tiny_corpus
):
    """A scheduler signals the whole job (torchrun and its workers, gloo here).

    The processes agree on the step, the main one saves a mid-epoch checkpoint, each exits (143)
    while their data loader workers, signalled too, wait; the same command resumes there and
    trains the epoch's remaining steps only.
    """
    out = tmp_path / "exp"
    script, *args = _exact_resume_command(out, tiny_corpus)[1:]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        f"--master_port={free_port()}", script, *args, "--distributed_backend", "gloo",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        start_new_session=True,  # its own process group: the job, as a scheduler sees it
    )  # fmt: skip
    deadline = time.time() + 300
    while not _intra_epoch_checkpoints(out) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert _intra_epoch_checkpoints(out), "no interval checkpoint before the deadline"
    os.killpg(process.pid, signal.SIGTERM)  # torchrun and both workers, as SLURM signals a step
    output = process.communicate(timeout=300)[0]
    assert output.count("SIGTERM: mid-epoch checkpoint saved at epoch 1, step") == 1, output[-5000:]
    # Each worker exited by itself (torchrun kills those still alive after 30 s), and torchrun
    # reports the signal: the job did not finish.
    assert "forcefully exiting" not in output and process.returncode != 0
    stopped = yaml.safe_load((_intra_epoch_checkpoints(out)[-1] / "brain.ckpt").read_text())
    steps_per_epoch = 4 * (10 * TINY["reps"] + TINY["free_text_train"]) // 2 // 4
    assert 4 <= stopped["step"] < steps_per_epoch  # mid-epoch, where the workers agreed
    command[4] = f"--master_port={free_port()}"
    resumed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-5000:]
    final = _latest_checkpoint(out)
    assert yaml.safe_load((final / "brain.ckpt").read_text())["optimizer_step"] == steps_per_epoch


def _latest_checkpoint(out: Path) -> Path:
    """The run's most recently saved complete checkpoint."""
    return max(
        (c for c in (out / "save").glob("CKPT*") if (c / "CKPT.yaml").exists()),
        key=lambda c: yaml.safe_load((c / "CKPT.yaml").read_text())["unixtime"],
    )


def test_a_resumed_run_drops_logged_epochs_that_its_checkpoint_does_not_hold(tmp_path):
    """An epoch logged, then killed (or a full disk) before its checkpoint: trained again."""
    log = tmp_path / "train_log.txt"
    lines = [
        "epoch: 1, lr_head: 1.00e-02 - train loss: 6.01 - valid EER: 40.00\n",
        "epoch: 2, lr_head: 9.00e-03 - train loss: 5.50 - valid EER: 30.00\n",
        "epoch: 3, lr_head: 8.00e-03 - train loss: 5.10 - valid EER: 25.00\n",
    ]
    log.write_text("".join(lines))
    assert trim_train_log(log, completed_epochs=3) == [] and log.read_text() == "".join(lines)
    assert trim_train_log(log, completed_epochs=1) == [2, 3]
    assert log.read_text() == lines[0]
    assert trim_train_log(tmp_path / "absent.txt", 0) == []


def test_nonfinite_loss_is_skipped_then_stops_training(tmp_path, tiny_wavlm_dir):
    hparams = load_yaml(
        "synthetic_demo.yaml",
        {"output_folder": str(tmp_path), "wavlm_source": tiny_wavlm_dir, "noise_csv": None},
    )
    brain = build_brain(hparams, {"device": "cpu"}, n_classes=3, n_phrases=2)
    brain.hparams.epoch_counter.current, brain.steps_per_epoch = 1, 10
    brain.init_optimizers()
    brain.nonfinite_count = 0  # as SpeechBrain sets it at the start of each epoch
    brain.modules.train()
    before = [p.detach().clone() for p in brain.modules.parameters()]
    normal = brain.compute_objectives
    brain.compute_objectives = lambda *args: normal(*args) * float("nan")
    for _ in range(hparams["nonfinite_patience"]):  # tolerated: counted, gradients dropped
        brain.fit_batch(fake_batch())
    assert brain.nonfinite_count == hparams["nonfinite_patience"]
    after = list(brain.modules.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # steps skipped
    with pytest.raises(ValueError, match="Loss is not finite and patience is exhausted"):
        brain.fit_batch(fake_batch())
    brain.compute_objectives = normal
    assert torch.isfinite(brain.fit_batch(fake_batch()))
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))  # trains again


def _break_after_prep(tmp_path, tiny_corpus):
    corpus = _copy_corpus(tiny_corpus, tmp_path)
    prepare_deepmine(  # as the demo YAML prepares it, so the recipe's data prep has nothing to do
        corpus, tmp_path / "exp" / "prep", valid_speakers=2, seed=1986, include_free_text=True
    )
    train = (tmp_path / "exp" / "prep" / "train.csv").read_text().splitlines()
    victim = train[1].split(",")[0]
    # Damaged in place (bit rot), its size and times kept: a rerun's data prep, which compares
    # them, sees nothing (a deleted or replaced file would be prepared again and named there).
    wav = corpus / "wav" / "train" / f"{victim}.wav"
    times = wav.stat()
    with open(wav, "r+b") as handle:
        handle.write(b"JUNK")  # no RIFF header: unreadable
    os.utime(wav, ns=(times.st_atime_ns, times.st_mtime_ns))
    return corpus, victim


@pytest.mark.slow
def test_audio_broken_after_prep_fails_with_its_name(tmp_path, tiny_corpus):
    corpus, victim = _break_after_prep(tmp_path, tiny_corpus)
    command = [
        sys.executable, str(ROOT / "recipes" / "train_speaker_embeddings.py"),
        str(ROOT / "hparams" / "synthetic_demo.yaml"), "--output_folder", str(tmp_path / "exp"),
        "--data_folder", str(corpus), "--synthetic_corpus", "null", "--valid_speakers", "2",
        "--crop_seconds", "1.0", "--batch_size", "8", "--noise_csv", "null", "--emb_dim", "64",
        "--number_of_epochs", "1", "--noprogressbar",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode != 0
    output = result.stdout + result.stderr  # SpeechBrain logs the traceback to stdout
    assert re.search(rf"cannot read training audio \S*{victim}\.wav", output), output[-3000:]


@pytest.mark.slow
def test_audio_broken_after_prep_is_skipped_and_logged_when_asked(tmp_path, tiny_corpus):
    corpus, victim = _break_after_prep(tmp_path, tiny_corpus)
    run_script(
        "train_speaker_embeddings.py", tmp_path / "exp", corpus,
        "--number_of_epochs", "1", "--on_bad_audio", "skip",
    )  # fmt: skip
    log = (tmp_path / "exp" / "rejected_train_audio.txt").read_text().splitlines()
    assert log and all(f"{victim}.wav" in line for line in log)
    assert (tmp_path / "exp" / "verification_valid.json").is_file()
    # The scoring cohort (training speakers) passed over it too.
    assert f"{victim}.wav" not in (tmp_path / "exp" / "prep" / "cohort.csv").read_text()


def _losses(folder: Path) -> list[str]:
    """Each epoch's training loss and validation EER (not the data-wait share: that is a timing)."""
    return re.findall(
        r"train loss: ([^,\s]+),.* - valid EER: ([^,\s]+),", (folder / "train_log.txt").read_text()
    )


@pytest.mark.slow
def test_same_seed_same_data_same_curve(tmp_path, tiny_corpus):
    for name in ("a", "b"):
        run_script(
            "train_speaker_embeddings.py", tmp_path / name, tiny_corpus, "--number_of_epochs", "2"
        )
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b") and len(_losses(tmp_path / "a")) == 2


class _Evil:
    """Unpickling this runs a command: what a malicious checkpoint would hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_loading_a_checkpoint_never_runs_code_from_it(tmp_path):
    model = torch.nn.Linear(2, 2)
    checkpointer = AtomicCheckpointer(tmp_path / "ckpt", {"model": model})
    checkpoint = checkpointer.save_checkpoint()
    marker = tmp_path / "pwned"
    torch.save({"weight": _Evil(marker)}, checkpoint.path / "model.ckpt")
    with pytest.raises(Exception, match=r"(?i)weights_only|unpickl"):
        AtomicCheckpointer(tmp_path / "ckpt", {"model": model}).recover_if_possible()
    assert not marker.exists()


@pytest.mark.slow
def test_two_processes_with_torchrun_on_cpu(tmp_path, tiny_corpus):
    """README's multi-GPU command on gloo, scaled to the tiny corpus.

    ``wavlm_td.yaml`` as shipped (a frozen first epoch, L2-SP) and a WavLM that has SpecAugment's
    ``masked_spec_embed``, as Base+ has.
    """
    out = tmp_path / "exp"
    wavlm = build_tiny_wavlm(tmp_path / "masked_wavlm", mask_time_prob=0.05)
    common = [
        str(ROOT / "hparams" / "wavlm_td.yaml"), "--output_folder", str(out),
        "--data_folder", str(tiny_corpus), "--valid_speakers", "2",
        "--wavlm_source", wavlm, "--wavlm_hidden_size", "96",
        "--precision", "fp32", "--eval_precision", "fp32", "--num_workers", "1",
        "--crop_seconds", "1.0", "--batch_size", "8", "--noise_csv", "null", "--emb_dim", "64",
        "--noprogressbar", "--device", "cpu",
    ]  # fmt: skip
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        f"--master_port={free_port()}", str(ROOT / "recipes" / "train_speaker_embeddings.py"),
        *common, "--distributed_backend", "gloo", "--number_of_epochs", "2",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert output.count("Wrote manifests") == 1  # data prep ran once, on the main process
    assert "WavLM frozen" in output and "WavLM unfrozen" in output
    checkpoints = [c for c in (out / "save").glob("CKPT*") if (c / "CKPT.yaml").exists()]
    assert checkpoints  # written by the main process
    # Each process trained on its own half of each epoch: 168 utterances / 2 processes / 8.
    utterances = 4 * (10 * TINY["reps"] + TINY["free_text_train"])
    steps = max(
        yaml.safe_load((c / "brain.ckpt").read_text())["optimizer_step"] for c in checkpoints
    )
    assert steps == 2 * (utterances // 2 // 8)
    # Final scoring embedded each utterance once in all: the two processes' shares add up.
    shares = re.findall(
        r"embedded (\d+) of (\d+) utterances on 2 process\(es\): (\d+) \+ (\d+)", output
    )
    assert len(shares) == 3  # the cohort (of the default quality measure), valid and eval
    for embedded, total, first, second in shares:
        assert embedded == total and int(first) + int(second) == int(total)
        assert abs(int(first) - int(second)) <= 1
    ddp_report = (out / "verification_valid.json").read_text()
    (out / "verification_valid.json").unlink()
    shutil.rmtree(out / "embeddings")  # the single process must embed everything itself
    step = [str(ROOT / "hparams" / "verification.yaml"), "--output_folder", str(out),
            "--noprogressbar", "--device", "cpu"]  # fmt: skip
    single = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "verify_speakers.py"), "trials", *step],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # as torchrun: batched BLAS sums alike
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    # Same numbers from one process (float sums may still differ in the last digits, so
    # thresholds are compared with a tolerance).
    single_report = json.loads((out / "verification_valid.json").read_text())
    for name, metrics in json.loads(ddp_report)["conditions"].items():
        assert single_report["conditions"][name] == pytest.approx(metrics, rel=1e-5, abs=1e-6)


# ------------------------------------------------------------------------------------------------
# One run per experiment folder; nothing of a run is destroyed or half-written
# ------------------------------------------------------------------------------------------------
# Holds the lock, then forks a child that lives on, as a data loader's worker does.
HOLD = (
    "import os, sys, time\n"
    "from recipes.experiment_lock import hold_experiment_lock\n"
    "hold_experiment_lock(sys.argv[1])\n"
    "child = os.fork()\n"
    "if child == 0:\n"
    "    time.sleep(120); os._exit(0)\n"
    "print(child, flush=True); time.sleep(120)\n"
)


def test_a_held_experiment_folder_is_refused_naming_its_holder(tmp_path, tiny_corpus):
    folder = tmp_path / "exp"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    worker = None
    try:
        worker = int(holder.stdout.readline())
        with pytest.raises(FolderInUse, match=rf'"pid": {holder.pid},'):
            hold_experiment_lock(folder)
        train = run_script_command("train_speaker_embeddings.py", folder, tiny_corpus)
        step = run_script_command(
            "verify_speakers.py", folder, tiny_corpus,
            "--run_hparams", str(experiment_record(tmp_path, tiny_corpus)),
        )  # fmt: skip
        for command in (train, step):
            result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
            assert result.returncode != 0 and "is in use by another run" in result.stderr
        assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE]  # nothing written
        holder.kill()
        holder.wait()
        os.kill(worker, 0)  # its forked worker still runs, and does not hold the lock on:
        hold_experiment_lock(folder)  # the killed holder's lock went with it, no stale lock
        assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        holder.kill()
        if worker is not None:
            os.kill(worker, signal.SIGKILL)


def test_an_export_never_replaces_what_is_not_an_export(tmp_path):
    run = tmp_path / "runs" / "exp"
    (run / "save").mkdir(parents=True)
    for target in (run, run.parent, tmp_path):  # the experiment, or a folder holding it
        with pytest.raises(SystemExit, match="would replace the experiment"):
            check_export_target(target, run)
    other = tmp_path / "models"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="holds files that are not an export"):
        check_export_target(other, run)
    (tmp_path / "empty").mkdir()
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    for name in EXPORT_MARKERS:
        (earlier / name).write_text("old")
    for fine in (run / "export", tmp_path / "new", tmp_path / "empty", earlier):
        check_export_target(fine, run)
    staging = tmp_path / ".staging"
    staging.mkdir()
    (staging / "export.json").write_text("new")
    published(staging, earlier)
    assert (earlier / "export.json").read_text() == "new"
    assert not (earlier / EXPORTED_MODULE).exists() and not staging.exists()
    assert not list(tmp_path.glob(".earlier.previous.*"))


def _report(folder, scores, labelled=True):
    """``write_report`` of a small eval list: 2 models x 4 tests."""
    trials = pd.DataFrame({
        "model_id": ["m1"] * 4 + ["m2"] * 4, "test_id": [f"t{i}" for i in range(8)],
        "label": ["1", "0", "0", "0"] * 2, "condition": ["TC", "TW", "IC", "IW"] * 2,
    })  # fmt: skip
    if not labelled:
        trials = trials.assign(label="", condition="")
    return write_report(folder, "eval", trials, np.asarray(scores), trial_metrics(scores, trials))


def test_a_report_is_published_whole_or_not_at_all(tmp_path, monkeypatch):
    _report(tmp_path, [0.9, 0.1, 0.3, 0.2, 0.8, 0.4, 0.1, 0.0])
    names = [
        "answer.txt", "det_eval.png", "scores_eval.txt", "submission_eval.zip",
        "verification_eval.json",
    ]  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    before = {name: (tmp_path / name).read_bytes() for name in names}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(verification_report, "plot_det", full_disk)
    with pytest.raises(WriteFailed) as refused:
        _report(tmp_path, [0.5] * 8)
    assert f"cannot write the eval reports in {tmp_path} (" in str(refused.value)
    assert "MiB free on its disk): OSError: [Errno 28] No space left" in str(refused.value)
    assert "the previous eval reports are whole" in str(refused.value)
    assert {name: (tmp_path / name).read_bytes() for name in names} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == names  # no staging folder left
    monkeypatch.undo()
    _report(tmp_path, [0.5] * 8, labelled=False)  # blind: no metrics, so no DET plot
    assert not (tmp_path / "det_eval.png").exists()  # not the labelled run's plot beside it
    assert (tmp_path / "answer.txt").read_text().split() == ["0.500000"] * 8


def test_a_cache_that_cannot_be_written_is_a_named_warning_and_leaves_nothing(
    tmp_path, monkeypatch, caplog
):
    tables = {"speaker": EmbeddingTable(["u1", "u2"], np.eye(2, dtype=np.float32))}
    prefix = tmp_path / "cache" / "valid"
    _save_tables(prefix, tables, {"u1": "a", "u2": "b"})
    assert (tmp_path / "cache" / "valid.sources.json").exists()

    def full_disk(self, prefix):
        Path(f"{prefix}.npy").write_bytes(b"\x93NUMPY")  # a partial file, as a full disk leaves
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(EmbeddingTable, "save", full_disk)
    with caplog.at_level(logging.WARNING):
        _save_tables(prefix, tables, {"u1": "a", "u2": "b"})  # the scores go on
    assert f"cannot write the embedding cache valid in {tmp_path / 'cache'}" in caplog.text
    assert "the cache is dropped" in caplog.text
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-written is left


def test_a_refused_write_is_named_and_other_errors_pass(tmp_path):
    named = named_write_failures("the thing", tmp_path, "nothing changed")
    refused = pytest.raises(WriteFailed, match=r"cannot write the thing in .* MiB free on its disk")
    with refused, named:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")
    other = named_write_failures("the thing", tmp_path, "nothing changed")
    with pytest.raises(FileNotFoundError), other:  # not a refused write: unchanged
        raise FileNotFoundError(2, "No such file", "audio.wav")


# ------------------------------------------------------------------------------------------------
# A resume on other settings or data is refused, naming what differs
# ------------------------------------------------------------------------------------------------
def _prep(folder: Path) -> Path:
    """A prep folder with the manifests the guard hashes."""
    folder.mkdir(parents=True)
    for name in MANIFESTS:
        (folder / name).write_text(f"ID,duration\n{name},1.0\n")
    _prep_record(folder, audio="samples-1")
    return folder


def _prep_record(folder: Path, audio: str) -> None:
    """Data prep's record, with ``audio`` as the hash of the listed files' samples."""
    record = {"options": {}, "manifests": {}, "audio": {"files": 5, "content": audio}}
    (folder / "prep_options.json").write_text(json.dumps(record))


def test_a_resume_on_other_settings_or_data_is_refused_naming_each(tmp_path, caplog):
    save, prep = tmp_path / "save", _prep(tmp_path / "prep")
    settings = {"emb_dim": 64, "seed": 1, "lr_head": 0.002, "data_folder": "/corpus",
                "wavlm": {"hidden": 96}, "__set_seed": [1]}  # fmt: skip
    guard_settings(save, settings)  # a new run: nothing to compare
    guard_data(save, settings, prep)  # ... and recorded
    assert json.loads((save / FINGERPRINT_FILE).read_text())["settings"]["emb_dim"] == 64
    (save / "CKPT+2026-01-01+00-00-00+00").mkdir()
    (save / "CKPT+2026-01-01+00-00-00+00" / "CKPT.yaml").write_text("EER: 1.0\n")
    other = {**settings, "emb_dim": 128, "seed": 2, "__set_seed": [2], "wavlm": {"hidden": 48}}
    with pytest.raises(SystemExit) as refused:
        guard_settings(save, other)
    message = str(refused.value)
    assert "emb_dim: 64 (now 128)" in message and "seed: 1 (now 2)" in message
    assert "wavlm" not in message and "__set_seed" not in message  # follow from the settings
    assert "not damaged: keep them" in message
    moved = {**settings, "lr_head": 0.001, "data_folder": "/moved/corpus"}
    with caplog.at_level("WARNING"):
        guard_settings(save, moved)  # allowed, and said
        guard_data(save, moved, prep)  # the same manifests: the same data
    assert "resuming with a changed setting: lr_head: 0.002 (now 0.001)" in caplog.text
    _prep_record(prep, audio="samples-2")  # same ids and durations, other recordings
    with pytest.raises(SystemExit, match=r"audio: other audio \(the listed files hold other"):
        guard_data(save, moved, prep)
    _prep_record(prep, audio="samples-1")
    (prep / "train.csv").write_text("ID,duration\nother,2.0\n")
    with pytest.raises(SystemExit, match=r"train.csv: other data"):
        guard_data(save, moved, prep)
    assert json.loads((save / FINGERPRINT_FILE).read_text())["settings"]["lr_head"] == 0.002


def test_a_run_recorded_by_another_version_is_refused_naming_what_differs(tmp_path, tiny_corpus):
    """A record lacking a setting, or with one removed since: one message, before anything runs."""
    record = experiment_record(tmp_path, tiny_corpus)
    lines = record.read_text().splitlines()
    older = [line for line in lines if line.split(":")[0] not in ("wavlm_tuning", "corpus")]
    older.append("phrase_classifier_type: linear")  # a setting removed since
    record.write_text("\n".join(older) + "\n")
    step = run_script_command("verify_speakers.py", tmp_path / "exp", tiny_corpus)
    result = subprocess.run(
        [*step, "--run_hparams", str(record)], capture_output=True, text=True, cwd=ROOT,
        timeout=600,
    )  # fmt: skip
    assert result.returncode != 0
    assert (
        f"error: {record} was recorded by another version of this recipe: it lacks corpus, "
        "wavlm_tuning; it has phrase_classifier_type, removed since." in result.stderr
    ), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "Wrote manifests" not in result.stdout


def _stamps(folder: Path) -> dict:
    """Every file under ``folder`` with its size and modification time."""
    return {
        p.relative_to(folder): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*") if p.is_file()
    }  # fmt: skip


def test_a_hand_edited_run_record_is_refused_naming_each_change(trained, tmp_path):
    out, _ = trained
    copy = tmp_path / "exp"
    shutil.copytree(out, copy, symlinks=True, copy_function=shutil.copy2)
    record = copy / "hyperparams.yaml"
    text = re.sub(r"^head_type: xvector", "head_type: mhfa", record.read_text(), flags=re.M)
    record.write_text(re.sub(r"^corpus: .*\n", "", text, flags=re.M))
    command = run_script_command("verify_speakers.py", copy, None)
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode != 0
    assert f"error: {record} was edited since training (" in result.stderr
    assert "corpus: removed" in result.stderr and "head_type: 'xvector' -> 'mhfa'" in result.stderr
    assert "Wrote manifests" not in result.stdout  # refused before anything ran


@pytest.mark.slow
def test_a_copied_then_moved_run_scores_and_exports_where_it_is_never_touching_the_original(
    trained, tiny_corpus, tmp_path
):
    out, _ = trained
    corpus, copy = tmp_path / "corpus", tmp_path / "copy" / "exp"
    shutil.copytree(tiny_corpus, corpus, copy_function=shutil.copy2)  # cp -a: times kept
    shutil.copytree(out, copy, symlinks=True, copy_function=shutil.copy2)
    before = _stamps(out)
    scored = run_script("verify_speakers.py", copy, None, "--data_folder", str(corpus))
    assert "up to date" in scored and "skipping data prep" in scored  # the same corpus, moved
    assert f"the run was recorded at {out} and is now at {copy}" in scored
    assert (copy / "scores_valid.txt").stat().st_mtime_ns > before[Path("scores_valid.txt")][1]
    moved = tmp_path / "moved"
    copy.rename(moved)  # mv
    run_script("export_model.py", moved, None, "--data_folder", str(corpus), "--export_onnx",
               "false")  # fmt: skip
    assert (moved / "export" / "export.json").is_file()
    assert not (tmp_path / "copy" / "exp").exists()  # nothing recreated where it was
    assert _stamps(out) == before  # the original: not one file read-written or added


@pytest.mark.slow
def test_resuming_a_run_with_another_model_shape_changes_nothing(trained, tiny_corpus):
    out, _ = trained
    record = (out / "hyperparams.yaml").read_bytes()
    command = [
        "--emb_dim=32" if arg == "--emb_dim=64" else arg
        for arg in run_script_command("train_speaker_embeddings.py", out, tiny_corpus)
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode != 0, result.stdout[-2000:]
    assert "emb_dim: 64 (now 32)" in result.stderr and "keep them" in result.stderr
    assert (out / "hyperparams.yaml").read_bytes() == record  # the run's record is untouched


def test_a_whole_checkpoint_that_does_not_fit_is_not_called_damaged(tmp_path):
    folder = tmp_path / "CKPT+2026-01-01+00-00-00+00"
    folder.mkdir()
    torch.save({"w": torch.ones(3)}, folder / "embedding_model.ckpt")
    (folder / "brain.ckpt").write_text("step: 4\n")  # SpeechBrain's text recoverables
    (folder / "counter.ckpt").write_text("2")
    error = CheckpointLoadError(folder, RuntimeError("size mismatch for head.weight"))
    assert "do not fit the model these settings build" in str(error)
    assert "Delete" not in str(error) and "size mismatch for head.weight" in str(error)
