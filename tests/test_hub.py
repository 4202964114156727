"""Hub ids as model.name, offline: a fake hub cache laid out as huggingface_hub lays it
(models--owner--name/{refs, snapshots/<commit>, blobs}), HF_HUB_OFFLINE on, and every socket
refused, so that no test can reach the network whatever goes wrong."""

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import filter_repo_objects
from typer.testing import CliRunner

from selfevo.cli import app
from selfevo.config import ModelConfig
from selfevo.models import HUB_CODE, HUB_FILES, ModelError, load_model, resolve_model
from tests.helpers import ROOT, build_tiny_model, toy_domain_inputs, write_records
from tests.test_bad_input import run_bad

REPO = "selfevo-test/tiny-llama"
COMMIT_MAIN = "a" * 40
COMMIT_V1 = "b" * 40


def refuse(*args, **kwargs):
    raise ConnectionRefusedError("tests/test_hub.py: no network in these tests")


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache under HF_HOME, offline. huggingface_hub reads its settings once, at
    import, so its constants are set too; a new process (test_real_process_*) reads the
    environment."""
    home = tmp_path / "hf"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return cache


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Two tiny models that differ in their weights: one for main, one for the tag v1."""
    root = tmp_path_factory.mktemp("hub-models")
    return {
        "main": build_tiny_model(root / "main", seed=0),
        "v1": build_tiny_model(root / "v1", seed=1),
    }


