"""The figures of an experiment sweep, drawn from its results table's rows only.

``draw_figure(kind, rows, out_stem, title)`` reads the rows of results.jsonl (dicts, one per
run; see kcap/experiments/results.py) and writes ``<out_stem>.png`` and ``<out_stem>.svg``.
It never looks at a run's memory or folder: a figure can be redrawn from the table alone.

Kinds: "capacity" (bits learned against parameters, log-log, the paper's Figure 1),
"architectures" (the same coloured by architecture, beside each architecture's R relative to
a baseline), "quantized" (R before and after each post-training step) and "junk" (R on the
useful data against exposures, one line per training mix).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from kcap.atomic import atomic_path

# The options each kind reads: an option a kind would ignore is refused, not dropped silently.
_OPTIONS = {"capacity": {"color_by", "laws"}, "architectures": {"laws", "baseline"},
            "quantized": set(), "junk": set()}
KINDS = tuple(_OPTIONS)
_LEGEND_TITLES = {"n": "N people", "arch": "architecture", "mix": "training mix",
                  "lr": "learning rate"}
_NAMES_IN_NOTE = 4


def draw_figure(kind: str, rows: list[dict], out_stem, title: str,
                options: dict | None = None) -> list[Path]:
    """Draw figure ``kind`` of ``rows`` to <out_stem>.png and <out_stem>.svg; return the paths.

    Returns [] and writes nothing when no row has status "done". Options: "color_by" (a label,
    default "n"; capacity), "laws" (bits per parameter drawn as lines, default [2.0]; capacity,
    architectures), "baseline" (the architecture others are divided by, default "gpt2";
    architectures).
    """
    if kind not in _OPTIONS:
        raise ValueError(f"unknown figure kind {kind!r}; known: {', '.join(KINDS)}")
    options = dict(options or {})
    unknown = set(options) - _OPTIONS[kind]
    if unknown:
        raise ValueError(f"figure {kind!r} takes options {sorted(_OPTIONS[kind])}, not "
                         f"{sorted(unknown)}")
    color_by = options.get("color_by", "n")
    laws = options.get("laws", [2.0])
    baseline = options.get("baseline", "gpt2")
    if not isinstance(color_by, str) or not isinstance(baseline, str):
        raise ValueError("options color_by and baseline must be strings")
    if (not isinstance(laws, (list, tuple))
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                        for v in laws)):
        raise ValueError(f"option laws must be a list of positive bits/param, got {laws!r}")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError("rows must be a list of dicts (the rows of results.jsonl)")
    if not isinstance(title, str):
        raise ValueError(f"title must be a string, got {type(title).__name__}")
    done = [r for r in rows if r.get("status") == "done"]
    if not done:
        return []
    if kind == "architectures":
        fig = Figure(figsize=(11, 4.5))
        left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
        archs = sorted({str(_label(r, "arch")) for r in done})
        colours = _colours(archs)
        law_texts = _capacity(left, done, "arch", laws, colours)
        _relative(right, done, baseline, colours)
        fig.suptitle(title)
    else:
        fig = Figure(figsize=(7, 4.5))
        ax = fig.subplots()
        law_texts = []
        if kind == "capacity":
            values = sorted({_label(r, color_by) for r in done}, key=_order)
            law_texts = _capacity(ax, done, color_by, laws, _colours(values))
        elif kind == "quantized":
            _quantized(ax, done)
        else:
            _junk(ax, done)
        ax.set_title(title)
    fig.tight_layout()
    _align(law_texts)
    return _save(fig, out_stem)


def _capacity(ax, done, color_by, laws, colours) -> list:
    """Bits learned against P, log-log, with each run's bits in the data and the law lines.

    Runs with bits <= 0 (tiny models that score below the pools guesser) are left out and
    named in a note rather than drawn on a symlog axis: symlog's linear band around zero
    would bend the straight lines a scaling law reads as, for runs that carry no signal.
    """
    for r in done:
        for key in ("bits", "bits_max", "params"):
            _number(r, key)
    shown = [r for r in done if r["bits"] > 0 and r["params"] > 0]
    hidden = [r for r in done if not (r["bits"] > 0 and r["params"] > 0)]
    for value, colour in colours.items():
        group = [r for r in shown if _text(_label(r, color_by)) == _text(value)]
        if not group:
            continue
        x = [r["params"] for r in group]
        err = [(r.get("R_ci95") or 0) * r["params"] for r in group]
        ax.errorbar(x, [r["bits"] for r in group], yerr=err if any(err) else None, fmt="o",
                    ms=5, color=colour, capsize=2, label=_text(value))
        ax.scatter(x, [r["bits_max"] for r in group], s=22, facecolors="none",
                   edgecolors=colour, linewidths=1)
        qa = [(r["params"], _extractable(r)) for r in group if (_extractable(r) or 0) > 0]
        if qa:  # the QA post-step's extractable bits beside the stored ones
            ax.scatter(*zip(*qa), s=30, marker="D", facecolors="white", edgecolors=colour,
                       linewidths=1.2, zorder=3)
    handles, labels = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], ls="", marker="o", mfc="none", mec="grey"))
    labels.append("bits in the data")
    extractable = [r for r in done if _extractable(r) is not None]
    if extractable:
        handles.append(Line2D([], [], ls="", marker="D", mfc="white", mec="grey"))
        labels.append("extractable bits (QA)")
    no_qa_bits = [r for r in extractable if not _extractable(r) > 0]
    ax.set_xscale("log")
    ax.set_yscale("log")
    law_texts = []
    xs = [r["params"] for r in shown] or [r["params"] for r in done if r["params"] > 0] or [1]
    lo, hi = min(xs) / 1.5, max(xs) * 1.5
    ax.set_xlim(lo, hi)
    _log_ticks(ax.xaxis, lo, hi)
    for law in sorted(laws):
        ax.plot([lo, hi], [law * lo, law * hi], ls="--", color="grey", lw=1, zorder=0)
        law_texts.append((ax, law, lo, hi, ax.text(hi / 1.15, law * hi / 1.15,
                                                   f"{law:g} bits/param", ha="right",
                                                   va="bottom", fontsize="small",
                                                   color="dimgrey", rotation_mode="anchor")))
    _log_ticks(ax.yaxis, *ax.get_ylim())
    ax.set_xlabel("parameters counted (P)")
    ax.set_ylabel("bits of knowledge learned")
    ax.legend(handles, labels, title=_LEGEND_TITLES.get(color_by, color_by), fontsize="small",
              loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    notes = [f"{_runs(hidden)} with bits <= 0 not shown (log axes)"] if hidden else []
    if extractable and no_qa_bits:
        notes.append(f"{_runs(no_qa_bits)} with extractable bits <= 0 not shown")
    if notes:
        _note(ax, "; ".join(notes))
    return law_texts


def _extractable(row) -> float | None:
    """The run's extractable bits from its QA post-step, None if it has none."""
    qa = (row.get("post") or {}).get("qa") or {}
    value = qa.get("bits")
    return None if value is None else float(value)


