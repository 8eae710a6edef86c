"""Big models on this machine: a search's memory and time on a synthetic 3B, and the shard-wise bake of an 8B.

1. Builds (or reuses) a random-weight Llama-3.1-8B (the published config, bf16, ~5 GB shards: 16 GB; bench/synthetic.py)
   and bakes a one-direction ablation into it shard by shard in a child process: wall time and the child's peak RSS
   (its VmHWM: its own address space alone, whatever ran before). Target: peak RSS <= 3 GB.
2. On a smaller model — Qwen2.5-3B's widths and vocabulary with --identity-layers layers (0: all 36), in ~0.5 GB shards —
   bakes the same way shard-wise and in memory (`load_model` + `bake` + `save_hf`), each in a child, and compares every
   stored tensor byte for byte.

3. On a random-weight Qwen2.5-3B (all 36 layers, bf16): `abliterate run --trials 2` in a child (few prompts, 16
   new tokens, batch 8): its peak RSS against the weights' bytes (target <= 1.3x), and the mean time of a trial
   (KL pass + refusal generation, from the run's journal) against its floor: the same prompts through the bare
   transformers model, one first-token forward over the harmless ones and a full-length greedy `generate` over the
   harmful ones a trial answers (those the base model refuses, from run.json), in another child (target <= 1.5x; a
   trial may end answers early, the floor never does).

Records through the harness (bench/results/scale.json, or scale-norm-preserving.json). Models live under --work
(default ~/.cache/abliterate-bench/synth); the baked outputs are deleted, the synthetic bases kept for reruns (--clean
deletes them too).

    python bench/scale.py [--work DIR] [--identity-layers 4] [--norm-preserving] [--skip-8b] [--skip-run] [--clean]
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import harness  # noqa: E402


def measured(command: list[str], env: dict | None = None) -> dict:
    """Run `command` as a child: wall seconds, its peak RSS (GB), exit status. The one place that times things.

    Peak RSS is the child's VmHWM (/proc/PID/status, the high-water mark of its own address space since exec), read
    every 50 ms until it exits: monotonic, so the last reading is the peak. Not getrusage/wait4's ru_maxrss: on Linux
    that also counts the parent's RSS at fork, which exec carries over."""
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)
    status_file, peak_kb = Path(f"/proc/{child.pid}/status"), 0
    while True:
        pid, status, _ = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        try:
            line = next(x for x in status_file.read_text().splitlines() if x.startswith("VmHWM:"))
            peak_kb = max(peak_kb, int(line.split()[1]))
        except (OSError, StopIteration):  # exiting: the mapping is already gone
            pass
        time.sleep(0.05)
    child.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": round(time.perf_counter() - start, 1), "peak_rss_gb": round(peak_kb * 1024 / 1e9, 3),
            "exit": child.returncode}


def synthetic_model(config_name: str, folder: Path, layers: int | None, shard_gb: float) -> Path:
    """Build once; a folder with a complete index (or single file) and config is reused."""
    import synthetic

    if (folder / "config.json").exists():
        return folder
    print(f"building {folder} ...", file=sys.stderr)
    config = synthetic.load_config(synthetic.CONFIGS / f"{config_name}.json", layers=layers)
    return synthetic.build(config, folder, shard_gb=shard_gb)


def directions_for(model: Path, path: Path):
    import torch

    from abliterate.measure.directions import Directions

    config = json.loads((model / "config.json").read_text())
    generator = torch.Generator().manual_seed(0)
    unit = torch.randn(config["num_hidden_layers"], config["hidden_size"], generator=generator)
    Directions(torch.nn.functional.normalize(unit, dim=-1), metadata={"model": str(model)}).save(path)
    return path, config["num_hidden_layers"]


def bake_in_child(how: str, model: Path, directions: Path, out: Path, layer: float, norm_preserving: bool) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, __file__, "child", how, str(model), str(directions), str(out), str(layer)]
    return measured(command + (["--norm-preserving"] if norm_preserving else []))


def child(how: str, model: str, directions: str, out: str, layer: str, norm_preserving: bool) -> None:
    """What the measured child does: one bake, shard-wise or loaded in memory."""
    from abliterate.measure.ablation import AblationParams, bake, plan_edits
    from abliterate.measure.directions import Directions

    params = AblationParams.single_direction(float(layer), 1.0, norm_preserving=norm_preserving)
    refusal = Directions.load(directions)
    if how == "shard-wise":
        from abliterate.ship.shard_bake import shard_bake

        def step(s):
            print(s.describe(), file=sys.stderr, flush=True)
            return contextlib.nullcontext()

        shard_bake(model, refusal, params, out, on_shard=step)
    else:
        from abliterate.core.load import load_model
        from abliterate.core.save import save_hf

        loaded = load_model(model, dtype="checkpoint")
        bake(plan_edits(loaded.adapter, refusal.fitted_to(loaded.adapter).directions, params), norm_preserving)
        save_hf(loaded.model, loaded.tokenizer, out)


