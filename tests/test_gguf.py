"""GGUF files: tiny ones written with the `gguf` package the way llama.cpp lays them out (its tensor names,
split MLA, stacked experts, permuted llama queries, every supported tensor type, split sets) load, match
`gguf.quants` bit for bit, generate what the same weights do from safetensors, and fail clearly when
corrupt."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import struct
from pathlib import Path

import gguf
import httpx
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from hetero_moe.kernels.ggml_blocks import LANE_REPACK, REPACK
from hetero_moe.kernels.numba import int8dot
from hetero_moe.kernels.numba.int8dot import from_lanes
from hetero_moe.kernels.numba.simd import LANES

from hetero_moe import settings
from hetero_moe.arch import ModelError
from hetero_moe.cli import main
from hetero_moe.llm import LLM, place
from hetero_moe.loader import converted, gguf_load
from hetero_moe.loader.gguf_file import SUPPORTED, GGUFError, GGUFFile, dequantize
from hetero_moe.loader.gguf_model import load_gguf_tokenizer
from hetero_moe.ops.cpu_experts import CPUExperts
from hetero_moe.ops.cpu_linear import BlockMatrix, CPULinear, CPUQuantKwargs, QuantMatrix
from hetero_moe.ops.embedding import BlockEmbedding
from hetero_moe.settings import RESERVES
from hetero_moe.synth import tiny as synth
from hetero_moe.synth.gguf import (
    GGUF_SIZES,
    cpu_rules,
    encode,
    from_gguf_layout,
    random_blocks,
    write_gguf,
)
from hetero_moe.tune.plan import Box
from hetero_moe.tune.plan import plan as make_plan

EXPERT_KWARGS = {
    QT.Q4_0: "quant: int4, group_size: 32, scale_dtype: fp16",
    QT.Q8_0: "quant: int8, group_size: 32, scale_dtype: fp16",
    QT.F32: "quant: bf16",
}


def experts_rules(experts: QT) -> str:
    return cpu_rules(
        f"{{op: cpu_experts, device: cpu, kwargs: {{{EXPERT_KWARGS[experts]}, torch_min_tokens: 1000000}}}}"
    )


CASES = [  # architecture, dense types, experts type, split parts
    ("DeepseekV3ForCausalLM", [QT.Q8_0, QT.Q4_K, QT.Q6_K, QT.BF16], QT.Q4_0, 0),
    ("DeepseekV2ForCausalLM", [QT.Q5_K, QT.IQ4_XS, QT.Q4_1, QT.F16], QT.Q8_0, 0),
    ("Qwen3MoeForCausalLM", [QT.Q4_0, QT.Q6_K, QT.F32], QT.F32, 20),
    ("MixtralForCausalLM", [QT.F16, QT.Q4_K, QT.Q8_0], QT.Q4_0, 0),
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """`pair(case)` -> (GGUF path, safetensors directory of the same dequantized weights, rules file)."""
    built = {}

    def make(case: tuple) -> tuple[Path, Path, Path]:
        arch, dense, experts, split = case
        if arch not in built:
            root = tmp_path_factory.mktemp(arch)
            model = synth.random_model(synth.tiny_config(arch, **GGUF_SIZES[arch]), seed=3)
            path = root / "model.gguf"
            values = write_gguf(path, model, dense, experts, split=split)
            if split:
                path = next(root.glob("model-00001-of-*.gguf"))
            state = from_gguf_layout(values, model.config, model.state_dict())
            model.load_state_dict(state)
            synth.write_checkpoint(model, root / "st", dtype=torch.float32)
            rules = root / "rules.yaml"
            rules.write_text(experts_rules(experts))
            built[arch] = (path, root / "st", rules)
        return built[arch]

    return make


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_gguf_generates_what_the_same_weights_do_from_safetensors(pair, case) -> None:
    path, st, rules = pair(case)
    prompts = [[0, 17, 42, 9, 100, 23], [0, 5]]
    with LLM(path, rules=rules, dtype="float32") as ours, LLM(st, rules=rules, dtype="float32") as ref:
        assert ours.placed.config.architectures == ref.placed.config.architectures
        got = ours.generate(prompts, max_tokens=6, temperature=0.0)
        want = ref.generate(prompts, max_tokens=6, temperature=0.0)
        assert [c.token_ids for c in got] == [c.token_ids for c in want]
        experts = [m for m in ours.placed.model.modules() if isinstance(m, CPUExperts)]
        assert {m.block_type for m in experts} == ({case[2].name} if case[2] != QT.F32 else {None})


@pytest.mark.parametrize("case", CASES[:2], ids=["V3", "V2-Lite"])
def test_config_from_metadata(pair, case) -> None:
    path, st, _ = pair(case)
    ours, ref = place(path, "cpu-only.yaml", "float32").config, place(st, "cpu-only.yaml", "float32").config
    fields = ["hidden_size", "num_hidden_layers", "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group"]
    fields += ["q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim", "routed_scaling_factor", "rms_norm_eps"]
    fields += ["norm_topk_prob", "first_k_dense_replace", "n_shared_experts", "topk_method", "max_position_embeddings"]
    assert {f: getattr(ours, f) for f in fields} == {f: getattr(ref, f) for f in fields}
    for k in ("rope_type", "factor", "original_max_position_embeddings", "mscale", "mscale_all_dim", "rope_theta"):
        assert ours.rope_parameters[k] == ref.rope_parameters[k], k


def test_tokenizer_and_chat_template_from_metadata(pair) -> None:
    path, _, _ = pair(CASES[0])
    ours = load_gguf_tokenizer(path, GGUFFile.open(path).metadata)
    ref = synth.build_tokenizer(path.parent / "check", 419, "DeepseekV3ForCausalLM")
    text = "The quick brown fox, 42 times."
    assert ours.decode(ours.encode(text), skip_special_tokens=True) == text
    assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    chat = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]
    assert ours.apply_chat_template(chat, tokenize=False) == ref.apply_chat_template(chat, tokenize=False)
    ids = ours.apply_chat_template(chat, return_dict=True)["input_ids"]
    assert ids == ref.apply_chat_template(chat, return_dict=True)["input_ids"]
    assert ids[0] == ref.bos_token_id and ours.convert_ids_to_tokens(ids[1]) == synth.USER_TOKEN


@pytest.fixture(scope="module")
def every_type(tmp_path_factory) -> tuple[Path, dict[str, tuple[QT, np.ndarray]]]:
    """One file with a tensor of each supported type, odd row counts."""
    path = tmp_path_factory.mktemp("types") / "types.gguf"
    rng = np.random.default_rng(7)
    w = gguf.GGUFWriter(path, "qwen3moe")
    raws = {}
    for qtype in SUPPORTED:
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        shape = (5, 3 * max(block, 32)) if block > 1 else (7, 45)
        raw = encode(rng.standard_normal(shape).astype(np.float32) * 0.1, qtype, rng)
        w.add_tensor(f"t.{qtype.name}", raw, raw_dtype=None if qtype in (QT.F32, QT.F16) else qtype)
        raws[f"t.{qtype.name}"] = (qtype, raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, raws


def test_every_type_dequantizes_bit_exactly_as_gguf_quants(every_type) -> None:
    path, raws = every_type
    g = GGUFFile.open(path)
    for name, (qtype, raw) in raws.items():
        t = g.tensors[name]
        assert t.type == qtype
        want = torch.from_numpy(gguf.quants.dequantize(raw, qtype).astype(np.float32))
        got = dequantize(t).float()
        assert got.shape == want.shape and torch.equal(got.view(torch.int32), want.view(torch.int32)), name
        assert torch.equal(dequantize(t, 3).float(), want[3]), name  # one row (one expert of a stack)


def mapped_from(a: np.ndarray, path: Path) -> bool:
    """Whether `a` is a view of a memory map of the file `path`."""
    while a is not None and not isinstance(a, np.memmap):
        a = a.base
    return isinstance(a, np.memmap) and Path(a.filename) == path


def assert_experts_run_the_files_values(experts: CPUExperts, g: GGUFFile, x: torch.Tensor, atol: float) -> None:
    """Layer 1's experts hold `gguf.quants`' values bit for bit, and compute their float64 products within
    the int8 activations' rounding (`atol` of the largest output)."""
    for proj, name in enumerate(("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")):
        t = g.tensors[f"blk.1.{name}.weight"]
        want = gguf.quants.dequantize(t.data[3], t.type)
        assert np.array_equal(experts.format.dequantize(3, proj).numpy().view(np.uint32), want.view(np.uint32))
    index, weights = torch.tensor([[0, 2], [1, 2], [3, 0]]), torch.full((3, 2), 0.5)
    got = experts(x, index, weights).double()
    ref = torch.zeros_like(got)
    for t in range(3):
        for j in range(2):
            e = int(index[t, j])
            w13 = [experts.format.dequantize(e, p).double() for p in (0, 1)]
            h = torch.nn.functional.silu(x[t].double() @ w13[0].T) * (x[t].double() @ w13[1].T)
            ref[t] += 0.5 * (h @ experts.format.dequantize(e, 2).double().T)
    assert torch.allclose(got, ref, rtol=0.05, atol=atol * ref.abs().max().item())


