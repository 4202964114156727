"""Configuration dataclasses. Each YAML section maps onto one dataclass here, field for field.

`selfevo evolve --config configs/demo.yaml --generation.batch_size 8` is parsed by jsonargparse into
an `EvolveConfig`; any key can be overridden in dotted form on the command line.
"""

from __future__ import annotations

import importlib
import math
import re
import string
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Literal, Optional, Union

# The prompt of the IFD paper (Cherry_LLM) and of the seed's get_ifd_original.py; kept as the
# default so that our scores agree with the seed's.
SEED_IFD_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Input:\n{question}\n\n### Response:"
)
SEED_IFD_ANSWER_PREFIX = "### Response:"
# The same prompt with the fragment before the question: the grounding pass differs from IFD's
# conditioned pass by the fragment alone.
GROUNDED_PROMPT = SEED_IFD_PROMPT.replace("{question}", "{fragment}\n\n{question}")


@dataclass
class DataConfig:
    fragments: str = "data/quillmesh_fragments.json"
    """Knowledge fragments: JSON list or JSONL of {"instruction": text} (or {"text": text})."""
    eval: Optional[str] = "data/quillmesh_eval.json"
    """Eval QA: JSON list or JSONL of {"instruction": fragment, "input": question, "output":
    answer}. None: no labelled eval set; `eval_share` of generation 0's QA pairs are held out as
    the eval instead, their open-book answers the references (the report says so)."""
    eval_share: float = 0.1
    """Without `eval`: the share of generation 0's QA pairs held out as the eval (seeded, whole
    sentences at a time, never trained on or asked again)."""
    limit: Optional[int] = None
    """Use only N unique fragments (None: all): the first N, unless include_eval or fill say
    otherwise."""
    include_eval: bool = False
    """Make every eval fragment (the eval records' `instruction`) a training fragment: they are kept
    whatever `limit` is, and count towards it; each must be in the fragment file."""
    general: Optional[str] = None
    """General questions with short factual answers (JSON/JSONL of {"question", "answer"}, e.g.
    data/general_qa.json), answered closed book by the base model and every generation: what the
    training cost the model outside the domain (None: not measured)."""
    fill: Literal["first", "random"] = "first"
    """Which fragments make up the rest of `limit`: the first in file order, or a random choice
    seeded by `seed`. Either way the chosen fragments keep their file order."""


