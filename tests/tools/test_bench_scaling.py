"""The attention scaling study: every (phase, backend, length) point in the JSON with
a positive latency, the reference backend's quadratic prefill memory, paged KV
reserving less than contiguous for mixed lengths, a PNG, skipped points named
rather than dropped, and every backend and KV layout computing the same attention."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from pinfer import kernels

from pinfer.errors import PinferError
from pinfer.tools.bench_scaling import (
    BACKENDS,
    LiveBytes,
    Shape,
    add_scaling_args,
    make_step,
    run_scaling,
    settings_from_args,
    step_call,
)

# head_dim 8: the L x L score matrices outweigh the [L, H, D] tensors already at L = 16..64.
SMALL_SHAPE = "heads=4,kv_heads=2,head_dim=8,block_size=8,layers=2"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_scaling_args(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("scaling")
    args = parse(["--lengths", "16,64", "--backends", "reference,paged,contiguous", "--batch", "2",
                  "--repeats", "2", "--model-shape", SMALL_SHAPE, "--mixed-seqs", "8",
                  "--json", str(out / "scaling.json"), "--plot", str(out / "scaling.png")])
    assert run_scaling(args) == 0
    return json.loads((out / "scaling.json").read_text()), out / "scaling.png"


def test_json_has_every_point_with_a_latency_and_the_machine(tiny_study):
    document, _ = tiny_study
    points = {(p["phase"], p["backend"], p["length"]): p for p in document["points"]}
    assert set(points) == {(ph, b, n) for ph in ("prefill", "decode") for b in ("reference", "paged", "contiguous")
                           for n in (16, 64)}
    for p in points.values():
        assert p["skipped"] is None and p["latency_ms"] > 0 and p["peak_bytes"] > 0
        assert len(p["samples_ms"]) == 2 and p["calls_per_sample"] >= 1
    assert points[("decode", "paged", 16)]["num_seqs"] == 2 and points[("prefill", "paged", 16)]["num_seqs"] == 1
    assert document["machine"]["cpu_model"] and document["settings"]["shape"]["head_dim"] == 8


def test_reference_prefill_memory_grows_quadratically_paged_linearly(tiny_study):
    document, _ = tiny_study
    peak = {(p["phase"], p["backend"], p["length"]): p["peak_bytes"] for p in document["points"]}

    def exponent(backend: str) -> float:  # peak ~ L ** exponent between L = 16 and 64
        return math.log(peak[("prefill", backend, 64)] / peak[("prefill", backend, 16)], 4)

    # Reference: two [H, L, L] float32 score matrices alive at once, plus [L, H, D] tensors
    # (here 32 L^2 + 544 L bytes: exponent 1.66); paged (SDPA's flash kernel): no score matrix.
    assert 1.5 < exponent("reference") <= 2.0, exponent("reference")
    assert 0.9 < exponent("paged") < 1.1, exponent("paged")


def test_paged_reserves_less_kv_than_contiguous_for_mixed_lengths(tiny_study):
    kv = tiny_study[0]["kv_reserved"]
    layouts = {name: v["bytes_per_layer"] for name, v in kv["layouts"].items()}
    assert layouts["exact"] <= layouts["paged"] < layouts["contiguous"]
    per_token = kv["bytes_per_token_per_layer"]
    assert layouts["contiguous"] == kv["num_seqs"] * 64 * per_token  # max_model_len: the longest length
    assert layouts["paged"] - layouts["exact"] < kv["num_seqs"] * kv["block_size"] * per_token  # < a block each
    assert kv["layouts"]["paged"]["bytes_model"] == 2 * layouts["paged"]  # layers=2


def test_plot_is_written(tiny_study):
    png = tiny_study[1]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_points_over_budget_are_skipped_and_reported(tmp_path, capsys):
    args = parse(["--lengths", "16,32,64", "--backends", "reference", "--phases", "prefill", "--repeats", "1",
                  "--model-shape", SMALL_SHAPE, "--budget-seconds", "1e-9", "--json", str(tmp_path / "s.json")])
    assert run_scaling(args) == 0
    points = json.loads((tmp_path / "s.json").read_text())["points"]
    assert points[0]["latency_ms"] > 0 and points[0]["skipped"] is None  # nothing to extrapolate from yet
    assert "budget" in points[1]["skipped"] and points[1]["latency_ms"] is None
    assert "shorter length was skipped" in points[2]["skipped"]
    out = capsys.readouterr().out
    assert "skipped" in out and "prefill reference L=32: predicted" in out


def test_every_backend_and_layout_computes_the_same_attention():
    shape = Shape()  # SmolLM2-135M's; lengths that are not whole blocks
    for phase, length in (("prefill", 40), ("decode", 37)):
        step = make_step(phase, length, 3, shape, torch.float32, max_model_len=64, contiguous=True, seed=1)
        expected = step_call("reference", step)()
        # paged_kernels needs pinfer's CPU kernels (AVX-512); tests/model/test_cpu_kernels.py fails where they should build
        for backend in (b for b in BACKENDS if b not in ("paged_kernels", "paged_int8") or kernels.load()):
            where = f"{backend} {phase}"
            # paged_int8 attends over 8-bit values: agreement to their rounding (its exact arithmetic is
            # tests/model/test_int8_kv_cache.py's)
            tolerance = dict(atol=0.08, rtol=0.05) if backend == "paged_int8" else dict(atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(step_call(backend, step)(), expected, **tolerance,
                                       msg=lambda m, where=where: f"{where}: {m}")


def test_live_bytes_counts_storages_until_freed_not_views():
    with LiveBytes() as mode:
        a = torch.empty(1000)  # 4000 bytes
        b = a.view(10, 100).t()  # a view: nothing new
        del a  # the storage lives on in b
        c = torch.empty(500)  # 2000 more: 6000 live
        del b, c
        d = torch.empty(250)  # everything else freed: 1000 live
    assert mode.peak == 6000 and mode.live == 1000
    del d


def test_bad_flags_say_what_is_accepted():
    with pytest.raises(PinferError, match="choose from"):
        settings_from_args(parse(["--backends", "paged,flash"]))
    with pytest.raises(PinferError, match="KEY=N"):
        settings_from_args(parse(["--model-shape", "heads=nine"]))
    with pytest.raises(PinferError, match="multiple of kv_heads"):
        settings_from_args(parse(["--model-shape", "heads=9,kv_heads=2"]))
