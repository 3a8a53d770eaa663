"""The fast question-type classifier gives the same answer as one regex per category."""

from __future__ import annotations

import pytest

from router import length_predictor as lp


def reference(text: str | None) -> str:
    if not text:
        return lp.OTHER_TYPE
    sample = text[:2000]
    if sum(ord(ch) > 127 for ch in sample) > 0.3 * len(sample):
        return lp.NON_ENGLISH_TYPE
    lowered = sample.lower()
    for name, pattern in lp._TYPE_PATTERNS:
        if pattern.search(lowered):
            return name
    return lp.OTHER_TYPE


CASES = [
    None, "", "Fix this bug please", "my_code is here", "codes", "Write C++ for me",
    "I like java and tea", "javascript!", "```print(1)```", "def foo(): pass", "define x",
    "How does it work?", "how doesn't it", "howdoes", "Tell me about Rome", "why?", "why not",
    "Summarize this text", "Who was first", "whom", "Yes or no: is it?", "go on", "gone",
    "créer un article", "日本語のテキストです", "What is 2+2", "what are you", "improve this",
    "a list of ideas", "continue", "keep going now", "correct the spelling", "correct them",
    "script for a play", "SQL query", "more", "nothing to see",
]


@pytest.mark.parametrize("text", CASES)
def test_same_answer_as_the_regex_per_category(text: str | None) -> None:
    assert lp.question_type(text) == reference(text)


def test_same_answers_on_sharegpt() -> None:
    from benchmarks.dataset import load_sharegpt

    texts = [turn.get("value", "") for entry in load_sharegpt()[:3000]
             for turn in entry.get("conversations", [])]
    assert len(texts) > 3000
    assert [lp.question_type(t) for t in texts] == [reference(t) for t in texts]


def test_ascii_word_split_equals_the_regex() -> None:
    import random

    rng = random.Random(0)
    alphabet = [chr(c) for c in range(128)]
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert lp._words(text) == set(lp._WORD.findall(text)), repr(text)
    assert lp._words("naïve café_1 x") == {"naïve", "café_1", "x"}  # non-ASCII: the regex
