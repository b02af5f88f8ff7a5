"""The ``esa`` command line: a thin layer over the library; each command writes one run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from esa.cli import options as o
from esa.cli.errors import user_errors

app = typer.Typer(
    name="esa",
    help="Extreme Sensitivity Analysis: find the weights of a causal LM that matter most, and test them causally.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
tiny_app = typer.Typer(help="The embedded tiny model.", no_args_is_help=True)
app.add_typer(tiny_app, name="tiny")
console = Console(highlight=False)


def _fmt(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


@app.command()
@user_errors
def baseline(
    model: o.Model = None,
    dtype: o.Dtype = "auto",
    device: o.Device = "auto",
    revision: o.Revision = None,
    trust_remote_code: o.TrustRemoteCode = False,
    attn_implementation: o.AttnImplementation = None,
    dataset: o.Dataset = "embedded",
    dataset_path: o.DatasetPath = None,
    text_file: o.TextFile = None,
    seq_len: o.SeqLen = None,
    max_samples: o.MaxSamples = None,
    batch_size: o.BatchSize = 8,
    seed: o.Seed = 0,
    out_dir: o.OutDir = Path("runs/baseline"),
    overwrite: o.Overwrite = False,
) -> None:
    """Perplexity, loss and next-token accuracy on the evaluation windows (per-window NLL kept)."""
    from esa.baseline import run_baseline
    from esa.config import BaselineConfig

    config = BaselineConfig(
        model=o.model_config(model, dtype, device, revision, trust_remote_code, attn_implementation),
        data=o.data_config(dataset, dataset_path, text_file, seq_len, max_samples, batch_size, seed),
        out_dir=str(out_dir), overwrite=overwrite,
    )
    run = run_baseline(config)
    print_baseline(run.metrics, run.session.describe(), run.out_dir)


def print_baseline(metrics: dict, described: dict, out_dir: Path) -> None:
    m, w = described["model"], described["windows"]
    table = Table(title=f"baseline — {m['model_id']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("perplexity", _fmt(metrics["ppl"]))
    table.add_row("mean NLL (nats/token)", _fmt(metrics["mean_nll"]))
    table.add_row("next-token accuracy", _fmt(metrics["accuracy"]))
    table.add_row("tokens evaluated", f"{metrics['tokens']:,}")
    table.add_row("windows × seq_len", f"{w['n_windows']} × {w['seq_len']} (of {w['n_available']} available)")
    table.add_row("uniform-guess PPL", str(metrics.get("uniform_guess_ppl")))
    table.add_row("model", f"{m['architecture']}, {m['n_parameters']:,} params, {m['dtype']} on {m['device']}")
    table.add_row("dataset", str(described["dataset"].get("dataset")))
    console.print(table)
    for warning in metrics.get("leak_warnings", []):
        console.print(f"[bold red]LEAK SUSPECTED:[/] {warning}")
    console.print(f"results in {out_dir}")


@app.command()
@user_errors
def profile() -> None:
    """Sensitivity scores of every weight, top-k selection and heavy-tail statistics (not implemented yet)."""
    from esa.errors import EsaError

    raise EsaError("esa profile is not implemented yet")


@app.command()
@user_errors
def perturb() -> None:
    """Causal tests: perturb the top-k weights and random/bottom controls (not implemented yet)."""
    from esa.errors import EsaError

    raise EsaError("esa perturb is not implemented yet")


@app.command()
@user_errors
def report() -> None:
    """Figures, tables and the evidence checklist from run directories (not implemented yet)."""
    from esa.errors import EsaError

    raise EsaError("esa report is not implemented yet")


@tiny_app.command("train")
@user_errors
def tiny_train(
    out_dir: Annotated[Path, typer.Option(help="where to write the model [default: the package's own assets]")] = None,
    steps: Annotated[int, typer.Option(help="optimizer steps")] = 1200,
    seed: Annotated[int, typer.Option(help="seed of initialisation and batches")] = 0,
) -> None:
    """Rebuild the embedded tiny model from Python's own documentation (about 10 minutes on 2 CPU cores)."""
    from esa.tiny import ASSETS_DIR
    from esa.tiny.train import TinyRecipe, train

    summary = train(out_dir or ASSETS_DIR, TinyRecipe(steps=steps, seed=seed))
    console.print(f"held-out PPL {summary['held_out_ppl']:.2f} (uniform guess {summary['uniform_guess_ppl']}); "
                  f"written to {out_dir or ASSETS_DIR}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