def _relative(ax, done, baseline, colours):
    """Each architecture's R over the baseline's, pairing runs of equal n, exposures, size.

    Several runs of one architecture at one pairing key (an lr sweep) count as their best R,
    the paper's rule for the runs of a sweep.
    """
    best: dict[tuple, float] = {}
    for r in done:
        key = (str(_label(r, "arch")),) + tuple(
            _text(r.get("labels", {}).get(k)) for k in ("n", "exposures", "size"))
        best[key] = max(best.get(key, -math.inf), _number(r, "R"))
    ratios: dict[str, list[float]] = {a: [] for a in colours if a != baseline}
    unusable = 0
    for (arch, *key), value in best.items():
        base = best.get((baseline, *key))
        if arch == baseline or base is None:
            continue
        if value > 0 and base > 0:  # a geometric mean needs positive ratios
            ratios[arch].append(value / base)
        else:
            unusable += 1
    paired = [a for a in ratios if ratios[a]]
    for i, arch in enumerate(paired):
        gm = math.exp(sum(map(math.log, ratios[arch])) / len(ratios[arch]))
        ax.bar(i, gm, width=0.6, color=colours[arch], alpha=0.8)
        ax.scatter([i] * len(ratios[arch]), ratios[arch], s=12, color="black", zorder=3)
        top = max(gm, *ratios[arch])
        n = len(ratios[arch])
        ax.annotate(f"{gm:.2f}\n{n} pair{'s' * (n != 1)}", (i, top), xytext=(0, 3),
                    textcoords="offset points", ha="center", va="bottom", fontsize="small")
    ax.axhline(1.0, color="grey", ls="--", lw=1)
    ax.set_xticks(range(len(paired)), paired)
    ax.set_xlim(-0.7, max(len(paired), 1) - 0.3)
    ax.set_ylim(0, max([1.0] + [max(v) for v in ratios.values() if v]) * 1.3)
    ax.set_ylabel(f"R relative to {baseline} (geometric mean)")
    ax.set_xlabel("architecture (pairs: same n, exposures, size)")
    notes = []
    if not any(str(_label(r, "arch")) == baseline for r in done):
        notes.append(f"no {baseline} run to compare against")
    missing = [a for a in ratios if not ratios[a]]
    if missing:
        notes.append(f"no pair with {baseline}: {', '.join(missing)}")
    if unusable:
        notes.append(f"{unusable} pair{'s' * (unusable != 1)} with R <= 0 left out")
    if notes:
        _note(ax, "; ".join(notes))