def cache_repo(
    cache: Path, repo_id: str, commit: str, files: dict[str, bytes], refs=("main",)
) -> Path:
    """Lay `files` out as a snapshot of `repo_id` at `commit`, as huggingface_hub caches one:
    each file a blob named by its hash, the snapshot's entries relative links to them, and each
    ref (branch or tag) a file holding the commit. Returns the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no newline, as the hub writes it
    return snapshot


def folder_files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file()}


def first_weight(model) -> torch.Tensor:
    return model.get_input_embeddings().weight.detach()


def test_cached_snapshot_resolves_and_loads(hub_cache, tiny_models, monkeypatch):
    snapshot = cache_repo(hub_cache, REPO, COMMIT_MAIN, folder_files(tiny_models["main"]))
    assert resolve_model(REPO) == snapshot
    model, tokenizer = load_model(ModelConfig(name=REPO, dtype="float32"))
    reference, _ = load_model(ModelConfig(name=str(tiny_models["main"]), dtype="float32"))
    assert torch.equal(first_weight(model), first_weight(reference))
    assert tokenizer.padding_side == "left" and tokenizer("port 7741")["input_ids"]
    # Another cache (HF_HUB_CACHE elsewhere) does not hold it: the cache is truly consulted.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache.parent / "elsewhere"))
    with pytest.raises(ModelError, match="not in the hub cache"):
        resolve_model(REPO)


def test_revision_resolves_to_its_snapshot(hub_cache, tiny_models):
    main = cache_repo(hub_cache, REPO, COMMIT_MAIN, folder_files(tiny_models["main"]))
    v1 = cache_repo(hub_cache, REPO, COMMIT_V1, folder_files(tiny_models["v1"]), refs=("v1",))
    assert resolve_model(REPO) == main
    assert resolve_model(REPO, revision="v1") == v1
    assert resolve_model(REPO, revision=COMMIT_V1) == v1  # a commit needs no ref
    tagged, _ = load_model(ModelConfig(name=REPO, revision="v1", dtype="float32"))
    reference, _ = load_model(ModelConfig(name=str(tiny_models["v1"]), dtype="float32"))
    assert torch.equal(first_weight(tagged), first_weight(reference))
    with pytest.raises(ModelError, match="at revision 'v2': not in the hub cache"):
        resolve_model(REPO, revision="v2")


def assert_offline_message(message: str, repo_id: str, cache: Path) -> None:
    assert "\n" not in message
    assert message.startswith(f"{repo_id}: not in the hub cache {cache} and HF_HUB_OFFLINE is set")
    assert "--model.name /path/to/folder" in message
    assert f"`hf download {repo_id} --local-dir DIR`" in message


def test_not_cached_offline_is_one_line_saying_what_to_do(hub_cache):
    with pytest.raises(ModelError) as e:
        resolve_model("nobody/absent-model")
    assert_offline_message(str(e.value), "nobody/absent-model", hub_cache)


def test_not_cached_offline_through_the_cli_exits_2_and_writes_nothing(hub_cache, tmp_path):
    # run_bad compares every file under tmp_path, the hub cache included, before and after.
    run_bad(
        tmp_path,
        model="nobody/absent-model",
        needles=["nobody/absent-model: not in the hub cache", "HF_HUB_OFFLINE is set"],
    )
    assert list(hub_cache.iterdir()) == []


def test_real_process_reads_hf_home_and_hf_hub_offline(tmp_path, tiny_models):
    """A new process, configured by the environment alone: HF_HOME's hub cache and
    HF_HUB_OFFLINE as huggingface_hub reads them at import."""
    home = tmp_path / "hf"
    snapshot = cache_repo(home / "hub", REPO, COMMIT_MAIN, folder_files(tiny_models["main"]))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    fragments, eval_file = toy_domain_inputs(tmp_path)
    evolve = ["evolve", "--data.fragments", str(fragments), "--data.eval", str(eval_file)]
    # One process (importing torch takes seconds): the cached id, then the CLI on an absent one.
    script = (
        "import sys\nfrom selfevo.cli import main\nfrom selfevo.models import resolve_model\n"
        f"print(resolve_model({REPO!r}), flush=True)\n"
        f"sys.argv = ['selfevo', *{evolve!r}, '--model.name', 'nobody/absent-model']\nmain()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert proc.stdout.strip() == str(snapshot), proc.stderr
    assert proc.returncode == 2, proc.stderr
    prefix = "selfevo: error: "
    assert proc.stderr.startswith(prefix) and proc.stderr.count("\n") == 1, proc.stderr
    assert_offline_message(proc.stderr[len(prefix) :].strip(), "nobody/absent-model", home / "hub")
    assert not (tmp_path / "runs").exists()


def test_unreachable_hub_uses_the_cache_or_says_so(hub_cache, tiny_models, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # online, but every socket refuses
    snapshot = cache_repo(hub_cache, REPO, COMMIT_MAIN, folder_files(tiny_models["main"]))
    assert resolve_model(REPO) == snapshot
    with pytest.raises(ModelError) as e:
        resolve_model("nobody/absent-model")
    message = str(e.value)
    assert "\n" not in message and "the hub cannot be reached" in message
    assert "--model.name /path/to/folder" in message


def test_repo_with_pickled_weights_only_is_refused(hub_cache, tiny_models):
    files = folder_files(tiny_models["main"])
    files = {k: v for k, v in files.items() if not k.endswith(".safetensors")}
    files["pytorch_model.bin"] = b"a pickle is never loaded"
    cache_repo(hub_cache, REPO, COMMIT_MAIN, files)
    with pytest.raises(ModelError, match=f"^{REPO}: the hub repo has no model.safetensors .*"
                       "selfevo loads safetensors only"):  # fmt: skip
        resolve_model(REPO)


def test_shard_named_by_the_index_but_missing_is_refused(hub_cache, tiny_models):
    files = folder_files(tiny_models["main"])
    files["model.safetensors.index.json"] = (
        b'{"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}'
    )
    cache_repo(hub_cache, REPO, COMMIT_MAIN, files)
    with pytest.raises(ModelError, match="model-00002-of-00002.safetensors is missing"):
        resolve_model(REPO)


def test_only_what_a_safetensors_model_needs_is_fetched():
    """Of a repo with every kind of file (Mistral's second copy of the weights among them), the
    patterns given to snapshot_download keep the config, tokenizer, templates and the weights
    transformers loads."""
    wanted = [
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
        "chat_template.jinja",
        "additional_chat_templates/tool_use.jinja",
    ]
    unwanted = [
        "pytorch_model.bin",
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model.bin.index.json",
        "consolidated.safetensors",
        "original/consolidated.00.pth",
        "original/model.safetensors",
        "model.pt",
        "tf_model.h5",
        "flax_model.msgpack",
        "onnx/model.onnx",
        "onnx/model.safetensors",
        "training_args.bin",
        "modeling_custom.py",
        "README.md",
        ".gitattributes",
    ]
    kept = list(filter_repo_objects(wanted + unwanted, allow_patterns=list(HUB_FILES)))
    assert kept == wanted
    assert "modeling_custom.py" in filter_repo_objects(unwanted, allow_patterns=list(HUB_CODE))


def hub_response(status: int) -> SimpleNamespace:
    """What a hub error keeps of the HTTP response (no httpx: its package changed names)."""
    return SimpleNamespace(status_code=status, headers={}, request=None)


@pytest.mark.parametrize(
    "error, needle",
    [
        (GatedRepoError("gated", response=hub_response(403)), "a gated hub repo; accept its terms"),
        (
            RepositoryNotFoundError("404", response=hub_response(404)),
            "no such folder, nor hub repo",
        ),
        (RevisionNotFoundError("404", response=hub_response(404)), "no revision 'v9' on the hub"),
    ],
)
def test_hub_errors_are_one_line_each(hub_cache, monkeypatch, error, needle):
    calls = []

    def snapshot_download(**kwargs):
        calls.append(kwargs)
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(ModelError) as e:
        resolve_model(REPO, revision="v9")
    assert str(e.value).startswith(f"{REPO}: ") and needle in str(e.value)
    assert "\n" not in str(e.value)
    # No cache_dir: huggingface_hub's own (HF_HOME, HF_HUB_CACHE) is the one.
    assert calls == [{"repo_id": REPO, "revision": "v9", "allow_patterns": list(HUB_FILES)}]


@pytest.mark.parametrize(
    "name, needle",
    [
        ("./models/x", "./models/x: not a model folder (no such folder)"),
        ("~/no-such-models/x", "~/no-such-models/x: not a model folder (no such folder)"),
        ("models/x", "models/x: not in the hub cache"),  # reads as a hub id: both are named
    ],
)
def test_missing_path_written_like_a_hub_id(hub_cache, name, needle):
    with pytest.raises(ModelError, match="no such") as e:
        resolve_model(name)
    assert str(e.value).startswith(needle)


def test_revision_of_a_local_folder_is_refused(tiny_models):
    with pytest.raises(ModelError, match="model.revision 'v1' is for hub ids only"):
        resolve_model(str(tiny_models["main"]), revision="v1")


def test_selfevo_fit_takes_a_hub_id_at_a_revision(hub_cache, tiny_models, tmp_path):
    """`selfevo fit --model.revision` reaches the data module's tokenizer as well as the model:
    only the tag v1 is cached, so anything that resolved main would stop the fit."""
    cache_repo(hub_cache, REPO, COMMIT_V1, folder_files(tiny_models["v1"]), refs=("v1",))
    pairs = [{"question": f"Fact {i}?", "answer": f"Port {7700 + i}."} for i in range(4)]
    train_file = write_records(tmp_path / "qa.json", pairs)
    adapter = tmp_path / "adapter"
    args = {
        "--config": ROOT / "configs" / "lora.yaml", "--model.model": REPO,
        "--model.revision": "v1", "--model.dtype": "float32", "--data.train_file": train_file,
        "--model.save_adapter_to": adapter, "--trainer.max_steps": 1,
        "--trainer.logger.init_args.save_dir": tmp_path / "logs",
        "--trainer.default_root_dir": tmp_path,
    }  # fmt: skip
    result = CliRunner().invoke(app, ["fit", *(str(x) for item in args.items() for x in item)])
    assert result.exit_code == 0, result.output
    assert (adapter / "adapter_model.safetensors").is_file()
