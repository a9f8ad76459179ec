"""Write a synthetic text-dependent corpus as Kaldi-style data directories, with any phrase set.

The same synthetic speech as ``data_prep/synth_deepmine.py`` (seeded espeak-ng speakers,
coloured, noised and reverberated), with the pass-phrases read from a text file (one per line)
and ``enrol_utts`` enrollment utterances per model, in the layout ``data_prep/kaldi_prepare.py``
reads::

    CORPUS/wav/{train,enroll,test}/<utt>.wav
    CORPUS/train/{wav.scp,utt2spk,text,utt2lang}
    CORPUS/enroll/{wav.scp,text,models,utt2lang}
    CORPUS/test/wav.scp
    CORPUS/trials       <model> <test-utt> target|nontarget TC|TW|IC|IW

Transcripts are written as a person would type them: each utterance's text in one of a few
spellings of its phrase (as given, lower case, without punctuation), so that the preparer's
normalization is what makes them one phrase. Free text (sentences that are no pass-phrase) is
drawn from the generator's sentences in the corpus's language only.

Usage::

    python data_prep/synth_kaldi.py --out data/kaldi_en30 --phrases phrases.txt --enrol_utts 5

The output is byte-identical for a given seed, phrase file and size, whatever ``--jobs`` is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import shutil
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.synth_deepmine import (
    FREE_TEXT,
    LANGUAGE_VOICE,
    TRAIN_FREE_TEXT,
    CorpusPlan,
    Utterance,
    plan_corpus,
    render_plan,
)

#: Folder of each kind of utterance, in the plan and on disk.
FOLDERS = {"train": "train", "enrollment": "enroll", "evaluation": "test"}


def read_phrases(path) -> list[str]:
    """The pass-phrases of a text file, one per line (blank lines and repeats refused)."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    phrases = [line for line in lines if line]
    if len(set(phrases)) != len(phrases) or not phrases:
        raise ValueError(f"{path}: give distinct pass-phrases, one per line")
    return phrases


def spellings(text: str) -> list[str]:
    """Ways a transcriber writes one phrase: as given, lower case, without punctuation."""
    bare = "".join(c for c in text if c.isalnum() or c.isspace())
    return [text, text.lower(), " ".join(bare.split())]


def utterance_ids(plan: CorpusPlan, speaker_ids: list[str]) -> dict[str, str]:
    """Kaldi utterance ids: training ones prefixed by their speaker (Kaldi's sort order)."""
    ids = {}
    for utt in plan.train:
        ids[utt.file_id] = f"{speaker_ids[utt.speaker]}-{utt.file_id}"
    for utt in plan.enrollment + plan.evaluation:
        ids[utt.file_id] = utt.file_id
    return ids


def _wav(out: Path, utt: Utterance, ids: dict) -> Path:
    """Where an utterance's audio goes."""
    return out / "wav" / FOLDERS[utt.subdir] / f"{ids[utt.file_id]}.wav"


def _write_lists(out: Path, plan: CorpusPlan, ids: dict, texts: dict, speaker_ids) -> None:
    """The data directories' tables (each sorted by id, as Kaldi wants) and the trials."""

    def transcript(utt: Utterance) -> str:
        """One spelling of the utterance's text, chosen by its seed."""
        forms = spellings(texts[utt.phrase_id][1])
        return forms[int(np.random.default_rng([*utt.seed, 7]).integers(len(forms)))]

    def write(name: str, rows) -> None:
        """A table: ``key value`` lines sorted by key."""
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{k} {v}\n" for k, v in sorted(rows)), encoding="utf-8")

    for subdir, utts in (("train", plan.train), ("enroll", plan.enrollment)):
        write(f"{subdir}/wav.scp", [(ids[u.file_id], _relative(out, u, ids)) for u in utts])
        write(f"{subdir}/text", [(ids[u.file_id], transcript(u)) for u in utts])
        write(f"{subdir}/utt2lang", [(ids[u.file_id], texts[u.phrase_id][0]) for u in utts])
    write("train/utt2spk", [(ids[u.file_id], speaker_ids[u.speaker]) for u in plan.train])
    write("enroll/models", [(m, " ".join(ids[f] for f in fids)) for m, _, fids in plan.models])
    write("test/wav.scp", [(ids[u.file_id], _relative(out, u, ids)) for u in plan.evaluation])
    lines = [
        f"{m} {ids[t]} {'target' if c == 'TC' else 'nontarget'} {c}\n" for m, t, c in plan.trials
    ]
    (out / "trials").write_text("".join(lines), encoding="utf-8")


