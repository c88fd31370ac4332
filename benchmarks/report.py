"""The rows of a benchmark report: medians, ranges, ratios and verdicts, as text and as RESULTS.md."""

from __future__ import annotations

import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from harness import LL
from workloads import Size


@dataclass
class Row:
    figure: str
    what: str
    unit: str  # "s", "ms", "%", "x", "MiB", "count"
    ll: list | None
    other: list | None
    other_name: str
    target: str = ""
    met: bool | None = None
    verdict: str = ""
    kind: str = "time"  # "time": ratio = other / ll (times faster); "plain": no ratio
    profile: list = field(default_factory=list)  # lines: where lora_loader's time goes (cProfile), shown for missed targets


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        print("  " + format_row_text(row), flush=True)
        return row


def med(xs):
    return statistics.median(xs) if xs else float("nan")


SCALE = {"s": (1.0, "s"), "ms": (1e3, "ms"), "us": (1e6, "µs"), "%": (1.0, "%"), "x": (1.0, "x"), "MiB": (1.0, "MiB"), "count": (1, "")}


def fmt_value(v, unit: str) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    if unit == "count":
        return str(int(v))
    if unit in ("s", "ms"):  # pick ms or s by magnitude; samples are stored in seconds
        if v < 1e-3:
            return f"{v * 1e6:.0f} µs"
        if v < 1.0:
            return f"{v * 1e3:.3g} ms"
        return f"{v:.3g} s"
    if unit == "%":
        return f"{v:+.1f}%"
    if unit == "x":
        return f"{v:.2f}x"
    return f"{v:.1f} {SCALE[unit][1]}"


def fmt_stats(xs, unit: str) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return fmt_value(xs[0], unit)
    return f"{fmt_value(med(xs), unit)} [{fmt_value(min(xs), unit)} – {fmt_value(max(xs), unit)}]"


def ratio_text(row: Row) -> str:
    if row.kind != "time" or not row.other or not row.ll:
        return "-"
    r = med(row.other) / med(row.ll)
    return f"{r:.1f}x faster" if r >= 1 else f"{1 / r:.1f}x slower"


def format_row_text(row: Row) -> str:
    other = f"{row.other_name} {fmt_stats(row.other, row.unit)}" if row.other else ""
    verdict = f" | {row.verdict}" if row.verdict else ""
    mine = f"{LL} {fmt_stats(row.ll, row.unit)} | " if row.ll else ""
    return f"[{row.figure}] {row.what}: {mine}{other} | {ratio_text(row)}{verdict}"


def read_target_note(what: str, load: float, mapped: float, owned: float, modules: int) -> str:
    """Why a load misses "<= 2x the safetensors read": what the reference reads, and what the load does beyond it."""
    return (
        f"Why {what} misses 2x the read: the read is `safetensors.torch.load_file`, which in safetensors 0.8 maps the file "
        f"and copies no byte ({fmt_value(mapped, 's')}); a load must own the bytes (a file rewritten or truncated later must not "
        f"change the adapter or crash the process), and the same read with each tensor copied into process memory costs "
        f"{fmt_value(owned, 's')} alone, so 2x the map ({fmt_value(2 * mapped, 's')}) leaves "
        + (f"{fmt_value(2 * mapped - owned, 's')}" if 2 * mapped > owned else "nothing")
        + f" for the work beyond the copy. Against the copying read the load is {load / owned:.2f}x; the rest is per-module Python work for "
        f"{modules} modules: names and alphas converted, each tensor checked finite, the plan, one wrapper layer per module "
        f"(its profile is under 'Where lora_loader's time goes')."
    )


def verdict(met: bool, text: str) -> str:
    return ("MET: " if met else "MISSED: ") + text


def faster_text(speed: float, target: float = 5.0) -> str:
    if speed >= target:
        return f"{speed:.1f}x faster"
    now = f"{speed:.1f}x faster" if speed >= 1 else f"{1 / speed:.1f}x slower"
    return f"{now} (target {target:g}x faster: {target / speed:.1f}x short)"


# -- RESULTS.md -----------------------------------------------------------------------------------------


