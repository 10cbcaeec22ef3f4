"""`flamingo-annotate evaluate`: run task files on a gold set through the annotation job and score the answers.

A gold set is a table (Parquet, CSV or JSONL, by extension; any fsspec URI) with one row per expected answer:
  item    the item: a media URI or path (relative paths are relative to the gold file's folder), or an id as the
          job writes it, `<shard>.tar::<key>` / `<file>.parquet::<key>` for an item inside a shard;
  answer  the expected answer;
  task    optional: the task the row's answer is for (its `name`). Without this column every row's answer is
          expected from every task.
The items run through the same job as `run` (pipeline.job.run_job, the files that hold them as its input),
into a scratch output, and the rows join the gold rows by id. A gold item whose file is missing, or whose
shard has no such member, or whose row failed, counts under `errors`, apart from the scored rows.

Scores per task: classify -- accuracy with its Wilson 95% interval, per-class precision / recall / support and
the confusion matrix (scikit-learn); generate -- exact match with its interval and corpus BLEU and chrF
(sacrebleu). Answers compare normalised: stripped, case-folded, a final '.' dropped. With `shots`, each task
runs again with only its first k demonstrations (k = 0 is zero-shot), one point of the shot curve per k.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa

from media.files import ID_SEPARATOR
from media.storage import filesystem, is_local, to_uri
from pipeline.task import Task
from training.evaluate import proportion

GOLD_FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}
ALL_SHOTS = -1   # the task as written: every demonstration


class GoldError(ValueError):
    """A gold set that cannot be used, as one `URI: FIELD: PROBLEM` line; raised before any work starts."""


@dataclass(frozen=True)
class GoldRow:
    item: str            # the item's id as the job writes it
    answer: str
    task: str | None     # None: expected from every task


def read_gold(uri: str, storage_options: Mapping[str, Any] | None = None, *, item_column: str = "item",
              answer_column: str = "answer", task_column: str = "task") -> list[GoldRow]:
    """The gold rows of `uri`, items resolved to the ids the job writes. Raises GoldError."""
    suffix = PurePosixPath(uri.split("?", 1)[0]).suffix.lower()
    if suffix not in GOLD_FORMATS:
        raise GoldError(f"{uri}: unsupported gold file type {suffix or '(none)'}; use {', '.join(GOLD_FORMATS)}")
    fs, path = filesystem(uri, storage_options)
    try:
        with fs.open(path, "rb") as f:
            table = _read_table(f, GOLD_FORMATS[suffix])
    except FileNotFoundError:
        raise GoldError(f"{uri}: file not found") from None
    except Exception as exc:
        raise GoldError(f"{uri}: cannot read {GOLD_FORMATS[suffix]}: {type(exc).__name__}: {exc}") from None
    for column in (item_column, answer_column):
        if column not in table.column_names:
            raise GoldError(f"{uri}: {column}: missing column (columns: {', '.join(table.column_names)})")
    items = table.column(item_column).to_pylist()
    answers = table.column(answer_column).to_pylist()
    tasks = table.column(task_column).to_pylist() if task_column in table.column_names else [None] * len(items)
    folder = path.rsplit("/", 1)[0] if "/" in path else "."
    rows = []
    for i, (item, answer, task) in enumerate(zip(items, answers, tasks)):
        if item is None or str(item).strip() == "":
            raise GoldError(f"{uri}: {item_column}[{i}]: empty item")
        if answer is None:
            raise GoldError(f"{uri}: {answer_column}[{i}]: empty answer")
        rows.append(GoldRow(_item_id(str(item), fs, folder, storage_options), str(answer),
                            None if task is None else str(task)))
    if not rows:
        raise GoldError(f"{uri}: no rows")
    return rows


def _read_table(f: Any, kind: str) -> pa.Table:
    if kind == "parquet":
        import pyarrow.parquet as pq
        return pq.read_table(f)
    if kind == "csv":
        import pyarrow.csv as pcsv
        return pcsv.read_csv(f)
    import pyarrow.json as pjson
    return pjson.read_json(f)


def _item_id(item: str, gold_fs: Any, gold_folder: str, storage_options: Mapping[str, Any] | None) -> str:
    """The id the job writes for `item`: its file part as `media.storage.to_uri` names it, `::key` kept."""
    file, sep, key = item.partition(ID_SEPARATOR)
    if "://" not in file and not file.startswith("/") and is_local(gold_fs):
        file = f"{gold_folder}/{file}"
    elif "://" not in file and not file.startswith("/"):
        file = gold_fs.unstrip_protocol(f"{gold_folder}/{file}")
    fs, path = filesystem(file, storage_options)
    return to_uri(fs, path) + sep + key


def file_of(item_id: str) -> str:
    return item_id.partition(ID_SEPARATOR)[0]


def check_tasks_against_gold(tasks: Sequence[Task], rows: Sequence[GoldRow], uri: str) -> None:
    """Gold rows that name a task not given, or (with a task column) a task given that has no gold rows,
    stop the command before work starts."""
    names = {t.name for t in tasks}
    named = {r.task for r in rows if r.task is not None}
    unknown = sorted(named - names)
    if unknown:
        raise GoldError(f"{uri}: task: rows for tasks not given: {', '.join(unknown)} "
                        f"(given: {', '.join(sorted(names))})")
    if named and names - named:
        raise GoldError(f"{uri}: task: no rows for {', '.join(sorted(names - named))}")


def shot_variants(task: Task, shots: Sequence[int]) -> list[tuple[int, Task]]:
    """(k, the task with its first k demonstrations) for each k that the task has; ALL_SHOTS is the task as
    written, under its own name. The others get names and output columns of their own (`NAME-kK`)."""
    out: list[tuple[int, Task]] = []
    for k in shots:
        if k == ALL_SHOTS:
            out.append((len(task.demonstrations), task))
        elif k < len(task.demonstrations):
            name = f"{task.name}-k{k}"
            out.append((k, dataclasses.replace(task, name=name, output_column=name,
                                               demonstrations=task.demonstrations[:k])))
    return sorted(out, key=lambda pair: pair[0])


def normalise(text: str) -> str:
    text = text.strip().casefold()
    return text[:-1].rstrip() if text.endswith(".") else text


def missing_items(rows: Sequence[GoldRow], storage_options: Mapping[str, Any] | None) -> dict[str, str]:
    """item id -> why, for the gold items whose file does not exist (checked once per file)."""
    missing: dict[str, str] = {}
    checked: dict[str, bool] = {}
    for row in rows:
        file = file_of(row.item)
        if file not in checked:
            fs, path = filesystem(file, storage_options)
            checked[file] = bool(fs.isfile(path))
        if not checked[file]:
            missing[row.item] = f"file not found: {file}"
    return missing


def score_task(task: Task, gold: Sequence[GoldRow], outputs: Mapping[str, tuple[str | None, str | None]],
               missing: Mapping[str, str]) -> dict[str, Any]:
    """The report of one task (variant): `outputs` maps item id -> (annotation, error) of its rows."""
    expected, predicted, errors = [], [], []
    for row in gold:
        if row.item in missing:
            errors.append({"item": row.item, "error": missing[row.item]})
            continue
        annotation, error = outputs.get(row.item, (None, "not in the output: no such item in its file"))
        if error is not None or annotation is None:
            errors.append({"item": row.item, "error": error or "no annotation"})
            continue
        expected.append(normalise(row.answer))
        predicted.append(normalise(annotation))
    report: dict[str, Any] = {"task": task.name, "kind": task.kind, "shots": len(task.demonstrations),
                              "n": len(expected), "errors": len(errors), "error_items": errors[:20]}
    correct = sum(e == p for e, p in zip(expected, predicted))
    if task.kind == "classify":
        report["accuracy"] = proportion(correct, len(expected), 1 / len(task.labels) if task.labels else None)
        report |= classify_metrics(expected, predicted, [normalise(label) for label in task.labels])
    else:
        report["exact_match"] = proportion(correct, len(expected))
        report |= caption_metrics(expected, predicted)
    return report


def classify_metrics(expected: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Per-class precision / recall / support and the confusion matrix (rows: expected, columns: answered)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    classes = list(dict.fromkeys([*labels, *sorted(set(expected) - set(labels))]))
    if not expected:
        return {"per_class": {}, "confusion": {"labels": classes, "matrix": []}}
    precision, recall, _, support = precision_recall_fscore_support(
        expected, predicted, labels=classes, zero_division=0)
    per_class = {}
    for c, p, r, s in zip(classes, precision, recall, support):
        hits = sum(e == c == a for e, a in zip(expected, predicted))
        per_class[c] = {"precision": round(float(p), 4), "recall": round(float(r), 4), "support": int(s),
                        "recall_ci95": proportion(hits, int(s))["ci95"]}
    matrix = confusion_matrix(expected, predicted, labels=classes)
    return {"per_class": per_class, "confusion": {"labels": classes, "matrix": matrix.tolist()}}


def caption_metrics(expected: Sequence[str], predicted: Sequence[str]) -> dict[str, Any]:
    """Corpus BLEU and chrF (sacrebleu, its default 13a tokenizer), one reference per item."""
    import sacrebleu

    if not expected:
        return {"bleu": None, "chrf": None}
    return {"bleu": round(sacrebleu.corpus_bleu(list(predicted), [list(expected)]).score, 2),
            "chrf": round(sacrebleu.corpus_chrf(list(predicted), [list(expected)]).score, 2)}


def evaluate_tasks(tasks: Sequence[Task], gold: Sequence[GoldRow], config_for: Any, *, output: str | None = None,
                   shots: Sequence[int] = (ALL_SHOTS,), storage_options: Mapping[str, Any] | None = None
                   ) -> dict[str, Any]:
    """Run `tasks` (each at every k of `shots`) on the gold items with one job and score them.
    `config_for(tasks, input_files, output_uri)` builds the pipeline.job.JobConfig, as `run` would. Output:
    `output` (one subfolder `job-N` per set of items when tasks have different ones), else a temp dir."""
    from pipeline.job import run_job
    from pipeline.query import open_output

    missing = missing_items(gold, storage_options)
    variants = {task.name: shot_variants(task, shots) for task in tasks}
    # One job per set of input files: tasks whose gold rows name different items (a task column) don't
    # annotate each other's items.
    groups: dict[tuple[str, ...], list[Task]] = {}
    for task in tasks:
        files = tuple(sorted({file_of(r.item) for r in gold if r.task in (None, task.name) and r.item not in missing}))
        groups.setdefault(files, []).append(task)
    outputs: dict[str, dict[str, tuple[str | None, str | None]]] = {}
    seconds = 0.0
    with tempfile.TemporaryDirectory(prefix="flamingo-evaluate-") as scratch:
        for index, (files, group) in enumerate(groups.items()):
            if not files:
                continue
            out_uri = f"{(output or scratch).rstrip('/')}/job-{index}" if len(groups) > 1 else (output or scratch)
            job_tasks = tuple(t for task in group for _, t in variants[task.name])
            seconds += run_job(config_for(job_tasks, files, out_uri)).seconds
            table = open_output(out_uri, storage_options).to_table(columns=["id", "task", "annotation", "error"])
            for item, name, annotation, error in zip(*(table.column(c).to_pylist() for c in table.column_names)):
                outputs.setdefault(name, {})[item] = (annotation, error)
    reports = []
    for task in tasks:
        rows = [r for r in gold if r.task in (None, task.name)]
        curve = [score_task(variant, rows, outputs.get(variant.name, {}), missing)
                 for _, variant in variants[task.name]]
        main = next((r for r in curve if r["task"] == task.name), curve[-1])
        report = dict(main)
        if len(curve) > 1 or main["task"] != task.name:
            report["shot_curve"] = [{"shots": r["shots"], "n": r["n"], "errors": r["errors"],
                                     "score": r.get("accuracy", r.get("exact_match"))} for r in curve]
        reports.append(report)
    return {"tasks": reports, "gold_rows": len(gold), "missing_items": len(missing), "jobs": len(groups),
            "job_seconds": round(seconds, 1)}


def parse_shots(text: str) -> tuple[int, ...]:
    """`all` or a comma list of k >= 0 and `all` (e.g. `0,1,2,all`)."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if part == "all":
            out.append(ALL_SHOTS)
        elif part.isdigit():
            out.append(int(part))
        else:
            raise ValueError(f"--shots: expected 'all' or numbers of demonstrations >= 0, got {part!r}")
    return tuple(dict.fromkeys(out))


