"""Building the encoder/decoder pair from disk, under ZeRO-3 partitioning when configured."""
from __future__ import annotations

import contextlib
import json
import os

import torch

from ..ground import distributed as D
from ..ground.atomic import atomic_dir
from .config import ConfigError
from ..ground.data import records
from ..ground.lora import add_lora
from ..method.model import AutoRegEmbedModel
from ..method.packing import VARLEN, has_varlen, register_varlen, sdpa_without_cudnn
from ..method.tokenization import prepare_tokenizer


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def resolve_attention(name: str, packing: bool | None) -> tuple[str, bool]:
    """(attn_implementation, packed) for ``model.attn_implementation`` and ``model.packing``.
    auto: flash_attention_2 when the package and a GPU are there; on a GPU without it, PyTorch's
    varlen flash kernel (packing.VARLEN) where this torch has one (2.9+), else SDPA (see
    ``sdpa_without_cudnn``); on CPU, SDPA.  packing null: on where a GPU and a kernel that reads
    packed rows are there (on CPU the packed reference attention is O(tokens^2)); true is kept."""
    cuda = torch.cuda.is_available()
    if name == "auto":
        try:
            import flash_attn  # noqa: F401

            name = "flash_attention_2" if cuda else "sdpa"
        except ImportError:
            name = VARLEN if cuda and packing is not False and has_varlen() else "sdpa"
    packed = cuda and name in ("flash_attention_2", VARLEN) if packing is None else packing
    if name == VARLEN:
        register_varlen()
    if name == "sdpa":
        sdpa_without_cudnn()
    if (name, packed) not in _said:  # which kernel ran is the first thing a slow GPU step is asked
        _said.add((name, packed))
        from ..ground.monitor import log

        log(f"attention: {name}, {'packed (padding-free)' if packed else 'padded'} passes")
    return name, packed


_said: set = set()


def build_tiny_base(out_dir: str, corpus_files: list[str], hidden_size: int = 64, layers: int = 2,
                    vocab_size: int = 2000, seed: int = 0, pretrain_steps: int = 500):
    """A small LLaMA-architecture causal LM and a BPE tokenizer trained on the bundled text.

    The CPU default and the tests use it: real architecture, real tokenizer, no download.
    The LM is briefly pretrained on the same text, because AutoRegEmbed's frozen decoder
    must be a language model for compression to mean anything (a random one is not).
    Written atomically; a folder that already holds a model of the same shape is left as it is,
    one of another shape is refused (the runs in that output folder were built on it).
    """
    if os.path.exists(os.path.join(out_dir, "config.json")):
        with open(os.path.join(out_dir, "config.json")) as f:
            have = json.load(f)
        have = (have.get("hidden_size"), have.get("num_hidden_layers"), have.get("autoregembed_tiny_seed", seed))
        if have != (hidden_size, layers, seed):
            raise ConfigError(f"{out_dir} already holds a tiny base with hidden size {have[0]}, {have[1]} layers "
                              f"and seed {have[2]}, not {hidden_size}, {layers} and {seed} (model.tiny_hidden_size, "
                              f"model.tiny_layers, model.tiny_seed): use another output_dir, or delete {out_dir} "
                              f"and the runs built on it")
        return out_dir
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [v for path in corpus_files for _, rec in records(path) if isinstance(rec, dict)
             for v in rec.values() if isinstance(v, str)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    config.autoregembed_tiny_seed = seed  # recorded in config.json: a folder is reused only for its own seed
    model = LlamaForCausalLM(config)
    _pretrain(model, tokenizer, texts, pretrain_steps, seed)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir


def _pretrain(model, tokenizer, texts: list[str], steps: int, seed: int, batch_size: int = 32, max_len: int = 64):
    """Plain next-token training of the tiny base LM (~25 s on 2 CPU cores at 500 steps); 0 steps: untrained."""
    import random

    if steps <= 0:
        return

    rng = random.Random(seed)
    seqs = [[tokenizer.bos_token_id] + tokenizer(t, add_special_tokens=False)["input_ids"][: max_len - 2]
            + [tokenizer.eos_token_id] for t in dict.fromkeys(texts)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / steps))
    model.train()
    from ..ground.monitor import Progress

    progress = Progress("tiny base: pretraining", steps, "steps")
    for step in range(1, steps + 1):
        batch = rng.sample(seqs, min(batch_size, len(seqs)))
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        for i, s in enumerate(batch):
            ids[i, : len(s)] = torch.tensor(s)
            labels[i, : len(s)] = torch.tensor(s)
        loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        progress.update(step)
    model.eval()


def load_tokenizer(path: str, k: int):
    from transformers import AutoTokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(path), k)