RUN_TOKENS, RUN_BATCH, RUN_PROMPTS = 16, 8, 8  # new tokens per answer, batch size, tune (and eval) prompts per set


def search_in_child(model: Path, out: Path, trials: int) -> dict:
    """`abliterate run` on the synthetic model, measured: peak RSS, wall, and the mean seconds of a trial's passes."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "ABLITERATE_DIRECTION_PROMPTS": "16", "ABLITERATE_BATCH_SIZE": str(RUN_BATCH)}
    command = [sys.executable, "-m", "abliterate.cli", "run", str(model), "--trials", str(trials), "--startup-trials",
               str(trials), "--tune-prompts", str(RUN_PROMPTS), "--eval-prompts", str(RUN_PROMPTS), "--dtype", "bfloat16",
               "--max-new-tokens", str(RUN_TOKENS), "-o", str(out)]
    result = measured(command, env)
    import optuna

    from abliterate.core.rundir import STUDY_FILE, STUDY_NAME

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / STUDY_FILE)))
    trials_done = [t for t in optuna.load_study(study_name=STUDY_NAME, storage=storage).trials
                   if "generation_seconds" in t.user_attrs]  # complete trials, not cut short before generating
    seconds = [t.user_attrs["kl_seconds"] + t.user_attrs["generation_seconds"] for t in trials_done]
    answered = json.loads((out / "run.json").read_text())["base_tune_refused"]
    return {**result, "trials": len(trials_done), "trial_s": round(sum(seconds) / max(len(seconds), 1), 2),
            "answered": answered}


def floor_child(model: str, answered: str) -> None:
    """What the floor child does: a trial's passes through the bare transformers model; prints seconds as JSON."""
    import torch

    from abliterate.core.load import load_model
    from abliterate.core.prompts import format_prompts, load_prompts

    loaded = load_model(model, "bfloat16")
    tokenizer, hf = loaded.tokenizer, loaded.model
    tokenizer.padding_side = "left"
    harmful, harmless = (format_prompts(tokenizer, load_prompts(name, split="tune")[:RUN_PROMPTS])
                         for name in ("harmful", "harmless"))
    harmful = [harmful[i] for i in json.loads(answered)]  # what a trial answers

    def batches(prompts):
        for at in range(0, len(prompts), RUN_BATCH):
            yield tokenizer(prompts[at:at + RUN_BATCH], return_tensors="pt", padding=True, add_special_tokens=False)

    with torch.inference_mode():
        for batch in batches(harmless[:RUN_BATCH]):  # warm-up: first calls pay for kernel selection
            hf(**batch)
        started = time.perf_counter()
        for batch in batches(harmless):
            hf(**batch)
        for batch in batches(harmful):
            hf.generate(**batch, max_new_tokens=RUN_TOKENS, min_new_tokens=RUN_TOKENS, do_sample=False,
                        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        print(json.dumps({"floor_s": round(time.perf_counter() - started, 2)}), flush=True)


def search_at_scale(work: Path, trials: int) -> dict:
    model = synthetic_model("qwen2.5-3b-instruct", work / "qwen2.5-3b-36l", None, 0.5)
    weights = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    run = search_in_child(model, work / "qwen2.5-3b-run", trials)
    shutil.rmtree(work / "qwen2.5-3b-run", ignore_errors=True)
    floor = subprocess.run([sys.executable, __file__, "floor", str(model), json.dumps(run.pop("answered"))],
                           capture_output=True, text=True, check=True)
    floor_s = json.loads(floor.stdout.strip().splitlines()[-1])["floor_s"]
    return {**run, "weights_gb": round(weights / 1e9, 2), "rss_over_weights": round(run["peak_rss_gb"] * 1e9 / weights, 2),
            "floor_s": floor_s, "trial_over_floor": round(run["trial_s"] / floor_s, 2),
            "targets": {"rss_over_weights": 1.3, "trial_over_floor": 1.5}}


def compare(base: Path, shard_wise: Path, in_memory: Path) -> dict:
    """Every tensor of both outputs byte for byte, one tensor at a time; how many the edit changed."""
    from safetensors import safe_open

    def locations(folder: Path) -> dict[str, Path]:
        return {name: shard for shard in sorted(folder.glob("*.safetensors")) for name in safe_open(shard, "pt").keys()}

    ours, theirs, original = locations(shard_wise), locations(in_memory), locations(base)
    differing, edited = [], 0
    for name, shard in ours.items():
        with safe_open(shard, "pt") as a, safe_open(theirs[name], "pt") as b, safe_open(original[name], "pt") as c:
            mine = a.get_tensor(name)
            if not _bytes_equal(mine, b.get_tensor(name)):
                differing.append(name)
            edited += not _bytes_equal(mine, c.get_tensor(name))
    return {"tensors": len(ours), "same_names": ours.keys() == theirs.keys(), "differing": differing,
            "bit_identical": not differing and ours.keys() == theirs.keys(), "edited_tensors": edited}


def _bytes_equal(a, b) -> bool:
    import torch

    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                                              b.contiguous().reshape(-1).view(torch.uint8))


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "abliterate-bench" / "synth")
    parser.add_argument("--identity-layers", type=int, default=4, help="layers of the Qwen2.5-3B-wide model; 0: all 36")
    parser.add_argument("--norm-preserving", action="store_true")
    parser.add_argument("--skip-8b", action="store_true")
    parser.add_argument("--skip-run", action="store_true", help="skip the search on the 3B")
    parser.add_argument("--trials", type=int, default=2, help="trials of the search on the 3B")
    parser.add_argument("--clean", action="store_true", help="delete the synthetic bases afterwards")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result = {"norm_preserving": args.norm_preserving}

    if not args.skip_8b:
        big = synthetic_model("llama-3.1-8b-instruct", work / "llama-3.1-8b", None, 5.0)
        directions, layers = directions_for(big, work / "llama-3.1-8b.directions.safetensors")
        run = bake_in_child("shard-wise", big, directions, work / "llama-3.1-8b-baked", 0.65 * (layers - 1),
                            args.norm_preserving)
        size = sum(p.stat().st_size for p in big.glob("*.safetensors"))
        result["llama-3.1-8b shard-wise"] = {**run, "model_gb": round(size / 1e9, 2),
                                             "shards": len(list(big.glob("*.safetensors"))),
                                             "target_peak_rss_gb": 3.0, "within_target": run["peak_rss_gb"] <= 3.0}
        shutil.rmtree(work / "llama-3.1-8b-baked", ignore_errors=True)

    name = f"qwen2.5-3b-{args.identity_layers or 36}l"
    small = synthetic_model("qwen2.5-3b-instruct", work / name, args.identity_layers or None, 0.5)
    directions, layers = directions_for(small, work / f"{name}.directions.safetensors")
    runs = {how: bake_in_child(how, small, directions, work / f"{name}-{how}", 0.65 * (layers - 1), args.norm_preserving)
            for how in ("shard-wise", "in-memory")}
    result[f"{name} identity"] = {**{f"{how} {k}": v for how, run in runs.items() for k, v in run.items()},
                                  **compare(small, work / f"{name}-shard-wise", work / f"{name}-in-memory")}
    for how in runs:
        shutil.rmtree(work / f"{name}-{how}", ignore_errors=True)
    if args.clean:
        for path in (work / "llama-3.1-8b", work / name):
            shutil.rmtree(path, ignore_errors=True)

    if not args.skip_run:
        result["qwen2.5-3b run"] = search_at_scale(work, args.trials)

    big_run = result.get("llama-3.1-8b shard-wise", {})
    identity = result[f"{name} identity"]
    headline = (f"8B shard-wise bake peak RSS {big_run.get('peak_rss_gb', '-')} GB (target 3); "
                f"{name}: bit-identical {identity.get('bit_identical')}")
    if "qwen2.5-3b run" in result:
        search = result["qwen2.5-3b run"]
        headline += (f"; 3B run peak RSS {search['rss_over_weights']}x weights (target 1.3), trial "
                     f"{search['trial_over_floor']}x its floor (target 1.5)")
    harness.record("scale-norm-preserving" if args.norm_preserving else "scale", result, title="shard-wise bake at scale",
                   headline=headline, path=args.json)

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "floor":
        floor_child(sys.argv[2], sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "child":
        child(*sys.argv[2:7], norm_preserving="--norm-preserving" in sys.argv)
    else:
        main()
