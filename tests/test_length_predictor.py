"""The output-length predictor: features, conditional refresh, persistence, committed model."""

import json
from pathlib import Path

import numpy as np
import pytest

from router.length_predictor import (
    DEFAULT_MODEL_PATH,
    DecodeState,
    HistogramLengthPredictor,
    LengthHistogram,
    LengthTracker,
    MeanLengthBaseline,
    PromptFeatures,
    RemainingLengthPredictor,
    load_default_predictor,
    question_type,
)


@pytest.mark.parametrize("text,kind", [
    ("Write a python function that sorts a list", "code"),
    ("Please summarize this paragraph", "rewrite"),
    ("Write an essay about trees", "write"),
    ("Give me a list of ideas for a party", "list"),
    ("Explain why the sky is blue", "explain"),
    ("What is the capital of France?", "short_question"),
    ("The capital letters look nice", "other"),  # "api" inside "capital" is no keyword
    ("你好，请问今天天气怎么样", "non_english"),
    (None, "other"),
])
def test_question_type(text, kind):
    assert question_type(text) == kind


def test_histogram_conditional_remaining():
    # Uniform on [0, 100): E[L] = 50, E[L - 40 | L > 40] = 30, median of the rest = 30.
    h = LengthHistogram(np.array([0.0, 50.0, 100.0]), np.array([0.5, 0.5]))
    assert h.mean_remaining(0) == pytest.approx(50)
    assert h.mean_remaining(40) == pytest.approx(30)
    assert h.median_remaining(40) == pytest.approx(30)
    assert h.mean_remaining(100) == 0.0


def synthetic(n=2000, seed=0):
    """Code prompts answer long (~400), short questions answer short (~40)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        if rng.random() < 0.5:
            out.append((PromptFeatures(int(rng.integers(20, 200)), "fix this python code"),
                        int(rng.integers(300, 500))))
        else:
            out.append((PromptFeatures(int(rng.integers(5, 30)), "what is 2+2?"),
                        int(rng.integers(20, 60))))
    return out


def test_features_beat_the_mean_baseline_on_held_out_data():
    train, test = synthetic(seed=0), synthetic(500, seed=1)
    model = HistogramLengthPredictor().fit(train)
    truth = np.array([o for _, o in test])
    model_mae = np.mean(np.abs([model.predict_total(p) - o for p, o in test]))
    base_mae = np.mean(np.abs(np.mean([o for _, o in train]) - truth))
    assert model_mae < 0.3 * base_mae


def test_refresh_conditions_on_tokens_generated():
    model = HistogramLengthPredictor().fit(synthetic())
    tracker = LengthTracker(model, PromptFeatures(100, "fix this python code"))
    first = tracker.estimate
    assert 300 <= first <= 500
    later = tracker.refresh(350)
    assert 0 < later < first - 300  # conditional on surviving past 350: at most ~150 more
    assert tracker.refresh(5000) == 0.0  # past the support (2048): nothing known


def test_save_load_round_trip(tmp_path):
    model = HistogramLengthPredictor().fit(synthetic(300))
    path = tmp_path / "m.json"
    model.save(path)
    again = HistogramLengthPredictor.load(path)
    prompt = PromptFeatures(100, "fix this python code")
    assert again.remaining(DecodeState(prompt, 10)) == model.remaining(DecodeState(prompt, 10))


def test_interface_seam_accepts_hidden_state():
    class HiddenStatePredictor:
        def remaining(self, state: DecodeState) -> float:
            return float(sum(state.hidden_state or ())) - state.generated

    predictor = HiddenStatePredictor()
    assert isinstance(predictor, RemainingLengthPredictor)
    tracker = LengthTracker(predictor, PromptFeatures(5))
    assert tracker.refresh(3, hidden_state=[10.0, 5.0]) == 12.0


def test_mean_baseline():
    base = MeanLengthBaseline(200)
    assert base.remaining(DecodeState(PromptFeatures(1), 150)) == 50
    assert base.remaining(DecodeState(PromptFeatures(1), 250)) == 0


def test_committed_model_and_results_are_consistent():
    """The committed ShareGPT model loads, and its report beats the mean baseline."""
    assert DEFAULT_MODEL_PATH.is_file(), "run python -m benchmarks.train_length_predictor"
    model = load_default_predictor()
    assert isinstance(model, HistogramLengthPredictor)
    assert DEFAULT_MODEL_PATH.stat().st_size < 50_000
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    report = json.loads((results / "length_predictor.json").read_text())
    at_prompt = report["at_prompt"]
    assert at_prompt["predictor_median"] < at_prompt["mean_baseline"]
    assert report["heldout_requests"] > 1000
    with pytest.raises(FileNotFoundError):  # a model asked for by path never falls back
        load_default_predictor(DEFAULT_MODEL_PATH.parent / "missing.json")


def test_a_missing_shipped_model_is_not_silent(monkeypatch, caplog):
    import router.length_predictor as lp

    monkeypatch.setattr(lp, "DEFAULT_MODEL_PATH", lp.DEFAULT_MODEL_PATH.parent / "gone.json")
    with caplog.at_level("WARNING", logger="fulcrum.length_predictor"):
        model = lp.load_default_predictor()
    assert isinstance(model, MeanLengthBaseline)
    assert "missing" in caplog.text
