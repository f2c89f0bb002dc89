"""The benchmark's plot: prefill time against prompt length, where the time goes, and decode."""

from __future__ import annotations

from pathlib import Path

from .results import BREAKDOWN_KEYS, ModeResult

# In the plot a colour is a mode, in every panel; the parts of a mode's time are shades of grey.
MODE_COLORS = {"split": "tab:blue", "split-seed": "tab:orange", "whole": "tab:green", "tee-only": "tab:red",
               "split-private": "tab:purple", "split-verify": "tab:brown", "split-private+verify": "tab:pink"}
PART_GREYS = dict(zip(BREAKDOWN_KEYS, ("#303030", "#707070", "#a8a8a8", "#dcdcdc")))


def plot(results: list[ModeResult], path: Path, title: str) -> None:
    """Top: median prefill time against prompt length, one line per mode. Below: one panel per
    length, a bar per mode of its median seconds, stacked by part (same mode colours); and with
    decode rows, a last row of panels: each mode's milliseconds per new token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import NullLocator

    decode = [r for r in results if r.phase == "decode"]
    results = [r for r in results if r.phase == "prefill"]
    modes = list(dict.fromkeys(r.mode for r in results))
    tokens = sorted({r.tokens for r in results})
    spare = iter(plt.get_cmap("tab10").colors[7:] * len(modes))  # modes this table does not know
    colors = {mode: MODE_COLORS.get(mode) or next(spare) for mode in modes}
    heights = (1, 1.15, 0.9) if decode else (1, 1.15)
    fig = plt.figure(figsize=(max(9.0, 2.5 + 0.55 * len(modes) * len(tokens)), 9.5 + 4 * bool(decode)))
    grid = fig.add_gridspec(len(heights), len(tokens), height_ratios=heights)
    line = fig.add_subplot(grid[0, :])
    bars = [fig.add_subplot(grid[1, j]) for j in range(len(tokens))]
    if decode:
        _decode_panels([fig.add_subplot(grid[2, j]) for j in range(len(tokens))], decode, tokens, colors)
    for mode in modes:
        points = sorted((r.tokens, r.median_s) for r in results if r.mode == mode)
        line.plot([t for t, _ in points], [s for _, s in points], marker="o", color=colors[mode], label=mode)
    line.set(xlabel="prompt tokens", ylabel="prefill time, median (s)", title="Prefill time", xscale="log",
             yscale="log")
    line.set_xticks(tokens, [str(t) for t in tokens])
    line.xaxis.set_minor_locator(NullLocator())
    line.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), title="mode")
    for ax, n in zip(bars, tokens):
        cells = [r for r in results if r.tokens == n]
        for x, r in enumerate(cells):
            bottom = 0.0
            for key in BREAKDOWN_KEYS:
                value = r.breakdown_s.get(key, 0.0)
                ax.bar(x, value, 0.75, bottom=bottom, color=PART_GREYS[key], edgecolor="white", linewidth=0.5)
                bottom += value
            ax.bar(x, bottom, 0.75, fill=False, edgecolor=colors[r.mode], linewidth=2)
            ax.text(x, bottom, f"{r.median_s:.3g} s", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(cells)), [r.mode for r in cells], rotation=35, ha="right", fontsize=8)
        for label, r in zip(ax.get_xticklabels(), cells):
            label.set_color(colors[r.mode])
        ax.set_title(f"{n} tokens", fontsize=10)
        ax.margins(y=0.12)
    bars[0].set_ylabel("where the time goes: seconds, median")
    parts = [Patch(facecolor=PART_GREYS[key], edgecolor="black", linewidth=0.5, label=key.replace("_", " "))
             for key in BREAKDOWN_KEYS]
    fig.legend(handles=parts, loc="lower center", ncol=len(parts), fontsize=8, frameon=False,
               title="parts of a mode's time (its bar's outline is the mode's colour)", title_fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _decode_panels(axes, decode: list[ModeResult], tokens: list[int], colors: dict) -> None:
    for ax, n in zip(axes, tokens):
        cells = [r for r in decode if r.tokens == n]
        for x, r in enumerate(cells):
            ax.bar(x, r.ms_per_token, 0.75, color=colors.get(r.mode, "tab:gray"))
            ax.text(x, r.ms_per_token, f"{r.ms_per_token:.3g} ms", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(cells)), [r.mode for r in cells], rotation=35, ha="right", fontsize=8)
        ax.set_title(f"decode after {n} tokens", fontsize=10)
        ax.margins(y=0.15)
    axes[0].set_ylabel("ms per new token, median")


def check_can_plot() -> None:
    """--plot needs matplotlib (the `bench` extra): say so before the benchmark, not after it."""
    from ..errors import InputError

    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise InputError(f"--plot needs matplotlib, which cannot be imported here ({err}); "
                         "pip install 'tsqp[bench]'") from None


