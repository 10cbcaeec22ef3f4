"""Zero-shot tasks: a task file with no demonstrations runs through `flamingo-annotate run`, for both kinds,
with and without an instruction (one Ray run for all four), on the bundled `miniature` model: every item
gets one row per task, without error, with a non-empty generation or a label of the task's own. The same run
checks what a calibrated classify task (`calibrate: true`) writes."""

from __future__ import annotations

import math
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
                   "labels: [\" red\", \" green\", \" blue\"]\ncalibrate: true\n",
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
    for row in classified.itertuples():  # raw log-likelihoods always; calibrated log-probabilities when asked
        raw = {e["label"]: e["score"] for e in row.label_scores}
        calibrated = {e["label"]: e["calibrated"] for e in row.label_scores}
        if row.task == "colour":
            assert set(calibrated.values()) == {None}
            assert row.annotation == max(raw, key=raw.__getitem__) and row.score == raw[row.annotation]
        else:
            assert sum(math.exp(c) for c in calibrated.values()) == pytest.approx(1.0)
            assert row.annotation == max(calibrated, key=calibrated.__getitem__)
            assert row.score == calibrated[row.annotation]


@pytest.mark.parametrize("instruction", ["", "Describe the scene."])
def test_a_zero_shot_prompt_equals_the_same_prompt_run_whole(instruction: str) -> None:
    """No demonstrations: the prefix/query split the pipeline runs (an empty prefix included, which holds no
    keys/values) gives the tokens and label scores of the plain, uncached forward of the whole prompt."""
    import torch

    from flamingo import load_model

    model = load_model("miniature")
    visual = model.encode_vision(torch.rand(2, 1, 1, 3, 64, 64))                     # (2, 1, n, D)
    query = "<image>Question: What colour is the shape? Answer:"
    whole, _ = model.tokenize([instruction + query] * 2)
    prefix_ids, _ = model.tokenize([instruction])
    query_ids, _ = model.tokenize([query] * 2)
    prefix = model.prepare_prefix(prefix_ids)
    assert prefix.length == len(model.tokenizer.encode(instruction, add_special_tokens=False))
    split = model.generate(lang_x=query_ids, visual_tokens=visual, prefix=prefix, max_new_tokens=5,
                           return_dict=True)
    tokens = whole                                          # greedy decoding by uncached full forwards
    with torch.inference_mode():
        for _ in range(split.new_tokens.shape[1]):
            logits = model(lang_x=tokens, visual_tokens=visual).logits[:, -1]
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    stop = set(model._stop_ids(None).tolist())
    for row, expected in zip(split.new_tokens.tolist(), tokens[:, whole.shape[1]:].tolist()):
        n = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
        assert row[:n] == expected[:n]
    labels = [" red", " green", " blue", " purple"]
    candidates = [model.tokenizer.encode(f"{lb}<|endofchunk|>", add_special_tokens=False) for lb in labels]
    scores = model.score(query_ids, candidates, visual_tokens=visual, prefix=prefix)
    with torch.inference_mode():
        for k, candidate in enumerate(candidates):
            ids = torch.cat([whole, torch.tensor([candidate] * 2)], dim=1)
            logprobs = model(lang_x=ids, visual_tokens=visual).logits.float().log_softmax(-1)
            picked = logprobs[:, whole.shape[1] - 1:-1].gather(2, ids[:, whole.shape[1]:, None])
            torch.testing.assert_close(scores[:, k], picked.sum((1, 2)), rtol=1e-4, atol=1e-4)
