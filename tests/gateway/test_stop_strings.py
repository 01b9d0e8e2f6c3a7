"""StopStringMatcher: stop strings found across deltas, with no text held back needlessly."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from gateway.stop_strings import StopMatch, StopStringMatcher


def run(stop: Sequence[str], deltas: Sequence[str]) -> tuple[str, bool]:
    """Feed every delta (stopping early if told to) and flush; return (text, stopped)."""
    matcher = StopStringMatcher(stop)
    text = []
    for delta in deltas:
        match = matcher.feed(delta)
        text.append(match.text)
        if match.stopped:
            return "".join(text), True
    text.append(matcher.flush())
    return "".join(text), False


def reference(stop: Sequence[str], full: str) -> tuple[str, bool]:
    """Text before the stop string that ends first in ``full`` (ties: the one starting first)."""
    found = [(full.find(s) + len(s), full.find(s)) for s in stop if s in full]
    if not found:
        return full, False
    return full[: min(found)[1]], True


def test_no_stop_strings_passes_text_through() -> None:
    matcher = StopStringMatcher([])
    assert matcher.feed("hello") == StopMatch("hello", False)
    assert matcher.flush() == ""


def test_stop_string_within_one_delta() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("abc STOP def") == StopMatch("abc ", True)


def test_stop_string_split_across_deltas() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("abc ST") == StopMatch("abc ", False)
    assert matcher.feed("O") == StopMatch("", False)
    assert matcher.feed("P and more") == StopMatch("", True)


def test_held_prefix_is_released_when_it_stops_matching() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("ST") == StopMatch("", False)
    assert matcher.feed("ORM") == StopMatch("STORM", False)


def test_held_prefix_is_returned_by_flush() -> None:
    matcher = StopStringMatcher(["</answer>"])
    assert matcher.feed("42</ans") == StopMatch("42", False)
    assert matcher.flush() == "</ans"


def test_no_false_holds() -> None:
    """Text that cannot begin a stop string is emitted at once, even next to a stop's chars."""
    matcher = StopStringMatcher(["\n\nUser:", "###"])
    for delta in ["Hello", " world.", "\nNext", "# heading", "Us"]:
        assert matcher.feed(delta) == StopMatch(delta, False)


def test_only_the_longest_matching_tail_is_held() -> None:
    matcher = StopStringMatcher(["aab"])
    assert matcher.feed("xa") == StopMatch("x", False)
    assert matcher.feed("a") == StopMatch("", False)
    assert matcher.feed("a") == StopMatch("a", False)  # "aaa": only "aa" can still start "aab"
    assert matcher.feed("b") == StopMatch("", True)


def test_the_stop_string_that_ends_first_wins() -> None:
    assert run(["abcd", "bc"], ["abcd"]) == ("a", True)
    assert run(["abcd", "bc"], ["ab", "cd"]) == ("a", True)
    assert run(["abcd", "bc"], ["abc", "d"]) == ("a", True)


def test_ties_on_the_end_go_to_the_longer_stop_string() -> None:
    assert run(["cd", "abcd"], ["xxabcd"]) == ("xx", True)


def test_overlapping_prefixes_of_several_stop_strings() -> None:
    stop = ["<|end|>", "<|eot|>", "<<"]
    assert run(stop, ["text <", "|e", "o", "t|> tail"]) == ("text ", True)
    assert run(stop, ["text <", "|e", "x", "it"]) == ("text <|ex" + "it", False)
    assert run(stop, ["a <", "<b"]) == ("a ", True)


def test_stops_are_unicode_aware() -> None:
    assert run(["日本"], ["今日は日", "本語"]) == ("今日は", True)
    assert run(["🙂"], ["fine ", "🙂 thanks"]) == ("fine ", True)


def test_after_stopping_everything_is_dropped() -> None:
    matcher = StopStringMatcher(["x"])
    assert matcher.feed("axb") == StopMatch("a", True)
    assert matcher.stopped
    assert matcher.feed("more") == StopMatch("", True)
    assert matcher.flush() == ""


def test_held_text_is_shorter_than_the_longest_stop_string() -> None:
    stop = ["abcabd", "zz"]
    matcher = StopStringMatcher(stop)
    stream, emitted = "", ""
    for char in "abcabcabcabzabcab":
        stream += char
        emitted += matcher.feed(char).text
        assert stream.startswith(emitted)
        assert len(stream) - len(emitted) < max(map(len, stop))
    assert emitted + matcher.flush() == stream


def test_empty_stop_string_is_rejected() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher(["ok", ""])


@pytest.mark.parametrize("seed", range(20))
def test_result_does_not_depend_on_how_text_is_split(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = "ab c\n"
    stop = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(3)]
    for _ in range(50):
        full = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        cuts = sorted(rng.sample(range(len(full) + 1), k=min(len(full) + 1, rng.randint(0, 8))))
        deltas = [full[a:b] for a, b in zip([0, *cuts], [*cuts, len(full)], strict=True)]
        assert run(stop, deltas) == reference(stop, full), (stop, deltas)


def run_including(stop: Sequence[str], deltas: Sequence[str]) -> tuple[str, bool]:
    matcher = StopStringMatcher(stop, include_stop_str_in_output=True)
    text = []
    for delta in deltas:
        match = matcher.feed(delta)
        text.append(match.text)
        if match.stopped:
            return "".join(text), True
    text.append(matcher.flush())
    return "".join(text), False


def test_include_stop_str_in_output_keeps_the_matched_string() -> None:
    assert run_including(["END"], ["abc E", "N", "Dxyz"]) == ("abc END", True)
    assert run_including(["\n\n", "STOP"], ["a\n", "\nSTOP"]) == ("a\n\n", True)
    assert run_including(["END"], ["abc EN"]) == ("abc EN", False)  # no match: flushed


def test_include_stop_str_in_output_against_the_reference_on_random_splits() -> None:
    rng = random.Random(7)
    stop = ["ab", "bca", "ccc"]
    for _ in range(300):
        full = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 20)))
        cuts = sorted(rng.sample(range(len(full) + 1), k=min(3, len(full) + 1)))
        deltas = [full[i:j] for i, j in zip([0, *cuts], [*cuts, len(full)], strict=True)]
        found = [(full.find(s) + len(s), full.find(s)) for s in stop if s in full]
        want = (full[: min(found)[0]], True) if found else (full, False)
        assert run_including(stop, deltas) == want, (full, deltas)