def test_q4_0_and_q8_0_experts_run_in_lanes_or_in_place(pair, monkeypatch, tmp_path) -> None:
    """Where they fit in memory, Q4_0 and Q8_0 experts are repacked into rows across lanes and cached (the first
    load runs from the cache it wrote, a second maps it without repacking: the same bits); where they do not fit,
    they are read in place from the file."""
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0)) * 0.5
    index, weights = torch.tensor([[0, 2], [1, 2], [3, 0]]), torch.full((3, 2), 0.5)
    for case in (CASES[0], CASES[1]):
        path, _, rules = pair(case)
        monkeypatch.setenv("HETERO_MOE_CACHE", str(tmp_path / case[0]))  # a cache no other test filled
        g = GGUFFile.open(path)
        outputs = []
        for _ in range(2):
            with LLM(path, rules=rules, dtype="float32") as llm:
                experts = llm.placed.model.model.layers[1].mlp.experts
                assert [r.fmt for r in experts.format.repacks] == [LANE_REPACK[case[2].name].fmt] * 2
                assert not experts.format.rows and experts.cache is not None
                assert_experts_run_the_files_values(experts, g, x, 0.02)
                outputs.append((experts(x, index, weights), experts.restored, experts.mapped_bytes()))
        (first, restored_first, mapped_first), (second, restored, mapped) = outputs
        assert not restored_first and restored and torch.equal(first, second)
        assert mapped_first == mapped == experts.nbytes()  # both run from the cache, mapped
        monkeypatch.setattr(gguf_load, "fits_in_memory", lambda nbytes: False)
        with LLM(path, rules=rules, dtype="float32") as llm:
            experts = llm.placed.model.model.layers[1].mlp.experts
            assert all(mapped_from(experts.format.rows[p], path) for p in (0, 1, 2))
            assert experts.cache is None and experts.mapped_bytes() == experts.nbytes()
            assert_experts_run_the_files_values(experts, g, x, 0.02)
            assert torch.allclose(experts(x, index, weights), first, rtol=1e-4, atol=1e-5 * first.abs().max().item())
        monkeypatch.setattr(gguf_load, "fits_in_memory", converted.fits_in_memory)


