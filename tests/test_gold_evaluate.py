"""`flamingo-annotate evaluate`: gold sets read from CSV / JSONL / Parquet, and the scores of a real run on the
bundled `miniature` model checked against the same figures computed by hand from the job's own output rows
(one Ray run): classify accuracy, per-class recall and confusion matrix; generate exact match and chrF; the
shot curve; missing items counted as errors. Bad gold files stop the command before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sacrebleu
from click.testing import CliRunner
from sample_media import image_bytes, tar_bytes

from flamingo_annotate.cli import main
from flamingo_annotate.gold import GoldError, read_gold

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220)}
CLASSIFY = ("name: colour\nkind: classify\ndemonstrations:\n  - {media: demo.png, text: \" red\"}\n"
            "query: \"Question: What colour is the shape? Answer:\"\nlabels: [\" red\", \" green\", \" blue\"]\n")
GENERATE = ("name: describe\ndemonstrations:\n  - {media: demo.png, text: \" a red square.\"}\n"
            "query: \"Output:\"\ngeneration: {max_new_tokens: 6}\n")


def _norm(text: str) -> str:
    text = text.strip().casefold()
    return text[:-1].rstrip() if text.endswith(".") else text


def _write_gold(path: Path, rows: list[dict[str, str]]) -> None:
    table = pa.Table.from_pylist(rows)
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text("\n".join([",".join(rows[0]), *(",".join(r.values()) for r in rows)]) + "\n")


def test_evaluate_scores_match_the_output_rows(ray_session: None, tmp_path: Path) -> None:
    (tmp_path / "demo.png").write_bytes(image_bytes(COLOURS["red"], size=(64, 64)))
    (tmp_path / "colour.yaml").write_text(CLASSIFY)
    (tmp_path / "describe.yaml").write_text(GENERATE)
    images = tmp_path / "gold" / "images"
    images.mkdir(parents=True)
    gold_rows = []
    for i, (name, colour) in enumerate([*COLOURS.items(), ("red", COLOURS["red"]), ("blue", COLOURS["blue"])]):
        (images / f"{i}.png").write_bytes(image_bytes(colour, size=(64, 64)))
        gold_rows.append({"item": f"images/{i}.png", "answer": name})
    (images / "shard.tar").write_bytes(tar_bytes([("a.png", image_bytes(COLOURS["green"], size=(64, 64)))]))
    gold_rows += [{"item": "images/shard.tar::a", "answer": "green"},
                  {"item": "images/shard.tar::nope", "answer": "red"},     # no such member
                  {"item": "images/gone.png", "answer": "blue"}]           # no such file
    gold = tmp_path / "gold" / "gold.jsonl"
    _write_gold(gold, gold_rows)
    out, report_file = tmp_path / "out", tmp_path / "report.json"
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path / "colour.yaml"), str(tmp_path / "describe.yaml"),
                                       "--gold", str(gold), "--output", str(out), "--json", str(report_file),
                                       "--shots", "0,all", "--model", "miniature", "--no-progress"])
    assert result.exit_code == 0, result.output
    report = {t["task"]: t for t in json.loads(report_file.read_text())["tasks"]}
    rows = pq.read_table(out).to_pandas()
    answer = {(r.task, r.id): r.annotation for r in rows.itertuples() if r.error is None}
    expected = {str(tmp_path / "gold" / r["item"]): r["answer"]
                for r in gold_rows}
    scored = {item: truth for item, truth in expected.items() if ("colour", item) in answer}
    assert len(scored) == 6 and len(expected) - len(scored) == 2

    colour = report["colour"]
    assert colour["n"] == 6 and colour["errors"] == 2
    assert {e["item"].rsplit("/", 1)[-1] for e in colour["error_items"]} == {"shard.tar::nope", "gone.png"}
    hits = sum(_norm(answer[("colour", i)]) == t for i, t in scored.items())
    assert colour["accuracy"]["correct"] == hits and colour["accuracy"]["n"] == 6
    labels = colour["confusion"]["labels"]
    assert labels == ["red", "green", "blue"]
    matrix = [[sum(t == g and _norm(answer[("colour", i)]) == a for i, t in scored.items()) for a in labels]
              for g in labels]
    assert colour["confusion"]["matrix"] == matrix
    for g, row in zip(labels, matrix):
        support = sum(t == g for t in scored.values())
        assert colour["per_class"][g]["support"] == support
        assert colour["per_class"][g]["recall"] == pytest.approx(row[labels.index(g)] / support, abs=1e-4)
    assert [p["shots"] for p in colour["shot_curve"]] == [0, 1]
    zero_shot = sum(_norm(answer[("colour-k0", i)]) == t for i, t in scored.items())
    assert colour["shot_curve"][0]["score"]["correct"] == zero_shot

    describe = report["describe"]
    assert describe["n"] == 6 and describe["errors"] == 2
    captions = [_norm(answer[("describe", i)]) for i in scored]
    assert describe["exact_match"]["correct"] == sum(c == t for c, t in zip(captions, scored.values()))
    chrf = sacrebleu.corpus_chrf(captions, [list(scored.values())]).score
    assert describe["chrf"] == pytest.approx(chrf, abs=0.01)
    assert "colour (classify, 1 shots): n=6 errors=2" in result.output


def test_gold_files_of_every_format_read_alike_and_bad_ones_fail_first(tmp_path: Path) -> None:
    rows = [{"item": "a.png", "answer": "red", "task": "colour"}, {"item": "s.tar::k", "answer": "two", "task": "n"}]
    read = []
    for suffix in (".csv", ".jsonl", ".parquet"):
        _write_gold(tmp_path / f"gold{suffix}", rows)
        read.append(read_gold(str(tmp_path / f"gold{suffix}")))
    assert read[0] == read[1] == read[2]
    assert [r.item for r in read[0]] == [str(tmp_path / "a.png"), f"{tmp_path / 's.tar'}::k"]
    assert [(r.answer, r.task) for r in read[0]] == [("red", "colour"), ("two", "n")]
    with pytest.raises(GoldError, match="gold.csv: answer_text: missing column"):
        read_gold(str(tmp_path / "gold.csv"), answer_column="answer_text")

    (tmp_path / "colour.yaml").write_text("name: colour\nkind: classify\nlabels: [\" red\", \" blue\"]\n")
    runner = CliRunner()
    result = runner.invoke(main, ["evaluate", str(tmp_path / "colour.yaml"), "--gold", str(tmp_path / "gold.csv"),
                                  "--answer-column", "label"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"Error: {tmp_path / 'gold.csv'}: label: missing column "
                                                  "(columns: item, answer, task)"]
    result = runner.invoke(main, ["evaluate", str(tmp_path / "colour.yaml"), "--gold", str(tmp_path / "gold.csv")])
    assert result.exit_code == 1
    assert "task: rows for tasks not given: n (given: colour)" in result.output
    assert len(result.output.strip().splitlines()) == 1
