#!/usr/bin/env python3
"""Draw the README's benchmark chart from criterion's saved results.

    cargo bench                      # or: cargo bench --bench uncontended, ...
    python3 scripts/chart.py         # reads target/criterion, writes docs/bench-chart.svg

Every benchmark criterion saved (`<dir>/**/new/benchmark.json` with its `estimates.json`)
becomes one horizontal bar of its median, grouped into sections by bench group and parameter
(`uncontended/n=16`, `waiters (100)` for 100 queued, ...), coloured by who it measures: ours
(membudget), tokio, frozen-core, the floor (the bare allocator, `std::alloc`), or another peer.
Where a group declares a throughput in elements (`contention`, `many_tasks`), the median is
divided by it: time per operation. Each section has its own logarithmic axis (from a little below its fastest row to its
slowest, at least a decade), so nanosecond and millisecond benches can sit on one page and
small differences stay visible; each bar is labelled with its value.
Sections with one kind of row only (all ours, say: nothing to compare) are left out. Missing rows,
benches or files are skipped: the chart shows whatever was run.

The title names the CPU (`model name` in /proc/cpuinfo of the machine drawing the chart, so
run it where the benches ran, or pass --cpu) and the dates of the results. Python 3.11
standard library only; the SVG is written by hand.

`--check` draws the committed fixture (scripts/fixtures/criterion) into memory and checks the
result (CI runs it); it writes nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "criterion"

# Who a row measures, from the start of its id (first match wins), and how it is drawn.
# Okabe-Ito colours: distinguishable with the common colour-vision deficiencies.
PEERS = [
    ("ours", "ours (membudget)", "#0072B2", ("ours", "pool", "allocate")),
    ("tokio", "tokio Semaphore + alloc", "#E69F00", ("tokio",)),
    ("frozen", "frozen-core 0.0.32", "#CC79A7", ("frozen",)),
    ("floor", "floor: std::alloc (+ atomics)", "#999999", ("floor", "std")),
    ("other", "other peer (async-lock)", "#009E73", ()),
]
PEER_ORDER = {key: i for i, (key, *_rest) in enumerate(PEERS)}
# Bench files in the README's order; groups of other benches follow alphabetically.
BENCH_ORDER = ["uncontended", "contention", "handoff", "waiters", "many_tasks"]

# A value that names a parameter of the bench (n, a queue length, a size), not a variant.
PARAMETER = re.compile(r"^[0-9][0-9.]*\s*[A-Za-z]*$|=")


@dataclass
class Row:
    section: str
    label: str
    peer: str
    ns: float  # median, per element when the group declares an element throughput
    per_element: bool
    mtime: float


def peer_of(label: str) -> str:
    low = label.lower()
    for key, _name, _colour, prefixes in PEERS:
        if low.startswith(prefixes):
            return key
    return "other"


def natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def section_key(section: str) -> tuple:
    head = re.split(r"[/_ ]", section, maxsplit=1)[0]
    rank = BENCH_ORDER.index(head) if head in BENCH_ORDER else len(BENCH_ORDER)
    return (rank, natural_key(section))


def load(criterion: Path, baseline: str) -> tuple[list[Row], list[str]]:
    """Every saved result under `criterion`, and a note for each one that could not be read."""
    rows, skipped = [], []
    for bench_json in sorted(criterion.glob(f"**/{baseline}/benchmark.json")):
        where = bench_json.parent.relative_to(criterion)
        try:
            bench = json.loads(bench_json.read_text())
            estimates = json.loads((bench_json.parent / "estimates.json").read_text())
            ns = float(estimates["median"]["point_estimate"])
            group = bench["group_id"]
            function = bench.get("function_id") or ""
            value = bench.get("value_str") or ""
        except (OSError, ValueError, KeyError, TypeError) as err:
            skipped.append(f"{where}: {err}")
            continue
        if not function:  # `group.bench_function("name", ..)` without a BenchmarkId
            function, value = value, ""
        if value and PARAMETER.search(value):
            section, label = f"{group} ({value})", function
        else:
            section, label = group, f"{function}/{value}" if value else function
        throughput = bench.get("throughput") or {}
        elements = throughput.get("Elements") if isinstance(throughput, dict) else None
        per_element = isinstance(elements, (int, float)) and elements > 0
        if per_element:
            ns /= elements
        if not (ns > 0 and math.isfinite(ns)):
            skipped.append(f"{where}: median {ns!r} is not a positive time")
            continue
        rows.append(Row(section, label, peer_of(label), ns, per_element,
                        (bench_json.parent / "estimates.json").stat().st_mtime))
    return rows, skipped


def sections_of(rows: list[Row]) -> list[tuple[str, list[Row]]]:
    by_section: dict[str, list[Row]] = {}
    for row in rows:
        by_section.setdefault(row.section, []).append(row)
    out = []
    for name in sorted(by_section, key=section_key):
        members = by_section[name]
        if len({row.peer for row in members}) < 2:
            continue  # one kind of row only: nothing to compare with
        members.sort(key=lambda r: (PEER_ORDER[r.peer], natural_key(r.label)))
        out.append((name, members))
    return out


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


def section_axis(members: list[Row]) -> tuple[float, float, list[float]]:
    """A logarithmic axis for one section: from a 1-2-5 value a little below its fastest row
    (so that row's bar is still seen) to one at or above its slowest, at least a decade wide."""
    lo, hi = min(r.ns for r in members) / 1.3, max(r.ns for r in members)
    if hi / lo < 10:
        lo = hi / 10
    steps = nice_steps(lo, hi)
    lo, hi = steps[0], steps[-1]
    if len(steps) > 7:  # too many to label: the decades, and both ends where there is room
        decades = [v for v in steps if abs(math.log10(v) - round(math.log10(v))) < 1e-9]
        room = (math.log10(hi) - math.log10(lo)) * 50 / 560  # 50 px of the 560 the bars get
        ends = [v for v in (lo, hi) if all(abs(math.log10(v / d)) > room for d in decades)]
        steps = sorted(set(decades + ends))
    return lo, hi, steps


def render(sections: list[tuple[str, list[Row]]], cpu: str, dates: str) -> str:
    font = 12
    char_w = font * 0.6  # a generous average advance for sans-serif
    row_h, bar_h, head_h, tick_h, gap = 17, 12, 22, 14, 10
    labels = [row.label for _name, members in sections for row in members]
    label_w = max([len(label) for label in labels] + [20]) * char_w + 24
    bars_w, value_w = 560, 80
    left = 10
    width = round(left + label_w + bars_w + value_w + 10)
    top = 84  # below the title, subtitle and legend
    x0 = left + label_w

    body: list[str] = []
    y = top
    for name, members in sections:
        lo, hi, ticks = section_axis(members)
        span = math.log10(hi) - math.log10(lo)

        def x_of(ns: float) -> float:
            return x0 + bars_w * (math.log10(ns) - math.log10(lo)) / span

        per_op = " (per operation)" if members[0].per_element else ""
        body.append(f'<text x="{left}" y="{y + 16}" class="section">{escape(name + per_op)}</text>')
        y += head_h
        rows_top, rows_bottom = y + tick_h - 2, y + tick_h + len(members) * row_h
        decade = 10 ** math.floor(math.log10(lo))
        while decade < hi:  # unlabelled 1-2-5 lines
            for m in (1, 2, 5):
                if lo < m * decade < hi and m * decade not in ticks:
                    mx = x_of(m * decade)
                    body.append(f'<line x1="{mx:.1f}" y1="{rows_top}" x2="{mx:.1f}" '
                                f'y2="{rows_bottom}" class="minor"/>')
            decade *= 10
        for tick in ticks:
            tx = x_of(tick)
            body.append(f'<line x1="{tx:.1f}" y1="{rows_top}" x2="{tx:.1f}" y2="{rows_bottom}" '
                        f'class="grid"/><text x="{tx:.1f}" y="{y + tick_h - 4}" '
                        f'class="axis">{fmt_time(tick)}</text>')
        y += tick_h
        for row in members:
            colour = next(c for key, _n, c, _p in PEERS if key == row.peer)
            x1 = x_of(row.ns)
            body.append(
                f'<text x="{x0 - 8:.1f}" y="{y + bar_h - 2}" class="label">{escape(row.label)}</text>'
                f'<rect x="{x0:.1f}" y="{y}" width="{max(x1 - x0, 1.0):.1f}" height="{bar_h}" '
                f'fill="{colour}"><title>{escape(name)} {escape(row.label)}: '
                f"{row.ns:.4g} ns</title></rect>"
                f'<text x="{x1 + 4:.1f}" y="{y + bar_h - 2}" class="value">{fmt_time(row.ns)}</text>'
            )
            y += row_h
        y += gap
    height = y + 10

    legend: list[str] = []
    lx = left
    present = {row.peer for _name, members in sections for row in members}
    for key, name, colour, _p in PEERS:
        if key == "other" and key not in present:
            continue
        legend.append(f'<rect x="{lx}" y="58" width="12" height="12" fill="{colour}"/>'
                      f'<text x="{lx + 17}" y="68" class="legend">{escape(name)}</text>')
        lx = round(lx + 17 + len(name) * char_w + 22)

    width = max(width, lx)
    title = f"membudget vs tokio vs frozen-core vs the floor: criterion medians, {cpu}, {dates}"
    subtitle = ("Shorter is faster. Each section has its own logarithmic axis: compare bars "
                "within a section. Per operation: median ÷ elements per iteration.")
    return "\n".join([
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif">',
        "<style>"
        f".title{{font-size:{font + 3}px;font-weight:bold}} .sub{{font-size:{font}px;fill:#444}} "
        f".section{{font-size:{font + 1}px;font-weight:bold}} "
        f".label{{font-size:{font}px;text-anchor:end}} .value{{font-size:{font - 1}px;fill:#222}} "
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


def dates_of(rows: list[Row]) -> str:
    if not rows:
        return "no results"
    days = sorted({dt.date.fromtimestamp(row.mtime).isoformat() for row in rows})
    return days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"


def check() -> int:
    """Draws the fixture and checks the SVG: well-formed, every readable row a bar, the
    broken and peerless entries left out."""
    rows, skipped = load(FIXTURE, "new")
    sections = sections_of(rows)
    svg = render(sections, "Fixture CPU", "2000-01-01")
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    bars = [r for r in root.iter(f"{ns}rect") if r.find(f"{ns}title") is not None]
    names = [name for name, _members in sections]
    drawn = sum(len(members) for _name, members in sections)
    problems = []
    if len(bars) != drawn or drawn == 0:
        problems.append(f"{len(bars)} bars drawn for {drawn} rows")
    if len(skipped) != 1:
        problems.append(f"expected the one broken fixture entry skipped, got {skipped}")
    expected = ["uncontended/n=1", "contention/wide/2t", "waiters (1)", "waiters (100)"]
    if names != expected:
        problems.append(f"sections {names}, expected {expected}")
    for name, members in sections:
        if name.startswith("contention") and not all(r.per_element for r in members):
            problems.append("contention rows not divided by their throughput")
    if problems:
        print("chart --check: FAILED\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print(f"chart --check: ok ({len(sections)} sections, {drawn} bars, "
          f"{len(skipped)} broken entry skipped, {len(svg)} bytes of SVG)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--criterion", type=Path, default=ROOT / "target" / "criterion",
                        help="criterion's output directory (default: target/criterion)")
    parser.add_argument("--baseline", default="new",
                        help="which saved run to read: new (the latest) or a --save-baseline name")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench-chart.svg")
    parser.add_argument("--cpu", help="CPU named in the title (default: /proc/cpuinfo)")
    parser.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                        help="leave out sections matching REGEX (repeatable)")
    parser.add_argument("--check", action="store_true",
                        help="draw the committed fixture in memory and check it; write nothing")
    args = parser.parse_args()
    if args.check:
        return check()

    if not args.criterion.is_dir():
        print(f"chart: no {args.criterion}; run `cargo bench` first", file=sys.stderr)
        return 1
    rows, skipped = load(args.criterion, args.baseline)
    for note in skipped:
        print(f"chart: skipped {note}", file=sys.stderr)
    rows = [r for r in rows if not any(re.search(x, r.section) for x in args.exclude)]
    sections = sections_of(rows)
    if not sections:
        print(f"chart: no comparable results under {args.criterion}", file=sys.stderr)
        return 1
    svg = render(sections, args.cpu or cpu_model(), dates_of(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(svg, encoding="utf-8")
    os.replace(tmp, args.out)
    drawn = sum(len(members) for _name, members in sections)
    print(f"chart: {drawn} bars in {len(sections)} sections -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