@contextlib.contextmanager
def hf_zero3_config(ds_config: dict):
    """Within: Transformers knows the ZeRO-3 config, so ``from_pretrained`` builds partitioned models
    (through ``zero.Init``).  After: it has forgotten it, or later ``from_pretrained`` calls in the
    process (evaluation, the next stage) would build partitioned, empty models.  The config is a
    global in Transformers; this is the one place that sets and clears it."""
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    keepalive = HfDeepSpeedConfig(ds_config)  # Transformers holds it weakly: it lives while we hold it
    try:
        yield keepalive
    finally:
        unset_hf_deepspeed_config()


def load_frozen_decoder(path: str, dtype: torch.dtype, attn: str, gradient_checkpointing: bool | int = False):
    """The frozen base causal LM, as the decoder of training and scoring (frozen by the model);
    ``gradient_checkpointing``: true, false, or how many of its layers recompute (the first n)."""
    from transformers import AutoModelForCausalLM

    decoder = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    decoder.config.use_cache = False
    if gradient_checkpointing:
        enable_activation_checkpointing(decoder)
        if not isinstance(gradient_checkpointing, bool):
            recompute_first(decoder, gradient_checkpointing)
    return decoder


def recompute_first(model, n: int):
    """Checkpoint only the first ``n`` of ``model``'s transformer layers (activation checkpointing
    already enabled): the others keep their activations for the backward, which saves their
    recompute where the memory allows it (model.decoder_checkpointing, sized by ``autoregembed plan``)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if n > len(layers):
        raise ConfigError(f"key 'model.decoder_checkpointing': {n} layers to recompute, but the decoder has "
                          f"{len(layers)}")
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < n


def load_model(encoder_path: str, decoder_path: str, k: int, dtype: torch.dtype, attn: str,
               gradient_checkpointing: bool = False,
               lora: dict | None = None, decoder_bos: bool = False, scorer="auto",
               outside_decoder=None, packed: bool = False, decoder_checkpointing: bool | int | None = None,
               with_decoder: bool = True):
    """Return (AutoRegEmbedModel, tokenizer).

    encoder_path: the base model (stage 1) or a stage-1 export (reference scores, stage 2).
    decoder_path: always the frozen base causal LM.  Inside ``hf_zero3_config`` (ZeRO stage 3)
    both are constructed partitioned, unless ``outside_decoder`` (from ``load_frozen_decoder``,
    loaded outside it) is given: the model then holds it without registering it (model.py).
    lora: ``add_lora`` keyword arguments when the encoder trains through LoRA adapters.
    decoder_bos: the decoder reads the tokenizer's BOS before the compressed tokens (model.py).
    packed: padding-free passes (packing.py; ``attn`` must then be one that packs: resolve_attention).
    decoder_checkpointing: the decoder's activation checkpointing (None: ``gradient_checkpointing``).
    with_decoder: false builds a model that only embeds (no frozen decoder loaded; AutoRegEmbedModel).
    """
    from transformers import AutoModel

    tokenizer = load_tokenizer(encoder_path, k)
    decoder = None if not with_decoder else outside_decoder or load_frozen_decoder(
        decoder_path, dtype, attn, gradient_checkpointing if decoder_checkpointing is None else decoder_checkpointing)
    encoder = AutoModel.from_pretrained(encoder_path, dtype=dtype, attn_implementation=attn)
    if encoder.get_input_embeddings().num_embeddings < len(tokenizer):
        encoder.resize_token_embeddings(len(tokenizer))
    if lora:
        add_lora(encoder, **lora)
    encoder.config.use_cache = False
    if gradient_checkpointing:
        enable_activation_checkpointing(encoder)
    model = AutoRegEmbedModel(encoder, decoder, k, decoder_bos_id=tokenizer.bos_token_id if decoder_bos else None,
                              scorer=scorer, decoder_in_module=outside_decoder is None, packed=packed)
    return model, tokenizer


def enable_activation_checkpointing(model):
    """Non-reentrant activation checkpointing (ZeRO-3's hooks need it), through Transformers'
    current API where it has it (``gradient_checkpointing_enable`` is deprecated from 5.x)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def prepare_base(model, folder: str, corpus: list[str]) -> str:
    """The base causal LM (``model``: the model section; ``folder``: Layout.base_model); the tiny default is
    built there (once, by rank 0) on first use, its tokenizer trained on ``corpus`` (the run's data files)."""
    if model.base == "tiny":
        if D.rank() == 0:
            build_tiny_base(folder, corpus, hidden_size=model.tiny_hidden_size, layers=model.tiny_layers,
                            seed=model.tiny_seed)
        D.barrier()
    return folder

