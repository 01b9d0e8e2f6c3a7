"""``benchmarks/speculative.py`` without a server: the seeded workloads, the Prometheus
counters and their deltas, decode tok/s and ITL from client timestamps, the greedy comparison
between systems, the flags and header of each system, and the truncated draft (on a tiny model:
its logits are the target's early exit)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from benchmarks.speculative import (
    Stream,
    acceptance,
    greedy_mismatches,
    grounded,
    header,
    num_layers,
    parse_args,
    spec_counters,
    summarize,
    system_flags,
    truncated_draft,
    ungrounded,
)
from tests.support.tiny_models import build_tiny_model

EXPOSITION = """\
# HELP pdserve_spec_proposed_tokens_total Draft tokens proposed
# TYPE pdserve_spec_proposed_tokens_total counter
pdserve_spec_proposed_tokens_total{tier="decode"} 120.0
pdserve_spec_proposed_created{tier="decode"} 1.7e9
# TYPE pdserve_spec_accepted_tokens_total counter
pdserve_spec_accepted_tokens_total{tier="decode"} 90.0
# TYPE pdserve_spec_verify_steps_total counter
pdserve_spec_verify_steps_total{tier="decode"} 40.0
# TYPE pdserve_requests_total counter
pdserve_requests_total{tier="decode"} 7.0
"""


def test_workloads_are_seeded_and_of_their_kind() -> None:
    assert grounded(6, 0) == grounded(6, 0)
    assert grounded(6, 0) != grounded(6, 1)
    prompts = grounded(4, 0).prompts
    assert [p.split("\n")[0].split(" ")[0] for p in prompts] == ["Repeat", "Rewrite"] * 2
    assert "def " in prompts[1] and "x" in prompts[1]
    assert all(p.startswith("Write a story about ") for p in ungrounded(5, 0).prompts)
    assert len(ungrounded(16, 0).prompts) == 16


def test_counters_are_summed_by_name_and_others_ignored() -> None:
    twice = EXPOSITION + EXPOSITION.replace('"decode"', '"colocated"')
    assert spec_counters(twice) == {
        "pdserve_spec_proposed_tokens_total": 240.0,
        "pdserve_spec_accepted_tokens_total": 180.0,
        "pdserve_spec_verify_steps_total": 80.0,
    }
    assert spec_counters("# TYPE x counter\nx_total 1.0\n") == {}


def test_acceptance_is_over_deltas_and_na_without_counters() -> None:
    before = {"pdserve_spec_proposed_tokens_total": 20.0}
    got = acceptance(before, spec_counters(EXPOSITION))
    assert got["proposed"] == 100.0 and got["accepted"] == 90.0
    assert got["acceptance_rate"] == pytest.approx(0.9)
    assert got["tokens_per_step"] == pytest.approx((90 + 40) / 40)
    assert acceptance({}, {})["acceptance_rate"] is None
    unmoved = acceptance(spec_counters(EXPOSITION), spec_counters(EXPOSITION))
    assert unmoved["acceptance_rate"] is None and unmoved["tokens_per_step"] is None


def _stream(tokens: int, arrivals: tuple[float, ...], sent: float = 0.0) -> Stream:
    return Stream(tuple(range(tokens)), "", 10, sent, arrivals)


def test_decode_rate_excludes_ttft_and_spans_each_group() -> None:
    # batch 1: two requests in turn, 4 tokens after the first in 1 s each
    one_at_a_time = [[_stream(5, (1.0, 1.25, 1.5, 1.75, 2.0))], [_stream(5, (11.0, 11.5, 12.0))]]
    figures = summarize(one_at_a_time)
    assert figures["decode_tok_per_s"] == pytest.approx(8 / 2.0)
    assert figures["ttft_mean_ms"] == pytest.approx((1.0 + 11.0) / 2 * 1000)
    assert figures["completion_tokens"] == 10
    # batch 2: one window from the first first token to the last token
    together = [[_stream(3, (1.0, 2.0, 3.0)), _stream(3, (2.0, 2.5, 5.0))]]
    assert summarize(together)["decode_tok_per_s"] == pytest.approx(4 / 4.0)
    assert summarize(together)["itl_p50_ms"] == pytest.approx(1000.0)


def _cell(system: str, outputs: list[list[int]], batch: int = 1) -> dict[str, Any]:
    return {"system": system, "workload": "grounded", "batch": batch, "outputs": outputs}


def test_greedy_mismatches_name_the_first_differing_token() -> None:
    cells = [
        _cell("off", [[1, 2, 3], [4, 5]]),
        _cell("ngram", [[1, 2, 3], [4, 6]]),
        _cell("off", [[7, 8]], batch=2),
        _cell("ngram", [[7, 8, 9]], batch=2),
    ]
    compared, differ = greedy_mismatches(cells)
    assert compared == 3
    assert [(d["batch"], d["prompt"], d["first_diff"]) for d in differ] == [(1, 1, 1), (2, 0, 2)]
    assert greedy_mismatches(cells[1:2]) == (0, [])


def test_system_flags_name_the_draft_model_folder() -> None:
    assert system_flags("ngram", 4) == ("--speculative", "ngram", "--num-speculative-tokens", "4")
    flags = system_flags("draft", None, Path("/tmp/d"))
    assert flags == ("--speculative", "draft", "--draft-model", "/tmp/d")
    with pytest.raises(ValueError):
        system_flags("draft", None)


def test_header_reports_the_draft_layer_count() -> None:
    args = parse_args(["--systems", "off,draft", "--draft-layers", "6"])
    assert args.draft_layers == 6 and args.systems == ["off", "draft"]
    assert header(args, 6).endswith("; draft: 6 layers (the target's first)")
    assert "draft" not in header(parse_args(["--systems", "off,ngram"]), None)
    with pytest.raises(SystemExit):
        parse_args(["--systems", "off,eagle"])


def test_truncated_draft_is_the_targets_early_exit(tmp_path: Path) -> None:
    source = build_tiny_model(tmp_path / "target", "llama", vocab_size=512)
    draft = truncated_draft(source, 1, tmp_path / "draft")
    assert num_layers(draft) == 1
    assert (draft / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    target = AutoModelForCausalLM.from_pretrained(source).eval()
    early = AutoModelForCausalLM.from_pretrained(draft).eval()
    ids = torch.tensor([[5, 17, 99, 3, 250, 41]])
    with torch.no_grad():
        hidden = target(ids, output_hidden_states=True).hidden_states[1]
        want = target.lm_head(target.model.norm(hidden))
        assert torch.allclose(early(ids).logits, want, atol=1e-5)
    for layers in (0, 2):  # the target has 2: keep at least one, drop at least one
        with pytest.raises(SystemExit):
            truncated_draft(source, layers, tmp_path / f"bad{layers}")
