#!/usr/bin/env python3
"""Draw the tail-latency chart from the latency bench's results.

    cargo bench --bench latency          # writes $CARGO_TARGET_DIR/latency/results.json
    python3 scripts/latency_plot.py      # reads it, writes docs/latency.svg

The bench (benches/latency.rs) records every request's time from asking to holding and saves,
per run, the p50, p90, p99, p99.9 and maximum in ns. This draws one panel per scenario and
series (`tasks64_room8` tasks; `mixed` tasks, blocking threads, all), with a row per
percentile and peer: one marker per run, so the spread between runs shows, and a bar at the
median over runs. All panels share one logarithmic axis, so a p99.9 in milliseconds and a
p50 in microseconds sit on one page. Each panel's heading gives ours ÷ tokio for p99, round
by round (issue 22's target: at most 1.0 in every run).

By default only ours and tokio are drawn; `--peers` adds the bench's diagnostic runs
(`LATENCY_DIAG=1`: `ours_untimed`, `ours_fbo`). Runs that are missing a field, or whose
percentiles are not in order, are skipped with a note.

The title names the CPU (the results' own `cpu`, from the machine that ran the bench; or
--cpu) and the date of the run. Python 3.11 standard library only; the SVG is written by hand.

`--check` draws the committed fixture (scripts/fixtures/latency/results.json) into memory and
checks the result (CI runs it); it writes nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import statistics
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "latency" / "results.json"

# (key in the JSON, label)
PERCENTILES = [("p50", "p50"), ("p90", "p90"), ("p99", "p99"), ("p999", "p99.9")]
# Who a run measures, and how it is drawn: Okabe-Ito colours, as in scripts/chart.py.
PEERS = {
    "ours": ("ours (membudget)", "#0072B2", "circle"),
    "tokio": ("tokio Semaphore + alloc", "#E69F00", "diamond"),
    "ours_untimed": ("ours, time_waits(false)", "#56B4E9", "circle"),
    "ours_fbo": ("ours, threads on futures block_on", "#009E73", "circle"),
}
DEFAULT_PEERS = ["ours", "tokio"]
# Panels in this order; others follow alphabetically.
PANELS = [("tasks64_room8", "tasks"), ("mixed", "tasks"), ("mixed", "threads"), ("mixed", "all")]
PANEL_TITLES = {
    ("tasks64_room8", "tasks"): "tasks64_room8: 64 tasks share room for 8 (2 workers)",
    ("mixed", "tasks"): "mixed: the 64 tasks, beside 2 blocking threads",
    ("mixed", "threads"): "mixed: the 2 blocking threads",
    ("mixed", "all"): "mixed: every request",
}


@dataclass
class Run:
    scenario: str
    series: str
    peer: str
    round: int
    values: dict[str, float]  # p50 .. p999, max, in ns


def default_results() -> Path:
    target = os.environ.get("CARGO_TARGET_DIR")
    return (Path(target) if target else ROOT / "target") / "latency" / "results.json"


def load(data: dict) -> tuple[list[Run], list[str]]:
    """Every well-formed run in the bench's JSON, and a note for each one that is not."""
    runs, skipped = [], []
    for i, entry in enumerate(data.get("runs") or []):
        try:
            values = {key: float(entry[key]) for key, _label in PERCENTILES}
            values["max"] = float(entry["max"])
            run = Run(str(entry["scenario"]), str(entry["series"]), str(entry["peer"]),
                      int(entry["round"]), values)
        except (KeyError, TypeError, ValueError) as err:
            skipped.append(f"run {i}: missing or bad field {err}")
            continue
        ordered = [values[key] for key, _label in PERCENTILES] + [values["max"]]
        if not all(v > 0 and math.isfinite(v) for v in ordered):
            skipped.append(f"run {i}: a percentile is not a positive time")
        elif any(a > b for a, b in zip(ordered, ordered[1:])):
            skipped.append(f"run {i}: percentiles out of order {ordered}")
        else:
            runs.append(run)
    return runs, skipped


