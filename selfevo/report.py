"""Tables and plots of a run: the summary across generations and the seed-style bar chart."""

from __future__ import annotations

import io
import re
from pathlib import Path

from rich.table import Table

from selfevo.data import read_json, write_bytes, write_json, write_text

METRICS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")


def collect(run_dir: str | Path) -> list[dict]:
    """One row per evaluated model: the base model, then each finished generation."""
    run_dir = Path(run_dir)
    gens = sorted(
        (int(m.group(1)), p) for p in run_dir.glob("gen_*") if (m := re.fullmatch(r"gen_(\d+)", p.name))
    )
    rows = []
    for name, folder in [("base", run_dir / "base")] + [(f"gen_{i}", p) for i, p in gens]:
        if (folder / "metrics.json").exists():
            stages = read_json(folder / "stages.json") if (folder / "stages.json").exists() else {}
            row = {"model": name, **read_json(folder / "metrics.json")}
            row["qa_pairs"] = stages.get("answers", {}).get("kept")
            row["replayed"] = stages.get("replay", {}).get("chosen")
            row["seconds"] = {k: v.get("seconds") for k, v in stages.items()}
            rows.append(row)
    return rows


def _seconds_total(row: dict) -> str:
    values = [v for v in (row.get("seconds") or {}).values() if v is not None]
    return f"{sum(values):.0f}" if values else ""


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | BLEU-4 | ROUGE-1 | ROUGE-2 | ROUGE-L | QA pairs | replayed | seconds |", "|---" * 8 + "|"]
    for r in rows:
        cells = [r["model"], *(f"{r[m]:.2f}" for m in METRICS)]
        cells += [str(r.get("qa_pairs") or ""), str(r.get("replayed") if r.get("replayed") is not None else "")]
        cells.append(_seconds_total(r))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(run_dir: str | Path) -> Table:
    """Write summary.json and summary.md into the run directory; return the table for the terminal."""
    run_dir = Path(run_dir)
    rows = collect(run_dir)
    write_json(run_dir / "summary.json", rows)
    write_text(run_dir / "summary.md", markdown_table(rows))
    table = Table(title=f"{run_dir.name}: closed-book eval per generation")
    for col in ("model", "BLEU-4", "ROUGE-1", "ROUGE-2", "ROUGE-L", "QA pairs", "seconds"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        table.add_row(r["model"], *(f"{r[m]:.2f}" for m in METRICS), str(r.get("qa_pairs") or ""), _seconds_total(r))
    return table


def write_report(run_dir: str | Path) -> Path:
    """report.png: BLEU-4 and ROUGE per generation as grouped bars (the seed's draw_scores.py chart), and report.md."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = collect(run_dir)
    if not rows:
        raise FileNotFoundError(f"{run_dir}: no evaluated generation yet (no metrics.json)")
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(METRICS) * max(1, len(rows)) / 2), 4.5))
    width = 0.8 / len(rows)
    for k, row in enumerate(rows):
        xs = [m + (k - (len(rows) - 1) / 2) * width for m in range(len(METRICS))]
        bars = ax.bar(xs, [row[m] for m in METRICS], width, label=row["model"])
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(METRICS)), [m.upper() for m in METRICS])
    ax.set_ylabel("score (x100)")
    ax.set_title(f"{run_dir.name}: closed-book eval, base model and each generation")
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = run_dir / "report.png"
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=120)
    plt.close(fig)
    write_bytes(png, image.getvalue())
    write_text(run_dir / "report.md", f"# {run_dir.name}\n\n![scores](report.png)\n\n" + markdown_table(rows))
    return png
