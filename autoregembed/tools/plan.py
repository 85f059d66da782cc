"""Per-GPU memory planner for an AutoRegEmbed run: ``autoregembed plan ...``.

Model states follow DeepSpeed's accounting (estimate_zero3_model_states_mem_needs without
offload): per trainable parameter 2 bytes (bf16 weight) + 4 (fp32 gradient) + 12 (fp32
master weight, Adam m and v), partitioned over all GPUs under ZeRO-3, plus a gather
buffer of 4 bytes x the largest layer.  The frozen decoder adds only its bf16 weights.
Activations assume gradient checkpointing (every layer's input is kept, one layer is
recomputed at a time).  LM head: what the scorer backend says it holds (scorers.py ``held_bytes``:
ours keeps each scored token's bf16 Jacobian and log-probability between forward and backward, plus
one chunk of fp32 logits and bf16 dZ while it runs); the materialised alternative keeps bf16 logits,
their fp32 log-softmax and its gradient for every scored token.
"""
from __future__ import annotations

from ..method.scorers import Scorer, scorer_for
from ..ground.arch import Arch
from ..ground.errors import InputError

GB = 1e9
SCORER_KEY = "LM head scorer"

def plan(arch: Arch, gpus: int, zero: int, micro_batch: int, negatives: int, max_len: int, k: int = 5,
         shard_decoder: bool = False, decoder_checkpointing: bool | int = True, scorer: Scorer | str = "auto",
         stage: int = 2, prefix: int = 0, contrast: bool = False, hpz: int = 0, reads_decoder: bool = True) -> dict:
    """shard_decoder: the frozen decoder partitioned under ZeRO-3 (model.shard_decoder), else whole
    on every GPU.  decoder_checkpointing: how many decoder layers recompute their activations in the
    backward (true: all, false: none, n: the first n; model.decoder_checkpointing); the others keep
    every activation from the forward.  scorer: the LM head's
    backend or its name (scorer.kind).  stage 1: one text per row and one decoder sequence (two with
    ``contrast``, stage1_loss.contrast's pass over the previous row's e); stage 2: query and positive
    encoded, 2 + ``negatives`` decoder sequences per query.  prefix: model.shared_prefix's positions,
    read before e in every decoder sequence of both stages.  hpz: ZeRO++'s hierarchical partition size
    (ds_configs/zero3_multinode.json: the GPUs of a node), which keeps a second bf16 copy of the
    encoder's parameters partitioned over that many GPUs, so that gathers stay inside a node.
    reads_decoder: false for a stage-2 objective on embeddings alone (loss.kind=infonce): no decoder is
    loaded, and the encoder reads each query and every distinct document of its row (1 + ``negatives``)."""
    if zero not in (2, 3):
        raise InputError("--zero must be 2 or 3")
    if stage not in (1, 2):
        raise InputError("--stage must be 1 or 2")
    if not reads_decoder and stage == 1:
        raise InputError("stage 1 always reads the decoder (it reconstructs through it)")
    recomputed = recomputed_layers(decoder_checkpointing, arch.layers) if reads_decoder else 0
    enc = arch.params(extra_tokens=k, with_head=False)  # the encoder is the base transformer, no LM head
    dec = arch.params() if reads_decoder else 0
    shard = gpus if zero == 3 else 1
    out = {
        "encoder parameters (bf16)": 2 * enc / shard,
        "decoder parameters (bf16, frozen)": 2 * dec / (shard if shard_decoder else 1),
        "gradients (fp32)": 4 * enc / gpus,
        "optimizer (fp32 master + Adam m, v)": 12 * enc / gpus,
        "gather buffer (largest layer)": 4 * arch.largest_layer(k) if zero == 3 else 0,
    }
    if zero == 3 and 0 < hpz < gpus:
        out["hpZ secondary parameters (bf16)"] = 2 * enc / hpz
    # stage 2 encodes queries and positives; without the decoder, queries and every document
    texts = micro_batch * (1 if stage == 1 else 2 if reads_decoder else 2 + negatives)
    enc_tokens = texts * (max_len + k + 3)  # with BOS, two newlines and the EMBED tokens
    # stage 1: target|e (and target|e of the previous row); stage 2: pos|e_q, pos|e_pos, neg_i|e_q
    dec_seqs = 0 if not reads_decoder else micro_batch * ((2 if contrast else 1) if stage == 1 else 2 + negatives)
    dec_tokens = dec_seqs * (prefix + k + max_len + 1)
    layer_work = 2 * (10 * arch.hidden + 3 * arch.intermediate)  # bytes per token while recomputing a layer
    checkpointed = 2 * arch.hidden * arch.layers + layer_work  # bytes per token: layer inputs + one layer's work
    # the decoder: the inputs of the layers it recomputes, one of them at work, every kept layer's activations
    dec_checkpointed = 2 * arch.hidden * recomputed + (layer_work if recomputed else 0)
    out["activations (checkpointed)"] = checkpointed * enc_tokens + dec_checkpointed * dec_tokens
    if reads_decoder and recomputed < arch.layers:
        out["decoder activations (kept)"] = layer_work * (arch.layers - recomputed) * dec_tokens
    if reads_decoder:
        out[SCORER_KEY] = scorer_for(scorer).held_bytes(dec_tokens, arch.hidden, arch.vocab)
    else:
        del out["decoder parameters (bf16, frozen)"]
    materialised = (2 + 4 + 4) * dec_tokens * arch.vocab
    return {"breakdown": out, "total": sum(out.values()), "materialised_logits": materialised,
            "total_if_materialised": sum(out.values()) - out.get(SCORER_KEY, 0) + materialised,
            "encoder_params": enc, "decoder_params": dec, "decoder_tokens": dec_tokens, "stage": stage,
            "recomputed_layers": recomputed}