def _quantized(ax, done):
    """Grouped bars: each run's R as trained and after each post-training step."""
    steps = sorted({k for r in done for k in (r.get("post") or {})})
    names = [f"{r.get('labels', {}).get('model', r.get('run'))}\n"
             f"N={_text(r.get('labels', {}).get('n'))}" for r in done]
    if len(set(names)) < len(names):  # runs that differ in another label: name them by run
        names = [str(r.get("run")) for r in done]
    order = sorted(range(len(done)), key=lambda i: (
        _order(str(done[i].get("labels", {}).get("model"))),
        _order(done[i].get("labels", {}).get("n")), names[i]))
    width = 0.8 / (len(steps) + 1)
    colours = {"trained": "dimgrey", **_colours(steps)}
    for j, step in enumerate(["trained"] + steps):
        xs, ys, errs = [], [], []
        for g, i in enumerate(order):
            entry = done[i] if step == "trained" else (done[i].get("post") or {}).get(step)
            if not entry or entry.get("R") is None:
                continue  # this step was not run, or failed, for this run
            xs.append(g - 0.4 + width * (j + 0.5))
            ys.append(_number(entry, "R", done[i]))
            errs.append(entry.get("R_ci95") or 0)
        if xs:
            ax.bar(xs, ys, width=width, yerr=errs if any(errs) else None, capsize=2,
                   color=colours[step], label=step)
    if any(p.get_height() < 0 for p in ax.patches):
        ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(range(len(order)), [names[i] for i in order], fontsize="small")
    ax.set_ylabel("R (bits/param)")
    ax.set_xlabel("trained run")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)


