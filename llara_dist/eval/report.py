"""`llara-dist report RUN_DIR`: PNG plots and a Markdown summary of a run.

Reads what training and evaluation wrote (``RUN/metrics.jsonl``, ``RUN/eval/*/metrics.json``,
``RUN/config.yaml``) and writes ``RUN/report/``:

- ``training.png``: loss, learning rate, hybrid share and validation HitRatio@1 over steps (one
  panel each; a panel says "not logged" when the run has no such series);
- ``hit_ratio.png``: HitRatio@1 with Wilson 95% intervals, LLaRA vs the recommender vs popularity,
  for every evaluation found;
- ``summary.md``: the settings that matter, the final training numbers and the evaluation table.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from llara_dist.errors import DataError

# Series plotted from metrics.jsonl (the keys the training worker writes): panel title -> key.
SERIES: dict[str, str] = {
    "loss": "loss",
    "learning rate": "lr",
    "hybrid share": "hybrid_share",
    "validation HitRatio@1": "valid/hit_ratio@1",
}


def read_metrics_log(path: Path) -> list[dict]:
    """Rows of ``metrics.jsonl``; a malformed line is an error naming the file and line."""
    rows = []
    if not path.is_file():
        return rows
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object per line")
        rows.append(row)
    return rows


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key`` in the log, keeping the last value per step."""
    points = {}
    for i, row in enumerate(rows):
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            points[row.get("step", i)] = float(value)
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def read_evaluations(run_dir: Path) -> list[tuple[str, dict]]:
    """(name, metrics) for each ``RUN/eval/NAME/metrics.json``, sorted by name."""
    out = []
    for path in sorted((run_dir / "eval").glob("*/metrics.json")):
        try:
            out.append((path.parent.name, json.loads(path.read_text())))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg})") from None
    return out


def _plot_training(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (title, key) in zip(axes.flat, SERIES.items()):
        steps, values = series(rows, key)
        ax.set_title(title)
        ax.set_xlabel("step")
        if steps:
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label="measured")
            if title == "validation HitRatio@1":  # its ValidRatio in the same panel
                v_steps, v_values = series(rows, "valid/valid_ratio")
                if v_steps:
                    ax.plot(v_steps, v_values, "--", color="tab:orange", label="ValidRatio")
                    ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def comparison_rows(evaluations: list[tuple[str, dict]]) -> list[tuple[str, float, float, float]]:
    """(label, HR@1, low, high) for LLaRA in each evaluation and its recommender / popularity."""
    llara, refs = [], []
    for name, m in evaluations:
        llara.append((f"LLaRA {name}", m["hit_ratio@1"], *m["hit_ratio@1_ci95"]))
        for ref in ("recommender", "popularity"):
            r = m.get(ref)
            if r:
                label = f"{r.get('model', ref) if ref == 'recommender' else ref} {m.get('split', name)}"
                bar = (label, r["hit_ratio@1"], *r["hit_ratio@1_ci95"])
                if bar not in refs:  # several evaluations of one split share the baselines
                    refs.append(bar)
    return llara + refs


def _plot_comparison(bars: list[tuple[str, float, float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(bars) + 2), 4.5))
    if bars:
        labels, values, lows, highs = zip(*bars)
        colours = ["tab:blue" if l.startswith("LLaRA") else "tab:grey" if l.startswith("popularity") else "tab:orange"
                   for l in labels]
        err = [[v - lo for v, lo in zip(values, lows)], [hi - v for v, hi in zip(values, highs)]]
        ax.bar(range(len(bars)), values, yerr=err, capsize=4, color=colours)
        ax.set_xticks(range(len(bars)), labels, rotation=30, ha="right")
    else:
        ax.text(0.5, 0.5, "no evaluation yet (run `llara-dist eval`)", ha="center", va="center",
                transform=ax.transAxes, color="grey")
    ax.set_ylabel("HitRatio@1 (Wilson 95% interval)")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt_ci(value: float, ci: list[float]) -> str:
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def summary_markdown(run_dir: Path, cfg: dict, rows: list[dict], evaluations: list[tuple[str, dict]]) -> str:
    lines = [f"# Run `{run_dir.name}`", ""]
    if cfg:
        model, train, lora = cfg.get("model", {}), cfg.get("train", {}), cfg.get("lora", {})
        workers = cfg.get("scaling", {}).get("num_workers")
        lines += [
            "| setting | value |", "|---|---|",
            f"| model | {model.get('name_or_path')} ({model.get('dtype')}) |",
            f"| LoRA | r={lora.get('r')}, alpha={lora.get('alpha')} |",
            f"| curriculum | {train.get('curriculum')} |",
            f"| lr / micro-batch / grad-accum | {train.get('lr')} / {train.get('micro_batch_size')} / {train.get('grad_accum')} |",
            f"| max steps / epochs | {train.get('max_steps')} / {train.get('epochs')} |",
            f"| workers | {workers} |",
            f"| DeepSpeed config | {train.get('ds_config')} |",
            f"| shards | {cfg.get('data', {}).get('shards')} |",
            "",
        ]
    lines += ["## Training", ""]
    if rows:
        for title, key in SERIES.items():
            steps, values = series(rows, key)
            if steps:
                lines.append(f"- {title}: {values[0]:.4g} at step {steps[0]:g} -> {values[-1]:.4g} at step {steps[-1]:g}"
                             + (f" (best {max(values):.4g})" if "HitRatio" in title else ""))
    else:
        lines.append("No `metrics.jsonl` in this run.")
    lines += ["", "![training](training.png)", "", "## Evaluation", ""]
    if evaluations:
        lines += ["| evaluation | prompt | decoding | n | HitRatio@1 [95% CI] | ValidRatio | HR@1 among valid "
                  "| recommender HR@1 | popularity HR@1 |", "|---|---|---|---|---|---|---|---|---|"]
        for name, m in evaluations:
            rec, pop = m.get("recommender") or {}, m.get("popularity") or {}
            lines.append(
                f"| {name} | {m.get('prompt', '?')} | {m.get('decoding', '?')} | {m['n']} "
                f"| {_fmt_ci(m['hit_ratio@1'], m['hit_ratio@1_ci95'])} | {m.get('valid_ratio', float('nan')):.3f} "
                f"| {m.get('hit_ratio@1_among_valid', float('nan')):.3f} "
                f"| {_fmt_ci(rec['hit_ratio@1'], rec['hit_ratio@1_ci95']) if rec else '-'} "
                f"| {_fmt_ci(pop['hit_ratio@1'], pop['hit_ratio@1_ci95']) if pop else '-'} |")
        lines += ["", "![HitRatio@1](hit_ratio.png)"]
    else:
        lines.append("No evaluation yet: run `llara-dist eval --run RUN_DIR`.")
    return "\n".join(lines) + "\n"


def run_report(run_dir: str | Path) -> Path:
    """Write ``RUN/report/{training.png, hit_ratio.png, summary.md}``; returns the report folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: run directory not found")
    cfg_path = run_dir / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {}
    rows = read_metrics_log(run_dir / "metrics.jsonl")
    evaluations = read_evaluations(run_dir)
    if not rows and not evaluations:
        raise DataError(f"{run_dir}: nothing to report (no metrics.jsonl and no eval/*/metrics.json)")
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    _plot_training(rows, out / "training.png")
    _plot_comparison(comparison_rows(evaluations), out / "hit_ratio.png")
    (out / "summary.md").write_text(summary_markdown(run_dir, cfg or {}, rows, evaluations))
    print(f"report: {out / 'summary.md'}, {out / 'training.png'}, {out / 'hit_ratio.png'}")
    return out