@dataclass
class ModelConfig:
    name: str = "smollm2-135m-instruct"
    """A Hugging Face folder, a .gguf file, a Hugging Face Hub id (Qwen/Qwen2.5-0.5B-Instruct,
    fetched once into the hub cache: HF_HOME, HF_HUB_OFFLINE), or the alias
    smollm2-135m-instruct."""
    revision: Optional[str] = None
    """A hub id's branch, tag or commit (None: main)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """auto: bfloat16 on a GPU that supports it, else float32."""
    trust_remote_code: bool = False
    quantization: Literal["none", "nf4"] = "none"
    """nf4: QLoRA, the frozen base in 4-bit NF4 through bitsandbytes (CUDA only; pip install
    "selfevo[qlora]")."""
    max_length: int = 1024
    """Token cutoff for every prompt + completion (the seed's cutoff_len)."""


@dataclass
class GenerationConfig:
    backend: Literal["auto", "hf", "vllm"] = "auto"
    """auto: vllm where it imports and a GPU is there (one rank, an unquantized base), else hf;
    hf: Hugging Face `generate`; vllm: vLLM's offline engine (the extra selfevo[vllm]). Not part of
    a run's identity: a run begun on one may go on with the other."""
    language: Literal["en", "zh"] = "en"
    """Language of the question and answer prompts. The `prompts` section's presets are this
    language's; it also says how fragments are cut into sentences, which words name something and
    how facts are scored."""
    batch_size: int = 16
    question_max_new_tokens: int = 64
    answer_max_new_tokens: int = 256
    temperature: float = 0.5
    top_p: float = 0.95
    question_focus: Literal["fragment", "sentence"] = "sentence"
    """What a question is asked about: fragment = the whole fragment, in the paper's prompt;
    sentence = one sentence of it (prompts.fact_sentences), in a prompt by example, so that the
    questions of a fragment cover its facts instead of asking about its main fact again."""
    questions_per_fragment: int = 4
    """Questions per fragment per generation. With question_focus sentence, each about a different
    sentence: first those the last check found unknown (targeting.retarget), then those asked least
    so far; with fragment, the prompt sampled this many times."""
    phrasings: int = 3
    """Questions written about each chosen sentence (question_focus fragment: about the fragment,
    times questions_per_fragment), each sampled anew and answered on its own, so that training
    meets each fact in several wordings (a sentence the last check missed gets one more). Repeats
    are dropped by question_filters. 3 against 1, trained to retention: +7.5 points of fact recall
    at generation 0 (docs/results.md)."""
    question_filters: bool = True
    """Drop questions that name nothing specific to their fragment, that recur across fragments,
    or that an earlier generation (or the dev split) asked already; counted by reason in
    stages.json."""
    standalone_answers: bool = True
    """Drop answers that speak of their source ("the passage", "根据文档"): trained closed book,
    they teach the model to cite a text it never sees."""
    min_grounding: Optional[float] = 0.0
    """Drop answers whose grounding (ifd.ground_pairs: how much likelier the fragment makes the
    answer under the base model, nats per token) is below this: the fragment does not support them
    (None: no grounding pass). The score of every pair is kept in grounded.jsonl and qa.jsonl."""
    question_model: Literal["base", "current"] = "current"
    """Who writes the questions, open book: current = the model of this generation (the paper's
    loop); base = the base model, its adapter off, every generation (what to ask still follows the
    check's misses and the history). Trained on short answers, Qwen 0.5B wrote 21-64% of its
    generation-1 questions as copies of the prompt's examples (docs/results.md, seventh visit)."""
    answer_model: Literal["base", "current"] = "base"
    """Who answers the questions, open book: base = the base model, its adapter off; current = the
    model of this generation (the paper's loop). With current, a small model's answers drifted from
    one generation to the next, to echoing the question; with base they held (docs/results.md)."""
    vllm_kv_cache_gib: float = 4.0
    """vllm backend: memory for its KV cache, in GiB (the model's weights come on top)."""
    vllm_tensor_parallel_size: int = 1
    """vllm backend: GPUs the engine splits the model over (vLLM's tensor_parallel_size)."""


@dataclass
class ReplayConfig:
    mode: Literal["hard", "easy", "even", "random", "all"] = "hard"
    """How pairs of earlier generations are replayed, by IFD: hard = highest k, easy = lowest k,
    even = every (n // k)-th of the sorted history, random = k at random, all = everything."""
    k: int = 2000
    """Pairs replayed per generation (0: no replay, except with mode all)."""


@dataclass
class TargetingConfig:
    """Each generation's closed-book check, and the questions it sends back to the next one."""

    dev_share: float = 0.1
    """Share of generation 0's QA pairs held back as the dev split: never trained on, answered
    closed book after every generation; its fact recall picks the best generation (0: no dev
    split)."""
    check_pairs: int = 200
    """Pairs of each generation's training set answered closed book after its training: the
    retention check (0: none)."""
    retarget: bool = True
    """Ask the next generation again, first and in one phrasing more than generation.phrasings,
    about the sentences whose checked pairs (dev or trained) the model answered without all of the
    reference's facts."""


@dataclass
class IFDConfig:
    batch_size: int = 16
    """Pairs per batch (each pair is two sequences)."""
    scorer: Literal["base", "trained"] = "base"
    """Score with the base model (the seed's way) or with the generation's freshly trained model."""
    prompt: str = SEED_IFD_PROMPT
    """Conditioned prefix; {question} is replaced by the question."""
    answer_prefix: str = SEED_IFD_ANSWER_PREFIX
    """The fixed prefix of the answer-only pass."""
    grounded_prompt: str = GROUNDED_PROMPT
    """The grounding pass's prefix: `prompt` with the fragment; {fragment} and {question} are
    replaced."""


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: Union[str, list[str]] = "all-linear"
    """PEFT target modules; all-linear excludes the LM head, so adapters stay vLLM-loadable."""


@dataclass
class TrainConfig:
    learning_rate: float = 1e-3
    """1e-3 made Qwen2.5-Coder-0.5B retain 52-95% of the facts it was trained on, 2e-4 5-8%
    (docs/results.md); the paper's configs set their own."""
    epochs: int = 2
    """Epochs of each generation's training; with max_epochs, the fewest."""
    max_epochs: Optional[int] = 6
    """Train on past `epochs` while retention rises, up to this many (None: exactly `epochs`).
    Retention: after every epoch the model answers `probe_pairs` of its training pairs closed book,
    scored by fact recall (train.RetentionProbe); training stops after `patience` epochs without a
    rise. The cosine schedule spans max_epochs."""
    patience: int = 1
    probe_pairs: int = 64
    fresh_adapter: bool = False
    """Train each generation's adapter from a fresh one (A_0) instead of continuing the last: with
    replay.mode all, generation i's adapter learns every pair so far in one training, and no
    generation's drift carries into the next. M_i still writes generation i's questions."""
    micro_batch_size: int = 4
    grad_accum: int = 4
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    fragment_weight: float = 0.0
    """The fragments themselves as plain text beside the QA pairs (language modelling): each this
    many times per generation; a fractional part is a seeded share of them (0: none)."""
    anchors: Optional[str] = None
    """General instructions (JSON/JSONL of {"question"}, e.g. data/anchor_prompts.json) that the
    base model answers once, closed book (base/anchors.jsonl); each generation trains on
    `anchor_pairs` of these answers beside its QA, so that outside the domain it keeps answering as
    the base model did (self-distillation against forgetting). None: no anchors."""
    anchor_pairs: int = 100
    """Anchor pairs per generation, a seeded sample (all of them if there are fewer)."""
    anchor_share: Optional[float] = None
    """Instead of anchor_pairs: anchors make up this share of what each generation trains on, the
    base model's answers repeated as often as that takes, so that their weight keeps pace with more
    QA pairs (three phrasings a sentence cut a fixed 224 anchors from 16% to 7% of the training
    set, and forgetting grew: docs/results.md). None: anchor_pairs."""
    checkpoint_every: int = 50
    """Optimizer steps between mid-training checkpoints, from which a killed training resumes (0:
    none)."""


@dataclass
class TrainerConfig:
    """Arguments of lightning.Trainer shared by training, IFD scoring and evaluation."""

    accelerator: str = "auto"
    devices: Union[int, str] = 1
    """Devices per node; the evolve loop runs one rank per device (docs/scaling.md)."""
    strategy: str = "auto"
    """auto or ddp for the evolve loop on several devices."""
    num_nodes: int = 1
    precision: Optional[str] = None
    """None: bf16-mixed on a bf16-capable GPU, 32-true otherwise."""
    fit_precision: Optional[
        Literal["auto", "16-true", "16-mixed", "bf16-true", "bf16-mixed", "32-true", "64-true"]
    ] = None
    """The training stage's precision (None: `precision`; auto: bf16-mixed where the device
    computes bf16 natively, a bf16-capable GPU or a CPU with AVX512-BF16 or AMX, else 32-true). On
    such a CPU bf16-mixed trains 2-3x faster, where evaluation under autocast was less accurate
    and little faster; on a CPU without (AVX2), bf16 is emulated and a step took 23x fp32's time
    (docs/tuning.md). Hence a key of its own."""
    gradient_clip_val: Optional[float] = 1.0
    """Training clips the gradients' norm to this (None: no clipping)."""
    logger: Optional[list[dict]] = None
    """Training's loggers, as LightningCLI writes them: a list of {class_path, init_args}, e.g.
    [{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: logs}}] (W&B, MLflow:
    their Lightning loggers, their packages installed). Each generation's training gets a logger
    of its own, named train_gen_<i>. None: TensorBoard under logs_dir/name; []: none. The loop's
    own TensorBoard events (logs_dir/name/evolve) are written either way."""
    callbacks: list[dict] = field(default_factory=list)
    """More Lightning callbacks for training, as LightningCLI writes them ({class_path,
    init_args}), beside selfevo's own (checkpoints, retention, learning-rate monitor)."""


@dataclass
class EvalConfig:
    batch_size: int = 16
    max_new_tokens: int = 256
    do_sample: bool = False
    """False: greedy (reproducible). True: the seed's sampled decoding (LLaMA-Factory's
    defaults)."""
    temperature: float = 0.95
    top_p: float = 0.7
    top_k: int = 50
    limit: Optional[int] = None
    """Evaluate only the first N eval pairs (None: all)."""
    metrics: Literal["auto", "seed", "seed+word"] = "auto"
    """seed: the seed's character BLEU-4 and jieba ROUGE (to compare with the paper); seed+word:
    also SacreBLEU and stemmed ROUGE-L over words; auto: seed+word for English, seed for Chinese.
    Fact recall is scored either way (docs/metrics.md)."""


@dataclass
class PromptsConfig:
    """The prompts the model sees; null: generation.language's preset.

    Each a template with named fields in braces ({question}; a literal brace doubled, {{ and }}, as
    in Python's str.format). Part of a run's identity: a run is not resumed with other prompts."""

    question: Optional[str] = None
    """The open-book question prompt with question_focus fragment, a chat turn: {fragment}, the
    whole fragment."""
    fact_question: Optional[str] = None
    """The open-book question prompt with question_focus sentence, a plain completion (not a chat
    turn) that ends where the question begins, best taught by examples: {focus}, one sentence of
    the fragment."""
    answer: Optional[str] = None
    """The open-book answer prompt, a chat turn: {fragment} and {question}. An answer that gives
    back its instructions is dropped ("restating")."""
    closed_book: Optional[str] = None
    """The closed-book prompt, a chat turn: {question}. The same for training, evaluation, the
    retention probe and the anchors (preset: the question alone, "{question}")."""
    example_terms: Optional[list[str]] = None
    """Words of a custom fact_question prompt's examples that a question about another sentence
    has no reason to use: a question that names one its fragment lacks copies the examples and is
    dropped ("copies_example"). None: the preset's terms while fact_question is the preset, none
    for a custom one."""


PROMPT_FIELDS = {
    "question": ("fragment",),
    "fact_question": ("focus",),
    "answer": ("fragment", "question"),
    "closed_book": ("question",),
}
"""The named fields of each prompt template, all of them required."""


@dataclass
class EvolveConfig:
    name: str = "demo"
    """Run name: the run is written to {runs_dir}/{name} and logged to {logs_dir}/{name}."""
    start: int = 0
    end: int = 2
    seed: int = 0
    runs_dir: str = "runs"
    logs_dir: str = "logs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    targeting: TargetingConfig = field(default_factory=TargetingConfig)
    ifd: IFDConfig = field(default_factory=IFDConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)


class ConfigError(ValueError):
    """A config value that parses but makes no sense."""


_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def _check_values(section: object, prefix: str = "") -> None:
    """Every value of the declared kind: no null where the type takes none, numbers finite, text
    that UTF-8 can write (a command-line byte that is not UTF-8 arrives as a lone surrogate)."""
    hints = typing.get_type_hints(type(section))
    for f in fields(section):
        key, value = prefix + f.name, getattr(section, f.name)
        if is_dataclass(value):
            _check_values(value, key + ".")
        elif value is None and type(None) not in typing.get_args(hints[f.name]):
            raise ConfigError(f"{key}: must not be null")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value}")
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ConfigError(
                    f"{key}: holds a character that is not valid Unicode text"
                ) from None