def _junk(ax, done):
    """R on the useful data against exposures: a colour per training mix, a marker per model
    and N (a mix's runs of one model and N make one line).

    Runs that differ only in "lr" (an lr sweep) are one point, at their best R.
    """
    best: dict[tuple, dict] = {}
    for r in done:
        _number(r.get("labels", {}), "exposures", r)
        _label(r, "mix")
        key = tuple(sorted((k, _text(v)) for k, v in r["labels"].items() if k != "lr"))
        if key not in best or _number(r, "R") > best[key]["R"]:
            best[key] = r
    series: dict[tuple, list] = {}
    for r in best.values():
        labels = r["labels"]
        model = (str(labels.get("model", "")), labels.get("n"))
        series.setdefault((_text(labels["mix"]), model), []).append(r)
    mixes = sorted({m for m, _ in series}, key=lambda m: (m != "none", m))  # the control first
    models = sorted({m for _, m in series}, key=lambda m: (_order(m[0]), _order(m[1])))
    colours, markers = _colours(mixes), dict(zip(models, "osD^vPX*" * 8))
    for (mix, model), points in sorted(series.items(), key=lambda s: (mixes.index(s[0][0]),
                                                                      models.index(s[0][1]))):
        points.sort(key=lambda r: r["labels"]["exposures"])
        err = [r.get("R_ci95") or 0 for r in points]
        ax.errorbar([r["labels"]["exposures"] for r in points], [r["R"] for r in points],
                    yerr=err if any(err) else None, fmt="-", marker=markers[model], ms=5,
                    capsize=2, color=colours[mix])
    ax.set_xscale("log")
    ticks = sorted({r["labels"]["exposures"] for r in best.values()})
    ax.set_xticks(ticks, [f"{e:g}" for e in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    if any(r["R"] < 0 for r in best.values()):
        ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("exposures per person")
    ax.set_ylabel("R (bits/param on the useful data)")
    legend = ax.legend([Line2D([], [], color=colours[m], marker="o", ms=5) for m in mixes],
                       mixes, title="training mix", fontsize="small", loc="upper left",
                       bbox_to_anchor=(1.01, 1), borderaxespad=0)
    if len(models) > 1:  # a second legend, of markers, only when there are several models
        ax.add_artist(legend)
        ax.legend([Line2D([], [], ls="", color="black", marker=markers[m], ms=5)
                   for m in models], [f"{m} N={_text(n)}" for m, n in models], title="model",
                  fontsize="small", loc="lower left", bbox_to_anchor=(1.01, 0), borderaxespad=0)


def _align(law_texts):
    """Turn each law's label along its line: only known once the layout fixes the axes."""
    for ax, law, lo, hi, text in law_texts:
        (x0, y0), (x1, y1) = ax.transData.transform([(lo, law * lo), (hi, law * hi)])
        text.set_rotation(math.degrees(math.atan2(y1 - y0, x1 - x0)))


def _log_ticks(axis, lo, hi):
    """Short labels (20k, 1M) at 1-2-5 of each decade over a short range, where matplotlib
    would label every minor tick and the labels would run into each other."""
    subs = (1.0, 2.0, 5.0) if hi / lo < 100 else (1.0,)
    axis.set_major_locator(LogLocator(subs=subs))
    axis.set_major_formatter(FuncFormatter(_short))
    axis.set_minor_formatter(NullFormatter())


def _short(value, _pos=None) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):  # B: billions, as model sizes go
        if abs(value) >= size:
            return f"{value / size:g}{unit}"
    return f"{value:g}"


def _save(fig, out_stem) -> list[Path]:
    stem = Path(out_stem)
    paths = [stem.parent / f"{stem.name}.png", stem.parent / f"{stem.name}.svg"]
    # SVG text stays text (searchable, editable); no date, so a redraw of the same rows
    # gives the same file.
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "kcap"}):
        for path in paths:
            fmt = path.suffix[1:]
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format=fmt, dpi=150,
                            metadata={"Date": None} if fmt == "svg" else None)
    return paths


def _note(ax, text):
    """A small note under the axis label, where it cannot cover data."""
    ax.annotate(text, (0, 0), xycoords=ax.xaxis.label, xytext=(0, -4),
                textcoords="offset points", ha="left", va="top", fontsize="x-small",
                color="dimgrey", annotation_clip=False)


def _runs(rows) -> str:
    names = [str(r.get("run")) for r in rows]
    shown = ", ".join(names[:_NAMES_IN_NOTE]) + (", ..." if len(names) > _NAMES_IN_NOTE else "")
    return f"{len(rows)} run{'s' * (len(rows) != 1)} ({shown})"


def _colours(values) -> dict:
    """Ordered values (N, exposures) on a sequential map, names on the categorical one."""
    values = list(values)
    if values and all(isinstance(v, (int, float)) for v in values):
        cmap = matplotlib.colormaps["viridis"]
        return {v: cmap(0.85 * i / max(len(values) - 1, 1)) for i, v in enumerate(values)}
    cmap = matplotlib.colormaps["tab10"]
    return {v: cmap(i % 10) for i, v in enumerate(values)}


def _label(row, key):
    labels = row.get("labels") or {}
    if key not in labels:
        raise ValueError(f"run {row.get('run')}: no label {key!r}, which the figure groups by")
    return labels[key]


def _number(d, key, row=None) -> float:
    value = d.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        run = (row or d).get("run")
        raise ValueError(f"run {run} is done but its {key} is {value!r}, not a finite number")
    return value


def _order(value):
    """Numbers before names; names with numbers in them by those numbers (gpt2-4-4 first)."""
    if isinstance(value, (int, float)):
        return (0, value, [])
    return (1, 0, [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(value))])


def _text(value) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return f"{value:g}" if isinstance(value, float) else str(value)