def panels_of(runs: list[Run], peers: list[str]) -> list[tuple[tuple[str, str], list[str]]]:
    """The panels to draw, each with the peers that have runs in it, in `peers`' order."""
    keys = {(r.scenario, r.series) for r in runs if r.peer in peers}
    ordered = [k for k in PANELS if k in keys] + sorted(keys - set(PANELS))
    out = []
    for key in ordered:
        present = [p for p in peers if any((r.scenario, r.series, r.peer) == (*key, p)
                                           for r in runs)]
        out.append((key, present))
    return out


def p99_ratios(runs: list[Run], key: tuple[str, str]) -> list[float]:
    """ours ÷ tokio for p99, per round in which both ran."""
    def p99(peer: str) -> dict[int, float]:
        return {r.round: r.values["p99"] for r in runs
                if (r.scenario, r.series, r.peer) == (*key, peer)}
    ours, tokio = p99("ours"), p99("tokio")
    return [ours[rnd] / tokio[rnd] for rnd in sorted(ours) if rnd in tokio]


def fmt_time(ns: float) -> str:
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3), ("ns", 1.0)):
        if ns >= scale or unit == "ns":
            v = ns / scale
            return f"{v:.3g} {unit}" if v < 1000 else f"{v:.0f} {unit}"
    raise AssertionError


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def nice_steps(lo: float, hi: float) -> list[float]:
    """The 1-2-5 values from the one at or below `lo` to the one at or above `hi`."""
    first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    values = [m * 10.0**e for e in range(first, last + 1) for m in (1, 2, 5)]
    start = max(i for i, v in enumerate(values) if v <= lo * 1.0001)
    stop = min(i for i, v in enumerate(values) if v >= hi / 1.0001)
    return values[start : stop + 1]


def marker(shape: str, x: float, y: float, colour: str, tip: str) -> str:
    title = f"<title>{escape(tip)}</title>"
    if shape == "diamond":
        r = 4.6
        points = f"{x:.1f},{y - r:.1f} {x + r:.1f},{y:.1f} {x:.1f},{y + r:.1f} {x - r:.1f},{y:.1f}"
        return (f'<polygon points="{points}" fill="{colour}" fill-opacity="0.75" '
                f'stroke="#333" stroke-width="0.5" class="run">{title}</polygon>')
    return (f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.8" fill="{colour}" fill-opacity="0.75" '
            f'stroke="#333" stroke-width="0.5" class="run">{title}</circle>')


