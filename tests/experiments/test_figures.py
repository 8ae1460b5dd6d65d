"""The sweep figures: each kind draws a PNG and an SVG from results rows alone, says which runs
it leaves out, draws nothing without a finished run, and refuses unknown kinds and options."""
import pytest

from kcap.experiments.figures import KINDS, draw_figure


def _row(run, status="done", bits=1000.0, params=10_000, labels=None, post=None, ci=0.01):
    row = {"experiment": "test", "preset": "smoke", "run": run, "status": status,
           "labels": labels or {}, "config": {}, "bits": None, "bits_max": None, "R": None,
           "R_max": None, "R_ci95": None, "params": None, "tokens": None, "wall_s": None,
           "device": "cpu", "literal_R": None, "post": {}}
    if status == "done":
        row.update(bits=bits, bits_max=5000.0, R=bits / params, R_max=5000.0 / params,
                   R_ci95=ci, params=params, tokens=10**6, wall_s=3.0, post=post or {})
    return row


def _capacity_rows():
    rows = [_row(f"gpt2-{s}-n{n}", bits=0.3 * p * (n / 1000), params=p,
                 labels={"model": f"gpt2-{s}", "n": n, "exposures": 100})
            for n in (200, 1000) for s, p in (("1-1", 20_000), ("2-2", 80_000), ("4-4", 300_000))]
    rows.append(_row("gpt2-tiny-n200", bits=-35.0, params=5_000, labels={"n": 200}))
    rows.append(_row("gpt2-8-8-n200", status="failed", labels={"n": 200}))
    return rows


def _svg(paths):
    png, svg = paths
    assert png.name.endswith(".png") and svg.name.endswith(".svg")
    assert png.stat().st_size > 5_000
    text = svg.read_text()
    assert text.startswith("<?xml") and "<svg" in text
    return text


def test_capacity_draws_law_legend_and_leaves_out_negative_bits(tmp_path):
    paths = draw_figure("capacity", _capacity_rows(), tmp_path / "r1.smoke", "capacity")
    assert paths == [tmp_path / "r1.smoke.png", tmp_path / "r1.smoke.svg"]
    text = _svg(paths)
    for expected in ("parameters counted (P)", "bits of knowledge learned", "N people", "200",
                     "1,000", "bits in the data", "2 bits/param",
                     "1 run (gpt2-tiny-n200) with bits &lt;= 0 not shown"):
        assert expected in text, expected


def test_capacity_options_colour_and_laws(tmp_path):
    rows = [r for r in _capacity_rows() if r["status"] == "done" and r["bits"] > 0]
    paths = draw_figure("capacity", rows, tmp_path / "c", "by exposures",
                        {"color_by": "exposures", "laws": [1, 2.0]})
    text = _svg(paths)
    assert "1 bits/param" in text and "2 bits/param" in text and "not shown" not in text
    with pytest.raises(ValueError, match="no label 'lr'"):
        draw_figure("capacity", rows, tmp_path / "d", "t", {"color_by": "lr"})


def test_architectures_pairs_runs_with_the_baseline(tmp_path):
    rows = []
    for arch, factor in (("gpt2", 1.0), ("llama", 0.8), ("mistral", 1.1)):
        for n in (200, 1000):
            rows.append(_row(f"{arch}-2-2-n{n}", bits=2000.0 * factor * n / 1000, params=40_000,
                             labels={"arch": arch, "n": n, "exposures": 100, "size": "2-2"}))
    rows.append(_row("qwen-2-2-n200", bits=500.0, params=40_000,  # no gpt2 at exposures 300
                     labels={"arch": "qwen", "n": 200, "exposures": 300, "size": "2-2"}))
    rows.append(_row("llama-1-1-n200", bits=-10.0, params=10_000,
                     labels={"arch": "llama", "n": 200, "exposures": 100, "size": "1-1"}))
    paths = draw_figure("architectures", rows, tmp_path / "r2", "architectures")
    text = _svg(paths)
    for expected in ("architecture", "llama", "mistral", "R relative to gpt2",
                     "0.80", "1.10", "2 pairs", "no pair with gpt2: qwen", "not shown",
                     "parameters counted (P)"):
        assert expected in text, expected


