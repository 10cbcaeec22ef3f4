"""Commands that make or measure a model: `train`, `recipe`, `eval` (the training recipe in training/) and
`bench` (flamingo_annotate/bench.py). They only parse options and print; torch, Ray and the training code
are imported when a command runs, so `flamingo-annotate --help` stays instant.
"""

from __future__ import annotations

from typing import Any

import click

from flamingo_annotate.options import dtype_option, refused_models, trust_remote_code_option


@click.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--local", is_flag=True, help="Train in this process instead of on Ray Train.")
def train(config: str, local: bool) -> None:
    """Train the bridges (resampler, gated cross-attention, added tokens) of a model on the data a CONFIG
    file names, backbones frozen. Running the same config again resumes from its latest checkpoint."""
    from training.config import load_config
    from training.train import train as train_on_ray
    from training.train import train_local

    settings = load_config(config)
    train_local(settings) if local else train_on_ray(settings)
    click.echo(f"model written to {settings.output_dir}")


@click.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--local", is_flag=True, help="Run stage 3 in this process instead of on Ray Train.")
def recipe(config: str, local: bool) -> None:
    """Reproduce the miniature model from a recipe CONFIG (e.g. jobs/train_configs/miniature.yaml): stage 1
    vision tower, stage 2 language model, stage 3 bridges, then the evaluation table. Finished stages
    are skipped, so running it again continues an interrupted recipe."""
    from training.config import ConfigError
    from training.recipe import load_recipe, run_recipe

    try:
        settings = load_recipe(config)
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"model written to {run_recipe(settings, local=local)}")


@click.command("eval")
@click.option("--model", metavar="NAME_OR_PATH",
              help="A preset, a bundled model or a saved model folder [default: miniature].")
@click.option("--scenes", type=click.IntRange(min=0), default=200, show_default=True,
              help="Held-out scenes to caption (0-shot).")
@click.option("--clips", type=click.IntRange(min=0), default=100, show_default=True,
              help="Held-out clips to caption (0-shot).")
@click.option("--questions", type=click.IntRange(min=0), default=200, show_default=True,
              help="Questions per attribute, each on its own held-out scene or clip.")
@click.option("--episodes", type=click.IntRange(min=1), default=200, show_default=True,
              help="Binding episodes per point of each few-shot curve.")
@click.option("--ways", type=click.IntRange(min=2), default=2, show_default=True,
              help="Nonsense words per binding episode (chance = 1/ways).")
@click.option("--shots", default="0,1,2,4,8", show_default=True, help="Shots per word on the binding curve.")
@click.option("--categories", default="colour_shape,shape", show_default=True,
              help="What the binding words name, one curve each: colour_shape ('red circle'), shape.")
@click.option("--words", default="train,wide", show_default=True,
              help="Nonsense words, one row each: train (training's generator), wide (a wider one).")
@click.option("--task-items", type=click.IntRange(min=0), default=240, show_default=True,
              help="Held-out scenes for each example task file.")
@click.option("--tasks", "task_files", show_default=True,     # training.evaluate.DEFAULT_TASKS, without its import
              default="jobs/tasks/caption.yaml,jobs/tasks/count.yaml,jobs/tasks/has_red.yaml,jobs/tasks/binding.yaml",
              help="Example task files to score on held-out scenes ('' to skip).")
@click.option("--parts", default="caption,qa,binding,tasks", show_default=True, help="What to measure.")
@click.option("--threads", type=click.IntRange(min=1), help="torch CPU threads [default: torch's].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the results here.")
@trust_remote_code_option
def evaluate(model: str | None, scenes: int, clips: int, questions: int, episodes: int, ways: int, shots: str,
             categories: str, words: str, task_items: int, task_files: str, parts: str, threads: int | None,
             seed: int, json_path: str | None, trust_remote_code: bool) -> None:
    """Accuracy with Wilson 95% intervals and chance, on held-out draws of the synthetic world: 0-shot
    captions, question answering per attribute, the few-shot binding curves (training-like and wider
    nonsense words, each with every gate at 0 as the no-vision control) and the example task files."""
    import torch

    from flamingo import DEFAULT_MODEL, load_model
    from training.evaluate import EvalConfig
    from training.evaluate import evaluate as run_evaluation

    def listed(text: str) -> tuple[str, ...]:
        return tuple(part.strip() for part in text.split(",") if part.strip())

    try:
        settings = EvalConfig(seed=seed, scenes=scenes, clips=clips, questions=questions, episodes=episodes,
                              ways=ways, shots=tuple(int(s) for s in listed(shots)), categories=listed(categories),
                              words=listed(words), task_items=task_items, tasks=listed(task_files))
    except ValueError as error:
        raise click.BadParameter(str(error)) from None
    from flamingo_annotate.task_scoring import check_task_files, score_task
    from pipeline.task import TaskError

    if "tasks" in listed(parts):
        try:
            check_task_files(settings.tasks)
        except TaskError as error:       # before the model is loaded and minutes of the other parts run
            raise click.UsageError(f"task files:\n{error}") from None
    if threads:
        torch.set_num_threads(threads)
    with refused_models():
        loaded = load_model(model or DEFAULT_MODEL, trust_remote_code=trust_remote_code)

    report = run_evaluation(loaded, settings, parts=listed(parts), score_task=score_task)
    click.echo(report.table())
    if json_path:
        report.save(json_path)
        click.echo(f"results written to {json_path}")


@click.command()
@click.option("--model", default="random-vits32-llama8", show_default=True,
              help="A preset (random weights are enough for speed) or a saved model folder.")
@click.option("--shots", type=click.IntRange(min=0), default=4, show_default=True)
@click.option("--caption-tokens", type=click.IntRange(min=1), default=12, show_default=True)
@click.option("--query-tokens", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--new-tokens", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True,
              help="Items per generation batch.")
@click.option("--vision-batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Items per vision encoder batch.")
@click.option("--openflamingo-batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--items", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@dtype_option
@click.option("--compile", "compile", is_flag=True,
              help="torch.compile the decode step; its compile time is reported apart from the figures.")
@click.option("--shots-sweep", default="0,4,16,32", show_default=True,
              help="Comma-separated shot counts for the cost-per-item sweep ('' to skip).")
@click.option("--compare-openflamingo", is_flag=True,
              help="Also run OpenFlamingo 2.0.1's generate() on the same items; report the ratio.")
@click.option("--pipeline", "run_pipeline", is_flag=True,
              help="Also run the workload as a Ray job over --pipeline-items images; report its ratio.")
@click.option("--pipeline-items", type=click.IntRange(min=2), default=2000, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the results here.")
@trust_remote_code_option
def bench(shots_sweep: str, run_pipeline: bool, json_path: str | None, **options: Any) -> None:
    """Measure items/s per stage and end to end, FLOPs per item and the share of the matmul rate."""
    from flamingo_annotate.bench import BenchConfig, format_result, run_benchmark, save_result

    sweep = tuple(int(s) for s in shots_sweep.split(",") if s.strip())
    with refused_models():
        result = run_benchmark(BenchConfig(shots_sweep=sweep, pipeline=run_pipeline, **options))
    click.echo(format_result(result))
    if json_path:
        save_result(result, json_path)
        click.echo(f"results written to {json_path}")


MODEL_COMMANDS = (train, recipe, evaluate, bench)
