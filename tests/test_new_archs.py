"""The architectures of issue 17, each against transformers' own implementation: greedy output token for
token on tiny checkpoints (cpu-only.yaml, float32), the shipped GPU rules on the real-size config, and
batched requests through the server equal to each alone."""

from __future__ import annotations

import json
import threading

import openai
import pytest
from test_server import MODEL, serving

from hetero_moe.cli import main
from hetero_moe.engine.scheduler import SchedulerConfig
from hetero_moe.llm import LLM
from hetero_moe.synth import tiny as synth

PROMPT = [0, 5, 17, 42, 99, 7, 3, 100, 200, 11, 64]

# Kimi-K2's departures from DeepSeek-V3 at tiny size: one expert group, one dense layer, more experts per
# token, its routed scaling, YaRN with beta 1/1 and factor 32 over rope_theta 50000, no MTP layer, and
# the release's own model_type in config.json.
KIMI_K2 = {
    "n_routed_experts": 12,
    "num_experts_per_tok": 4,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "routed_scaling_factor": 2.827,
    "num_nextn_predict_layers": 0,
    "max_position_embeddings": 32 * 64,
    "rope_parameters": {
        "rope_type": "yarn",
        "factor": 32.0,
        "original_max_position_embeddings": 64,
        "beta_fast": 1.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "rope_theta": 50000.0,
    },
}


def assert_batched_equals_alone(llm: LLM, name: str = "") -> None:
    """Four concurrent clients through the server, with 4-token pages and 7-token prefill chunks (prompts
    prefilled in pieces beside other requests' decode steps): each gets the 12 greedy tokens it gets alone."""
    llm.eos_ids = llm.engine.eos_ids = frozenset()  # every request runs to max_tokens
    prompts = [f"client {i} says {'hello ' * (2 * i)}" for i in range(4)]
    alone = [llm.generate(p, max_tokens=12, temperature=0).text for p in prompts]
    batching = SchedulerConfig(max_batch=4, kv_cache_tokens=512, prefill_chunk=7, page_tokens=4)
    with serving(llm, batching=batching) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        results: dict[int, str] = {}

        def one(i: int) -> None:
            r = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=12, temperature=0)
            results[i] = r.choices[0].text

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=120)
    assert [results.get(i) for i in range(len(prompts))] == alone, name


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    """A tiny Kimi-K2: FP8 with ragged 32x32 blocks, three shards, model_type kimi_k2."""
    model = synth.random_model(synth.tiny_config("DeepseekV3ForCausalLM", **KIMI_K2), seed=1)
    out = tmp_path_factory.mktemp("kimi-k2")
    written = synth.write_checkpoint(model, out, shards=3, fp8=True, block_size=(32, 32), model_type="kimi_k2")
    model.load_state_dict(written.state_dict)
    return written.path, model