def test_absorbed_latent_attention_runs_the_files_k_b_and_v_b(pair, tmp_path) -> None:
    """`cpu-only-int4.yaml` absorbs W_UK and W_UV on the CPU: from a GGUF in blocks (everything dense Q4_0, as
    `v2lite-q4_0.gguf`) they are `attn_k_b`'s and `attn_v_b`'s own (`gguf.quants`' values bit for bit), not
    `kv_b_proj`'s weight quantized again, and decode runs on them; float ones are quantized as the rules say."""
    arch = "DeepseekV3ForCausalLM"
    sizes = {**GGUF_SIZES[arch], "qk_nope_head_dim": 32, "kv_lora_rank": 32}  # both fit 32-value blocks
    path = tmp_path / "q4_0.gguf"
    write_gguf(path, synth.random_model(synth.tiny_config(arch, **sizes), seed=5), [QT.Q4_0], QT.Q4_0)
    g = GGUFFile.open(path)
    with LLM(path, rules="cpu-only-int4.yaml", dtype="float32") as llm:
        attention = llm.placed.model.model.layers[1].self_attn
        assert set(attention.head_blocks) == {"uk", "uv"}
        for heads, name in ((attention._uk_heads, "attn_k_b"), (attention._uv_heads, "attn_v_b")):
            t = g.tensors[f"blk.1.{name}.weight"]
            assert t.type == QT.Q4_0
            want = gguf.quants.dequantize(t.data, t.type).astype(np.float32)
            assert np.array_equal(heads.dequantize().numpy().view(np.uint32), want.view(np.uint32)), name
        assert len(llm.generate([0, 5, 9], max_tokens=4, temperature=0, ignore_eos=True).token_ids) == 4
    path, _, _ = pair(CASES[0])  # attn_k_b and attn_v_b in F16 there
    with LLM(path, rules="cpu-only-int4.yaml", dtype="float32") as llm:
        attention = llm.placed.model.model.layers[1].self_attn
        assert attention.head_blocks == {} and isinstance(attention._uk_heads.matrices[0], QuantMatrix)


