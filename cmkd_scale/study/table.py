"""The study's table: mean ± std per row, each KD student's gain over its no-KD baseline, the
teachers' own scores, and a line for every KD row that lands below its baseline saying why,
from the numbers. Pure functions of a study.json dict (no torch, no MLflow).

Gains: the difference of the row means, ``mean(KD row) − mean(baseline row)``; with several
seeds it carries the standard error of that difference, ``sqrt(sd_kd²/n_kd + sd_base²/n_base)``,
and a gap within two standard errors is called seed noise.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from cmkd_scale.study.config import FAMILY_NAMES, ROWS, TITLES

NOISE_SE = 2.0  # |gain| within this many standard errors of the difference: seed noise
SMALL_MARGIN = 0.02  # a teacher this little above the student's baseline has little to give


@dataclass
class RowStats:
    name: str
    values: dict[str, list[float]]  # metric -> one value per seed (seed order)
    seeds: list[int]
    baseline: str | None = None  # the no-KD row this KD row is measured against
    teacher: str | None = None  # the teacher's family (= its baseline row's name)
    entries: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.seeds)

    def mean(self, metric: str) -> float | None:
        vals = self.values.get(metric) or []
        return statistics.fmean(vals) if vals else None

    def std(self, metric: str) -> float | None:
        vals = self.values.get(metric) or []
        return statistics.stdev(vals) if len(vals) > 1 else None


@dataclass
class Verdict:
    row: str
    gain: float | None  # mean(row) - mean(baseline), headline metric
    se: float | None  # standard error of that difference (None with one seed on a side)
    below: bool
    reasons: list[str] = field(default_factory=list)  # most likely first
    line: str = ""


def rows(study: dict[str, Any]) -> dict[str, RowStats]:
    """Per-row values of every metric, from study.json's entries (requested rows only)."""
    out: dict[str, RowStats] = {}
    wanted = study.get("rows") or list(ROWS)
    for name in ROWS:
        if name not in wanted:
            continue
        entries = sorted(
            (e for e in study["entries"] if e["name"] == name and e.get("requested", True)),
            key=lambda e: e["seed"],
        )
        values: dict[str, list[float]] = {}
        for metric in ("mAP", "mAUC", "dprime", "acc"):
            vals = [e[metric] for e in entries if e.get(metric) is not None]
            if vals:
                values[metric] = vals
        student, teacher = ROWS[name]
        out[name] = RowStats(
            name,
            values,
            [e["seed"] for e in entries],
            baseline=student if teacher is not None else None,
            teacher=teacher,
            entries=entries,
        )
    return out