def validate(cfg: EvolveConfig) -> None:
    """Reject values that would only fail later, after work was done."""
    _check_values(cfg)
    if not _RUN_NAME.match(cfg.name) or ".." in cfg.name:
        raise ConfigError(
            f"name: {cfg.name!r} is not a valid run name (letters, digits, '.', '_', '-')"
        )
    if cfg.model.quantization == "nf4" and cfg.generation.backend == "vllm":
        raise ConfigError(
            "model.quantization nf4 with generation.backend vllm: vLLM would serve the adapter on "
            "an "
            "unquantized base, not the 4-bit one it was trained on; use generation.backend hf"
        )
    if cfg.start < 0 or cfg.end <= cfg.start:
        raise ConfigError(f"start/end: need 0 <= start < end, got start={cfg.start} end={cfg.end}")
    if not cfg.data.eval and not 0 < cfg.data.eval_share < 1:
        raise ConfigError(
            f"data.eval_share: must be in (0, 1) without data.eval, got {cfg.data.eval_share}"
        )
    if not cfg.data.eval and cfg.data.include_eval:
        raise ConfigError("data.include_eval: there is no eval set (data.eval is null)")
    if not 0 <= cfg.targeting.dev_share < 1:
        raise ConfigError(f"targeting.dev_share: must be in [0, 1), got {cfg.targeting.dev_share}")
    if cfg.targeting.check_pairs < 0:
        raise ConfigError(f"targeting.check_pairs: must be >= 0, got {cfg.targeting.check_pairs}")
    if cfg.replay.k < 0:
        raise ConfigError(f"replay.k: must be >= 0, got {cfg.replay.k}")
    if cfg.train.anchor_pairs < 0:
        raise ConfigError(f"train.anchor_pairs: must be >= 0, got {cfg.train.anchor_pairs}")
    if cfg.train.anchor_share is not None and not 0 < cfg.train.anchor_share < 1:
        raise ConfigError(f"train.anchor_share: must be in (0, 1), got {cfg.train.anchor_share}")
    if cfg.train.anchor_share is not None and cfg.train.anchors is None:
        raise ConfigError("train.anchor_share: there are no anchors to share with (train.anchors)")
    if cfg.train.fragment_weight < 0:
        raise ConfigError(f"train.fragment_weight: must be >= 0, got {cfg.train.fragment_weight}")
    if cfg.train.max_epochs is not None and cfg.train.max_epochs < cfg.train.epochs:
        raise ConfigError(
            f"train.max_epochs: must be >= train.epochs ({cfg.train.epochs}), got "
            f"{cfg.train.max_epochs}"
        )
    if cfg.trainer.gradient_clip_val is not None and not cfg.trainer.gradient_clip_val > 0:
        raise ConfigError(
            f"trainer.gradient_clip_val: must be > 0 or null, got {cfg.trainer.gradient_clip_val}"
        )
    if cfg.train.checkpoint_every < 0:
        raise ConfigError(f"train.checkpoint_every: must be >= 0, got {cfg.train.checkpoint_every}")
    positive = {
        "generation.batch_size": cfg.generation.batch_size,
        "ifd.batch_size": cfg.ifd.batch_size,
        "evaluation.batch_size": cfg.evaluation.batch_size,
        "train.micro_batch_size": cfg.train.micro_batch_size,
        "train.grad_accum": cfg.train.grad_accum,
        "train.epochs": cfg.train.epochs,
        "train.patience": cfg.train.patience,
        "train.probe_pairs": cfg.train.probe_pairs,
        "lora.r": cfg.lora.r,
        "model.max_length": cfg.model.max_length,
    }
    positive.update(
        {
            "generation.question_max_new_tokens": cfg.generation.question_max_new_tokens,
            "generation.answer_max_new_tokens": cfg.generation.answer_max_new_tokens,
            "generation.questions_per_fragment": cfg.generation.questions_per_fragment,
            "generation.phrasings": cfg.generation.phrasings,
            "generation.temperature": cfg.generation.temperature,
            "generation.vllm_kv_cache_gib": cfg.generation.vllm_kv_cache_gib,
            "generation.vllm_tensor_parallel_size": cfg.generation.vllm_tensor_parallel_size,
            "evaluation.max_new_tokens": cfg.evaluation.max_new_tokens,
            "evaluation.temperature": cfg.evaluation.temperature,
            "data.limit": 1 if cfg.data.limit is None else cfg.data.limit,
            "evaluation.limit": 1 if cfg.evaluation.limit is None else cfg.evaluation.limit,
        }
    )
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be > 0, got {value}")
    for key, value in {
        "generation.top_p": cfg.generation.top_p,
        "evaluation.top_p": cfg.evaluation.top_p,
    }.items():
        if not 0 < value <= 1:
            raise ConfigError(f"{key}: must be in (0, 1], got {value}")
    if "{question}" not in cfg.ifd.prompt:
        raise ConfigError("ifd.prompt: must contain {question}")
    try:
        cfg.ifd.prompt.format(question="")
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"ifd.prompt: only {{question}} may stand in braces ({e!r})") from None
    try:
        cfg.ifd.grounded_prompt.format(fragment="", question="")
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(
            f"ifd.grounded_prompt: only {{fragment}} and {{question}} may stand in braces ({e!r})"
        ) from None
    if not {"{fragment}", "{question}"} <= set(re.findall(r"\{\w+\}", cfg.ifd.grounded_prompt)):
        raise ConfigError("ifd.grounded_prompt: must contain {fragment} and {question}")
    if not cfg.ifd.answer_prefix.strip():
        raise ConfigError("ifd.answer_prefix: must not be empty")
    check_prompts(cfg.prompts)
    for key, plugins, kind in (
        ("trainer.logger", cfg.trainer.logger or [], "lightning.pytorch.loggers.Logger"),
        ("trainer.callbacks", cfg.trainer.callbacks, "lightning.pytorch.callbacks.Callback"),
    ):
        for n, spec in enumerate(plugins):
            check_class_spec(f"{key}[{n}]", spec, kind)
    ranks = world_size(cfg.trainer)
    if ranks > 1:
        if cfg.trainer.strategy not in ("auto", "ddp"):
            raise ConfigError(
                "trainer.strategy: the evolve loop runs on several devices with ddp (every rank "
                "runs the "
                f"command, docs/scaling.md), got {cfg.trainer.strategy!r}"
            )
        if cfg.generation.backend == "vllm":
            raise ConfigError(
                "generation.backend: vllm runs on one rank; spread it over GPUs with "
                "generation.vllm_tensor_parallel_size and trainer.devices 1, or use backend hf on "
                "several devices"
            )
        if cfg.train.grad_accum % ranks:
            raise ConfigError(
                f"train.grad_accum: each optimizer step's {cfg.train.grad_accum} micro-batches "
                "are dealt out to "
                f"the {ranks} ranks, so it must be a multiple of {ranks}"
            )