def test_architectures_without_the_baseline_says_so(tmp_path):
    rows = [_row("llama-2-2", labels={"arch": "llama", "n": 200, "exposures": 100,
                                      "size": "2-2"})]
    text = _svg(draw_figure("architectures", rows, tmp_path / "a", "t", {"baseline": "gpt2"}))
    assert "no gpt2 run to compare against" in text


def test_quantized_groups_trained_and_post_steps(tmp_path):
    def post(r):
        return {"int8-rtn": {"bits": 1.0, "R": r * 0.98, "R_ci95": 0.01},
                "int4-gptq": {"bits": 1.0, "R": r * 0.7, "R_ci95": 0.02}}
    rows = [_row(f"gpt2-{s}-n200", bits=b, params=10_000,
                 labels={"model": f"gpt2-{s}", "n": 200}, post=post(b / 10_000))
            for s, b in (("1-1", 1500.0), ("2-2", -200.0))]
    rows.append(_row("gpt2-4-4-n200", status="pending", labels={"model": "gpt2-4-4", "n": 200}))
    text = _svg(draw_figure("quantized", rows, tmp_path / "r3", "quantized"))
    for expected in ("R (bits/param)", "trained", "int8-rtn", "int4-gptq", "gpt2-1-1",
                     "N=200"):
        assert expected in text, expected


def test_junk_lines_per_mix(tmp_path):
    rows = [_row(f"{mix}-e{e}", bits=e * k, params=10_000,
                 labels={"mix": mix, "exposures": e, "n": 1000})
            for mix, k in (("none", 20.0), ("random junk", 12.0), ("repetitive junk", 18.0))
            for e in (100, 300, 1000)]
    rows.append(_row("none-e100-lr2", bits=-50.0, params=10_000,  # a worse lr: not the point
                     labels={"mix": "none", "exposures": 100, "n": 1000, "lr": 2e-3}))
    text = _svg(draw_figure("junk", rows, tmp_path / "r4", "junk"))
    for expected in ("exposures per person", "R (bits/param on the useful data)",
                     "training mix", "none", "random junk", "repetitive junk"):
        assert expected in text, expected
    assert ">model<" not in text  # one model: no legend of markers


def test_junk_several_models_get_a_marker_legend(tmp_path):
    rows = [_row(f"{mix}-{s}-e{e}", bits=e * 10.0, params=10_000,
                 labels={"mix": mix, "exposures": e, "n": 1000, "model": f"gpt2-{s}"})
            for mix in ("none", "random junk") for e in (100, 300) for s in ("4-4", "12-12")]
    text = _svg(draw_figure("junk", rows, tmp_path / "r10", "junk"))
    assert ">model<" in text and "gpt2-4-4 N=1,000" in text and "gpt2-12-12 N=1,000" in text
    assert text.index("gpt2-4-4 N=1,000") < text.index("gpt2-12-12 N=1,000")


@pytest.mark.parametrize("kind", KINDS)
def test_no_done_rows_draws_nothing(tmp_path, kind):
    rows = [_row("a", status="failed"), _row("b", status="running")]
    assert draw_figure(kind, rows, tmp_path / "x", "t") == []
    assert draw_figure(kind, [], tmp_path / "x", "t") == []
    assert list(tmp_path.iterdir()) == []


def test_refuses_unknown_kind_and_options(tmp_path):
    rows = _capacity_rows()
    with pytest.raises(ValueError, match="known: capacity, architectures, quantized, junk"):
        draw_figure("scatter", rows, tmp_path / "x", "t")
    with pytest.raises(ValueError, match="colour"):
        draw_figure("capacity", rows, tmp_path / "x", "t", {"colour": "n"})
    with pytest.raises(ValueError, match="baseline"):  # an option this kind would ignore
        draw_figure("junk", rows, tmp_path / "x", "t", {"baseline": "gpt2"})
    with pytest.raises(ValueError, match="laws"):
        draw_figure("capacity", rows, tmp_path / "x", "t", {"laws": [-1]})
    with pytest.raises(ValueError, match="finite number"):
        draw_figure("capacity", [_row("a", bits=float("nan"), labels={"n": 1})],
                    tmp_path / "x", "t")
    assert list(tmp_path.iterdir()) == []
