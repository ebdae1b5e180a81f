"""`strata plan`: memory and communication arithmetic against hand counts, feasibility, bad input, CLI."""
from __future__ import annotations

import ast
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from strata.plan.arch import BUILTINS, arch_from_config, builtin, load_arch
from strata.plan.constants import FLOOR, Constants
from strata.plan.errors import ConfigError, LayoutError, PlanError, UnknownGPUError, UnknownModelError
from strata.plan.estimate import (
    Layout, Setup, Timer, Workload, comm_per_token, enumerate_layouts, estimate, memory, stage_layer_counts,
    stage_weights,
)
from strata.plan.hardware import GPUS, get_gpu, gpu_from_device_name, parse_interconnect
from strata.plan.planner import make_plan
from strata.plan.replicas import parse_rates, size_fleet
from strata.plan.units import parse_bandwidth, parse_bytes, parse_flops

H100 = get_gpu("h100-80gb")
H200 = get_gpu("h200")
WL = Workload(1000, 200, 64)


def weights(model: str, tp=1, pp=1, dp=1, ep=1, gpu=H100) -> list[float]:
    return [st.held_bytes for st in stage_weights(Setup(builtin(model), gpu), Layout(tp, pp, dp, ep))]


# ---- parameter counts ---------------------------------------------------------------------------------------
def test_param_counts_match_published_sizes():
    # Reference model of BENCHMARK-PROTOCOL.md: 4.022 B parameters (tied embeddings).
    assert builtin("qwen3-4b").params_total() == 4_022_468_096
    expected = {"llama-3-8b": 8.03e9, "llama-3-70b": 70.55e9, "llama-3.1-405b": 405.85e9, "mixtral-8x7b": 46.70e9,
                "mixtral-8x22b": 140.63e9, "qwen3-30b-a3b": 30.53e9, "qwen3-235b-a22b": 235.09e9,
                "opt-175b": 174.60e9}
    for name, n in expected.items():
        assert builtin(name).params_total() == pytest.approx(n, rel=2e-3), name
    assert builtin("qwen3-30b-a3b").params_active() == pytest.approx(3.35e9, rel=0.01)
    assert builtin("qwen3-235b-a22b").params_active() == pytest.approx(22.2e9, rel=0.01)
    assert builtin("mixtral-8x7b").params_active() == pytest.approx(12.9e9, rel=0.01)


def test_builtin_names_and_hf_ids_resolve():
    assert load_arch("meta-llama/Llama-3.1-405B").name == "llama-3.1-405b"
    assert load_arch("meta-llama/Meta-Llama-3-70B-Instruct").name == "llama-3-70b"
    assert load_arch("Qwen/Qwen3-4B-Instruct-2507").name == "qwen3-4b"
    assert load_arch("mistralai/Mixtral-8x7B-v0.1").name == "mixtral-8x7b"
    assert load_arch("Qwen3-30B-A3B").name == "qwen3-30b-a3b"
    for name in ("llama-3-8b", "llama-3-70b", "llama-3.1-405b", "qwen3-4b", "qwen3-30b-a3b", "qwen3-235b-a22b",
                 "mixtral-8x7b", "mixtral-8x22b", "opt-175b"):
        assert name in BUILTINS


