"""Zero-shot tasks: a task file with no demonstrations runs through `flamingo-annotate run`, for both kinds,
with and without an instruction (one Ray run for all four), on the bundled `miniature` model: every item
gets one row per task, without error, with a non-empty generation or a label of the task's own."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from sample_media import image_bytes

from flamingo_annotate.cli import main

TASKS = {
    "describe": "name: describe\nquery: \"A picture of\"\ngeneration: {max_new_tokens: 6}\n",
    "describe_told": "name: describe_told\ninstruction: \"Describe the scene.\"\nquery: \"A picture of\"\n"
                     "generation: {max_new_tokens: 6}\n",
    "colour": "name: colour\nkind: classify\nquery: \"Question: What colour is the shape? Answer:\"\n"
              "labels: [\" red\", \" green\", \" blue\"]\n",
    "colour_told": "name: colour_told\nkind: classify\ninstruction: \"Answer with a colour.\"\n"
                   "query: \"Question: What colour is the shape? Answer:\"\n"
                   "labels: [\" red\", \" green\", \" blue\"]\n",
}


def test_zero_shot_tasks_of_both_kinds_run_end_to_end(ray_session: None, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    colours = [(220, 20, 20), (20, 200, 20), (20, 20, 220)]
    for i, colour in enumerate(colours):
        (inputs / f"{i}.png").write_bytes(image_bytes(colour, size=(64, 64)))
    files = []
    for name, text in TASKS.items():
        (tmp_path / f"{name}.yaml").write_text(text)
        files.append(str(tmp_path / f"{name}.yaml"))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", *files, "--input", str(inputs), "--output", str(out),
                                       "--model", "miniature", "--no-progress"])
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pandas()
    assert sorted(rows.groupby("task").size().items()) == sorted((name, 3) for name in TASKS)
    assert rows["error"].isna().all(), rows[rows["error"].notna()][["task", "error"]]
    generated = rows[rows.task.str.startswith("describe")]
    assert (generated.annotation.str.strip().str.len() > 0).all(), generated.annotation.tolist()
    classified = rows[rows.task.str.startswith("colour")]
    assert set(classified.annotation) <= {"red", "green", "blue"}
    assert all(len(scores) == 3 for scores in classified.label_scores)


@pytest.mark.parametrize("instruction", ["", "Describe the scene."])
def test_a_zero_shot_prompt_equals_the_same_prompt_run_whole(instruction: str) -> None:
    """No demonstrations: what the pipeline's prefix/query split computes is the plain forward of the prompt."""
    import torch

    from flamingo import load_model

    model = load_model("miniature")
    visual = model.encode_vision(torch.rand(1, 1, 1, 3, 64, 64))                     # (1, 1, n, D)
    query = "<image>A picture of"
    whole, _ = model.tokenize([instruction + query])
    prefix_ids, _ = model.tokenize([instruction])
    query_ids, _ = model.tokenize([query])
    prefix = model.prepare_prefix(prefix_ids) if prefix_ids.shape[1] else None
    split = model.generate(lang_x=query_ids, visual_tokens=visual, prefix=prefix, max_new_tokens=5,
                           return_dict=True)
    plain = model.generate(lang_x=whole, visual_tokens=visual, max_new_tokens=5, return_dict=True)
    assert torch.equal(split.new_tokens, plain.new_tokens)
    torch.testing.assert_close(split.mean_logprob, plain.mean_logprob, rtol=1e-5, atol=1e-5)
