"""Draws engine_comparison.py's results files and prints their markdown tables.

    python benchmarks/plot_results.py                      # every file in benchmarks/results/
    python benchmarks/plot_results.py benchmarks/results/amd-zen4-avx512_2026-12-01_DPN92_b1.json

Per file: docs/performance_<file name>.png, one panel per (model, batch, threads) with the
median ms of each engine (each panel on its own scale: batch 8 takes ~8x batch 1), and on stdout
the tables docs/performance.md shows, each naming its machine, date, commit and data file.
"""
import argparse
import json
import sys
from pathlib import Path

from dpn_fast import engine_comparison  # the results schema and tables

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engines import RESULTS_DIR  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"
COLOURS = {"dpn_fast": "#d62728", "stock f32": "#1f77b4", "stock, lower precision": "#9ecae1"}


def load_results(path):
    """The results document in `path`, checked against the schema (ValueError names the fault)."""
    results = json.loads(Path(path).read_text())
    try:
        engine_comparison.check_results(results)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return results


def category(results, key, result):
    if not results["engines"][key]["stock"]:
        return "dpn_fast"
    return "stock f32" if result["precision"] == "f32" else "stock, lower precision"


def plot(results, data_file, out_path):
    """One panel per cell, a bar per engine (its median ms, labelled); writes `out_path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = results["cells"]
    threads = sorted({cell["threads"] for cell in cells})
    rows = list(dict.fromkeys((cell["model"], cell["batch"]) for cell in cells))
    engines = list(dict.fromkeys(key for cell in cells for key in cell["results"]))
    fig, axes = plt.subplots(len(rows), len(threads), squeeze=False,
                             figsize=(5.2 * len(threads), 0.75 + 0.32 * len(engines) * len(rows)))
    for ax in axes.flat:
        ax.set_visible(False)
    for cell in cells:
        ax = axes[rows.index((cell["model"], cell["batch"])), threads.index(cell["threads"])]
        ax.set_visible(True)
        present = [key for key in engines if key in cell["results"]]
        ms = [cell["results"][key]["median_ms"] for key in present]
        colours = [COLOURS[category(results, key, cell["results"][key])] for key in present]
        ax.barh(range(len(present)), ms, color=colours)
        ax.set_yticks(range(len(present)), [
            engine_comparison.precision_label(results["engines"][key]["label"],
                                          cell["results"][key]["precision"])
            for key in present], fontsize=7)
        ax.invert_yaxis()
        for y, value in enumerate(ms):
            ax.text(value, y, f" {value:.1f}", va="center", fontsize=7)
        ax.set_xlim(0, max(ms) * 1.18)
        ax.set_title(f"{cell['model']}, "
                     f"{engine_comparison.cell_heading(cell['batch'], cell['threads'])}, ms",
                     fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    machine = results["machine"]
    fig.suptitle(f"{machine['cpu_model']} ({machine['kind']}), {results['date']}, "
                 f"{engine_comparison.provenance(results)}\n"
                 f"data: {engine_comparison.repository_path(data_file)}", fontsize=8)
    fig.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in COLOURS.values()],
               labels=list(COLOURS), loc="lower center", ncol=len(COLOURS), fontsize=7,
               frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path,
                        help="results files (default: benchmarks/results/*.json)")
    parser.add_argument("--out-dir", type=Path, default=DOCS, help="where the PNGs go")
    args = parser.parse_args(argv)
    files = args.files or sorted(RESULTS_DIR.glob("*.json"))
    if not files:
        parser.error(f"no results files in {RESULTS_DIR}")
    for path in files:
        results = load_results(path)
        png = plot(results, path, args.out_dir / f"performance_{path.stem}.png")
        data_file = engine_comparison.repository_path(path)
        print(engine_comparison.format_table(results, data_file=data_file))
        print(f"![{path.stem}]({png.name})\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
