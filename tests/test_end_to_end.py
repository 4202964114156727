"""A user's whole path on the bundled model: documents in (`selfevo ingest`), the loop without a
labelled eval set (`selfevo evolve`), the QA pairs out as a dataset (`selfevo export-qa`)."""

import json

import pytest
from typer.testing import CliRunner

from selfevo.cli import app
from tests.helpers import ROOT

pytestmark = pytest.mark.slow

# Sized for a 2-core CPU: one generation, few and short questions and answers.
SMALL_RUN = {
    "--end": "1", "--model.name": "smollm2-135m-instruct", "--model.dtype": "float32",
    "--model.max_length": "384", "--data.eval": "null", "--data.eval_share": "0.25",
    "--generation.backend": "hf", "--generation.questions_per_fragment": "2",
    "--generation.phrasings": "2", "--generation.question_max_new_tokens": "32",
    "--generation.answer_max_new_tokens": "48", "--generation.min_grounding": "null",
    "--targeting.check_pairs": "8", "--replay.k": "0", "--train.epochs": "2",
    "--train.max_epochs": "null", "--train.micro_batch_size": "4", "--train.grad_accum": "1",
    "--evaluation.max_new_tokens": "48", "--trainer.fit_precision": "32-true",
}  # fmt: skip


def write_documents(folder):
    """The toy domain's facts as a user's documents: Markdown, HTML, plain text and Word."""
    from docx import Document

    facts = [
        r["instruction"]
        for r in json.loads((ROOT / "data" / "quillmesh_fragments.json").read_text())
    ]
    folder.mkdir()
    (folder / "guide.md").write_text(
        "# Quillmesh guide\n\n## Ports\n\n" + facts[0] + "\n\n## Sync\n\n" + facts[1] + "\n"
    )
    (folder / "faq.html").write_text(
        "<html><head><style>p {color: red}</style></head><body><h1>FAQ</h1>"
        f"<p>{facts[2]}</p><h2>Limits</h2><p>{facts[3]}</p></body></html>"
    )
    (folder / "notes.txt").write_text(facts[4] + "\n\n" + facts[5] + "\n")
    doc = Document()
    doc.add_heading("Operations", level=1)
    doc.add_paragraph(facts[6])
    doc.save(folder / "ops.docx")
    return facts[:7]


def test_documents_to_a_trained_model_to_a_dataset(tmp_path):
    runner = CliRunner()
    facts = write_documents(tmp_path / "docs")
    fragments = tmp_path / "fragments.jsonl"
    result = runner.invoke(app, ["ingest", str(tmp_path / "docs"), "--out", str(fragments)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in fragments.read_text().splitlines()]
    sources = {r["source"] for r in records}
    assert sources == {"docs/guide.md", "docs/faq.html", "docs/notes.txt", "docs/ops.docx"}
    assert all(any(f[:40] in r["text"] for r in records) for f in facts)

    args = ["evolve", "--name", "e2e", "--runs_dir", str(tmp_path / "runs")]
    args += ["--logs_dir", str(tmp_path / "logs"), "--data.fragments", str(fragments)]
    result = runner.invoke(app, args + [x for option in SMALL_RUN.items() for x in option])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "e2e"
    held = [
        json.loads(line) for line in (run_dir / "gen_0" / "eval.jsonl").read_text().splitlines()
    ]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["model"] for r in summary] == ["base", "gen_0"]
    assert summary[0]["held_out_eval"] == len(held) > 0
    assert "no labelled eval set" in (run_dir / "summary.md").read_text()

    out = tmp_path / "dataset"
    result = runner.invoke(
        app,
        ["export-qa", str(run_dir), "--format", "alpaca", "--generation", "0", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    import datasets

    exported = datasets.load_dataset("json", data_files=str(out / "e2e_gen0_alpaca.json"))["train"]
    trained = [
        json.loads(line) for line in (run_dir / "gen_0" / "train.jsonl").read_text().splitlines()
    ]
    assert len(exported) == len({(p["question"], p["answer"]) for p in trained})
    assert set(exported["source"]) <= sources and set(exported["input"]) == {""}
    assert not {r["question"] for r in held} & set(exported["instruction"])  # the eval stays out
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["e2e_gen0_alpaca"]["file_name"] == "e2e_gen0_alpaca.json"
