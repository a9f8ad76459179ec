"""Text-dependent scoring: the phrase branch, phrase scores, the fusion into calibrated LLRs.

A trial is a target only when the enrolled speaker says the enrolled pass-phrase; these tests
hold the phrase branch, the fusion's arithmetic and decisions, the reports and the CLI to that.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import speechbrain as sb
import torch
from speechbrain.dataio.batch import PaddedBatch

from data_prep.synth_deepmine import FREE_TEXT, TRAIN_FREE_TEXT, plan_corpus
from recipes.evaluation.fusion import (
    TrialScores,
    fit_calibration,
    learn_fusion,
    stored_or_learned_fusion,
    trial_scores,
)
from recipes.evaluation.metrics import actual_dcf, bayes_threshold, cllr
from recipes.evaluation.scoring import EmbeddingTable, score_trials
from recipes.evaluation.verification import ScoringSettings, check_validation_split
from recipes.evaluation.verification_report import score_columns, write_report
from recipes.model import trial_decisions
from recipes.model.speaker_model import PhraseBranch
from recipes.model.trial_decisions import GATE_PENALTY, LOGP_FLOOR, fused_llr, phrase_feature
from recipes.train_speaker_embeddings import build_brain
from tests.conftest import TINY
from tests.helpers import load_yaml, run_script

FUSION = {
    "kind": "llr",
    "speaker": {"features": ["speaker"], "weights": [8.0], "bias": -5.0},
    "phrase": {
        "features": ["speaker", "phrase", "content"],
        "weights": [7.0, 0.5, 2.0],
        "bias": -5.0,
    },
    "content": {"features": ["speaker", "content"], "weights": [6.0, 3.0], "bias": -6.0},
    "gate_threshold": {"phrase": -2.0, "content": 0.4},
}


def tone_batch(phrases, seconds=1.0):
    """Utterances whose 'phrase' is a tone (class 0: 300 Hz, class 1: 2 kHz), with noise."""
    t = torch.arange(int(16000 * seconds)) / 16000
    examples = []
    for i, phrase in enumerate(phrases):
        tone = torch.sin(2 * math.pi * (300 if phrase == 0 else 2000) * t)
        examples.append(
            {
                "id": f"u{i}",
                "sig": 0.3 * tone + 0.05 * torch.randn(t.shape),
                "class_encoded": torch.tensor([i % 3]),
                "phrase_encoded": torch.tensor([phrase]),
            }
        )
    return PaddedBatch(examples)


@pytest.mark.parametrize("margin", [0.0, 0.2])
def test_phrase_branch_learns_on_a_few_batches(tmp_path, tiny_wavlm_dir, margin):
    hparams = load_yaml(
        "synthetic_demo.yaml",
        {
            "output_folder": str(tmp_path),
            "wavlm_source": tiny_wavlm_dir,
            "noise_csv": None,
            "augment": False,
            "phrase_loss_weight": 1.0,
            "warmup_steps": 1,  # full learning rates from the first step
            "phrase_margin": margin,
        },
    )
    brain = build_brain(hparams, {"device": "cpu"}, n_classes=3, n_phrases=2)
    brain.use_data(100, None)
    brain.hparams.epoch_counter.current, brain.step = 1, 0
    brain.init_optimizers()
    brain.modules.train()
    torch.manual_seed(0)
    batch = tone_batch([0, 1, 0, 1, 1, 0])

    def phrase_loss():
        brain.modules.eval()
        with torch.no_grad():
            outputs = brain.compute_forward(batch, sb.Stage.VALID)
        brain.modules.train()
        targets = batch.phrase_encoded.data[:, 0]
        return float(torch.nn.functional.nll_loss(outputs["phrase_logp"], targets))

    before = phrase_loss()
    for _ in range(12):
        brain.fit_batch(batch)
    after = phrase_loss()
    assert after < 0.5 * before, (before, after)
    # One WavLM pass serves both: the branch has its own layer weights, and they learned.
    model = brain.modules.embedding_model
    assert model.phrase_branch.layer_logits.abs().sum() > 0
    assert not torch.equal(model.phrase_branch.layer_logits, model.layer_logits)


def test_the_cosine_phrase_classifier_trains_with_a_margin_and_scores_without():
    branch = PhraseBranch(3, 8, 4, channels=(8, 8, 8), embedding_dim=6, scale=30.0, margin=0.2)
    embedding, logits = branch(torch.randn(3, 2, 40, 8))
    weight = torch.nn.functional.normalize(branch.classifier.weight, dim=-1)
    cosine = torch.nn.functional.normalize(embedding, dim=-1) @ weight.T
    assert torch.allclose(logits, 30.0 * cosine, atol=1e-5)  # what scoring turns into posteriors
    targets = torch.tensor([2, 0])
    by_hand = -torch.log_softmax(30.0 * (cosine - 0.2 * torch.eye(4)[targets]), -1)
    assert torch.isclose(branch.loss(logits, targets), by_hand[[0, 1], targets].mean(), atol=1e-5)


def test_fused_llr_and_bayes_decisions_equal_a_hand_computation():
    speaker = np.array([0.95, 0.95, 0.2, 1.0, 0.6])
    logp = np.array([-0.01, -30.0, -0.02, -50.0, -50.0])  # the last two: no class, not used
    known = np.array([True, True, True, False, False])
    content = np.array([0.5, 0.5, 0.9, 0.95, 0.1])
    phrase = phrase_feature(logp, known, content)
    assert list(phrase) == [-0.01, LOGP_FLOOR, -0.02, 0.95, 0.1]  # floored; content where unknown
    features = {"speaker": speaker, "phrase": phrase, "content": content}
    llr = fused_llr(FUSION, features, known)
    expected = [
        -5.0 + 7.0 * 0.95 + 0.5 * -0.01 + 2.0 * 0.5,
        -5.0 + 7.0 * 0.95 + 0.5 * LOGP_FLOOR + 2.0 * 0.5,  # floored log-posterior
        -5.0 + 7.0 * 0.2 + 0.5 * -0.02 + 2.0 * 0.9,
        -6.0 + 6.0 * 1.0 + 3.0 * 0.95,  # content calibration
        -6.0 + 6.0 * 0.6 + 3.0 * 0.1,
    ]
    assert llr == pytest.approx(expected)
    threshold = bayes_threshold(0.01, 10.0, 1.0)
    assert threshold == pytest.approx(math.log(0.99 / 0.1))
    assert list(llr >= threshold) == [True, False, False, True, False]
    gate = fused_llr(FUSION, features, known, kind="gate")
    speaker_llr = -5.0 + 8.0 * speaker
    below = np.array([False, True, False, False, True])
    assert gate == pytest.approx(speaker_llr - GATE_PENALTY * below)


def test_actual_dcf_and_cllr_by_hand():
    targets, nontargets = np.array([3.0, 1.0, 5.0, -1.0]), np.array([-4.0, 2.5, -2.0, -6.0, 0.0])
    threshold = math.log(0.99 / 0.1)  # 2.29: misses 1.0 and -1.0; false alarm 2.5
    cost = (10 * 0.01 * 2 / 4 + 1 * 0.99 * 1 / 5) / min(10 * 0.01, 0.99)
    assert threshold > 2.0 and actual_dcf(targets, nontargets) == pytest.approx(cost)
    bits = (np.mean(np.log2(1 + np.exp(-targets))) + np.mean(np.log2(1 + np.exp(nontargets)))) / 2
    assert cllr(targets, nontargets) == pytest.approx(bits)
    assert cllr(np.zeros(3), np.zeros(3)) == pytest.approx(1.0)  # no information: 1 bit


def test_prior_weighted_calibration_recovers_the_true_llr():
    # Scores ~ N(+1, 1) for targets, N(-1, 1) for non-targets: the true LLR is 2 * score.
    rng = np.random.default_rng(0)
    targets = np.r_[np.ones(20000, bool), np.zeros(80000, bool)]
    scores = np.where(targets, 1.0, -1.0) + rng.normal(size=targets.size)
    conditions = np.where(targets, "TC", "IC")
    for prior in (0.01, 0.5):
        calibration = fit_calibration({"s": scores}, ["s"], conditions, prior)
        assert calibration["weights"][0] == pytest.approx(2.0, abs=0.1)
        assert calibration["bias"] == pytest.approx(0.0, abs=0.1)


def test_calibration_does_not_depend_on_the_mix_of_nontarget_conditions():
    # Same score distributions per condition, 9x more IW trials in one list: same calibration.
    rng = np.random.default_rng(1)
    base, conditions = _validation_like_scores(rng, n=4000)
    iw = conditions == "IW"
    repeat = np.where(iw, 9, 1)
    calibrations = [
        fit_calibration(base.features, ["speaker"], conditions, 0.1),
        fit_calibration(
            {"speaker": np.repeat(base.speaker, repeat)},
            ["speaker"],
            np.repeat(conditions, repeat),
            0.1,
        ),
    ]
    assert calibrations[0]["weights"][0] == pytest.approx(calibrations[1]["weights"][0], rel=1e-3)
    assert calibrations[0]["bias"] == pytest.approx(calibrations[1]["bias"], abs=1e-3)


def _validation_like_scores(rng, n=400):
    """Synthetic validation trials: TC, TW (low phrase score), IC, IW: (TrialScores, conditions)."""
    conditions = np.array(["TC", "TW", "IC", "IW"] * (n // 4))
    same_speaker = np.isin(conditions, ["TC", "TW"])
    same_phrase = np.isin(conditions, ["TC", "IC"])
    speaker = np.where(same_speaker, 0.7, 0.1) + 0.1 * rng.normal(size=n)
    phrase = np.where(same_phrase, -0.05, -6.0) + 0.3 * rng.normal(size=n)
    content = np.where(same_phrase, 0.8, 0.1) + 0.1 * rng.normal(size=n)
    features = {"speaker": speaker, "phrase": np.minimum(phrase, 0), "content": content}
    return TrialScores(features, np.ones(n, bool)), conditions


def test_fusion_separates_wrong_phrase_trials_and_is_stored(tmp_path, caplog):
    scores, conditions = _validation_like_scores(np.random.default_rng(1))
    fusion = learn_fusion(scores, conditions, prior=0.01)
    llr = fused_llr({**fusion, "kind": "llr"}, scores.features, scores.known)
    assert llr[conditions == "TC"].min() > llr[conditions == "TW"].max()
    assert fusion["phrase"]["weights"][1] > 0 and fusion["content"]["weights"][1] > 0
    path, stamp = tmp_path / "fusion" / "ckpt_none.json", {"checkpoint": "CKPT+1"}
    with caplog.at_level(logging.INFO, logger="recipes.evaluation.fusion"):
        first = stored_or_learned_fusion(path, scores, conditions, 0.01, stamp)
        again = stored_or_learned_fusion(path, scores, conditions, 0.01, stamp)
        other = stored_or_learned_fusion(path, scores, conditions, 0.01, {"checkpoint": "CKPT+2"})
    assert first == again and json.loads(path.read_text()) == other
    assert "using the one stored" in caplog.text and "learning it again" in caplog.text
    # Another corpus with the same shape (counts, targets): other scores, so learned again.
    shuffled = TrialScores({k: v[::-1].copy() for k, v in scores.features.items()}, scores.known)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="recipes.evaluation.fusion"):
        stored_or_learned_fusion(path, shuffled, conditions[::-1], 0.01, {"checkpoint": "CKPT+2"})
        path.write_text(path.read_text()[:40])  # truncated: damaged, learned again
        stored_or_learned_fusion(path, scores, conditions, 0.01, stamp)
    assert caplog.text.count("learning it again") == 2 and "is damaged" in caplog.text
    assert json.loads(path.read_text())["stamp"]["checkpoint"] == "CKPT+1"


def test_a_fusion_without_wrong_phrase_validation_trials_is_refused_before_training():
    """A held-out split whose speakers say one phrase each has no TW: named, with the fixes."""
    scoring = ScoringSettings(
        output_folder="x", score_norm="none", cohort_top_k=10, fusion="llr", fusion_prior=0.09,
        eval_precision="fp32", loader_options={}, max_eval_seconds=8.0, sample_rate=16000,
    )  # fmt: skip
    trials = pd.DataFrame({"condition": ["TC", "IC", "IC"]})
    with pytest.raises(
        SystemExit,
        match=r"fusion: 'llr' learns on the validation split's "
        r"wrong-phrase \(TW\) trials, and it has none \(its conditions: IC, TC\)",
    ):
        check_validation_split(trials, scoring)
    check_validation_split(pd.DataFrame({"condition": ["TC", "TW"]}), scoring)
    check_validation_split(trials, dataclasses.replace(scoring, fusion="none"))


def test_a_new_trial_feature_is_learned_applied_and_reported(tmp_path, monkeypatch):
    """A feature named in the schema (and computed) reaches learning, applying and the report."""
    monkeypatch.setattr(
        trial_decisions, "TRIAL_FEATURES", (*trial_decisions.TRIAL_FEATURES, "quality")
    )
    phrase_features = (*trial_decisions.CALIBRATIONS["phrase"], "quality")
    monkeypatch.setitem(trial_decisions.CALIBRATIONS, "phrase", phrase_features)
    rng = np.random.default_rng(2)
    scores, conditions = _validation_like_scores(rng)
    # A quality measure that tells targets apart a little: the fusion should weight it.
    scores.features["quality"] = (conditions == "TC") + rng.normal(size=conditions.size)
    fusion = {**learn_fusion(scores, conditions, prior=0.01), "kind": "llr"}
    assert fusion["phrase"]["features"] == list(phrase_features)
    assert fusion["phrase"]["weights"][-1] > 0
    shifted = {**scores.features, "quality": scores.features["quality"] + 1.0}
    difference = fused_llr(fusion, shifted) - fused_llr(fusion, scores.features)
    assert difference == pytest.approx(fusion["phrase"]["weights"][-1])
    trials = pd.DataFrame({"model_id": "m", "test_id": "t", "label": "x", "condition": conditions})
    final = fused_llr(fusion, scores.features, scores.known)
    write_report(tmp_path, "valid", trials, final, {}, parts=scores)
    columns = pd.read_csv(tmp_path / "scores_valid.txt", sep=" ", header=None).shape[1]
    assert columns == 3 + 4 + 2  # model test score, speaker phrase content quality, label condition


class _OneTrial(trial_decisions.TrialDecisions):
    """The decisions mixin as both exported backends use it, with a given fusion."""

    def __init__(self, fusion, phrase_labels):
        self.hparams = SimpleNamespace(fusion=fusion, phrase_labels=phrase_labels, costs=None)

    def has_fusion(self):
        return True


def test_a_fourth_trial_feature_works_on_trial_lists_and_on_one_trial(monkeypatch):
    """A feature added to the schema is learned, applied and given in the verdict, both paths.

    The same trials scored as a list (the recipe, the reports) and one by one (the exported
    folder's backends, the CLI) get the same features and the same fused LLR.
    """
    monkeypatch.setattr(
        trial_decisions, "TRIAL_FEATURES", (*trial_decisions.TRIAL_FEATURES, "agreement")
    )
    phrase_features = (*trial_decisions.CALIBRATIONS["phrase"], "agreement")
    monkeypatch.setitem(trial_decisions.CALIBRATIONS, "phrase", phrase_features)
    monkeypatch.setitem(
        trial_decisions.FEATURE_FORMULAS,
        "agreement",
        lambda p: np.asarray(p["speaker"]) * p["content"],
    )
    rng = np.random.default_rng(5)
    labels, dim = ["01", "02"], 8
    voices, phrases = rng.normal(size=(4, dim)), rng.normal(size=(2, dim))
    outputs, models, trials = {}, [], []

    def utterance(name, speaker, phrase):
        logp = np.log(np.where(np.arange(2) == phrase, 0.9, 0.1))
        outputs[name] = {
            "speaker": voices[speaker] + 0.3 * rng.normal(size=dim),
            "phrase_embedding": phrases[phrase] + 0.3 * rng.normal(size=dim),
            "phrase_logp": logp + 0.05 * rng.normal(size=2), "seconds": 1.5,
        }  # fmt: skip

    for speaker in range(4):
        for phrase in range(2):
            model = f"m{speaker}{phrase}"
            enrol = [f"{model}_e{i}" for i in range(3)]
            for name in enrol:
                utterance(name, speaker, phrase)
            models.append(
                {"model_id": model, "enrol_ids": " ".join(enrol), "phrase_id": labels[phrase]}
            )
            for other in range(4):
                for said in range(2):
                    test = f"t_{model}_{other}{said}"
                    utterance(test, other, said)
                    condition = ("T" if other == speaker else "I") + (
                        "C" if said == phrase else "W"
                    )
                    trials.append({"model_id": model, "test_id": test, "condition": condition})
    models, trials = pd.DataFrame(models), pd.DataFrame(trials)
    tables = {
        name: EmbeddingTable.from_dict({u: o[name] for u, o in outputs.items()})
        for name in ("speaker", "phrase_embedding", "phrase_logp")
    }
    scores = trial_scores(tables, models, trials, labels)
    fusion = {**learn_fusion(scores, trials["condition"], prior=0.1), "kind": "llr"}
    assert fusion["phrase"]["features"] == list(phrase_features)
    listed = fused_llr(fusion, scores.features, scores.known)

    decisions = _OneTrial(fusion, labels)
    phrase_of = models.set_index("model_id")["phrase_id"]
    enrol_of = models.set_index("model_id")["enrol_ids"].str.split()
    for i, trial in trials.iterrows():
        enrol = [outputs[u] for u in enrol_of[trial["model_id"]]]
        verdict = decisions.score_trial(
            enrol, outputs[trial["test_id"]], phrase_of[trial["model_id"]]
        )
        assert set(verdict.features) == set(trial_decisions.TRIAL_FEATURES)
        # (the tables are float32)
        for name, value in verdict.features.items():
            assert value == pytest.approx(scores.features[name][i], abs=1e-5), name
        assert verdict.score == pytest.approx(listed[i], abs=1e-4)


def test_free_text_wrong_phrase_trials_are_in_the_synthetic_corpus():
    trials_per_model = {"TW": 3, "IC": 6, "IW": 3}
    plain = plan_corpus(7, 4, 3, 4, trials_per_model)
    plan = plan_corpus(
        7, 4, 3, 4, trials_per_model, free_text=3, free_text_trials=2, free_text_train=2
    )
    # The free text is added: everything else is the same corpus.
    assert plan.trials[: len(plain.trials)] == plain.trials
    assert plan.evaluation[: len(plain.evaluation)] == plain.evaluation
    assert plan.train[: len(plain.train)] == plain.train
    train_free = plan.train[len(plain.train) :]
    assert len(train_free) == 4 * 2 and all(u.phrase_id in TRAIN_FREE_TEXT for u in train_free)
    assert not set(TRAIN_FREE_TEXT) & set(FREE_TEXT)  # evaluation sentences are never trained
    free = {u.file_id: u for u in plan.evaluation if u.phrase_id in FREE_TEXT}
    assert len(free) == 3 * 3
    models = {mid: phrase for mid, phrase, _ in plan.models}
    speaker_of = {u.file_id: u.speaker for u in plan.enrollment}
    model_speaker = {mid: speaker_of[fids[0]] for mid, _, fids in plan.models}
    free_trials = [t for t in plan.trials if t[1] in free]
    assert len(free_trials) == 2 * len(models)
    for model_id, test_id, condition in free_trials:
        assert condition == "TW" and free[test_id].speaker == model_speaker[model_id]


# ------------------------------------------------------------------------------------------------
# The short recipe run (conftest's ``trained``: phrase branch + llr fusion, as the demo)
# ------------------------------------------------------------------------------------------------
def _scores_table(path) -> pd.DataFrame:
    """A labelled score file of the run (the default quality measures' features included)."""
    columns = score_columns(trial_decisions.DEFAULT_QUALITY)
    return pd.read_csv(path, sep=" ", header=None, names=columns, dtype={"label": str})


@pytest.mark.slow
def test_recipe_scores_fused_llrs_and_reports_calibration(trained, tiny_corpus):
    out, _ = trained
    scores = _scores_table(out / "scores_eval.txt")
    answer = np.loadtxt(out / "answer.txt")
    assert answer == pytest.approx(scores["score"].to_numpy(), abs=1e-6)
    report = json.loads((out / "verification_eval.json").read_text())
    assert report["llr"] and {"act_dcf", "cllr"} <= set(report["conditions"]["pooled"])
    # Free-text wrong-phrase trials are scored (TW, a phrase score like any other trial).
    free = scores[scores["test_id"].isin(_free_text_ids())]
    assert len(free) > 0 and set(free["condition"]) == {"TW"}
    # The stored fusion reproduces the score file's LLRs from its speaker and phrase columns.
    fusion = json.loads(next((out / "fusion").glob("*_none_cohort.json")).read_text())
    llr = fused_llr({**fusion, "kind": "llr"}, scores)  # the score file's feature columns
    assert llr == pytest.approx(scores["score"].to_numpy(), abs=1e-4)


def _free_text_ids() -> set[str]:
    """Eval test utterances of the tiny corpus that are no pass-phrase (free text)."""
    plan = plan_corpus(
        TINY["seed"], TINY["speakers"], TINY["eval_speakers"], TINY["reps"],
        {"TW": 3, "IC": 6, "IW": 3}, TINY["free_text"], TINY["free_text_trials"],
    )  # fmt: skip
    return {u.file_id for u in plan.evaluation if u.phrase_id in FREE_TEXT}


@pytest.mark.slow
def test_fusion_none_gives_the_speaker_scores_exactly(trained, tiny_corpus):
    out, _ = trained
    output = run_script("verify_speakers.py", out, tiny_corpus, "--fusion", "none")
    # The step says what it does on the console, and appends it to the run's log.
    assert "recipes.settings - step on" in output and "eval_speaker | condition" in output
    assert "verify_speakers.py trials" in (out / "log.txt").read_text()
    speaker_only = _scores_table(out / "scores_eval_speaker.txt")
    fused = _scores_table(out / "scores_eval.txt")
    assert (speaker_only["score"] == speaker_only["speaker"]).all()
    assert (speaker_only["speaker"] == fused["speaker"]).all()
    # ... which are the cosine scores of the cached speaker embeddings, as before the fusion.
    cache = next((out / "embeddings").glob("*/eval.npy")).with_suffix("")
    models = pd.read_csv(out / "prep" / "eval_enrol.csv", dtype=str)
    trials = pd.read_csv(out / "prep" / "eval_trials.csv", dtype=str, keep_default_na=False)
    cosine = score_trials(EmbeddingTable.load(cache), models, trials)
    assert speaker_only["score"].to_numpy() == pytest.approx(cosine, abs=1e-6)
    assert np.loadtxt(out / "answer_speaker.txt") == pytest.approx(cosine, abs=1e-6)
    assert not json.loads((out / "verification_eval_speaker.json").read_text())["llr"]