def test_rules_check_and_plan_count_the_files_block_bytes(pair, capsys) -> None:
    path, _, rules = pair(CASES[0])
    g = GGUFFile.open(path)
    placed = place(path, rules, "float32")
    expert_bytes = sum(m.nbytes() for m in placed.model.modules() if isinstance(m, CPUExperts))
    assert expert_bytes == sum(t.nbytes for n, t in g.tensors.items() if "_exps" in n)
    assert main(["rules", "check", "--model", str(path), "--rules", str(rules), "--json", "--dtype", "float32"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "DeepseekV3ForCausalLM" and report["devices"]["cpu"] == placed.bytes_per_device()["cpu"]
    assert main(["plan", "--model", str(path), "--gpu-memory", "0", "--cpu-memory", "8"]) == 0
    assert "Q4_0 (the GGUF's own blocks)" in capsys.readouterr().out


def header_entry(data: bytes, name: str) -> int:
    """Byte offset of tensor `name`'s dimension count in the header."""
    encoded = name.encode()
    return data.index(struct.pack("<Q", len(encoded)) + encoded) + 8 + len(encoded)


def test_corrupt_files_are_clear_errors(pair, tmp_path) -> None:
    path, _, _ = pair(CASES[0])
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(GGUFError, match=r"truncated: tensor .* ends at byte"):
        GGUFFile.open(cut)
    (tmp_path / "tiny.gguf").write_bytes(data[:10])
    with pytest.raises(GGUFError, match="truncated"):
        GGUFFile.open(tmp_path / "tiny.gguf")
    at = header_entry(data, "blk.0.attn_norm.weight")  # [hidden] F32, in the middle of the data
    lying = bytearray(data)
    struct.pack_into("<Q", lying, at + 4, 300)
    (tmp_path / "lying.gguf").write_bytes(lying)
    with pytest.raises(GGUFError, match="blk.0.attn_norm.weight .* runs into tensor"):
        GGUFFile.open(tmp_path / "lying.gguf")
    unknown = bytearray(data)
    struct.pack_into("<I", unknown, at + 4 + 8, 99)
    (tmp_path / "unknown.gguf").write_bytes(unknown)
    with pytest.raises(GGUFError, match="tensor blk.0.attn_norm.weight has unknown type 99"):
        GGUFFile.open(tmp_path / "unknown.gguf")


def test_unsupported_types_and_architectures_are_named(tmp_path) -> None:
    w = gguf.GGUFWriter(tmp_path / "q2k.gguf", "qwen3moe")
    w.add_tensor("token_embd.weight", random_blocks((3, 256), QT.Q2_K, np.random.default_rng(0)), raw_dtype=QT.Q2_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match=r"token_embd.weight \(Q2_K\).*supported: F32, F16, BF16"):
        GGUFFile.open(tmp_path / "q2k.gguf").check_types()
    w = gguf.GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((3, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelError, match="unsupported GGUF architecture 'gpt2'; supported: deepseek2"):
        place(tmp_path / "gpt2.gguf", "cpu-only.yaml")


def test_split_sets_need_every_part_and_the_first(pair, tmp_path) -> None:
    path, _, _ = pair(CASES[2])
    assert path.name == "model-00001-of-00002.gguf" and len(GGUFFile.open(path).parts) == 2
    for part in path.parent.glob("model-0000*.gguf"):
        shutil.copy(part, tmp_path / part.name)
    with pytest.raises(GGUFError, match="give its first part, model-00001-of-00002.gguf"):
        GGUFFile.open(tmp_path / "model-00002-of-00002.gguf")
    (tmp_path / "model-00002-of-00002.gguf").unlink()
    with pytest.raises(GGUFError, match="missing: model-00002-of-00002.gguf"):
        GGUFFile.open(tmp_path / "model-00001-of-00002.gguf")


K_SIZES = {**GGUF_SIZES["Qwen3MoeForCausalLM"], "moe_intermediate_size": 256}  # rows of whole 256-value blocks
EXPERT_TYPES = [  # (gate and up, down): every block type, and the mixes of llama.cpp's _K_M files
    (t, t) for t in (QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.IQ4_NL, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_XS)
] + [(QT.Q4_K, QT.Q6_K), (QT.Q5_K, QT.Q6_K), (QT.Q4_K, QT.Q8_0)]


@pytest.mark.parametrize(
    "types", EXPERT_TYPES, ids=["+".join(dict.fromkeys(t.name for t in ts)) for ts in EXPERT_TYPES]
)
def test_block_experts_run_the_files_own_values(types, tmp_path, caplog) -> None:
    """Experts in each block type run on the CPU kernels: the repacked values are `gguf.quants`' bit for bit,
    the layer's output is the float64 product of those values within the int8 activations' rounding, and
    the model generates."""
    model = synth.random_model(synth.tiny_config("Qwen3MoeForCausalLM", **K_SIZES), seed=1)
    write_gguf(tmp_path / "k.gguf", model, [QT.F16], (types[0], types[0], types[1]))
    rules = tmp_path / "rules.yaml"
    rules.write_text(experts_rules(QT.Q4_0))
    g = GGUFFile.open(tmp_path / "k.gguf")
    with (
        caplog.at_level(logging.INFO, "hetero_moe.loader.gguf_load"),
        LLM(tmp_path / "k.gguf", rules=rules, dtype="float32") as llm,
    ):
        experts = llm.placed.model.model.layers[1].mlp.experts
        up, down = (t.name for t in types)
        assert experts.block_type == (up if up == down else f"{up}+{down}")
        # the rules ask for INT4 experts; the file's own blocks run, and the log says so
        layers = sum(isinstance(m, CPUExperts) for m in llm.placed.model.modules())
        assert f"{layers} x routed experts in {experts.block_type}" in caplog.text
        x = torch.randn(3, experts.hidden, generator=torch.Generator().manual_seed(0))  # tolerances hold for these
        assert_experts_run_the_files_values(experts, g, x, 0.03)
        # the tokens quantized as llama.cpp does for each block type (Q8_K's blocks of 256 for the K-quants)
        blocks = [bool(k.act_fmt & int8dot.BLOCKS_256) for k in experts.format.kernels]
        assert blocks == [REPACK[t.name].activations == "q8_k" for t in types]
        assert len(llm.generate([[0, 17, 42]], max_tokens=4, temperature=0.0)[0].token_ids) == 4


def test_experts_whose_gate_and_up_differ_are_an_error(tmp_path) -> None:
    model = synth.random_model(synth.tiny_config("Qwen3MoeForCausalLM", **K_SIZES))
    write_gguf(tmp_path / "k.gguf", model, [QT.F16], (QT.Q4_K, QT.Q6_K, QT.Q6_K))
    rules = tmp_path / "rules.yaml"
    rules.write_text(experts_rules(QT.Q4_0))
    with pytest.raises(GGUFError, match=r"gate and up must share a block type"):
        place(tmp_path / "k.gguf", rules)
    assert place(tmp_path / "k.gguf", "cpu-only.yaml", "float32") is not None  # torch experts: dequantized


def test_generate_command_takes_a_gguf_file(pair, capsys) -> None:
    path, _, rules = pair(CASES[1])
    argv = ["generate", "--model", str(path), "--rules", str(rules), "--dtype", "float32", "--prompt", "Hello"]
    assert main([*argv, "--max-tokens", "3", "--temperature", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt_token_ids"][0] == 0 and len(out["token_ids"]) == 3


def test_serve_a_gguf_file(pair) -> None:
    from test_server import MODEL, serving

    path, _, rules = pair(CASES[0])
    with LLM(path, rules=rules, dtype="float32") as llm, serving(llm) as url:
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        reply = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1
        (entry,) = httpx.get(f"{url}/api/tags", timeout=60).json()["models"]
        assert entry["name"] == MODEL and entry["size"] > 0


@pytest.mark.parametrize("name", list(REPACK))
def test_every_block_type_repacks_to_gguf_quants_values(name) -> None:
    """Rows with a ragged last kernel span (1408 inputs; 768 for the 256-value types) and whole ones; Q4_0
    and Q8_0 are read in place."""
    r, rng = REPACK[name], np.random.default_rng(len(name))
    for in_dim in (256, 1408 if r.elems == 32 else 768):
        raw = random_blocks((5, in_dim), QT[name], rng)
        want = gguf.quants.dequantize(raw, QT[name]).astype(np.float32)
        if r.in_place:
            assert r.row_bytes(in_dim) == raw.shape[1]
            assert np.array_equal(r.dequantize(raw, raw, in_dim).view(np.uint32), want.view(np.uint32))
            with pytest.raises(ValueError, match="read in place"):
                r.repack(raw, in_dim, raw, raw)
            continue
        codes, scales = (
            np.empty((5, r.code_bytes(in_dim)), np.uint8),
            np.empty((5, r.scale_cols(in_dim)), r.scale_dtype),
        )
        r.repack(raw, in_dim, codes, scales)
        assert np.array_equal(r.dequantize(codes, scales, in_dim).view(np.uint32), want.view(np.uint32))
        assert codes.nbytes + scales.nbytes == 5 * r.row_bytes(in_dim)
        with pytest.raises(ValueError, match="blocks of"):
            r.repack(raw[:, :-1], in_dim, codes, scales)


@pytest.mark.parametrize("name", list(REPACK))
def test_every_block_type_quantizes_tokens_as_llamacpp_does(name) -> None:
    """The activations a block type's weights take are llama.cpp's for it: Q8_K blocks of 256 inputs for the
    K-quants and IQ4_XS, and scales rounded to fp16 (Q8_0's) for Q4_0, Q5_0, Q8_0 and IQ4_NL. Our own INT4 with fp16
    scales keeps a float32 scale a group."""
    act = BlockMatrix(16, 256, name, None).kernels(None).act_fmt
    assert bool(act & int8dot.BLOCKS_256) == (name in ("Q4_K", "Q5_K", "Q6_K", "IQ4_XS"))
    assert bool(act & int8dot.ROUND_FP16) == (name in ("Q4_0", "Q8_0", "Q5_0", "IQ4_NL"))
    ours = QuantMatrix(16, 256, CPUQuantKwargs(quant="int4", group_size=32, scale_dtype="fp16"), None)
    assert ours.kernels(None).act_fmt == int8dot.activation_format(int8dot.FORMATS[ours.format[0]])


@pytest.mark.parametrize("name", list(LANE_REPACK))
def test_q4_0_and_q8_0_repack_into_lanes_losslessly(name) -> None:
    """Rows across lanes hold the file's values bit for bit and its bytes, the same from the Numba kernel as from
    numpy; rows come in whole blocks of 16."""
    r, rng = LANE_REPACK[name], np.random.default_rng(len(name))
    for rows, in_dim in ((16, 256), (48, 1408)):
        raw = random_blocks((rows, in_dim), QT[name], rng)
        want = gguf.quants.dequantize(raw, QT[name]).astype(np.float32)
        made = []
        for way in (r, dataclasses.replace(r, fast=None)):
            codes = np.empty((rows, r.code_bytes(in_dim)), np.uint8)
            scales = np.empty((rows, r.scale_cols(in_dim)), r.scale_dtype)
            way.repack(raw, in_dim, codes, scales)
            made.append((codes, scales))
            assert np.array_equal(r.dequantize(codes, scales, in_dim).view(np.uint32), want.view(np.uint32))
        assert all(np.array_equal(a, b) for a, b in zip(*made, strict=True))
        codes, scales = made[0]
        assert codes.nbytes + scales.nbytes == raw.nbytes == rows * r.row_bytes(in_dim)
        rows_codes, _ = from_lanes(LANES[r.code], r.g, codes, scales)  # the file's own codes, in rows
        assert np.array_equal(rows_codes, REPACK[name].unpack(raw.reshape(rows, -1, r.nbytes))[0])
        with pytest.raises(ValueError, match="whole blocks of 16 rows"):
            r.repack(raw[:8], in_dim, codes[:8], scales[:8])
        with pytest.raises(ValueError, match="contiguous"):
            r.repack(raw[:16], in_dim, codes[:16, : codes.shape[1] // 2], scales[:16])


@pytest.mark.parametrize("name", list(LANE_REPACK))
def test_dense_q4_0_and_q8_0_run_in_lanes_where_the_rows_allow(name) -> None:
    """A dense Q4_0 or Q8_0 weight of whole blocks of 16 rows runs as rows across lanes, and as rows one after
    another once stacked with others (`as_rows`); 40 rows are read in place. Each gives the file's values and
    their product."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    for rows, fmt in ((48, LANE_REPACK[name].fmt), (40, REPACK[name].fmt)):
        raw = random_blocks((rows, 256), QT[name], rng)
        want = gguf.quants.dequantize(raw, QT[name]).astype(np.float32)
        m = BlockMatrix(rows, 256, name, None)
        m.store_blocks(raw)
        for step in ("as stored", "as rows"):
            if step == "as rows":
                m.as_rows()
                fmt = fmt.removesuffix("_lanes")
            assert m.format[0] == fmt and m.in_place == (rows == 40)
            assert np.array_equal(m.dequantize().numpy().view(np.uint32), want.view(np.uint32))
            y = m.kernels(None).linear_x(x, m.codes, m.scales, 16)
            ref = x.astype(np.float64) @ want.T.astype(np.float64)
            assert np.allclose(y, ref, rtol=0.05, atol=0.02 * np.abs(ref).max())


def test_a_cpu_embedding_in_blocks_stays_in_the_file(pair) -> None:
    """V3's case writes token_embd in Q8_0: the embedding reads the file's rows, and gives the values
    `gguf.quants` does (generation equal to safetensors' is checked above)."""
    path, _, rules = pair(CASES[0])
    g = GGUFFile.open(path)
    t = g.tensors["token_embd.weight"]
    assert t.type == QT.Q8_0
    with LLM(path, rules=rules, dtype="float32") as llm:
        embed = llm.placed.model.model.embed_tokens
        assert isinstance(embed, BlockEmbedding) and mapped_from(embed.rows, path)
        ids = torch.tensor([[0, 5], [t.shape[0] - 1, 3]])
        want = torch.from_numpy(gguf.quants.dequantize(t.data, t.type))[ids]
        assert torch.equal(embed(ids), want)
        with pytest.raises(IndexError, match="out of range"):
            embed(torch.tensor([t.shape[0]]))


def test_plan_says_when_a_gguf_will_page_from_disk(pair, tmp_path, capsys) -> None:
    """Experts read in place need no DRAM of their own: a box too small for them plans with a warning that
    they page from disk; one too small for the rest is still an error."""
    path, _, _ = pair(CASES[0])
    roomy = make_plan(path, Box(0, 100e9))
    rules = tmp_path / "planned.yaml"
    rules.write_text(roomy.rules)
    in_place = place(path, rules, "auto").mapped_bytes()
    need = roomy.weights["cpu"] + roomy.kv_cache["cpu"]
    assert in_place > 0 and roomy.paged == 0
    reserve = RESERVES["cpu"]

    def box(usable: float) -> float:  # GB of DRAM that leave `usable` bytes after the reserve
        return (usable + reserve.fixed) / (1 - reserve.share) / 1e9

    assert (
        main(["plan", "--model", str(path), "--gpu-memory", "0", "--cpu-memory", f"{box(need - in_place / 2):.6f}"])
        == 0
    )
    out = capsys.readouterr().out
    assert "GB more than the usable DRAM: the weights read in place from the GGUF file page from disk" in out
    assert (
        main(["plan", "--model", str(path), "--gpu-memory", "0", "--cpu-memory", f"{box(need - in_place) - 0.01:.6f}"])
        == 2
    )
    assert "read in place from the file" in capsys.readouterr().err


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_memory_readings_respect_the_cgroup_limit(version, tmp_path, monkeypatch) -> None:
    """In a container with a memory limit, DRAM is the limit (what is left of it), not the host's."""

    _, limit_file, usage_file = settings.CGROUP_FILES[version]
    folder = tmp_path / "group"
    folder.mkdir()
    (folder / limit_file).write_text(f"{6 * 2**30}\n")
    (folder / usage_file).write_text(f"{3 * 2**30}\n")
    inactive = settings.INACTIVE_FILE[version]
    (folder / "memory.stat").write_text(f"active_file 5\n{inactive} {2 * 2**30}\nshmem 0\n")  # 2 GiB reclaimable
    proc = tmp_path / "cgroup"
    proc.write_text("0::/group\n" if version == "v2" else "7:pids:/\n4:memory:/group\n")
    monkeypatch.setattr(settings, "PROC_CGROUP", proc)
    monkeypatch.setitem(settings.CGROUP_FILES, version, (str(tmp_path), limit_file, usage_file))
    if settings._meminfo("MemTotal") is None:
        pytest.skip("no /proc/meminfo")
    assert settings.total_memory() == min(6 * 2**30, settings._meminfo("MemTotal"))
    assert settings._cgroup_memory() == (6 * 2**30, 2**30)
    assert settings.available_memory() <= 5 * 2**30
    (folder / limit_file).write_text("max\n" if version == "v2" else "9223372036854771712\n")
    assert settings.total_memory() == settings._meminfo("MemTotal")


def test_experts_that_do_not_fit_are_read_ahead_from_disk(pair, monkeypatch) -> None:
    """Where the experts read in place do not fit in memory, each call asks the kernel to read the rows of
    the experts it routes to, all at once; the results are the same."""
    path, _, rules = pair(CASES[0])
    x = torch.randn(3, 256)
    index, weights = torch.tensor([[0, 2], [1, 2], [3, 0]]), torch.full((3, 2), 0.5)
    monkeypatch.setattr(gguf_load, "_use_lanes", lambda blocks: None)  # in place, and read into memory
    with LLM(path, rules=rules, dtype="float32") as llm:
        want = llm.placed.model.model.layers[1].mlp.experts(x, index, weights)
    monkeypatch.setattr(gguf_load, "fits_in_memory", lambda nbytes: False)
    asked = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, n, advice: asked.append((offset, n, advice)))
    g = GGUFFile.open(path)
    with LLM(path, rules=rules, dtype="float32") as llm:
        experts = llm.placed.model.model.layers[1].mlp.experts
        asked.clear()
        assert torch.equal(experts(x, index, weights), want)
    expected = set()
    for name in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
        t = g.tensors[f"blk.1.{name}.weight"]
        step = t.nbytes // t.shape[0]
        expected |= {(t.offset + e * step, step, os.POSIX_FADV_WILLNEED) for e in (0, 1, 2, 3)}
    assert set(asked) == expected


def test_quantized_cpu_linears_run_the_files_blocks(pair) -> None:
    """Under rules that quantize the dense layers on the CPU (`cpu-only-int4.yaml`), weights in blocks run
    in the file's own types instead of being requantized: the values are `gguf.quants`' bit for bit, Q4_0
    and Q8_0 read in place; the layers compute their float64 products within the int8 activations' error."""
    path, _, _ = pair(CASES[0])
    g = GGUFFile.open(path)
    with LLM(path, rules="cpu-only-int4.yaml", dtype="float32") as llm:
        modules = dict(llm.placed.model.named_modules())
        checked = set()
        for key, name in (
            ("model.layers.1.self_attn.q_a_proj", "blk.1.attn_q_a.weight"),
            ("model.layers.1.self_attn.o_proj", "blk.1.attn_output.weight"),
            ("model.layers.0.mlp", "blk.0.ffn_down.weight"),
            ("model.layers.1.mlp.shared_experts", "blk.1.ffn_down_shexp.weight"),
            ("lm_head", "output.weight"),
        ):
            t, op = g.tensors[name], modules[key]
            matrix = op.matrix if isinstance(op, CPULinear) else op.parts["down_proj"]
            if t.type.name in ("F16", "BF16", "F32"):
                assert not isinstance(matrix, BlockMatrix)
                continue
            assert isinstance(matrix, BlockMatrix) and matrix.block_type == t.type.name, key
            want = gguf.quants.dequantize(t.data, t.type)
            assert np.array_equal(matrix.dequantize().numpy().view(np.uint32), want.view(np.uint32)), key
            if t.type in (QT.Q4_0, QT.Q8_0):
                assert mapped_from(matrix.codes, path), key
            if isinstance(op, CPULinear):
                x = torch.randn(3, t.shape[1], generator=torch.Generator().manual_seed(0))  # tolerances hold for these
                ref = x.double() @ torch.from_numpy(want).double().T
                assert torch.allclose(op(x).double(), ref, rtol=0.05, atol=0.02 * ref.abs().max().item()), key
            checked.add(t.type.name)
        assert len(checked) >= 2
        assert len(llm.generate([[0, 17, 42]], max_tokens=4, temperature=0.0)[0].token_ids) == 4
        # q_a_proj and kv_a_proj in different types do not stack, so the attention is not fused: no one-call step
        assert not llm.runner.mixers[1].fused and llm.runner._one_call is None
