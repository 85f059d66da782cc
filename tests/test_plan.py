"""The memory planner agrees with DeepSpeed's own ZeRO-3 estimate and refuses plans that do not fit."""
import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

from autoregembed.tools.cli import main
from autoregembed.ground.arch import Arch
from autoregembed.ground.errors import InputError
from autoregembed.tools.plan import SCORER_KEY, plan


def test_llama2_7b_model_states_agree_with_deepspeed():
    arch = Arch.load("llama-2-7b")
    p = plan(arch, gpus=8, zero=3, micro_batch=4, negatives=7, max_len=512)
    b = p["breakdown"]
    ours = (b["encoder parameters (bf16)"] + b["gradients (fp32)"] + b["optimizer (fp32 master + Adam m, v)"]
            + b["gather buffer (largest layer)"])
    _, ds_gpu, _ = estimate_zero3_model_states_mem_needs(p["encoder_params"], arch.largest_layer(5),
                                                         num_gpus_per_node=8, num_nodes=1, cpu_offload=False)
    assert ours == pytest.approx(ds_gpu, rel=0.05)
    assert p["decoder_params"] == pytest.approx(6.74e9, rel=0.01)  # LLaMA-2-7B's published size


def test_parameter_count_matches_a_real_model(tiny_base):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    assert Arch.load(tiny_base).params() == sum(p.numel() for p in model.parameters())


def test_fused_scorer_saves_the_logits_and_bad_plans_are_refused(capsys):
    assert main(["plan", "--model", "llama-3-8b", "--gpus-per-node", "8", "--micro-batch", "8",
                 "--negatives", "15", "--max-len", "512"]) == 0
    out = capsys.readouterr().out
    assert "fits in 80 GB" in out
    assert main(["plan", "--model", "llama-3-8b", "--gpus-per-node", "1", "--micro-batch", "8",
                 "--negatives", "15", "--max-len", "512"]) == 3
    assert "DOES NOT FIT" in capsys.readouterr().out
    p = plan(Arch.load("llama-3-8b"), 8, 3, 8, 15, 512)
    assert p["materialised_logits"] > 50 * p["breakdown"][SCORER_KEY]
    with pytest.raises(ValueError, match="preset"):
        Arch.load("no-such-model")


def test_planner_says_when_zero2_is_the_better_choice(capsys):
    assert main(["plan", "--model", "smollm2-135m", "--gpus-per-node", "8"]) == 0
    assert "ZeRO-2 fits too" in capsys.readouterr().out
    assert main(["plan", "--model", "llama-2-13b", "--gpus-per-node", "8"]) == 0
    assert "ZeRO-3 is the right choice" in capsys.readouterr().out


def test_the_decoder_is_whole_per_gpu_unless_sharded_and_the_planner_says_when_sharding_is_needed(capsys):
    arch = Arch.load("llama-2-13b")
    whole = plan(arch, 8, 3, 1, 1, 128)["breakdown"]["decoder parameters (bf16, frozen)"]
    sharded = plan(arch, 8, 3, 1, 1, 128, shard_decoder=True)["breakdown"]["decoder parameters (bf16, frozen)"]
    assert whole == pytest.approx(2 * arch.params()) and sharded == pytest.approx(whole / 8)
    # LLaMA-2-13B on 8 x 40 GB: with its 26 GB decoder whole it needs 56 GB, partitioned 33 GB
    assert main(["plan", "--model", "llama-2-13b", "--gpus-per-node", "8", "--gpu-mem-gb", "40", "--max-len", "128",
                 "--micro-batch", "1"]) == 3
    assert "--set model.shard_decoder=true --set model.shared_prefix=0" in capsys.readouterr().out
    assert main(["plan", "--model", "llama-2-13b", "--gpus-per-node", "8", "--gpu-mem-gb", "40", "--max-len", "128",
                 "--micro-batch", "1", "--shard-decoder"]) == 0


def test_keeping_the_decoders_activations_costs_what_its_recompute_saved():
    arch = Arch.load("llama-2-7b")
    kept = plan(arch, 8, 3, 4, 7, 512, decoder_checkpointing=False)["breakdown"]
    recomputed = plan(arch, 8, 3, 4, 7, 512)["breakdown"]
    dec_tokens = 4 * (2 + 7) * (5 + 512 + 1)
    layer_work = 2 * (10 * arch.hidden + 3 * arch.intermediate)
    assert kept["decoder activations (kept)"] == layer_work * arch.layers * dec_tokens
    assert "decoder activations (kept)" not in recomputed
    assert kept["activations (checkpointed)"] < recomputed["activations (checkpointed)"]


def test_each_stage_counts_its_own_decoder_sequences_and_the_shared_prefix(capsys):
    """Stage 1 scores one target per row (two with the contrast pass), stage 2 pos|e_q, pos|e_pos and
    every neg|e_q; each decoder sequence reads the shared prefix before e."""
    arch = Arch.load("llama-2-7b")
    k, n = 5, 512

    def tokens(**kw):
        return plan(arch, 8, 3, 4, 7, n, k=k, **kw)["decoder_tokens"]

    assert tokens(stage=1) == 4 * (k + n + 1)
    assert tokens(stage=1, contrast=True) == 2 * 4 * (k + n + 1)
    assert tokens(stage=1, contrast=True, prefix=5) == 2 * 4 * (5 + k + n + 1)
    assert tokens(stage=2, prefix=5) == 4 * (2 + 7) * (5 + k + n + 1)
    one, two = (plan(arch, 8, 3, 4, 7, n, stage=s)["breakdown"]["activations (checkpointed)"] for s in (1, 2))
    assert one < two  # stage 1 encodes one text per row, stage 2 two
    with pytest.raises(InputError, match="--stage"):
        plan(arch, 8, 3, 4, 7, n, stage=3)
    assert main(["plan", "--model", "llama-2-7b", "--stage", "1", "--micro-batch", "16"]) == 0
    out = capsys.readouterr().out  # the CLI's defaults are the trainer's: a prefix of 5 and the contrast pass
    assert out.startswith("stage 1: ") and f"; {16 * 2 * (5 + k + n + 1)} decoder tokens" in out
    assert main(["plan", "--model", "llama-2-7b", "--stage", "1", "--micro-batch", "16", "--no-contrast",
                 "--shared-prefix", "0"]) == 0
    assert f"; {16 * (k + n + 1)} decoder tokens" in capsys.readouterr().out


