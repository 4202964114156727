"""What the tests share besides fixtures: the tiny model's recipe, input files, the evolve
command line of the tiny runs, and comparisons of run files."""

from __future__ import annotations

import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_model(
    folder: Path, seed: int = 0, hidden_size: int = 64, init_std: float = 0.02
) -> Path:
    """A 2-layer Llama (4 heads) and a 600-token byte-level BPE trained on the toy domain."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [
        r["instruction"]
        for r in json.loads((ROOT / "data" / "quillmesh_fragments.json").read_text())
    ]
    texts += ["运维知识：服务器重启后检查日志。问题？答案。", "What? Why? How many ports?"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
    )
    fast.chat_template = CHATML
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        bos_token_id=None,
        initializer_range=init_std,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    fast.save_pretrained(folder)
    return folder


def write_records(path: Path, records, jsonl: bool = False) -> Path:
    if jsonl:
        path.write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
        )
    else:
        path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


# The files of a run that must come out the same, byte for byte, however it was interrupted.
RUN_FILES = (
    "questions.jsonl",
    "answers.jsonl",
    "replay.jsonl",
    "train.jsonl",
    "qa.jsonl",
    "predictions.jsonl",
    "metrics.json",
    "adapter/adapter_config.json",
    "adapter/adapter_model.safetensors",
)


# The tiny runs' settings: small batches and a checkpoint every 2 optimizer steps give each
# fault-injection point several passes. No question filters nor grounding: they would drop nearly
# every question a random model writes, and about half its answers (they have tests of their own),
# and the runs would have little to work on.
# One question per fragment keeps generation 0 at 5 training pairs (one is the dev split): 3
# micro-batches an epoch, which test_crash's resume inside the second epoch counts on.
TINY_RUN = {
    "--end": "2", "--model.dtype": "float32", "--model.max_length": "256",
    "--generation.question_max_new_tokens": "12", "--generation.answer_max_new_tokens": "16",
    "--generation.batch_size": "2", "--generation.question_filters": "false",
    "--generation.questions_per_fragment": "1", "--generation.phrasings": "1",
    "--generation.min_grounding": "null",
    "--evaluation.batch_size": "2",
    "--evaluation.max_new_tokens": "12",
    "--replay.k": "3", "--ifd.batch_size": "4", "--train.micro_batch_size": "2",
    "--train.grad_accum": "1", "--train.epochs": "2", "--train.max_epochs": "null",
    "--train.learning_rate": "1e-3",
    "--train.checkpoint_every": "2",
}  # fmt: skip


def evolve_args(
    tiny_model: str, inputs: tuple[Path, Path], root: Path, name: str = "t", *extra: str
) -> list[str]:
    """`selfevo evolve` of a tiny run named `name` under root/runs and root/logs."""
    fragments, eval_file = inputs
    return [
        "evolve", "--name", name, "--runs_dir", str(root / "runs"),
        "--logs_dir", str(root / "logs"), "--data.fragments", str(fragments),
        "--data.eval", str(eval_file), "--model.name", tiny_model,
        *(x for option in TINY_RUN.items() for x in option), *extra,
    ]  # fmt: skip


def run_files(run_dir: Path) -> dict[str, bytes]:
    """Every data file, metrics file and adapter of a run, byte for byte (timings live in
    stages.json)."""
    return {
        str(path.relative_to(run_dir)): path.read_bytes()
        for folder in sorted(run_dir.glob("gen_*")) + [run_dir / "base"]
        for name in RUN_FILES
        if (path := folder / name).exists()
    }


def assert_every_visible_file_complete(run_dir: Path) -> None:
    """What a reader can open under its real name parses whole: a partial file is never taken as
    complete."""
    for path in run_dir.rglob("*"):
        if path.name.endswith(".tmp") or not path.is_file():
            continue
        text = path.read_text() if path.suffix in (".json", ".jsonl") else None
        if path.suffix == ".json":
            json.loads(text)
        elif path.suffix == ".jsonl":
            assert text == "" or text.endswith("\n"), path
            for line in text.splitlines():
                json.loads(line)


def toy_domain_inputs(folder: Path) -> tuple[Path, Path]:
    """6 fragments (one given twice) and 4 eval pairs of the toy domain."""
    fragments = json.loads((ROOT / "data" / "quillmesh_fragments.json").read_text())[:6]
    eval_set = json.loads((ROOT / "data" / "quillmesh_eval.json").read_text())[:4]
    return write_records(folder / "fragments.json", fragments + fragments[:1]), write_records(
        folder / "eval.json", eval_set
    )
