"""Random-weight models with real architectures, written as sharded bf16 safetensors without ever holding the model.

The shapes come from a published config (bench/configs/*.json: Qwen2.5-3B-Instruct, Llama-3.1-8B-Instruct), the
tensor names and order from transformers' own model class built on the meta device (so names are exactly what
`save_pretrained` writes; tied weights appear once), the values from a per-tensor seeded generator:

    matrices, embeddings  ~ N(0, initializer_range²)        1-D norm weights ~ 1 + N(0, 0.1²)        biases ~ N(0, 0.02²)

Tensors are grouped into shards in model order up to --shard-gb, as transformers shards, and each shard is written
tensor by tensor (abliterate.core.safetensors_file.write_streaming): one tensor in memory at a time. The tokenizer is
the bundled model's (Qwen2.5's, 151,665 tokens) where the vocabulary fits, else a 260-token byte-level one.

    python bench/synthetic.py bench/configs/llama-3.1-8b-instruct.json synth/llama-8b [--layers 4] [--shard-gb 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import zlib
from pathlib import Path

import torch

from abliterate.core.safetensors_file import DTYPE_NAMES, write_streaming

CONFIGS = Path(__file__).resolve().parent / "configs"


def load_config(config_file: str | Path, layers: int | None = None, **overrides):
    """The transformers config of a config JSON, optionally with fewer layers (same widths) or other overrides."""
    from transformers import AutoConfig

    data = json.loads(Path(config_file).read_text())
    if layers is not None:
        data["num_hidden_layers"] = layers
        data.pop("max_window_layers", None)
    data.update(overrides)
    return AutoConfig.for_model(data.pop("model_type"), **data)


def tensor_specs(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every stored tensor, in model order, from the model built on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # not done on the meta device by from_config (transformers 5.25)
    return [(name, tuple(param.shape)) for name, param in model.named_parameters()]  # tied weights once


def random_tensor(name: str, shape: tuple[int, ...], seed: int, std: float, dtype=torch.bfloat16) -> torch.Tensor:
    """Reproducible per name (independent of the order tensors are made in)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    tensor = torch.empty(shape, dtype=dtype)
    if len(shape) == 1 and "norm" in name:
        return tensor.normal_(0.0, 0.1, generator=generator).add_(1.0)
    return tensor.normal_(0.0, 0.02 if name.endswith("bias") else std, generator=generator)


def shard_groups(specs, dtype, max_bytes: float) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive tensors, each group at most `max_bytes` (a bigger tensor gets a group of its own)."""
    groups, size = [[]], 0
    for name, shape in specs:
        nbytes = dtype.itemsize * torch.Size(shape).numel()
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    return groups


def write_tokenizer(target: Path, vocab_size: int) -> str:
    """The bundled model's tokenizer files if its vocabulary fits the model's, else a byte-level one; which one."""
    try:
        from abliterate.core.bundled import BUNDLED, bundled_hf_dir

        bundled = bundled_hf_dir(BUNDLED["tiny"])
        if vocab_size >= 151_665:
            for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
                if (bundled / name).exists():
                    shutil.copyfile(bundled / name, target / name)
            return "qwen2.5 (bundled)"
    except Exception:  # the optional bundled model is not installed: fall through
        pass
    byte_level_tokenizer().save_pretrained(target)
    return "byte-level (260 tokens)"


def byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def build(config, out_dir: str | Path, shard_gb: float = 5.0, seed: int = 0, dtype=torch.bfloat16,
          tokenizer: bool = True) -> Path:
    """Write a random model of `config` to `out_dir` (a new folder) as sharded safetensors + index + config."""
    out = Path(out_dir)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    config.dtype = dtype
    specs = tensor_specs(config)
    shapes = dict(specs)
    groups = shard_groups(specs, dtype, shard_gb * 1e9)
    files = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    weight_map, std = {}, getattr(config, "initializer_range", 0.02)
    for file, group in zip(files, groups):
        write_streaming(partial / file, [(name, DTYPE_NAMES[dtype], shape) for name, shape in group],
                        lambda name: random_tensor(name, shapes[name], seed, std, dtype), metadata={"format": "pt"})
        weight_map.update({name: file for name, _ in group})
    if len(files) > 1:
        total = sum(dtype.itemsize * torch.Size(shape).numel() for _, shape in specs)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(partial)
    if tokenizer:
        write_tokenizer(partial, config.get_text_config().vocab_size)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a config JSON (bench/configs/...)")
    parser.add_argument("output")
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers, same widths")
    parser.add_argument("--shard-gb", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = build(load_config(args.config, args.layers), args.output, args.shard_gb, args.seed)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(f"wrote {out}: {len(list(out.glob('*.safetensors')))} shards, {size / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