def format_report(report: Mapping[str, Any]) -> str:
    """The report as text tables, one block per task."""
    lines = []
    for t in report["tasks"]:
        lines.append(f"{t['task']} ({t['kind']}, {t['shots']} shots): n={t['n']} errors={t['errors']}")
        score = t.get("accuracy") or t.get("exact_match")
        label = "accuracy" if t["kind"] == "classify" else "exact match"
        if score and score["n"]:
            low, high = score["ci95"]
            lines.append(f"  {label}: {score['accuracy']:.3f} (95% {low:.3f}-{high:.3f}, "
                         f"{score['correct']}/{score['n']})")
        if t["kind"] == "classify" and t.get("per_class"):
            lines.append(f"  {'class':<16} {'precision':>9} {'recall':>7} {'recall 95%':>13} {'support':>7}")
            for c, m in t["per_class"].items():
                ci = f"{m['recall_ci95'][0]:.2f}-{m['recall_ci95'][1]:.2f}"
                lines.append(f"  {c:<16} {m['precision']:>9.3f} {m['recall']:>7.3f} {ci:>13} {m['support']:>7}")
            labels = t["confusion"]["labels"]
            lines.append("  confusion (rows: gold, columns: answered): " + " | ".join(labels))
            for c, row in zip(labels, t["confusion"]["matrix"]):
                lines.append(f"  {c:<16} " + " ".join(f"{v:>5}" for v in row))
        if t["kind"] == "generate" and t.get("bleu") is not None:
            lines.append(f"  BLEU {t['bleu']:.2f}  chrF {t['chrf']:.2f} (sacrebleu)")
        for point in t.get("shot_curve", []):
            s = point["score"]
            text = (f"{s['accuracy']:.3f} (95% {s['ci95'][0]:.3f}-{s['ci95'][1]:.3f})" if s and s["n"] else "no rows")
            lines.append(f"  shots={point['shots']}: {text} n={point['n']} errors={point['errors']}")
        for e in t.get("error_items", [])[:5]:
            lines.append(f"  error: {e['item']}: {e['error']}")
    return "\n".join(lines)