def render(runs: list[Run], peers: list[str], cpu: str, date: str, setup: dict) -> str:
    font = 12
    char_w = font * 0.6
    row_h, head_h, tick_h, gap = 15, 22, 14, 12
    panels = panels_of(runs, peers)
    drawn = [r for r in runs if r.peer in peers]
    label_w = 60  # the percentile names
    bars_w, value_w, left = 600, 70, 10
    x0 = left + label_w
    values = [r.values[key] for r in drawn for key, _label in PERCENTILES]
    lo, hi = min(values) / 1.3, max(values) * 1.1
    ticks = nice_steps(lo, hi)
    lo, hi = ticks[0], ticks[-1]
    span = math.log10(hi) - math.log10(lo)

    def x_of(ns: float) -> float:
        return x0 + bars_w * (math.log10(ns) - math.log10(lo)) / span

    label_ticks = ticks
    if len(ticks) > 10:  # too many to label: the decades and both ends
        label_ticks = [v for v in ticks if abs(math.log10(v) - round(math.log10(v))) < 1e-9
                       or v in (lo, hi)]
    body: list[str] = []
    text_w = 0.0  # the widest heading, so the page is wide enough for it
    y = 100  # below the title, subtitle and legend
    for key, present in panels:
        ratios = p99_ratios(runs, key)
        heading = PANEL_TITLES.get(key, f"{key[0]}: {key[1]}")
        if ratios:
            verdict = "met" if all(r <= 1.0 for r in ratios) else "not met"
            heading += (f" — p99 ours ÷ tokio by round: "
                        f"{', '.join(f'{r:.2f}' for r in ratios)} ({verdict})")
        text_w = max(text_w, len(heading) * (font + 1) * 0.62)
        body.append(f'<text x="{left}" y="{y + 16}" class="section">{escape(heading)}</text>')
        y += head_h
        rows = len(PERCENTILES) * len(present)
        rows_top = y + tick_h - 2
        rows_bottom = y + tick_h + rows * row_h + (len(PERCENTILES) - 1) * 4
        for tick in ticks:
            tx = x_of(tick)
            cls = "grid" if tick in label_ticks else "minor"
            body.append(f'<line x1="{tx:.1f}" y1="{rows_top}" x2="{tx:.1f}" y2="{rows_bottom}" '
                        f'class="{cls}"/>')
            if tick in label_ticks:
                body.append(f'<text x="{tx:.1f}" y="{y + tick_h - 4}" '
                            f'class="axis">{fmt_time(tick)}</text>')
        y += tick_h
        for pkey, plabel in PERCENTILES:
            for j, peer in enumerate(present):
                name, colour, shape = PEERS.get(peer, (peer, "#999999", "circle"))
                mine = sorted((r for r in runs if (r.scenario, r.series, r.peer) == (*key, peer)),
                              key=lambda r: r.round)
                cy = y + row_h / 2
                if j == 0:
                    body.append(f'<text x="{x0 - 8:.1f}" y="{cy + 4:.1f}" '
                                f'class="label">{plabel}</text>')
                mid = statistics.median(r.values[pkey] for r in mine)
                mx = x_of(mid)
                body.append(f'<line x1="{mx:.1f}" y1="{cy - 6:.1f}" x2="{mx:.1f}" '
                            f'y2="{cy + 6:.1f}" stroke="{colour}" stroke-width="2.5" '
                            f'class="median"/>')
                for r in mine:
                    tip = (f"{key[0]} {key[1]} {peer} round {r.round}: {plabel} "
                           f"{r.values[pkey]:.0f} ns")
                    body.append(marker(shape, x_of(r.values[pkey]), cy, colour, tip))
                body.append(f'<text x="{x0 + bars_w + 8:.1f}" y="{cy + 4:.1f}" '
                            f'class="value" fill="{colour}">{fmt_time(mid)}</text>')
                y += row_h
            y += 4
        y += gap - 4
    height = y + 10

    legend: list[str] = []
    lx = left
    for peer in peers:
        name, colour, shape = PEERS.get(peer, (peer, "#999999", "circle"))
        legend.append(marker(shape, lx + 5, 69, colour, name).replace(' class="run"', "")
                      + f'<text x="{lx + 14}" y="73" class="legend">{escape(name)}</text>')
        lx = round(lx + 14 + len(name) * char_w + 22)
    rounds = len({r.round for r in drawn})
    title = f"Time from asking to holding: membudget vs tokio, {cpu}, {date}"
    per_run = setup.get("tasks", 64) * setup.get("requests_per_task", 0)
    subtitle = (f"One marker per run ({rounds} rounds, {per_run:,} task requests each), "
                "the bar at the median over runs. Log axis; further left is better.")
    text_w = max(text_w, len(title) * (font + 3) * 0.62, len(subtitle) * font * 0.55)
    width = round(max(x0 + bars_w + value_w + 10, lx, left + text_w + 10))
    return "\n".join([
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif">',
        "<style>"
        f".title{{font-size:{font + 3}px;font-weight:bold}} .sub{{font-size:{font}px;fill:#444}} "
        f".section{{font-size:{font + 1}px;font-weight:bold}} "
        f".label{{font-size:{font}px;text-anchor:end}} .value{{font-size:{font - 1}px}} "
        f".axis{{font-size:{font - 2}px;fill:#666;text-anchor:middle}} "
        f".legend{{font-size:{font}px}} .grid{{stroke:#ccc;stroke-width:1}} "
        ".minor{stroke:#eee;stroke-width:1}"
        "</style>",
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="22" class="title">{escape(title)}</text>',
        f'<text x="{left}" y="42" class="sub">{escape(subtitle)}</text>',
        *legend,
        *body,
        "</svg>",
        "",
    ])


