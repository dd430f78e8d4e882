"""The peer benchmark's report: a markdown table (what the README shows, pasted
as printed) and a PNG plot of tasks/s and latency per system."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float | int):
        return f"{value:,.{digits}f}"
    return str(value)


def systems_table(report: dict[str, Any]) -> list[str]:
    systems = report.get("systems") or {}
    if not systems:
        return []
    kinds = sorted({k for s in systems.values() for k in s["cpu_ms_per_task"] if k != "total"})
    kinds = [k for k in ("client", "workers", "broker", "redis") if k in kinds]
    header = (
        ["system", "equal durability", "tasks/s", "x project"]
        + ["load p50 ms", "load p99 ms", "idle start p50 ms", "idle result p50 ms"]
        + [f"CPU ms/task {k}" for k in kinds]
        + ["CPU ms/task total", "x project CPU"]
        + ["AMQP publishes/task", "confirms/task", "deliveries/task", "acks/task"]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in systems.values():
        ratio = s.get("ratio") or {}
        amqp = s.get("amqp_per_task") or {}
        row = [
            s["label"],
            "yes" if s["durable"] else "no",
            _f(s["tasks_per_s"], 0),
            _f(ratio.get("tasks_per_s"), 2),
            _f(s["load_p50_ms"]),
            _f(s["load_p99_ms"]),
            _f(s["idle_start_p50_ms"], 2),
            _f(s["idle_result_p50_ms"], 2),
            *[_f(s["cpu_ms_per_task"].get(k), 2) for k in kinds],
            _f(s["cpu_ms_per_task"]["total"], 2),
            _f(ratio.get("cpu_ms_per_task"), 2),
            _f(amqp.get("publish"), 2),
            _f(amqp.get("confirm"), 2),
            _f(amqp.get("deliver_get"), 2),
            _f(amqp.get("ack"), 2),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def in_process_table(report: dict[str, Any]) -> list[str]:
    figures = report.get("in_process")
    if not figures:
        return []
    lines = ["", "| in-process (MemoryBus) | figure |", "|---|---|"]
    lines.append(
        f"| no-op tasks/s ({figures['tasks']:,} tasks, {figures['agents']} agents,"
        f" {figures.get('loop', 'asyncio')}) "
        f"| {_f(figures['tasks_per_s'], 0)} |"
    )
    for pending, micros in figures["submit_us_by_pending"].items():
        lines.append(f"| one submit with {int(pending):,} tasks pending, µs | {_f(micros, 1)} |")
    for pending, micros in (figures.get("bulk_submit_us_by_pending") or {}).items():
        lines.append(
            f"| mean submit filling up to {int(pending):,} pending, µs | {_f(micros, 1)} |"
        )
    if figures.get("submit_cost_ratio") is not None:
        lines.append(
            f"| submit cost, most pending / fewest | x{_f(figures['submit_cost_ratio'], 2)} |"
        )
    lines.append(
        f"| memory retained per finished task, bytes (tracemalloc, "
        f"{figures['retained_tasks']:,} tasks kept) | {_f(figures['bytes_per_finished_task'], 0)} |"
    )
    lines.append(
        f"| peak traced memory during that run, bytes per task "
        f"| {_f(figures['peak_bytes_per_task'], 0)} |"
    )
    return lines


def markdown_table(report: dict[str, Any]) -> str:
    lines = systems_table(report)
    if lines:
        lines.append("")
        lines.append(
            f"{report['tasks']:,} tasks per run, medians of {report['rounds']} interleaved rounds, "
            f"{report['workers']} worker processes where configurable, {report['cpus']} CPUs "
            f"({report['machine']}), "
            f"Python {report['python']}, {report.get('broker', '')}, {report['date']}"
        )
    return "\n".join(lines + in_process_table(report))


def plot(report: dict[str, Any], path: Path) -> None:
    """Two bar charts side by side: tasks/s, and latency (idle and under load)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = report["systems"]
    names = list(systems)
    colors = ["tab:blue" if n.startswith("project") else "tab:gray" for n in names]
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 0.55 * len(names) + 2))
    rows = list(range(len(names)))
    bars = left.barh(rows, [systems[n]["tasks_per_s"] for n in names], color=colors)
    left.bar_label(bars, fmt="%.0f", fontsize=8, padding=2)
    labels = [
        systems[n]["label"] + (" [equal durability]" if systems[n]["durable"] else "")
        for n in names
    ]
    left.set_yticks(rows, labels, fontsize=8)
    left.invert_yaxis()
    left.set_xlabel("tasks/s (higher is better)")
    height = 0.4
    right.barh(
        [r - height / 2 for r in rows],
        [systems[n]["idle_result_p50_ms"] for n in names],
        height,
        label="idle submit→result p50",
    )
    right.barh(
        [r + height / 2 for r in rows],
        [systems[n]["load_p50_ms"] for n in names],
        height,
        label="under load submit→result p50",
    )
    right.set_xscale("log")
    right.set_yticks(rows, [""] * len(names))
    right.invert_yaxis()
    right.set_xlabel("milliseconds, log scale (lower is better)")
    right.legend(fontsize=8)
    figure.suptitle(
        f"{report['tasks']:,} no-op tasks, medians of {report['rounds']} rounds, "
        f"{report['cpus']} CPUs, {report['date']}",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