def template_fields(template: str) -> list[str]:
    """The names in braces of a str.format template; ValueError for one that str.format cannot
    read (a lone brace) or a field that is not a plain name ({}, {0}, {a.b}, {a[0]}, {a!r},
    {a:>9})."""
    names = []
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            whole = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise ValueError(f"{{{whole}}} is not a plain named field")
        names.append(name)
    return names


def check_prompts(cfg: PromptsConfig) -> None:
    """Each template given can be filled with its named fields, and names each of them."""
    for key, allowed in PROMPT_FIELDS.items():
        if getattr(cfg, key) is not None:
            check_template(f"prompts.{key}", getattr(cfg, key), allowed)
    for term in cfg.example_terms or ():
        if not isinstance(term, str) or not term.strip():
            raise ConfigError(f"prompts.example_terms: must be words, got {term!r}")


def check_template(key: str, template: str, allowed: tuple[str, ...]) -> None:
    """`template` (the config's `key`) names each of the fields `allowed`, and no other."""
    fields_ = " and ".join(f"{{{f}}}" for f in allowed)
    try:
        names = template_fields(template)
    except ValueError as e:
        raise ConfigError(
            f"{key}: not a template of {fields_} ({e}); write a literal brace twice, {{{{ or }}}}"
        ) from None
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{key}: unknown field {{{unknown[0]}}}; it takes {fields_} (a literal brace is "
            "written twice, {{ or }})"
        )
    missing = [f for f in allowed if f not in names]
    if missing:
        raise ConfigError(f"{key}: must contain {{{missing[0]}}} (it takes {fields_})")