def real_config_report(capsys, model: str, rules: str) -> dict:
    """`rules check --json` on a built-in real-size config: its report, with no warning."""
    assert main(["rules", "check", "--model", model, "--rules", rules, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["warnings"] == []
    return report


def int4_expert_bytes(hidden: int, inter: int) -> int:
    """One routed expert in INT4, group 64, bf16 scales: gate and up [inter, hidden], down [hidden, inter]."""
    return 2 * inter * (hidden // 2 + 2 * hidden // 64) + hidden * (inter // 2 + 2 * inter // 64)


def test_kimi_k2_greedy_matches_transformers(kimi, hf_greedy) -> None:
    path, reference = kimi
    assert json.loads((path / "config.json").read_text())["model_type"] == "kimi_k2"
    llm = LLM(path, rules="cpu-only.yaml", dtype="float32")
    ours = llm.generate(PROMPT, max_tokens=40, temperature=0, ignore_eos=True).token_ids
    assert ours == hf_greedy(reference, PROMPT, 40)
    assert len(set(ours)) > 10


def test_kimi_k2_real_config_on_the_deepseek_v3_rules(capsys) -> None:
    report = real_config_report(capsys, "kimi-k2", "deepseek-v3.yaml")
    assert report["model"] == "DeepseekV3ForCausalLM"
    # 60 MoE layers (one dense layer first) of 384 INT4 experts in DRAM: 554 GB
    assert report["devices"]["cpu"] == 60 * 384 * int4_expert_bytes(7168, 2048)
    # FP8 attention, shared experts and dense layer, bf16 embeddings, lm_head and kv_b_proj
    assert 12e9 < report["devices"]["cuda:0"] < 16e9
    assert main(["plan", "--model", "kimi-k2", "--gpu-memory", "24", "--cpu-memory", "640", "--gpu-fp8"]) == 0
    assert "cpu_experts" in capsys.readouterr().out


# --- DeepSeek-V3.2: the lightning indexer inside the latent attention op --------------------------------


@pytest.mark.parametrize("prompt", [PROMPT, PROMPT[:3]], ids=["longer-than-topk", "shorter-then-longer"])
def test_deepseek_v32_greedy_matches_transformers(tiny, hf_greedy, prompt: list[int]) -> None:
    """index_topk 8: the 11-token prompt's later queries and every decode step keep 8 of their tokens; the
    3-token prompt decodes through contexts below index_topk (all kept) into longer ones."""
    t = tiny("DeepseekV32ForCausalLM", fp8=True, shards=3, block_size=(32, 32))
    assert t.reference.config.index_topk == 8
    llm = LLM(t.path, rules="cpu-only.yaml", dtype="float32")
    ours = llm.generate(prompt, max_tokens=40, temperature=0, ignore_eos=True).token_ids
    assert ours == hf_greedy(t.reference, prompt, 40)
    assert len(set(ours)) > 10


@pytest.mark.parametrize("absorb", [False, True], ids=["expanded", "absorbed"])
def test_deepseek_v32_logits_per_position_match_transformers(tiny, tmp_path, monkeypatch, absorb: bool) -> None:
    """Prefill, a chunk over cached tokens, then one token at a time: each position's logits equal those of
    transformers' forward over the whole sequence (its indexer masks every query alike)."""
    from importlib import resources

    import torch

    from hetero_moe.bench.teacher import TeacherForced
    from hetero_moe.ops.attention import LightningIndexer

    rules = tmp_path / "rules.yaml"
    text = (resources.files("hetero_moe.rules") / "cpu-only.yaml").read_text()
    if absorb:
        text = text.replace("replace: {op: attention}", "replace: {op: attention, kwargs: {absorb: true}}")
    rules.write_text(text)
    t = tiny("DeepseekV32ForCausalLM")
    llm = LLM(t.path, rules=str(rules), dtype="float32")
    ids = PROMPT + list(range(120, 150))
    with torch.no_grad():
        ref = t.reference(torch.tensor([ids])).logits[0]
    dropped = []  # per call of the indexer: earlier tokens some query does not attend to
    select = LightningIndexer.select

    def spy(self, q, keys, weights, start):
        keep = select(self, q, keys, weights, start)
        dropped.append(0 if keep is None else int(keep.shape[0] * keep.shape[1] - keep.sum()))
        return keep

    monkeypatch.setattr(LightningIndexer, "select", spy)
    cache = TeacherForced(llm.runner, len(ids))
    chunks = [ids[:6], ids[6:14], *[[tok] for tok in ids[14:]]]  # below index_topk, across it, then decode
    end = 0
    for chunk in chunks:
        end += len(chunk)
        torch.testing.assert_close(cache.feed(chunk), ref[end - 1], rtol=1e-4, atol=1e-4)
    layers = t.reference.config.num_hidden_layers
    assert dropped[:layers] == [0] * layers and all(d > 0 for d in dropped[layers:])


def test_deepseek_v32_cache_holds_the_indexer_keys(tiny) -> None:
    from hetero_moe.ops.attention import DSACache

    llm = LLM(tiny("DeepseekV32ForCausalLM").path, dtype="float32")
    attn = llm.placed.model.model.layers[0].self_attn
    cache = attn.new_cache(32, llm.placed.dtype)
    assert isinstance(cache, DSACache) and tuple(cache.index_k.shape) == (32, 20)
    assert attn.cache_bytes(32, llm.placed.dtype) == 32 * (24 + 8 + 20) * 4  # latent, rope key, indexer key


def test_deepseek_v32_real_config(capsys) -> None:
    report = real_config_report(capsys, "deepseek-v32", "deepseek-v32.yaml")
    assert report["model"] == "DeepseekV32ForCausalLM"
    assert report["devices"]["cpu"] == 58 * 256 * int4_expert_bytes(7168, 2048)
    assert 19e9 < report["devices"]["cuda:0"] < 23e9
    indexers = [m for m in report["modules"] if m["name"].endswith("self_attn.indexer.wq_b")]
    assert len(indexers) == 61 and all(m["op"] == "linear" for m in indexers)
    assert main(["rules", "check", "--model", "deepseek-v32", "--rules", "deepseek-v32.yaml", "--json",
                 "--max-context", "8192"]) == 0  # fmt: skip
    cache = json.loads(capsys.readouterr().out)["kv_cache"]
    assert cache == {"cuda:0": 61 * 8192 * (512 + 64 + 128) * 2}


# --- GLM-4.5 and MiniMax-M2 -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["Glm4MoeForCausalLM", "MiniMaxM2ForCausalLM"])
def test_glm_and_minimax_greedy_match_transformers(tiny, hf_greedy, arch: str) -> None:
    t = tiny(arch, fp8=True, shards=3, block_size=(32, 32))
    llm = LLM(t.path, rules="cpu-only.yaml", dtype="float32")
    ours = llm.generate(PROMPT, max_tokens=40, temperature=0, ignore_eos=True).token_ids
    assert ours == hf_greedy(t.reference, PROMPT, 40)
    assert len(set(ours)) > 10


def test_minimax_m2_checkpoint_keeps_the_release_names(tiny) -> None:
    from safetensors import safe_open

    t = tiny("MiniMaxM2ForCausalLM", fp8=True, shards=3, block_size=(32, 32))
    keys = set()
    for file in t.path.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            keys.update(f.keys())
    assert "model.layers.1.block_sparse_moe.e_score_correction_bias" in keys
    assert "model.layers.1.block_sparse_moe.experts.7.w2.weight" in keys
    assert not [k for k in keys if ".mlp." in k]


@pytest.mark.parametrize(
    ("model", "rules", "moe_layers", "experts", "hidden", "inter", "gpu"),
    [
        ("glm-4.5", "glm-4.5.yaml", 89, 160, 5120, 1536, (15e9, 20e9)),
        ("minimax-m2", "minimax-m2.yaml", 62, 256, 3072, 1536, (6e9, 10e9)),
    ],
)
def test_glm_and_minimax_real_configs(capsys, model, rules, moe_layers, experts, hidden, inter, gpu) -> None:
    report = real_config_report(capsys, model, rules)
    assert report["devices"]["cpu"] == moe_layers * experts * int4_expert_bytes(hidden, inter)
    assert gpu[0] < report["devices"]["cuda:0"] < gpu[1]


# --- batched = alone through the server -----------------------------------------------------------------


def test_batched_equals_alone_through_the_server(tiny, kimi) -> None:
    """Four concurrent clients per architecture, through 4-token pages and 7-token prefill chunks: each gets
    what it gets alone."""
    paths = {
        "kimi-k2": kimi[0],
        **{a: tiny(a).path for a in ("DeepseekV32ForCausalLM", "Glm4MoeForCausalLM", "MiniMaxM2ForCausalLM")},
    }
    for name, path in paths.items():
        assert_batched_equals_alone(LLM(path, dtype="float32"), name)


@pytest.mark.parametrize("model", ["deepseek-v32", "glm-4.5", "minimax-m2"])
def test_plan_writes_rules_for_the_real_configs(capsys, tmp_path, model: str) -> None:
    out = tmp_path / "plan.yaml"
    argv = ["plan", "--model", model, "--gpu-memory", "48", "--cpu-memory", "400", "--gpu-fp8", "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    report = real_config_report(capsys, model, str(out))
    assert [m["op"] for m in report["modules"] if m["name"].endswith(".mlp.experts")].count("cpu_experts") > 50