def _relative(out: Path, utt: Utterance, ids: dict) -> str:
    """A ``wav.scp`` path: relative to the corpus folder."""
    return _wav(out, utt, ids).relative_to(out).as_posix()


def synthesize_kaldi_corpus(
    out,
    phrases: list[str],
    speakers: int = 4,
    eval_speakers: int = 2,
    reps: int = 6,
    enrol_utts: int = 5,
    seed: int = 1234,
    jobs: int = 2,
    language: str = "english",
    free_text: int = 2,
    free_text_trials: int = 1,
    free_text_train: int = 2,
    trials_per_model: dict[str, int] | None = None,
) -> Path:
    """Write the corpus to ``out`` (skipped when it holds one made with the same options)."""
    if language not in LANGUAGE_VOICE:
        raise ValueError(f"language must be one of {', '.join(LANGUAGE_VOICE)}")
    out = Path(out)
    phrase_ids = [f"K{i + 1:03d}" for i in range(len(phrases))]
    texts = {pid: (language, text) for pid, text in zip(phrase_ids, phrases, strict=True)}
    texts.update(FREE_TEXT)
    texts.update(TRAIN_FREE_TEXT)
    trials_per_model = trials_per_model or {"TW": 3, "IC": 4, "IW": 3}
    options = dict(
        phrases=hashlib.sha256("\n".join(phrases).encode()).hexdigest()[:16], speakers=speakers,
        eval_speakers=eval_speakers, reps=reps, enrol_utts=enrol_utts, seed=seed,
        language=language, free_text=free_text, free_text_trials=free_text_trials,
        free_text_train=free_text_train, trials_per_model=trials_per_model,
    )  # fmt: skip
    marker = out / "synth_options.json"
    if marker.is_file() and json.loads(marker.read_text()) == options:
        print(f"Synthetic Kaldi-layout corpus already in {out} (same options): skipping.")
        return out
    plan = plan_corpus(
        seed, speakers, eval_speakers, reps, trials_per_model, free_text, free_text_trials,
        free_text_train, phrases=phrase_ids, enrol_utts=enrol_utts, languages=(language,),
    )  # fmt: skip
    speaker_ids = [f"spk{i + 1:04d}" for i in range(speakers + eval_speakers)]
    ids = utterance_ids(plan, speaker_ids)
    _clear(out)
    for folder in FOLDERS.values():
        (out / "wav" / folder).mkdir(parents=True, exist_ok=True)
    seconds = render_plan(
        out, plan, seed, speakers + eval_speakers, jobs, texts, lambda u: _wav(out, u, ids)
    )
    _write_lists(out, plan, ids, texts, speaker_ids)
    marker.write_text(json.dumps(options))
    utterances = len(plan.train) + len(plan.enrollment) + len(plan.evaluation)
    print(
        f"Wrote {utterances} utterances ({seconds / 3600:.2f} h), {len(phrases)} phrases, "
        f"{len(plan.models)} models of {enrol_utts} and {len(plan.trials)} trials to {out}"
    )
    return out


def _clear(out: Path) -> None:
    """Empty a folder this script wrote before; refuse one holding anything else."""
    mark = out / ".written_by_synth_kaldi"
    if out.exists() and any(out.iterdir()) and not mark.exists():
        raise FileExistsError(f"{out} holds files that synth_kaldi.py did not write")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    mark.touch()


def main(argv=None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="corpus folder to write")
    parser.add_argument("--phrases", required=True, help="text file: one pass-phrase per line")
    parser.add_argument(
        "--speakers", type=int, default=4, help="training speakers (validation too)"
    )
    parser.add_argument("--eval_speakers", type=int, default=2)
    parser.add_argument("--reps", type=int, default=6, help="repetitions of each phrase")
    parser.add_argument("--enrol_utts", type=int, default=5, help="utterances per model")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--language", default="english", choices=sorted(LANGUAGE_VOICE))
    parser.add_argument("--free_text", type=int, default=2, help="per evaluation speaker")
    parser.add_argument("--free_text_trials", type=int, default=1, help="TW trials per model")
    parser.add_argument("--free_text_train", type=int, default=2, help="per training speaker")
    parser.add_argument("--jobs", type=int, default=multiprocessing.cpu_count())
    args = parser.parse_args(argv)
    synthesize_kaldi_corpus(
        args.out, read_phrases(args.phrases), args.speakers, args.eval_speakers, args.reps,
        args.enrol_utts, args.seed, args.jobs, args.language, args.free_text,
        args.free_text_trials, args.free_text_train,
    )  # fmt: skip


if __name__ == "__main__":
    main()