def markdown(report: Report, info: dict, size: Size, args, elapsed: float) -> str:
    lines = [
        "# Benchmarks: lora_loader vs diffusers+peft / transformers+peft",
        "",
        f"Written by `{' '.join(['python', 'benchmarks/run.py'] + args.argv)}` "
        f"({size.name} sizes, {args.repeats or size.repeats} rounds, {elapsed / 60:.1f} min). "
        "Both libraries run in the same process, in alternating rounds (the order flips every round); "
        "each cell is the median [min – max] over the rounds. Ratio: how many times faster lora_loader is than the other library (medians). "
        "See `benchmarks/README.md` for what each figure measures.",
        "",
        "## Machine",
        "",
        "| | |",
        "| --- | --- |",
    ]
    lines += [f"| {k} | {v} |" for k, v in info.items()]
    lines += [
        "",
        "## Results (CPU, fp32)",
        "",
        f"| figure | what | {LL} | other library | other | ratio | target | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report.rows:
        lines.append(
            f"| {row.figure} | {row.what} | {fmt_stats(row.ll, row.unit) if row.ll else '-'} | {row.other_name or '-'} | "
            f"{fmt_stats(row.other, row.unit) if row.other else '-'} | {ratio_text(row)} | {row.target or ''} | {row.verdict or ''} |"
        )
    missed = [row for row in report.rows if row.met is False]
    lines += ["", "## Targets", ""]
    if not missed:
        lines.append("Every target measured in this run is met.")
    else:
        lines.append("Missed in this run (by how much is in the verdict column):")
        lines.append("")
        for row in missed:
            lines.append(f"- **{row.figure}: {row.what}**: target {row.target}; {row.verdict}.")
        profiled = [row for row in missed if row.profile]
        if profiled:
            lines += ["", "### Where lora_loader's time goes (cProfile, taken after the timed rounds)", "",
                      "Profiler overhead inflates these numbers; read them for proportions. `cumulative`: the function and "
                      "what it calls; `own`: time inside that function itself.", ""]
            for row in profiled:
                lines += [f"**{row.figure}: {row.what}**", "", "```"] + row.profile + ["```", ""]
    if report.checks:
        lines += ["", "## Sanity checks (same work on both sides)", ""]
        lines += [f"- {c}" for c in report.checks]
    if report.notes:
        lines += ["", "## Notes", ""]
        lines += [f"- {n}" for n in report.notes]
    lines += ["", f"Load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}.", ""]
    return "\n".join(lines)


def print_table(report: Report) -> None:
    print("\n" + "=" * 100)
    for row in report.rows:
        print(format_row_text(row))
        if row.target:
            print(f"    target: {row.target}")
    print("=" * 100)


def write_section(path: Path, text: str, start: str, end: str) -> None:
    """Put ``text`` (which starts with ``start`` and ends with ``end``) in place of the previous section between
    those markers in ``path``, or append it: how a benchmark with a section of its own writes RESULTS.md."""
    old = path.read_text() if path.exists() else ""
    if start in old and end in old:
        before, rest = old.split(start, 1)
        after = rest.split(end, 1)[1].lstrip("\n")
        new = before + text + ("\n" + after if after else "")
    else:
        new = old.rstrip("\n") + "\n\n" + text
    path.write_text(new)


def kept_sections(path: Path) -> str:
    r"""The sections other scripts wrote into ``path`` between their ``<!-- NAME:start -->`` / ``<!-- NAME:end -->``
    markers (``many_adapters.py``'s 50 adapters, ``bench_dit.py``'s DiTs), to keep when run.py rewrites the file.

    >>> import tempfile
    >>> f = Path(tempfile.mkdtemp()) / "R.md"
    >>> _ = f.write_text("old table\n<!-- a:start -->\nA\n<!-- a:end -->\nx\n<!-- b:start -->B<!-- b:end -->\n")
    >>> kept_sections(f)
    '<!-- a:start -->\nA\n<!-- a:end -->\n\n<!-- b:start -->B<!-- b:end -->\n'
    """
    old = path.read_text() if path.exists() else ""
    sections = re.findall(r"(<!-- ([\w-]+):start -->.*?<!-- \2:end -->)", old, flags=re.S)
    return "\n".join(section + "\n" for section, _ in sections)