def check_class_spec(key: str, spec: object, base: str) -> None:
    """A {class_path, init_args} of LightningCLI's that names an importable subclass of `base`;
    the class is built only when training starts, with its own errors for bad init_args."""
    if not isinstance(spec, dict) or not isinstance(spec.get("class_path"), str):
        raise ConfigError(f"{key}: must be a {{class_path, init_args}} mapping, got {spec!r}")
    if set(spec) - {"class_path", "init_args"} or not isinstance(spec.get("init_args", {}), dict):
        raise ConfigError(f"{key}: only class_path and init_args (a mapping) may be given")
    try:
        cls = import_class(spec["class_path"])
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"{key}: cannot import {spec['class_path']!r} ({e})") from None
    if not (isinstance(cls, type) and issubclass(cls, import_class(base))):
        raise ConfigError(f"{key}: {spec['class_path']} is not a {base.rpartition('.')[2]}")


def import_class(path: str) -> type:
    """What a dotted path names, such as lightning.pytorch.loggers.CSVLogger."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def world_size(cfg: TrainerConfig) -> int:
    """Ranks of an evolve run: devices per node x nodes (a number of devices, not a list)."""
    try:
        devices = int(cfg.devices)
    except ValueError:
        raise ConfigError(
            f"trainer.devices: the evolve loop needs a number of devices, got {cfg.devices!r}"
        ) from None
    if devices < 1 or cfg.num_nodes < 1:
        raise ConfigError(
            f"trainer.devices/num_nodes: must be >= 1, got {cfg.devices} and {cfg.num_nodes}"
        )
    return devices * cfg.num_nodes


def identity(cfg: EvolveConfig) -> dict:
    """The part of a config that defines a run's results: everything but the generation range, the
    folders, the checkpoint interval, the generation backend and the vLLM cache size, and how many
    devices do the work (several
    give one device's results within float tolerance, so a run begun on one GPU can go on over
    eight)."""
    d = asdict(cfg)
    for key in ("start", "end", "runs_dir", "logs_dir"):
        del d[key]
    del d["train"]["checkpoint_every"]
    del d["generation"][
        "vllm_kv_cache_gib"
    ]  # lowered after running out of memory, the results stay
    del d["generation"]["vllm_tensor_parallel_size"]
    del d["generation"]["backend"]  # the same stages and sampling seeds on either engine
    for key in ("devices", "strategy", "num_nodes", "logger"):
        del d["trainer"][key]  # where results are logged is no part of them
    if cfg.data.eval:
        del d["data"]["eval_share"]  # used only without a labelled eval set
    return d
