"""The MLX engine: greedy generation and log-probs computed by mlx-lm (Apple silicon; `mlx[cpu]` elsewhere), with a
trial's ablation applied to mlx-lm's own copy of the model.

Loading. mlx-lm loads the model itself from the `LoadedModel`'s Hugging Face folder (or hub id); a model loaded from a
.gguf file is written out as a Hugging Face folder first (`save_hf`, as the vllm engine does). mlx-lm keeps the dtype
stored in the files; the engine casts its copy to the `LoadedModel`'s dtype so both compute with the same weights.
`open(..., mlx_model=path)` takes an mlx-lm folder instead (e.g. an `mlx_lm.convert -q` 4-bit copy of the same model).

How the ablation is applied, chosen per residual writer (o_proj / down_proj) by its layer type:

* a plain `nn.Linear` (weight [hidden, in], as in torch): the edited weight is written into mlx-lm's module,

      W' = W − w·u(uᵀW)            (norm-preserving: each column rescaled to its original length)

  computed by `edited_tensor` (the function `bake` uses) from the kept original, in float32, then cast back. mlx
  arrays are immutable: leaving `ablated` puts the kept original arrays back, so the model is the base bit for bit.
* a `QuantizedLinear` (mlx-lm's 4-bit and 8-bit models): packed integer weights cannot take W' without re-quantising
  (which would change the base weights too), so the module is wrapped and its output corrected,

      out' = out − w·u(uᵀout)       (the same map as W', applied at run time, as the transformers engine's hooks do)

  and unwrapped on exit. Norm-preserving edits rescale W's columns, which no output correction can do: refused there.

Generation: greedy, one prompt at a time (mlx-lm's batched generation left-pads prompts; per prompt, every answer is
computed exactly as it would be alone), with a KV cache (`make_prompt_cache`). `stop(text)` is asked after each token,
as the transformers engine asks it: an answer ends at the first prefix it accepts, and no more tokens are computed.

Log-probs: computed by mlx itself (full-vocabulary logits, log-softmax in float32, converted to torch float32 on the
CPU), one prompt per forward pass: no padding, so each row is the prompt's own.

mlx-lm is optional: this module imports without it; opening the engine without it raises a `UserError` naming the
package (`pip install mlx-lm` on Apple silicon, `pip install "mlx[cpu]" mlx-lm` elsewhere).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np
import torch

from abliterate.errors import UserError
from abliterate.plugins import Generation


def install_hint() -> str:
    return ('the mlx engine needs mlx-lm: pip install mlx-lm (on Apple silicon) or pip install "mlx[cpu]" mlx-lm '
            "(elsewhere)")


def require_mlx_lm():
    """The mlx_lm module, or a one-line UserError saying what to install."""
    try:
        import mlx.core  # noqa: F401
        import mlx_lm
    except ImportError:
        raise UserError(install_hint()) from None
    return mlx_lm


def mlx_model_folder(loaded) -> tuple[str, str | None, object]:
    """(what mlx-lm loads, its revision, a TemporaryDirectory to keep alive or None): the `LoadedModel`'s Hugging
    Face folder or hub id as is; a model loaded from a .gguf file written out as a Hugging Face folder first."""
    source = loaded.source
    if source.gguf_file is None:
        return source.path, source.revision, None
    import tempfile

    from abliterate.core.save import save_hf

    folder = tempfile.TemporaryDirectory(prefix="abliterate-mlx-")
    save_hf(loaded.model, loaded.tokenizer, os.path.join(folder.name, "model"))
    return os.path.join(folder.name, "model"), None, folder


# --- torch <-> mlx ---------------------------------------------------------------------------------------------------


def to_torch(array) -> torch.Tensor:
    """An mlx array as a float32 torch tensor on the CPU (exact: every mlx float dtype fits in float32)."""
    import mlx.core as mx

    return torch.from_numpy(np.array(array.astype(mx.float32), copy=True))


def to_mlx(tensor: torch.Tensor, dtype):
    """A torch tensor as an mlx array of `dtype` (through float32: exact for values that came from `dtype`)."""
    import mlx.core as mx

    return mx.array(tensor.detach().float().cpu().numpy()).astype(dtype)


def mlx_dtype(torch_dtype: torch.dtype):
    import mlx.core as mx

    return {torch.float32: mx.float32, torch.float16: mx.float16, torch.bfloat16: mx.bfloat16}[torch_dtype]


def is_quantized(module) -> bool:
    import mlx.nn as nn

    return isinstance(module, nn.QuantizedLinear)


def output_corrected(module, corrections: list[tuple]):
    """`module` wrapped so that its output x becomes x − w·u(uᵀx) for each (u as an mlx array, w), in order."""
    import mlx.nn as nn

    class OutputCorrected(nn.Module):
        """A quantised residual writer with the rank-1 corrections on its output (see the module docstring)."""

        def __init__(self):
            super().__init__()
            self.inner = module

        def __call__(self, x):
            out = self.inner(x)
            for u, strength in corrections:
                out = out - strength * (out @ u)[..., None] * u  # out − w·u(uᵀout)
            return out

    return OutputCorrected()


class MlxEngine:
    """The `abliterate.plugins.Engine` over mlx-lm: generation and log-probs by mlx (the ablation written into its
    weights, or as output corrections on quantised layers; see the module docstring). The `LoadedModel` is kept:
    its adapter plans the edits and its tokenizer encodes prompts and decodes answers.

    Open with `MlxEngine.open(loaded_or_reference, dtype="auto", mlx_model=None)`; `close()` (or a `with` block)
    removes a temporary copy."""

    name = "mlx"

    def __init__(self, loaded, model, folder=None):
        self.loaded, self.model, self.tokenizer = loaded, model, loaded.tokenizer
        self._folder = folder  # a temporary Hugging Face copy mlx-lm read, removed on close
        self._modules: dict[str, tuple] = {}  # Hugging Face writer name → (mlx parent module, attribute name)
        self.last_update_seconds = 0.0

    @property
    def hf_model(self):
        return self.loaded.model

    @classmethod
    def from_loaded(cls, loaded) -> "MlxEngine":
        return cls.open(loaded)

    @staticmethod
    def require() -> None:
        """Fail in one line, before anything is loaded, when mlx-lm is not installed."""
        require_mlx_lm()

    @classmethod
    def open(cls, model, dtype: str = "auto", mlx_model: str | None = None) -> "MlxEngine":
        """`model`: a `LoadedModel` or a reference for `load_model` (`tiny`, a folder, a hub id, a .gguf file).
        `mlx_model`: an mlx-lm folder or hub id to run instead of the `LoadedModel`'s own weights (a quantised copy
        of the same model: same layers, same tokenizer); kept in its own dtypes."""
        mlx_lm = require_mlx_lm()
        from abliterate.core.load import load_model

        loaded = load_model(model, dtype) if isinstance(model, str) else model
        path, revision, folder = (mlx_model, None, None) if mlx_model else mlx_model_folder(loaded)
        mlx_module, _ = mlx_lm.load(path, revision=revision)
        if mlx_model is None:
            mlx_module.set_dtype(mlx_dtype(loaded.dtype))  # the dtype the LoadedModel computes in
        return cls(loaded, mlx_module, folder)

    def close(self) -> None:
        """Remove the temporary Hugging Face copy, if any (idempotent)."""
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- the ablation ------------------------------------------------------------------------------------------------

    def _writer_modules(self, edits: list) -> dict[str, tuple]:
        """(parent module, attribute) in mlx-lm's model for every writer the edits touch; a UserError for writers it
        has no linear of its own for (fused 3-D expert weights: not supported by this engine)."""
        wanted = {writer.name for edit in edits for writer in edit.component.writers} - set(self._modules)
        if wanted:
            modules = dict(self.model.named_modules())
            for name in sorted(wanted):
                matches = [full for full in modules if (full == name or full.endswith("." + name))
                           and "vision" not in full and "visual" not in full]
                if len(matches) != 1 or not hasattr(modules[matches[0]], "weight"):
                    raise UserError(f"the mlx engine cannot edit {name} of this model (only plain or quantised "
                                    "linear writers); use --engine transformers")
                parent, _, attribute = matches[0].rpartition(".")
                self._modules[name] = (modules[parent], attribute)
        return self._modules

    @contextmanager
    def ablated(self, edits: list, norm_preserving: bool = False):
        """The edits applied to mlx-lm's model for the `with` block (W' written, or output corrections on quantised
        layers); on exit the original arrays and modules go back, exactly."""
        import time

        import mlx.core as mx

        start = time.perf_counter()
        modules = self._writer_modules(edits)
        originals: dict[str, tuple] = {}  # writer → (parent, attribute, original module, its weight, its bias)
        corrections: dict[str, list] = {}  # quantised writer → [(u, w)]
        try:
            for edit in edits:
                for writer in edit.component.writers:
                    parent, attribute = modules[writer.name]
                    module = parent[attribute]
                    if writer.name not in originals:
                        originals[writer.name] = (parent, attribute, module, module.get("weight"), module.get("bias"))
                    if is_quantized(module):
                        if norm_preserving:
                            raise UserError("the mlx engine cannot apply norm-preserving edits to quantised layers "
                                            f"({writer.name}); use a non-quantised model")
                        u = mx.array(edit.u.float().numpy()).astype(module.scales.dtype)
                        corrections.setdefault(writer.name, []).append((u, float(edit.weight)))
                    else:
                        self._write_edited(module, edit, norm_preserving)
            for name, pairs in corrections.items():
                parent, attribute, module, _, _ = originals[name]
                parent[attribute] = output_corrected(module, pairs)
            mx.eval(self.model.parameters())
            self.last_update_seconds = time.perf_counter() - start
            yield self
        finally:
            for parent, attribute, module, weight, bias in originals.values():
                parent[attribute] = module
                if not is_quantized(module):
                    module.weight = weight
                    if bias is not None:
                        module.bias = bias

    @staticmethod
    def _write_edited(module, edit, norm_preserving: bool) -> None:
        """module.weight ← W' (and bias b' = b − w·u(uᵀb)) from its current arrays, in float32, in their dtype."""
        from abliterate.measure.ablation import edited_tensor

        weight = module.weight
        module.weight = to_mlx(edited_tensor(to_torch(weight), edit.u, edit.weight, -2, norm_preserving), weight.dtype)
        if "bias" in module:
            bias = module.bias
            module.bias = to_mlx(edited_tensor(to_torch(bias), edit.u, edit.weight, -1), bias.dtype)

    # --- generation and log-probs ----------------------------------------------------------------------------------

    def _token_ids(self, prompt: str) -> list[int]:
        """A formatted prompt as token ids from our tokenizer, as the transformers engine tokenises it."""
        return self.tokenizer(prompt, add_special_tokens=False).input_ids

    def _eos_ids(self) -> set[int]:
        """The ids that end an answer: the generation config's (may be several) and the tokenizer's."""
        ids = getattr(getattr(self.loaded.model, "generation_config", None), "eos_token_id", None)
        ids = ids if isinstance(ids, list) else [ids]
        return {i for i in ids + [self.tokenizer.eos_token_id] if i is not None}

    def _greedy(self, prompt: str, max_new_tokens: int, eos: set[int], stop) -> tuple[list[int], int]:
        """(answer token ids, EOS excluded; decode steps computed) for one prompt."""
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(self.model)
        logits = self.model(mx.array(self._token_ids(prompt))[None], cache=cache)
        tokens: list[int] = []
        for step in range(max_new_tokens):
            token = int(mx.argmax(logits[0, -1]).item())
            if token in eos:
                return tokens, step + 1
            tokens.append(token)
            if stop is not None and stop(self.tokenizer.decode(tokens, skip_special_tokens=True)):
                return tokens, step + 1
            if step < max_new_tokens - 1:
                logits = self.model(mx.array([[token]]), cache=cache)
        return tokens, max_new_tokens

    def generate(self, prompts: list[str], max_new_tokens: int = 32, batch_size: int = 16, stop=None,
                 **speed) -> Generation:
        """Greedy answers, one prompt at a time; `stop(text)` ends an answer at the first prefix it accepts.
        `batch_size` and the transformers engine's `speed` hints are not used."""
        eos = self._eos_ids()
        answers = [self._greedy(prompt, max_new_tokens, eos, stop) for prompt in prompts]
        tokens = [answer for answer, _ in answers]
        return Generation([self.tokenizer.decode(answer, skip_special_tokens=True) for answer in tokens], tokens,
                          sum(steps for _, steps in answers), len(prompts) * max_new_tokens)

    def stream(self, prompt: str, max_new_tokens: int = 512, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, cancel=None, stats: dict | None = None):
        """One answer through mlx-lm's `stream_generate` (its streaming detokenizer), stopping at this model's EOS ids."""
        import mlx.core as mx
        from mlx_lm import stream_generate
        from mlx_lm.sample_utils import make_sampler
        from mlx_lm.tokenizer_utils import TokenizerWrapper

        ids = self._token_ids(prompt)
        stats = {} if stats is None else stats
        stats.update(prompt_tokens=len(ids), completion_tokens=0)
        if seed is not None:
            mx.random.seed(seed)
        tokenizer = TokenizerWrapper(self.tokenizer, eos_token_ids=self._eos_ids())
        for response in stream_generate(self.model, tokenizer, ids, max_tokens=max_new_tokens,
                                        sampler=make_sampler(temp=temperature, top_p=top_p)):
            if cancel is not None and cancel.is_set():
                return
            stats["completion_tokens"] = response.generation_tokens
            if response.text:
                yield response.text

    def _last_logprobs(self, ids: list[int], positions: int) -> torch.Tensor:
        """[positions, vocab] float32 log-probs at the last `positions` positions of one forward pass over `ids`."""
        import mlx.core as mx

        logits = self.model(mx.array(ids)[None])[0, -positions:].astype(mx.float32)
        return to_torch(logits - mx.logsumexp(logits, axis=-1, keepdims=True))  # log-softmax

    def first_token_logprobs(self, prompts: list[str], batch_size: int = 16, **speed) -> torch.Tensor:
        """[N, vocab] float32 log-probs of the first response token, computed by mlx, one prompt per pass."""
        return torch.stack([self._last_logprobs(self._token_ids(prompt), 1)[0] for prompt in prompts])

    def teacher_forced_logprobs(self, prompts: list[str], continuations: list[list[int]],
                                batch_size: int = 16) -> torch.Tensor:
        """[N, T, vocab] log-probs at each position of each prompt's continuation, teacher-forced by mlx, one prompt
        per pass; T = the longest continuation, a shorter one padded after its end with pad tokens (those positions
        are noise for the caller to mask, as with the transformers engine)."""
        length = max(len(c) for c in continuations)
        pad = self.tokenizer.pad_token_id
        return torch.stack([self._last_logprobs(self._token_ids(prompt) + c[:-1] + [pad] * (length - len(c)), length)
                            for prompt, c in zip(prompts, continuations)])

    def choose_batch_size(self, prompts: list[str], max_batch_size: int = 64, new_tokens: int = 32) -> int:
        """Prompts run one at a time: any batch size gives the same work (the largest allowed is returned)."""
        return max(1, min(max_batch_size, len(prompts)))