def recomputed_layers(decoder_checkpointing: bool | int, layers: int) -> int:
    """The decoder layers recomputed under ``decoder_checkpointing`` (true: all, false: none, n: n)."""
    if isinstance(decoder_checkpointing, bool):
        return layers if decoder_checkpointing else 0
    if not 0 <= decoder_checkpointing <= layers:
        raise InputError(f"--decoder-checkpointing: {decoder_checkpointing} layers recomputed, but the decoder has "
                         f"{layers}")
    return decoder_checkpointing


def fewest_recomputed(arch: Arch, gpu_mem_gb: float, *args, **kwargs) -> int | None:
    """The fewest decoder layers to recompute for ``plan(arch, *args, **kwargs)`` to fit in
    ``gpu_mem_gb`` (each layer kept saves a third of its FLOPs in the backward), None if none fits."""
    kwargs.pop("decoder_checkpointing", None)
    for n in range(arch.layers + 1):  # memory falls as n grows: the first that fits is the fewest
        if plan(arch, *args, decoder_checkpointing=n, **kwargs)["total"] <= gpu_mem_gb * GB:
            return n
    return None


def report(p: dict, gpu_mem_gb: float, zero2: dict | None = None, sharded: dict | None = None) -> tuple[str, bool]:
    """The printed plan; ``zero2``: the same run under ZeRO-2, to recommend it when it fits;
    ``sharded``: the same run with the decoder partitioned, to recommend it when only it fits."""
    decoder = (f"decoder {p['decoder_params'] / 1e9:.2f}B frozen; {p['decoder_tokens']} decoder tokens per micro-batch"
               if p["decoder_params"] else "no decoder loaded (an objective on embeddings alone)")
    lines = [f"stage {p['stage']}: encoder {p['encoder_params'] / 1e9:.2f}B trainable params, {decoder}", ""]
    for name, v in p["breakdown"].items():
        lines.append(f"  {name:<40} {v / GB:9.2f} GB")
    if p["decoder_params"]:
        lines.append(f"  {'total per GPU (our scorer)':<40} {p['total'] / GB:9.2f} GB")
        lines.append(f"  {'  with materialised logits instead':<40} {p['total_if_materialised'] / GB:9.2f} GB "
                     f"(logits {p['materialised_logits'] / GB:.2f} GB)")
    else:
        lines.append(f"  {'total per GPU':<40} {p['total'] / GB:9.2f} GB")
    fits = p["total"] <= gpu_mem_gb * GB
    lines.append("")
    if not fits and sharded is not None and sharded["total"] <= gpu_mem_gb * GB:
        lines.append(f"DOES NOT FIT with the decoder whole on every GPU ({p['total'] / GB:.2f} GB); partitioned "
                     f"with the encoder it fits ({sharded['total'] / GB:.2f} GB): --set model.shard_decoder=true "
                     f"--set model.shared_prefix=0 (--shard-decoder here; the shared prefix is fitted through a "
                     f"whole decoder)")
    else:
        lines.append(f"fits in {gpu_mem_gb:g} GB" if fits else
                     f"DOES NOT FIT: {p['total'] / GB:.2f} GB > {gpu_mem_gb:g} GB per GPU; lower --micro-batch, "
                     f"--negatives or --max-len, or add GPUs"
                     + ("; or recompute the decoder (drop --no-decoder-checkpointing)"
                        if "decoder activations (kept)" in p["breakdown"] else ""))
    if zero2 is not None and zero2["total"] <= gpu_mem_gb * GB:
        lines.append(f"ZeRO-2 fits too ({zero2['total'] / GB:.2f} GB per GPU): prefer ds_configs/zero2.json. It keeps "
                     f"whole bf16 weights on every GPU and skips ZeRO-3's all-gather of every layer in each forward "
                     f"and backward, the main cost of ZeRO-3 across nodes.")
    elif zero2 is not None:
        lines.append(f"ZeRO-2 would need {zero2['total'] / GB:.2f} GB per GPU: ZeRO-3 is the right choice "
                     f"(ds_configs/zero3_multinode.json on several nodes keeps the gathers inside a node).")
    return "\n".join(lines), fits
