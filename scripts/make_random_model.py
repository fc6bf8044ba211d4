"""Build random-weight causal language models of real architectures, with a byte tokenizer.

Used by the worker's unit tests (tiny sizes, built in-process in well under a second) and by
scripts/bench_worker.py and scripts/device/ (a real model's shape, e.g. Qwen3-0.6B, Qwen3-4B or
Llama-3-8B, written out by hand from the published config.json: no hub; the real vocabulary size,
so the output layer costs what it really costs, though the byte tokenizer uses few of its rows).
The tokenizer maps every byte to one token and has a ChatML chat template, so nothing is trained.

    python scripts/make_random_model.py OUT_DIR --arch qwen3 [--hidden 64 --layers 2]
    python scripts/make_random_model.py OUT_DIR --arch qwen3-0.6b --dtype bfloat16
    python scripts/make_random_model.py OUT_DIR --arch qwen3-4b --dtype bfloat16 --device cuda
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
TINY_ARCHITECTURES = (
    "llama",
    "qwen2",
    "qwen3",
    "mistral",
    "gemma",
    "phi",
    "phi3",
    "gpt2",
    "gpt_neox",
    "qwen2_moe",
    "qwen3_moe",
    "mixtral",
    "gemma2",
    "falcon",
    "opt",
    "lfm2",
    "gpt_oss",
    "deepseek_v3",
    "qwen3_next",
)


def byte_tokenizer():
    """One token per byte (GPT-2 byte alphabet), plus ChatML's special tokens; no training."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocabulary = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for character in sorted(alphabet):
        vocabulary[character] = len(vocabulary)
    tokenizer = Tokenizer(models.BPE(vocab=vocabulary, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        bos_token=None,
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(architecture: str, *, hidden: int = 64, layers: int = 2, vocab: int = 300):
    """A small config of the given family; every family uses its own module layout."""
    import transformers

    heads = 4
    common = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
    }
    if architecture == "llama":
        return transformers.LlamaConfig(**common, head_dim=hidden // heads)
    if architecture == "qwen2":
        return transformers.Qwen2Config(**common)
    if architecture == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=hidden // heads)
    if architecture == "mistral":
        return transformers.MistralConfig(**common, head_dim=hidden // heads)
    if architecture == "gemma":
        return transformers.GemmaConfig(**common, head_dim=hidden // heads)
    if architecture == "phi":
        return transformers.PhiConfig(**common)
    if architecture == "phi3":
        return transformers.Phi3Config(**common)
    if architecture == "gpt2":
        return transformers.GPT2Config(
            vocab_size=vocab,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_positions=256,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
        )
    if architecture == "gpt_neox":
        return transformers.GPTNeoXConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=256,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
        )
    moe = {"num_experts_per_tok": 2, "moe_intermediate_size": hidden}
    if architecture == "qwen2_moe":
        return transformers.Qwen2MoeConfig(
            **common, **moe, num_experts=4, shared_expert_intermediate_size=hidden
        )
    if architecture == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **common, **moe, num_experts=4, head_dim=hidden // heads, mlp_only_layers=[]
        )
    if architecture == "mixtral":
        return transformers.MixtralConfig(
            **common, num_local_experts=4, num_experts_per_tok=2, head_dim=hidden // heads
        )
    if architecture == "gemma2":
        return transformers.Gemma2Config(**common, head_dim=hidden // heads)
    if architecture == "falcon":
        return transformers.FalconConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
        )
    if architecture == "opt":
        return transformers.OPTConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            ffn_dim=hidden * 2,
            word_embed_proj_dim=hidden,
            max_position_embeddings=256,
        )
    if architecture == "lfm2":
        return transformers.Lfm2Config(
            **common,
            layer_types=["conv" if i % 2 == 0 else "full_attention" for i in range(layers)],
        )
    if architecture == "gpt_oss":
        return transformers.GptOssConfig(
            **common,
            num_local_experts=4,
            num_experts_per_tok=2,
            head_dim=hidden // heads,
            layer_types=["full_attention"] * layers,
        )
    if architecture == "deepseek_v3":
        return transformers.DeepseekV3Config(
            **{**common, "num_key_value_heads": heads},
            moe_intermediate_size=hidden,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            head_dim=8,
            n_group=1,
            topk_group=1,
        )
    if architecture == "qwen3_next":
        return transformers.Qwen3NextConfig(
            **common,
            **moe,
            head_dim=hidden // heads,
            num_experts=4,
            shared_expert_intermediate_size=hidden,
            linear_num_value_heads=4,
            linear_num_key_heads=2,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            layer_types=[
                "linear_attention" if i % 2 == 0 else "full_attention" for i in range(layers)
            ],
        )
    raise ValueError(f"unknown architecture {architecture!r}; choose from {TINY_ARCHITECTURES}")


def _qwen3_config(hidden: int, intermediate: int, layers: int, heads: int):
    """A Qwen3 size from its published config.json, written out by hand (no hub access here):
    what the sizes share (vocabulary, 8 key/value heads of 128, rope, tied embeddings)."""
    import transformers

    return transformers.Qwen3Config(
        vocab_size=151936,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rope_theta=1000000,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=151643,
        eos_token_id=151645,
    )


def qwen3_0_6b_config():
    """Qwen3-0.6B's shape."""
    return _qwen3_config(hidden=1024, intermediate=3072, layers=28, heads=16)


def qwen3_4b_config():
    """Qwen3-4B's shape."""
    return _qwen3_config(hidden=2560, intermediate=9728, layers=36, heads=32)


def llama_3_8b_config():
    """Meta-Llama-3-8B-Instruct's published config.json, written out by hand (no hub access)."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128009,
    )


REAL_SHAPES = {
    "qwen3-0.6b": qwen3_0_6b_config,
    "qwen3-4b": qwen3_4b_config,
    "llama-3-8b": llama_3_8b_config,
}


def random_model(config, *, seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu"):
    """Random weights of `config`, in eval mode, initialised on `device` (a GPU builds a large
    model in seconds). Larger init std so layers differ visibly."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def make_random_model(
    directory: str | Path,
    architecture: str = "qwen3",
    *,
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> Path:
    """Write a random model plus the byte tokenizer to `directory` (save_pretrained layout)."""
    directory = Path(directory)
    tokenizer = byte_tokenizer()
    if architecture in REAL_SHAPES:
        config = REAL_SHAPES[architecture]()
    else:
        config = tiny_config(architecture, hidden=hidden, layers=layers, vocab=len(tokenizer))
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    model = random_model(config, seed=seed, dtype=dtype, device=device)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument(
        "--arch", default="qwen3", help=", ".join([*TINY_ARCHITECTURES, *REAL_SHAPES])
    )
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", help="where the weights are initialised")
    arguments = parser.parse_args(argv)
    path = make_random_model(
        arguments.out,
        arguments.arch,
        hidden=arguments.hidden,
        layers=arguments.layers,
        seed=arguments.seed,
        dtype=getattr(torch, arguments.dtype),
        device=arguments.device,
    )
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