def date_of(data: dict, path: Path | None) -> str:
    stamp = data.get("unix_time")
    if isinstance(stamp, (int, float)) and stamp > 0:
        return dt.datetime.fromtimestamp(stamp, dt.timezone.utc).date().isoformat()
    if path is not None:
        return dt.date.fromtimestamp(path.stat().st_mtime).isoformat()
    return "undated"


def check() -> int:
    """Draws the fixture and checks the SVG: well-formed, one marker per drawn run and
    percentile, the broken entries and the diagnostic peer left out, the ratios right."""
    data = json.loads(FIXTURE.read_text())
    runs, skipped = load(data)
    svg = render(runs, DEFAULT_PEERS, "Fixture CPU", date_of(data, None), data.get("setup", {}))
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    markers = [e for tag in ("circle", "polygon") for e in root.iter(f"{ns}{tag}")
               if e.get("class") == "run"]
    drawn = [r for r in runs if r.peer in DEFAULT_PEERS]
    problems = []
    if len(markers) != len(drawn) * len(PERCENTILES) or not drawn:
        problems.append(f"{len(markers)} markers for {len(drawn)} runs")
    if len(skipped) != 2:
        problems.append(f"expected the two broken fixture entries skipped, got {skipped}")
    names = [key for key, _present in panels_of(runs, DEFAULT_PEERS)]
    if names != PANELS:
        problems.append(f"panels {names}, expected {PANELS}")
    if "ours, threads on futures block_on" in svg:
        problems.append("the diagnostic peer was drawn without --peers")
    ratios = p99_ratios(runs, ("tasks64_room8", "tasks"))
    if [round(r, 2) for r in ratios] != [1.1, 0.9]:
        problems.append(f"tasks64_room8 p99 ratios {ratios}, expected [1.1, 0.9]")
    if "Fixture CPU, 2026-12-05" not in svg:
        problems.append("the title does not name the CPU and the date")
    if problems:
        print("latency_plot --check: FAILED\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print(f"latency_plot --check: ok ({len(names)} panels, {len(markers)} markers, "
          f"{len(skipped)} broken entries skipped, {len(svg)} bytes of SVG)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=default_results(),
                        help="the bench's JSON (default: $CARGO_TARGET_DIR/latency/results.json, "
                             "or target/latency/results.json)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "latency.svg")
    parser.add_argument("--cpu", help="CPU named in the title (default: the results' own)")
    parser.add_argument("--peers", default=",".join(DEFAULT_PEERS),
                        help="comma-separated peers to draw, in order (default: ours,tokio; "
                             "the diagnostics are ours_untimed and ours_fbo)")
    parser.add_argument("--check", action="store_true",
                        help="draw the committed fixture in memory and check it; write nothing")
    args = parser.parse_args()
    if args.check:
        return check()

    try:
        data = json.loads(args.results.read_text())
    except (OSError, ValueError) as err:
        print(f"latency_plot: cannot read {args.results} ({err}); "
              "run `cargo bench --bench latency` first", file=sys.stderr)
        return 1
    runs, skipped = load(data)
    for note in skipped:
        print(f"latency_plot: skipped {note}", file=sys.stderr)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    if not any(r.peer in peers for r in runs):
        print(f"latency_plot: no runs of {peers} in {args.results}", file=sys.stderr)
        return 1
    cpu = args.cpu or data.get("cpu") or cpu_model()
    svg = render(runs, peers, cpu, date_of(data, args.results), data.get("setup", {}))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(svg, encoding="utf-8")
    os.replace(tmp, args.out)
    drawn = [r for r in runs if r.peer in peers]
    print(f"latency_plot: {len(drawn)} runs in {len(panels_of(runs, peers))} panels -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