def teacher_scores(study: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """family -> the seed-0 baseline entry whose reported model taught the KD rows."""
    out = {}
    for e in study["entries"]:
        if e["teacher_family"] is None and e["seed"] == 0:
            out[e["name"]] = e
    return out


def _fmt(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "—"
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def second_metric(metric: str) -> str:
    """The table's second column: mAUC beside mAP (arg-max accuracy means nothing on a
    multi-label set), mAP beside acc (single-label sets)."""
    return "mAUC" if metric == "mAP" else "mAP"


def _score(x: float | None) -> str:
    return "?" if x is None else f"{x:.3f}"


def _signed(x: float) -> str:
    return f"{x:+.3f}"


def verdict(
    study: dict[str, Any], stats: dict[str, RowStats], row: str, metric: str
) -> Verdict | None:
    """The KD row against its baseline: gain, and when below, the likely reasons."""
    kd = stats.get(row)
    if kd is None or kd.baseline is None or kd.mean(metric) is None:
        return None
    student_name = FAMILY_NAMES[ROWS[row][0]]
    teacher_name = FAMILY_NAMES[ROWS[row][1] or "cnn"]
    base = stats.get(kd.baseline)
    title = f"{TITLES[row]} [{row}]"
    if base is None or base.mean(metric) is None:
        line = (
            f"{title}: {metric} {kd.mean(metric):.3f}; no {student_name} baseline in this study "
            f"(add '{kd.baseline}' to rows) — gain unknown"
        )
        return Verdict(row, None, None, False, line=line)
    k_mean, b_mean = kd.mean(metric), base.mean(metric)
    assert k_mean is not None and b_mean is not None
    gain = k_mean - b_mean
    k_sd, b_sd = kd.std(metric), base.std(metric)
    se = (
        math.sqrt(k_sd**2 / kd.n + b_sd**2 / base.n)
        if k_sd is not None and b_sd is not None
        else None
    )
    teachers = teacher_scores(study)
    t_entry = teachers.get(kd.teacher or "")
    t_score = t_entry.get(metric) if t_entry else None
    noise = se is not None and abs(gain) <= NOISE_SE * se
    n_text = f"{kd.n} seed{'s' if kd.n != 1 else ''}"
    context = _context(study, kd, n_text)
    if gain >= 0:
        parts = [f"{title}: {_signed(gain)} {metric} over the {student_name} baseline"]
        parts.append(f"({k_mean:.3f} vs {b_mean:.3f}; {context})")
        if noise:
            parts.append(f"— within seed noise (± {se:.3f} standard error)")
        if t_score is not None:
            rel = "beats" if k_mean > t_score else "stays below"
            parts.append(f"; {rel} its {teacher_name} teacher ({t_score:.3f})")
        return Verdict(row, gain, se, False, line=" ".join(parts).replace(" ;", ";"))

    reasons = _reasons(study, kd, base, metric, gain, se, t_score, teacher_name, student_name)
    line = (
        f"{title} is {-gain:.3f} {metric} BELOW the {student_name} baseline "
        f"({k_mean:.3f} vs {b_mean:.3f}; {context}). Most likely: {reasons[0]}"
    )
    if len(reasons) > 1:
        line += " Also: " + " ".join(reasons[1:])
    return Verdict(row, gain, se, True, reasons, line)


def _context(study: dict[str, Any], kd: RowStats, n_text: str) -> str:
    """'1 seed, 5 epochs on 256 training clips' from what study.json recorded."""
    parts = [n_text]
    epochs = next((e["epochs"] for e in kd.entries if e.get("epochs")), None)
    clips = (study.get("data") or {}).get("train_clips")
    if epochs and clips:
        parts.append(f"{epochs} epochs on {clips} training clips")
    elif epochs:
        parts.append(f"{epochs} epochs")
    return ", ".join(parts)


def _at_last_epoch(row: RowStats) -> int:
    """Runs whose model, chosen as the best of the run, is from the run's very last epoch."""
    return sum(
        1
        for e in row.entries
        if (e.get("model") or "best") == "best"
        and e.get("epochs")
        and e.get("epoch")
        and e["epoch"] >= e["epochs"]
    )


def _reasons(
    study: dict[str, Any],
    kd: RowStats,
    base: RowStats,
    metric: str,
    gain: float,
    se: float | None,
    t_score: float | None,
    teacher_name: str,
    student_name: str,
) -> list[str]:
    """Likely reasons for a KD row below its baseline, most likely first, each from numbers."""
    b_mean = base.mean(metric)
    assert b_mean is not None
    out: list[tuple[int, str]] = []
    chance = (study.get("chance") or {}).get(metric)
    if t_score is not None and t_score < b_mean:
        out.append(
            (
                0,
                f"the {teacher_name} teacher ({t_score:.3f} {metric}) is weaker than the "
                f"{student_name} baseline it should improve ({b_mean:.3f}): its soft labels "
                "pull the student toward worse predictions.",
            )
        )
    if se is not None and abs(gain) <= NOISE_SE * se:
        out.append(
            (
                1,
                f"the gap is within seed noise (standard error of the difference {se:.3f} over "
                f"{kd.n} and {base.n} seeds): not a measurable loss.",
            )
        )
    if t_score is not None and chance is not None and chance < 1:
        headroom = (t_score - chance) / (1 - chance)
        if headroom < 0.5:
            out.append(
                (
                    2,
                    f"the teacher's {t_score:.3f} {metric} is only {t_score - chance:.3f} above "
                    f"chance ({chance:.3f}), {headroom:.0%} of the way to perfect: its soft "
                    "labels carry little class information to transfer.",
                )
            )
    if t_score is not None and 0 <= t_score - b_mean < SMALL_MARGIN:
        out.append(
            (
                3,
                f"the teacher is only {t_score - b_mean:.3f} above the student's baseline: "
                "little to transfer.",
            )
        )
    last, base_last = _at_last_epoch(kd), _at_last_epoch(base)
    if last:
        both = (
            f"so was the baseline's ({base_last} of {base.n}): both are unfinished models and "
            "more epochs may change the order"
            if base_last
            else "its baseline had peaked earlier: the KD student may need more epochs"
        )
        out.append(
            (
                4,
                f"the student's best model is from its last epoch in {last} of {kd.n} run(s), "
                f"i.e. it was still improving when training stopped; {both}.",
            )
        )
    if se is None:
        out.append(
            (
                5,
                "with one seed per row there is no estimate of seed noise: rerun with "
                "--seeds 3 before reading this as a loss.",
            )
        )
    if not out:
        out.append(
            (
                6,
                f"none of the usual suspects (the teacher, {_score(t_score)}, is stronger "
                "than the baseline and the gap exceeds seed noise): check the "
                "distillation settings (distill.lambda_, temperature, loss) and the student's "
                "learning rate.",
            )
        )
    return [text for _, text in sorted(out)]


def format_table(study: dict[str, Any]) -> tuple[str, list[Verdict]]:
    """The printed table and the KD rows' verdicts (a below-baseline one always has a line)."""
    metric = study.get("metric", "mAP")
    other = second_metric(metric)
    stats = rows(study)
    n_seeds = study.get("seeds")
    selected = study.get("selected_on") or "?"
    head = (
        f"CMKD study '{study.get('name', 'study')}': {n_seeds} seed(s) per row; eval-set scores "
        f"of each run's reported model ({selected}); mean ± std over seeds"
    )
    lines = [head, ""]
    header = (
        f"{'row':8s} {'model':34s} {'n':>2s} {metric:>15s} {other:>15s}   "
        f"{'gain in ' + metric + ' over no-KD'}"
    )
    lines.append(header)
    verdicts: list[Verdict] = []
    for name, st in stats.items():
        gain_text = ""
        if st.baseline is not None:
            v = verdict(study, stats, name, metric)
            if v is not None:
                verdicts.append(v)
                if v.gain is not None:
                    gain_text = _signed(v.gain)
                    if v.se is not None:
                        gain_text += f" ± {v.se:.3f}"
                    gain_text += f" vs {st.baseline}"
                    if v.below:
                        gain_text += " (below)"
        lines.append(
            f"{name:8s} {TITLES[name]:34s} {st.n:2d} "
            f"{_fmt(st.mean(metric), st.std(metric)):>15s} "
            f"{_fmt(st.mean(other), st.std(other)):>15s}   {gain_text}".rstrip()
        )
    chance = study.get("chance") or {}
    if chance:
        c_main = chance.get(metric)
        c_other = chance.get(other)
        lines.append(
            f"{'chance':8s} {'(a random or majority-class scorer)':34s} {'':2s} "
            f"{(f'{c_main:.3f}' if c_main is not None else '—'):>15s} "
            f"{(f'{c_other:.3f}' if c_other is not None else '—'):>15s}".rstrip()
        )
    used = {st.teacher for st in stats.values() if st.teacher}
    teachers = {f: e for f, e in teacher_scores(study).items() if f in used}
    if teachers:
        lines.append("")
        lines.append("teachers (the seed-0 no-KD runs' reported models, frozen in the KD rows):")
        for family, e in sorted(teachers.items()):
            where = e.get("model") or "best"
            at = f"epoch {e['epoch']}" if e.get("epoch") is not None else f"step {e.get('step')}"
            m, o = e.get(metric), e.get(other)
            lines.append(
                f"  {FAMILY_NAMES[family]}: {metric} {m:.3f}"
                + (f", {other} {o:.3f}" if o is not None else "")
                + f"  ({where} model, {at}; {e['checkpoint']})"
            )
    if verdicts:
        lines.append("")
        lines.append("KD students against their no-KD baselines:")
        for v in verdicts:
            lines.append(("  ! " if v.below else "  ") + v.line)
    return "\n".join(lines), verdicts