def test_recomputing_some_decoder_layers_keeps_the_rest_and_the_planner_sizes_it(capsys):
    """n of L layers recomputed: the kept layers' activations grow by one layer's work per layer
    kept, and ``plan`` names the fewest layers to recompute that still fit."""
    from autoregembed.tools.plan import fewest_recomputed

    arch = Arch.load("llama-2-7b")
    layer_work = 2 * (10 * arch.hidden + 3 * arch.intermediate)
    every, half, none = (plan(arch, 8, 3, 4, 7, 512, decoder_checkpointing=n) for n in (True, 16, False))
    dec_tokens = every["decoder_tokens"]
    assert half["breakdown"]["decoder activations (kept)"] == layer_work * 16 * dec_tokens
    assert every["total"] < half["total"] < none["total"]
    assert plan(arch, 8, 3, 4, 7, 512, decoder_checkpointing=32)["total"] == every["total"]
    with pytest.raises(InputError, match="33 layers recomputed, but the decoder has 32"):
        plan(arch, 8, 3, 4, 7, 512, decoder_checkpointing=33)
    budget = (half["total"] + 1) / 1e9
    n = fewest_recomputed(arch, budget, 8, 3, 4, 7, 512)
    assert n <= 16 and plan(arch, 8, 3, 4, 7, 512, decoder_checkpointing=n)["total"] <= budget * 1e9
    assert n == 0 or plan(arch, 8, 3, 4, 7, 512, decoder_checkpointing=n - 1)["total"] > budget * 1e9
    assert fewest_recomputed(arch, 1.0, 8, 3, 4, 7, 512) is None
    assert main(["plan", "--model", "llama-2-7b", "--micro-batch", "4", "--negatives", "7"]) == 0
    out = capsys.readouterr().out
    n = fewest_recomputed(arch, 80, 8, 3, 4, 7, 512, k=5, prefix=5)
    assert f"recomputing {n} of 32 decoder layers fits too (--set model.decoder_checkpointing={n})" in out
    assert main(["plan", "--model", "llama-2-7b", "--micro-batch", "4", "--negatives", "7",
                 "--decoder-checkpointing", str(n)]) == 0
    assert "recomputing" not in capsys.readouterr().out


def test_hpz_keeps_a_second_parameter_copy_partitioned_within_a_node(capsys):
    """ds_configs/zero3_multinode.json (hpZ): every GPU also holds the bf16 parameters partitioned
    over its node's GPUs; a single node has no second copy."""
    arch = Arch.load("llama-2-7b")
    flat, hpz = (plan(arch, 16, 3, 4, 7, 512, hpz=h)["breakdown"] for h in (0, 8))
    assert hpz["hpZ secondary parameters (bf16)"] == pytest.approx(2 * arch.params(extra_tokens=5, with_head=False) / 8)
    assert "hpZ secondary parameters (bf16)" not in flat
    assert "hpZ secondary parameters (bf16)" not in plan(arch, 8, 3, 4, 7, 512, hpz=8)["breakdown"]
    assert main(["plan", "--model", "llama-2-7b", "--nodes", "2", "--hpz"]) == 0
    assert "hpZ secondary parameters (bf16)" in capsys.readouterr().out


def test_an_objective_on_embeddings_alone_plans_no_decoder(capsys):
    """loss.kind=infonce loads no decoder (session.Session): its plan holds no decoder weights, activations
    or LM head, and the encoder reads each query and every document of its row."""
    arch, n = Arch.load("llama-2-7b"), 512
    full, alone = plan(arch, 8, 3, 4, 7, n), plan(arch, 8, 3, 4, 7, n, reads_decoder=False)
    assert alone["decoder_params"] == 0 and alone["decoder_tokens"] == 0 and SCORER_KEY not in alone["breakdown"]
    assert not [key for key in alone["breakdown"] if "decoder" in key]
    gone = full["breakdown"]["decoder parameters (bf16, frozen)"] + full["breakdown"][SCORER_KEY]
    assert gone > 13e9  # the 7B decoder's bf16 weights alone
    # per encoder token: stage 1 encodes one text per row, and a decoder that recomputes nothing adds nothing here
    per_token = plan(arch, 8, 3, 4, 7, n, stage=1, decoder_checkpointing=False)["breakdown"][
        "activations (checkpointed)"] / (4 * (n + 5 + 3))
    assert alone["breakdown"]["activations (checkpointed)"] == pytest.approx(per_token * 4 * (2 + 7) * (n + 5 + 3))
    with pytest.raises(InputError, match="stage 1 always reads the decoder"):
        plan(arch, 8, 3, 4, 7, n, stage=1, reads_decoder=False)
    assert main(["plan", "--model", "llama-2-7b", "--embeddings-only", "--negatives", "7"]) == 0
    out = capsys.readouterr().out
    assert "no decoder loaded" in out and "materialised" not in out and "total per GPU" in out
