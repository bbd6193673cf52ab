"""`gptcli plot`: loss curves of one or more runs in one PNG (matplotlib, an optional extra).

Panels, each shared by all runs (one colour per run):
- loss: training loss (solid) and validation loss (dashed, dots at evaluations);
- val bpb: bits per byte, when any run is a language model;
- val accuracy: when any run is a classifier;
- one panel per multiple-choice task of `train.eval_tasks`: its acc_norm;
- one panel per metric of each generation task of `train.eval_tasks` (`NAME/rougeL`, ...);
- preference tuning: reward accuracy and reward margin, training (solid) and validation (dashed).
The x axis is the optimizer step or the tokens seen.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gptcli.errors import GptcliError
from gptcli.evals.text_metrics import CORPUS, PER_ITEM, ROUGE
from gptcli.outputs import check_output_file, input_paths
from gptcli.store.runlog import METRICS_FILE, RUN_FILE, read_metrics

LOSS_PNG = "loss.png"
X_AXES = {"step": "step", "tokens": "tokens seen"}
# Preference tuning's panels: each key's training curve and its `val_` curve.
PREFERENCE_PANELS = {"rewards/accuracies": "reward accuracy (chosen > rejected)",
                     "rewards/margins": "reward margin (chosen - rejected)"}
# Reinforcement learning's: the reward (sampled rollouts; `val_`: greedy answers), and pass@1.
POLICY_PANELS = {"reward": "reward (train: sampled, val: greedy)"}
PASS_AT_1 = "val_pass@1"
# train.eval_tasks' keys in metrics.jsonl are NAME/METRIC: the panels show these metrics.
TASK_METRICS = {"acc_norm": "acc_norm (multiple choice)", **{m: m for m in (*PER_ITEM, *ROUGE, *CORPUS)}}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise GptcliError("plotting needs matplotlib, an optional extra: pip install 'gptcli[plot]'") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def _series(records: list[dict], key: str, x_axis: str, tokens_at) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of `key` over the records that have it."""
    rows = [r for r in records if r.get(key) is not None]
    steps = np.array([r["step"] for r in rows], dtype=float)
    y = np.array([r[key] for r in rows], dtype=float)
    return (steps if x_axis == "step" else tokens_at(steps)), y


def _tokens_at(records: list[dict]):
    """Tokens seen as a function of step, interpolated between logged steps (evaluation
    records of older runs carry no token count)."""
    known = sorted({(r["step"], r["tokens_seen"]) for r in records if "tokens_seen" in r} | {(0, 0)})
    steps, tokens = (np.array(v, dtype=float) for v in zip(*known))
    return lambda at: np.interp(at, steps, tokens)


def plot_runs(run_dirs: list[str | Path], out: str | Path, x_axis: str = "step",
              log_scale: bool = False) -> Path:
    """Draw the runs' curves into the PNG `out` (written atomically); return its path."""
    if x_axis not in X_AXES:
        raise GptcliError(f"--x: '{x_axis}' is not one of {', '.join(X_AXES)}")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise GptcliError(f"--out: {out} should end in .png")
    read = [Path(run_dir) / name for run_dir in run_dirs for name in (METRICS_FILE, RUN_FILE)]
    target = check_output_file(out, input_paths(read), "--out")  # a symlink's target, written in place
    runs = {}
    for run_dir in map(Path, run_dirs):
        records = read_metrics(run_dir)
        if not records:
            raise GptcliError(f"{run_dir} has no {METRICS_FILE} with any records; name a run "
                              f"directory that has trained at least one logged step")
        runs[run_dir] = records
    panels = [("loss", "loss (nats per token)")]
    if any("val_bpb" in r for records in runs.values() for r in records):
        panels.append(("val_bpb", "val bits per byte"))
    if any("val_accuracy" in r for records in runs.values() for r in records):
        panels.append(("val_accuracy", "val accuracy"))
    if any("val_rewards/accuracies" in r for records in runs.values() for r in records):
        panels += [(key, title) for key, title in PREFERENCE_PANELS.items()]
    if any(PASS_AT_1 in r for records in runs.values() for r in records):
        panels += [*POLICY_PANELS.items(), (PASS_AT_1, "val pass@1 (greedy, the first reward)")]
    tasks = sorted({key for records in runs.values() for r in records for key in r
                    if "/" in key and key.rpartition("/")[2] in TASK_METRICS})
    panels += [(key, f"{key.rpartition('/')[0]} {TASK_METRICS[key.rpartition('/')[2]]}") for key in tasks]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    names = _short_names(list(runs))
    for color, (run_dir, records) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10, runs.items()):
        tokens_at = _tokens_at(records)
        name = names[run_dir]
        for ax, (key, _) in zip(axes[0], panels):
            if key == "loss" or key in PREFERENCE_PANELS or key in POLICY_PANELS:
                ax.plot(*_series(records, key, x_axis, tokens_at), color=color, lw=1.2, label=f"{name} train")
                ax.plot(*_series(records, f"val_{key}", x_axis, tokens_at), color=color, lw=1.2, ls="--",
                        marker="o", ms=3, label=f"{name} val")
            else:
                ax.plot(*_series(records, key, x_axis, tokens_at), color=color, lw=1.2, marker="o", ms=3,
                        label=name)
    for ax, (key, title) in zip(axes[0], panels):
        ax.set_title(title)
        ax.set_xlabel(X_AXES[x_axis])
        ax.grid(alpha=0.3)
        if log_scale and key in ("loss", "val_bpb"):  # not accuracies
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = target.with_name(f".{target.name}.tmp.png")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, dpi=110)
        tmp.replace(target)
    except OSError as exc:
        raise GptcliError(f"--out: cannot write {out} ({exc.strerror or exc}); choose a writable path") from None
    finally:
        plt.close(fig)
        if tmp.is_file():  # a failed save's leftover
            tmp.unlink()
    return out


def _short_names(run_dirs: list[Path]) -> dict[Path, str]:
    """Legend names: each run's folder name, or its path when two names clash."""
    names = [d.name or str(d) for d in run_dirs]
    # `$` would start matplotlib's maths mode: a name is shown as written.
    return {d: (n if names.count(n) == 1 else str(d)).replace("$", r"\$") for d, n in zip(run_dirs, names)}