# ---- memory: the seeds' hand-computed cases --------------------------------------------------------------------
def _llama70b_by_hand(tp: int) -> int:
    d, L, ffn, V = 8192, 80, 28672, 128256
    per_layer_sharded = d * d + 2 * d * 1024 + d * d + 3 * d * ffn  # q, k+v (8 KV heads x 128), o, gate/up/down
    replicated = L * 2 * d + d  # two RMSNorms per layer + final norm
    sharded = L * per_layer_sharded + 2 * V * d  # + embedding and untied lm_head (vocab-parallel)
    return (sharded // tp + replicated) * 2  # bf16


def test_70b_weights_per_gpu_tp2_tp4_tp8():
    # Seed exercise 3: "a 70B model requires 140 GB in FP16; per GPU at TP=2, 4, 8?"
    for tp, exact in ((2, 70_555_025_408), (4, 35_278_831_616), (8, 17_640_734_720)):
        assert _llama70b_by_hand(tp) == exact
        assert weights("llama-3-70b", tp=tp) == [pytest.approx(exact, abs=1)]
        assert exact / 1e9 == pytest.approx(141.1 / tp, rel=1e-3)  # 70.6 / 35.3 / 17.6 GB


def test_175b_weights_tp8_pp8_and_tp2_pp4():
    # OPT-175B (GPT-3 shape): d=12288, 96 layers, 4x plain MLP, biases, LayerNorm, 2050 learned positions, tied.
    d, L, V, P = 12288, 96, 50272, 2050
    layer = 12 * d * d + 13 * d  # qkvo 4d^2 + fc1/fc2 8d^2; biases 4d + 5d; 2 LayerNorms 4d
    layer_rep = 4 * d + d + d  # LayerNorms, o_proj bias, fc2 bias (row-parallel biases are replicated)
    assert builtin("opt-175b").params_total() == L * layer + V * d + P * d + 2 * d == 174_604_468_224
    # TP=8, PP=1: everything sharded but norms, row biases and learned positions; tied lm_head not stored twice.
    tp8 = ((L * (layer - layer_rep) + V * d) // 8 + L * layer_rep + P * d + 2 * d) * 2
    assert tp8 == 43_707_629_568
    assert weights("opt-175b", tp=8) == [pytest.approx(tp8, abs=1)]
    # PP=8: 12 layers per stage; stage 0 holds embeddings, stage 7 final norm + its own copy of the tied lm_head.
    pp8 = weights("opt-175b", pp=8)
    assert pp8[0] == pytest.approx((12 * layer + V * d + P * d) * 2, abs=1) == 44_776_243_200
    assert pp8[3] == pytest.approx(12 * layer * 2, abs=1)
    assert pp8[7] == pytest.approx((12 * layer + 2 * d + V * d) * 2, abs=1)
    # TP=2 x PP=4: 24 layers per stage over 2 GPUs -> ~44 GB per GPU (the seed's "88 GB" double-counts).
    tp2pp4 = weights("opt-175b", tp=2, pp=4)
    per_layer_gpu = (layer - layer_rep) // 2 + layer_rep
    assert tp2pp4[0] == pytest.approx((24 * per_layer_gpu + V * d // 2 + P * d) * 2, abs=1) == 44_160_270_336
    assert max(tp2pp4) / 1e9 == pytest.approx(44.2, abs=0.05)


def test_kv_replicated_when_tp_exceeds_kv_heads_and_memory_budget():
    s = Setup(builtin("qwen3-30b-a3b"), H200)  # 4 KV heads
    assert stage_weights(s, Layout(tp=8))[0].kv_bytes_per_token == 48 * 2 * 1 * 128 * 2
    # Protocol: 147,456 KV bytes per token for the reference model.
    assert builtin("qwen3-4b").kv_bytes_per_token() == 147_456
    # KV tokens for Llama-3-70B TP=4 on H100, by hand.
    lay = Layout(tp=4)
    setup = Setup(builtin("llama-3-70b"), H100)
    wl = Workload(1000, 200, 64, max_num_seqs=256)
    mem = memory(setup, lay, wl)
    budget = 0.9 * 81559 * 2**20
    act = 8192 * 2 * (4 * 8192 + (16 + 2 * 2) * 128 + 2 * 28672 / 4) + 256 * 128256 / 4 * 4
    free = budget - 35_278_831_616 - act - 1.5 * 2**30
    assert mem.kv_tokens == int(free // (80 * 2 * 2 * 128 * 2))
    assert mem.max_batch == 256  # capped by max_num_seqs (kv fits ~399 sequences of 1200)


def test_stage_split_sums_to_layers():
    for L, pp in ((126, 4), (80, 3), (32, 8), (94, 16)):
        c = stage_layer_counts(L, pp)
        assert sum(c) == L and max(c) - min(c) <= 1
    assert stage_layer_counts(126, 4) == [31, 32, 32, 31]


def test_moe_expert_parallel_memory():
    # Qwen3-30B-A3B on 4 GPUs: EP=4 holds a quarter of the experts; EP=1 (TP=1, DP=4) holds all of them.
    a = builtin("qwen3-30b-a3b")
    experts = 48 * 128 * 3 * 2048 * 768
    ep4 = weights("qwen3-30b-a3b", dp=4, ep=4, gpu=H200)[0]
    dp4 = weights("qwen3-30b-a3b", dp=4, gpu=H200)[0]
    assert dp4 == pytest.approx(a.params_total() * 2, abs=1)
    assert dp4 - ep4 == pytest.approx(experts * 2 * 3 / 4, abs=1)


# ---- communication volume per token ----------------------------------------------------------------------------
def test_comm_70b_tp4_by_hand():
    # Seed exercise 4. Two all-reduces per layer (after attention, after MLP) + one after the vocab-parallel
    # embedding, each of one token's hidden state (8192 x 2 bytes); logits (128256 x 2 bytes) gathered.
    c = comm_per_token(Setup(builtin("llama-3-70b"), H100), Layout(tp=4))
    assert c.tp_allreduce_calls == 2 * 80 + 1
    assert c.tp_allreduce_bytes == 161 * 8192 * 2 == 2_637_824
    assert c.tp_allreduce_wire_per_gpu == pytest.approx(2 * 3 / 4 * 2_637_824)  # ring: 2(p-1)/p
    assert c.tp_logits_gather_bytes == 128256 * 2
    assert c.pp_bytes == 0 and c.ep_alltoall_bytes == 0


def test_comm_pp_and_ep_by_hand():
    c = comm_per_token(Setup(builtin("llama-3-70b"), H100), Layout(pp=4))
    assert (c.tp_allreduce_bytes, c.pp_hops, c.pp_bytes) == (0, 3, 3 * 8192 * 2)
    c = comm_per_token(Setup(builtin("llama-3-70b"), H100, Constants(pp_activation_tensors=2)), Layout(pp=4))
    assert c.pp_bytes == 3 * 8192 * 2 * 2
    # Qwen3-30B-A3B, TP=1 x DP=4, EP=4: dispatch + combine of top-8 copies of each token's hidden state in each
    # of 48 MoE layers; 3/4 of the experts are on other GPUs.
    c = comm_per_token(Setup(builtin("qwen3-30b-a3b"), H200), Layout(dp=4, ep=4))
    assert c.ep_alltoall_calls == 96
    assert c.ep_alltoall_bytes == pytest.approx(2 * 48 * 8 * 2048 * 2 * 3 / 4)
    assert c.tp_allreduce_calls == 0
    # Mixtral-8x7B TP=2 x DP=4, EP=8: attention still all-reduces in TP (32 + embedding), MoE goes all-to-all.
    c = comm_per_token(Setup(builtin("mixtral-8x7b"), H100), Layout(tp=2, dp=4, ep=8))
    assert c.tp_allreduce_calls == 33
    assert c.ep_alltoall_bytes == pytest.approx(2 * 32 * 2 * 4096 * 2 * 7 / 8)
    assert c.tp_allgather_bytes == 32 * 4096 * 2
    # EP=1 MoE: experts split by TP like any MLP -> 2 all-reduces per layer.
    c = comm_per_token(Setup(builtin("mixtral-8x7b"), H100), Layout(tp=8))
    assert c.tp_allreduce_calls == 65 and c.ep_alltoall_bytes == 0


def test_collective_time_alpha_beta():
    t = Timer(Setup(builtin("llama-3-8b"), H200), Layout(tp=2))
    c = Constants()
    n = 128 * 2**20  # the protocol's 128 MB all-reduce at 286 GB/s bus bandwidth on 2 x H200
    assert t.allreduce(n, 2) == pytest.approx(c.allreduce_latency_s + n / (450e9 * c.link_efficiency))
    assert n / (t.allreduce(n, 2) - c.allreduce_latency_s) == pytest.approx(288e9, rel=0.01)
    assert t.allreduce(8192 * 2, 1) == 0.0


# ---- time model against the protocol's anchors -----------------------------------------------------------------
def test_reference_model_reproduces_protocol_floor():
    # The physical floor (anchor efficiencies, no host overhead), not the fitted defaults.
    s = Setup(builtin("qwen3-4b"), H200, FLOOR)
    # Batch-1 decode: "weights alone take 1.9 ms at 4.27 TB/s".
    e = estimate(s, Layout(), Workload(1024, 128, 1))
    assert 1.85e-3 < e.tpot_batch1_s < 2.1e-3
    # seed64 physical floor: 0.58 s, 11,030 output tok/s (prefill at peak, decode steps at max(bytes, flops)).
    e = estimate(s, Layout(), Workload(436, 100, 64))
    assert 6400 / e.output_tok_s == pytest.approx(0.58, rel=0.06)


def test_fitted_defaults_match_the_recorded_h200_runs():
    # The defaults are fitted to benchmarks/results/2026-11-21-h200-*.json: strata bench latency at batch 1
    # (1024 + 128 tokens) measured TPOT 3.51 ms, TTFT 21.7 ms; strata bench throughput seed64 6,645 tok/s.
    s = Setup(builtin("qwen3-4b"), H200)
    e = estimate(s, Layout(), Workload(1024, 128, 1))
    assert e.tpot_batch1_s * 1e3 == pytest.approx(3.51, rel=0.25)
    assert e.ttft_s * 1e3 == pytest.approx(21.7, rel=0.35)  # 30% over: see docs/PARALLELISM.md, calibration
    e = estimate(s, Layout(), Workload(436, 100, 64))
    assert e.output_tok_s == pytest.approx(6645, rel=0.25)


def test_tp_cuts_batch1_latency_pp_does_not():
    s = Setup(builtin("llama-3-70b"), H200)
    t1 = estimate(s, Layout(tp=2), Workload(1000, 200, 1)).tpot_batch1_s
    t_tp = estimate(s, Layout(tp=4), Workload(1000, 200, 1)).tpot_batch1_s
    t_pp = estimate(s, Layout(tp=2, pp=2), Workload(1000, 200, 1)).tpot_batch1_s
    assert t_tp < 0.65 * t1
    assert t_pp >= t1


def test_slower_interconnect_slows_tp():
    arch = builtin("llama-3-70b")
    fast = estimate(Setup(arch, H100), Layout(tp=4), Workload(1000, 200, 1)).tpot_s
    slow_gpu = get_gpu("h100-80gb", intra_bw="100GB/s")
    slow = estimate(Setup(arch, slow_gpu), Layout(tp=4), Workload(1000, 200, 1)).tpot_s
    assert slow > fast


# ---- layouts and feasibility -----------------------------------------------------------------------------------
def test_layout_enumeration():
    a = builtin("llama-3-70b")
    labels = {l.label for l in enumerate_layouts(a, 8)}
    assert labels == {"TP1 PP1 DP8", "TP1 PP2 DP4", "TP1 PP4 DP2", "TP1 PP8 DP1", "TP2 PP1 DP4", "TP2 PP2 DP2",
                      "TP2 PP4 DP1", "TP4 PP1 DP2", "TP4 PP2 DP1", "TP8 PP1 DP1"}
    moe = {l.label for l in enumerate_layouts(builtin("qwen3-30b-a3b"), 4)}
    assert {"TP1 PP1 DP4", "TP1 PP1 DP4 EP4", "TP2 PP1 DP2 EP4", "TP4 PP1 DP1"} <= moe
    assert [l.label for l in enumerate_layouts(a, 8, tp=4)] == ["TP4 PP1 DP2", "TP4 PP2 DP1"]


def test_gpus_not_divisible_into_layout():
    a = builtin("llama-3-70b")
    with pytest.raises(LayoutError, match="cannot be divided"):
        enumerate_layouts(a, 8, tp=3)
    with pytest.raises(LayoutError, match="must equal --gpus"):
        enumerate_layouts(a, 16, tp=2, pp=2, dp=2)
    with pytest.raises(LayoutError):
        enumerate_layouts(a, 0)
    with pytest.raises(LayoutError, match="EP"):
        enumerate_layouts(builtin("mixtral-8x7b"), 8, tp=2, pp=1, ep=3)


def test_infeasible_layouts_have_reasons():
    plan = make_plan(builtin("llama-3.1-405b"), [H100], 16, WL)
    reasons = {i.layout.label: i.reason for i in plan.infeasible}
    assert "TP=16 would span nodes" in reasons["TP16 PP1 DP1"]
    assert "weights need 811.7 GB per GPU" in reasons["TP1 PP1 DP16"]
    assert "weights need 101.5 GB per GPU" in reasons["TP8 PP1 DP2"]
    assert {e.layout.label for e in plan.feasible} == {"TP8 PP2 DP1", "TP4 PP4 DP1", "TP2 PP8 DP1", "TP1 PP16 DP1"}
    assert plan.best is not None and plan.why
    # Heads that do not split; experts that do not split; KV that cannot hold one sequence.
    p = make_plan(builtin("qwen3-4b"), [H100], 3, WL, tp=3)
    assert "32 attention heads do not split evenly over TP=3" in p.infeasible[0].reason and p.best is None
    p = make_plan(builtin("mixtral-8x7b"), [H200], 16, WL, tp=1, pp=1, ep=16)
    assert "8 experts do not split evenly over EP=16" in p.infeasible[0].reason
    p = make_plan(builtin("llama-3-70b"), [H100], 2, Workload(200_000, 100, 1), tp=2)
    assert "fewer than one 200100-token sequence" in p.infeasible[0].reason
    assert any("max_position_embeddings" in n for n in p.notes)


def test_objectives_pick_sensibly():
    a = builtin("llama-3-8b")
    # Enough requests to fill every replica to max_num_seqs: pure data parallelism wins.
    thr = make_plan(a, [H100], 8, Workload(1000, 200, 2048), objective="throughput")
    assert thr.best.layout.label == "TP1 PP1 DP8"
    lat = make_plan(a, [H100], 8, Workload(1000, 200, 1), objective="latency")
    assert lat.best.layout.tp >= 4
    cost = make_plan(a, [H100, H200], 8, Workload(1000, 200, 512), objective="cost")
    assert cost.best.cost_per_mtok == min(e.cost_per_mtok for e in cost.feasible)
    assert "per million output tokens" in cost.why
    with pytest.raises(PlanError):
        make_plan(a, [H100], 8, WL, objective="speed")


# ---- bad input -------------------------------------------------------------------------------------------------
def test_unknown_gpu_and_custom_gpu():
    with pytest.raises(UnknownGPUError, match="h100-80gb"):
        get_gpu("tpu-v5")
    g = get_gpu("mygpu", memory="96GiB", hbm_bw="4TB/s", flops="1000T", cost_per_hour=2.5)
    assert (g.memory_bytes, g.hbm_bw, g.flops) == (96 * 2**30, 4e12, 1e15)
    assert get_gpu("h100", intra_bw="100GB/s").intra_bw == 100e9
    assert gpu_from_device_name("NVIDIA H100 80GB HBM3") == "h100-80gb"
    assert gpu_from_device_name("NVIDIA H200") == "h200"
    assert gpu_from_device_name("NVIDIA A100-SXM4-40GB") == "a100-40gb"
    assert gpu_from_device_name("cpu") is None
    assert set(GPUS) >= {"h100-80gb", "h200", "a100-80gb", "a100-40gb", "l40s"}


def test_units_and_interconnect():
    assert parse_bandwidth("450GB/s") == 450e9
    assert parse_bandwidth("400Gb/s") == 50e9
    assert parse_bandwidth("1.6TB/s") == 1.6e12
    assert parse_bandwidth("100") == 100e9
    assert parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("141GB") == 141e9
    assert parse_flops("989T") == 989e12 and parse_flops("989e12") == 989e12
    assert parse_interconnect("nvlink=450GB/s,ib=50GB/s") == {"intra": "450GB/s", "inter": "50GB/s"}
    for bad in ("nvlink450", "warp=1GB/s", "nvlink=fast"):
        with pytest.raises(PlanError):
            parse_interconnect(bad)


def _qwen3_4b_config() -> dict:
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 2560,
            "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": True,
            "max_position_embeddings": 40960, "rope_theta": 1000000, "rms_norm_eps": 1e-6,
            "torch_dtype": "bfloat16"}


def test_config_json_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_qwen3_4b_config()))
    a = load_arch(str(tmp_path))
    assert a.params_total() == 4_022_468_096 and a.kv_bytes_per_token() == 147_456
    moe = arch_from_config({"model_type": "qwen3_moe", "hidden_size": 2048, "num_hidden_layers": 4,
                            "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
                            "vocab_size": 1000, "intermediate_size": 6144, "moe_intermediate_size": 768,
                            "num_experts": 128, "num_experts_per_tok": 8, "mlp_only_layers": [0]})
    assert (moe.moe_layers, moe.dense_layers, moe.moe_intermediate) == (3, 1, 768)
    mix = arch_from_config({"model_type": "mixtral", "hidden_size": 4096, "num_hidden_layers": 32,
                            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
                            "intermediate_size": 14336, "num_local_experts": 8, "num_experts_per_tok": 2})
    assert mix.params_total() == builtin("mixtral-8x7b").params_total()


def test_config_missing_fields_and_bad_models(tmp_path):
    cfg = _qwen3_4b_config()
    del cfg["hidden_size"], cfg["num_hidden_layers"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="lacks hidden_size, num_hidden_layers"):
        load_arch(str(tmp_path))
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        arch_from_config({**_qwen3_4b_config(), "num_experts": 8})
    with pytest.raises(ConfigError, match="latent attention"):
        arch_from_config({"model_type": "deepseek_v3", "kv_lora_rank": 512})
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        load_arch(str(bad))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UnknownModelError, match="no config.json"):
        load_arch(str(empty))
    with pytest.raises(UnknownModelError, match="never downloads"):
        load_arch("some-org/some-unknown-model")


# ---- fleet sizing ----------------------------------------------------------------------------------------------
def test_replicas_mode():
    assert parse_rates("us-east=40, eu-west=12") == {"us-east": 40.0, "eu-west": 12.0}
    for bad in ("", "us", "us=fast", "us=-1"):
        with pytest.raises(PlanError):
            parse_rates(bad)
    fleet = size_fleet(builtin("llama-3-8b"), [H100], {"us": 500.0, "eu": 5.0, "idle": 0.0},
                       Workload(1000, 200, 1), tpot_target_ms=30, ttft_target_ms=500, max_gpus_per_replica=8)
    regions = {r.region: r for r in fleet.regions}
    for r in fleet.regions:
        if r.rate:
            assert r.replicas == math.ceil(r.rate / (r.option.capacity_rps * 0.8))
            assert r.option.tpot_s <= 0.030 and r.option.ttft_s <= 0.5
            assert r.gpu_hours_per_day == r.replicas * r.option.layout.replica_gpus * 24
    assert regions["idle"].replicas == 0
    assert regions["us"].replicas > regions["eu"].replicas
    with pytest.raises(PlanError, match="latency target"):
        size_fleet(builtin("llama-3-8b"), [H100], {"us": 1.0}, Workload(), tpot_target_ms=None, ttft_target_ms=None)
    # An impossible target: every layout rejected, with the reason.
    f = size_fleet(builtin("llama-3-70b"), [H100], {"us": 1.0}, Workload(1000, 200, 1), tpot_target_ms=0.5,
                   ttft_target_ms=None, max_gpus_per_replica=8)
    assert not f.options and any("misses the target" in why for _, _, why in f.rejected)


# ---- CLI -------------------------------------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "strata.cli", "plan", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})


def test_cli_end_to_end_text():
    r = _cli("--model", "meta-llama/Llama-3.1-405B", "--gpus", "16", "--gpu", "h100-80gb", "--gpus-per-node", "8",
             "--interconnect", "nvlink=450GB/s,ib=50GB/s", "--prompt-len", "1000", "--output-len", "200",
             "--concurrency", "256")
    assert r.returncode == 0, r.stderr
    assert "TP8 PP2 DP1" in r.stdout and "infeasible:" in r.stdout and "recommendation (throughput):" in r.stdout


def test_cli_end_to_end_json_and_errors():
    r = _cli("--model", "qwen3-30b-a3b", "--gpus", "4", "--gpu", "h200", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["recommendation"]["label"] and out["layouts"] and out["constants"]["hbm_efficiency"] > 0
    row = out["layouts"][0]
    for k in ("memory", "comm_per_token", "ttft_ms", "tpot_ms", "output_tok_s", "cost_per_mtok_usd"):
        assert k in row
    r = _cli("--model", "llama-3-70b", "--gpus", "8", "--gpu", "tpu-v5")
    assert r.returncode == 2 and "error: unknown GPU 'tpu-v5'" in r.stderr and not r.stdout
    r = _cli("--model", "llama-3-70b", "--gpus", "8", "--tp", "3")
    assert r.returncode == 2 and "cannot be divided" in r.stderr


def test_cli_in_process_modes(capsys):
    from strata.cli import main

    assert main(["plan", "--model", "llama-3-70b", "--gpus", "4", "--gpu", "h100-80gb", "--interconnect",
                 "nvlink=100GB/s", "--concurrency", "1", "--objective", "latency"]) == 0
    assert "recommendation (latency): TP4 PP1 DP1" in capsys.readouterr().out
    assert main(["plan", "--replicas", "--model", "llama-3-8b", "--gpu", "h100-80gb,h200", "--rate", "us=20,eu=4",
                 "--tpot-target-ms", "40", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "GPU-h/day" in out and "total" in out
    assert main(["plan", "--model", "llama-3.1-405b", "--gpus", "4", "--gpu", "a100-40gb"]) == 1
    assert "no layout fits" in capsys.readouterr().out
    assert main(["plan", "--model", "llama-3-8b"]) == 2
    assert "--gpus is required" in capsys.readouterr().err


def test_constants_file(tmp_path, capsys):
    from strata.cli import main

    p = tmp_path / "c.json"
    p.write_text(json.dumps({"constants": {"step_overhead_s": 0.002}}))
    assert Constants.from_json(str(p)).step_overhead_s == 0.002
    p.write_text(json.dumps({"warp_factor": 9}))
    assert main(["plan", "--model", "qwen3-4b", "--gpus", "1", "--constants", str(p)]) == 2
    assert "unknown fields ['warp_factor']" in capsys.readouterr().err


def test_plan_package_is_pure_python():
    """strata.plan must not import torch (or numpy): it runs on any laptop in a second."""
    root = pathlib.Path(__file__).resolve().parents[1] / "src" / "strata" / "plan"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for n in names:
                assert n.split(".")[0] not in {"torch", "numpy", "transformers"}, f"{path.name} imports {n}"
