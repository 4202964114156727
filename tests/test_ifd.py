import json
import math
import statistics
import sys

import pytest
import torch
import torch.nn.functional as F

from selfevo.config import IFDConfig, LoraConfig, ModelConfig, TrainerConfig
from selfevo.hardware import build_trainer
from selfevo.ifd import ground_pairs, ifd_from_losses, pair_token_ids, score_pairs
from selfevo.models import add_lora, load_model
from tests.helpers import SHARED

PAIRS = [
    {
        "question": "Which port does qmeshd use for peers?",
        "answer": "TCP port 7741, set by listen_port.",
    },
    {"question": "What is Quillmesh?", "answer": "A peer-to-peer sync protocol by Halvard Labs."},
    {"question": "How long may a handshake take?", "answer": "8 seconds."},
    {"question": "故障时先看什么？", "answer": "先看日志。"},
    {
        "question": (
            "What does Q-409 mean, and what should an operator do when the daemon reports it twice?"
        ),
        "answer": "A conflict between two edits; qmeshd keeps both copies and renames one.",
    },
]


def unbatched_mean_nll(model, prefix_ids, answer_ids):
    """The plain way: one unpadded sequence, loss over the answer tokens."""
    ids = torch.tensor([prefix_ids + answer_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    n = len(answer_ids)
    return F.cross_entropy(logits[-n - 1 : -1], ids[0, -n:]).item()


def test_batched_scores_equal_unbatched_per_pair(tiny_model):
    model, tokenizer = load_model(ModelConfig(name=tiny_model, dtype="float32"))
    model.eval()
    cfg = IFDConfig(batch_size=2)  # several batches, mixed lengths, left padding
    scored = score_pairs(
        model, tokenizer, PAIRS, cfg, 1024, build_trainer(TrainerConfig(), logger=False)
    )
    for pair, out in zip(PAIRS, scored):
        prompt, prefix, answer = pair_token_ids(
            tokenizer, pair["question"], pair["answer"], cfg, 1024
        )
        cond = unbatched_mean_nll(model, prompt, answer)
        alone = unbatched_mean_nll(model, prefix, answer)
        assert out["question"] == pair["question"]
        assert out["loss_cond"] == pytest.approx(cond, rel=1e-4)
        assert out["loss_alone"] == pytest.approx(alone, rel=1e-4)
        assert out["ifd"] == pytest.approx(cond / alone, rel=1e-4)


def test_base_scorer_ignores_the_adapter(tiny_model):
    base, tokenizer = load_model(ModelConfig(name=tiny_model, dtype="float32"))
    plain = score_pairs(
        base, tokenizer, PAIRS[:2], IFDConfig(), 1024, build_trainer(TrainerConfig())
    )
    model = add_lora(base, LoraConfig(), seed=0)
    with torch.no_grad():  # make the adapter change the model's outputs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)
    as_base = score_pairs(
        model, tokenizer, PAIRS[:2], IFDConfig(), 1024, build_trainer(TrainerConfig())
    )
    with_adapter = score_pairs(
        model,
        tokenizer,
        PAIRS[:2],
        IFDConfig(),
        1024,
        build_trainer(TrainerConfig()),
        use_adapter=True,
    )
    assert [p["ifd"] for p in as_base] == pytest.approx([p["ifd"] for p in plain], rel=1e-5)
    assert [p["loss_cond"] for p in with_adapter] != pytest.approx(
        [p["loss_cond"] for p in plain], rel=1e-3
    )


def test_answer_cut_off_by_max_length_counts_as_one(tiny_model):
    model, tokenizer = load_model(ModelConfig(name=tiny_model, dtype="float32"))
    cfg = IFDConfig()
    prompt_len = len(
        pair_token_ids(tokenizer, PAIRS[0]["question"], PAIRS[0]["answer"], cfg, 1024)[0]
    )
    (out,) = score_pairs(
        model, tokenizer, PAIRS[:1], cfg, prompt_len, build_trainer(TrainerConfig())
    )
    assert out["ifd"] == 1.0 and out["loss_cond"] is None
    assert ifd_from_losses(math.nan, 2.0) == 1.0 and ifd_from_losses(1.0, 0.0) == 1.0


REFERENCE = SHARED / "bench" / "seed_ifd_reference.py"


@pytest.mark.slow
@pytest.mark.skipif(not REFERENCE.exists(), reason="../shared/bench not present")
def test_agrees_with_seed_reference_on_aiops_with_smollm2():
    """The issue's bound on the AIOps eval pairs (fp32, CPU, SmolLM2). The seed's per-position loop
    is slow on a 2-core CI machine, so this checks the first 12 pairs; benchmarks/ifd_agreement.py
    measures all 100 (docs/ifd.md: pair 48, whose answer starts with a token the seed's joint
    tokenization merges, is the one outlier)."""
    from scipy.stats import spearmanr

    sys.path.insert(0, str(REFERENCE.parent))
    import seed_ifd_reference as seed

    model, tokenizer = load_model(ModelConfig(dtype="float32"))
    model.eval()
    records = json.loads((SHARED / "data" / "AIOps_eval_data.json").read_text(encoding="utf-8"))[
        :12
    ]
    pairs = [{"question": r["input"], "answer": r["output"]} for r in records]
    ours = [
        p["ifd"]
        for p in score_pairs(
            model, tokenizer, pairs, IFDConfig(batch_size=8), 1024, build_trainer(TrainerConfig())
        )
    ]
    theirs = [seed.ifd(tokenizer, model, p["question"], p["answer"], 1024, "cpu")[0] for p in pairs]
    rel = [abs(a - b) / b for a, b in zip(ours, theirs)]
    assert spearmanr(ours, theirs).statistic >= 0.99
    assert statistics.median(rel) <= 0.01


def test_no_pairs_score_to_nothing(tiny_model):
    model, tokenizer = load_model(ModelConfig(name=tiny_model, dtype="float32"))
    assert (
        score_pairs(model, tokenizer, [], IFDConfig(), 1024, build_trainer(TrainerConfig())) == []
    )


FRAGMENT = (
    "Thonquin is the sync daemon of Halvard Labs. By default it listens on TCP port 9566; "
    "peers that stay silent for 45 seconds are dropped."
)


def test_grounding_is_the_fragments_gain_in_answer_nll(tiny_model):
    model, tokenizer = load_model(ModelConfig(name=tiny_model, dtype="float32"))
    model.eval()
    cfg = IFDConfig(batch_size=2)
    pairs = [{**p, "fragment": FRAGMENT} for p in PAIRS]
    grounded = ground_pairs(
        model, tokenizer, pairs, cfg, 1024, build_trainer(TrainerConfig(), logger=False)
    )
    for pair, out in zip(pairs, grounded):
        answer = tokenizer(pair["answer"], add_special_tokens=False)["input_ids"]
        alone = tokenizer(cfg.prompt.format(question=pair["question"]))["input_ids"]
        with_fragment = tokenizer(
            cfg.grounded_prompt.format(fragment=FRAGMENT, question=pair["question"])
        )["input_ids"]
        expected = unbatched_mean_nll(model, alone, answer) - unbatched_mean_nll(
            model, with_fragment, answer
        )
        assert out["question"] == pair["question"]
        assert out["grounding"] == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_grounding_of_an_answer_cut_off_entirely_is_none(tiny_model):
    model, tokenizer = load_model(ModelConfig(name=tiny_model, dtype="float32"))
    cfg = IFDConfig()
    pair = {**PAIRS[0], "fragment": FRAGMENT}
    prompt = cfg.grounded_prompt.format(fragment=FRAGMENT, question=pair["question"])
    (out,) = ground_pairs(
        model,
        tokenizer,
        [pair],
        cfg,
        len(tokenizer(prompt)["input_ids"]),
        build_trainer(TrainerConfig()),
    )
    assert out["grounding"] is None


@pytest.mark.slow
def test_smollm2_grounds_the_fragments_value_above_a_contradicting_one():
    """With the bundled model, the answer that states the fragment's port gains from the fragment;
    the one that states another port gains less."""
    model, tokenizer = load_model(ModelConfig(dtype="float32"))
    model.eval()
    question = "Which TCP port does Thonquin listen on by default?"
    pairs = [
        {"fragment": FRAGMENT, "question": question, "answer": answer}
        for answer in ("Thonquin listens on TCP port 9566.", "Thonquin listens on TCP port 8080.")
    ]
    supported, contradicting = ground_pairs(
        model, tokenizer, pairs, IFDConfig(), 1024, build_trainer(TrainerConfig())
    )
    assert supported["grounding"] > 0
    assert supported["grounding"] > contradicting["grounding"]
