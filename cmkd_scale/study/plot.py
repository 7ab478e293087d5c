"""study.png: one column per row, a point per seed, the mean ± std as a bar with error bars,
the teachers' scores and chance as reference lines (matplotlib's Agg canvas, no display)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cmkd_scale.study.table import rows, second_metric, teacher_scores

_COLOURS = {"cnn": "#1f77b4", "ast": "#d62728"}  # by the student's family


def plot_study(study: dict[str, Any], out: Path) -> Path:
    """Per-row mean ± std bars with the per-seed points, for the headline and second metric."""
    metrics = [study.get("metric", "mAP")]
    metrics.append(second_metric(metrics[0]))
    stats = rows(study)
    names = list(stats)
    fig = Figure(figsize=(max(6.0, 1.3 * len(names) + 2.0) * len(metrics) / 1.6, 4.2))
    FigureCanvasAgg(fig)
    teachers = teacher_scores(study)
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), i + 1)
        for x, name in enumerate(names):
            st = stats[name]
            vals = st.values.get(metric) or []
            colour = _COLOURS[st.baseline or name]
            if vals:
                mean, std = st.mean(metric), st.std(metric)
                ax.bar(
                    x,
                    mean,
                    width=0.6,
                    color=colour,
                    alpha=0.25 if st.baseline else 0.45,
                    yerr=std,
                    capsize=4,
                    hatch="//" if st.baseline else None,
                    edgecolor=colour,
                )
                jitter = [x + 0.12 * (j - (len(vals) - 1) / 2) for j in range(len(vals))]
                ax.plot(jitter, vals, "o", color=colour, ms=4)
                ax.annotate(
                    f"{mean:.3f}", (x, mean), textcoords="offset points", xytext=(0, 4),
                    ha="center", fontsize=8,
                )  # fmt: skip
        for family, e in teachers.items():
            if e.get(metric) is not None and any(s.teacher == family for s in stats.values()):
                ax.axhline(
                    e[metric], color=_COLOURS[family], ls="--", lw=1,
                    label=f"{family.upper()} teacher {e[metric]:.3f}",
                )  # fmt: skip
        chance = (study.get("chance") or {}).get(metric)
        if chance is not None:
            ax.axhline(chance, color="grey", ls=":", lw=1, label=f"chance {chance:.3f}")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=20)
        ax.set_ylabel(f"eval {metric}")
        ax.set_title(f"{study.get('name', 'study')}: {metric} (points: seeds)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out
