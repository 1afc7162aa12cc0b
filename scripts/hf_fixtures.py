#!/usr/bin/env python3
"""Hugging Face MoE fixtures for `MoELayer.fromPretrained` (run by hand, not in CI).

For each family (model_type) and dtype this builds a tiny random model from a config made in
code, saves it with `save_pretrained` (Hub key names, safetensors), reloads it with
`from_pretrained` and records, for the MoE block of decoder layer 1 (`model.model.layers[1].mlp`):

  io.safetensors     x, gradOutput, output, routerLogits (f32), indices (int64), weights (f32),
                     gradInput, hfAuxLoss, hfAuxLossScaled (and outputF32, gradInputF32 for bf16)
  grads.safetensors  d sum(output * gradOutput) / d(every block parameter), under the CHECKPOINT
                     key names and layout (made by save_pretrained itself, see `checkpoint_grads`)
  gradsF32.safetensors  (bf16 only) the same from the f32 computation on the bf16-rounded weights
  meta.json          versions, keys, router dtype, routing semantics, how hfAuxLoss was called

Usage:
  /tmp/hfvenv/bin/python scripts/hf_fixtures.py --out test/fixtures/hf
  /tmp/hfvenv/bin/python scripts/hf_fixtures.py --out test/fixtures/hf --verify-roundtrip DIR

Deterministic: every random tensor comes from a torch.Generator with a fixed seed.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import logging
import re
import os
import shutil
import sys
import tempfile
import warnings

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
warnings.filterwarnings("ignore")
torch.set_num_threads(min(2, os.cpu_count() or 1))

B, T = 2, 5
LAYER = 1
COMMON = dict(
    hidden_size=32,
    num_hidden_layers=2,
    vocab_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)

# Quoted from the installed transformers sources (checked against them at run time, see
# `check_quotes`): how each family routes.
ROUTING = {
    "mixtral": {
        "scoring": "softmax over all E logits, in float32, BEFORE top-k; top-k of the probabilities; "
        "the k values are always renormalised to sum 1 (no norm_topk_prob switch); the weights stay float32 "
        "and multiply the expert output (bf16 * f32 -> f32), which is cast back to the hidden dtype at index_add_",
        "source": [
            "router_logits = F.linear(hidden_states, self.weight)  # (seq_len, num_experts)",
            "router_probs = torch.nn.functional.softmax(router_logits.float(), dim=-1)",
            "router_top_value, router_indices = torch.topk(router_probs, self.top_k, dim=-1)  # (seq_len, top_k)",
            "router_top_value /= router_top_value.sum(dim=-1, keepdim=True)",
        ],
        "expert": "SwiGLU: down(silu(gate(x)) * up(x)); checkpoint w1 = gate, w3 = up, w2 = down (per expert, "
        "nn.Linear layout [out, in]); in memory transformers fuses them as experts.gate_up_proj [E, 2I, H] "
        "(gate rows first) and experts.down_proj [E, H, I]",
    },
    "qwen2_moe": {
        "scoring": "softmax over all E logits (dtype=float) BEFORE top-k; renormalise the k values only if "
        "norm_topk_prob (False here, the qwen2_moe default); the weights are cast back to the logits' dtype "
        "(bf16 in the bf16 model) before they scale the experts; plus a shared expert (SwiGLU) scaled by "
        "sigmoid(shared_expert_gate(x)) and added",
        "source": [
            "router_probs = torch.nn.functional.softmax(router_logits, dtype=torch.float, dim=-1)",
            "router_top_value, router_indices = torch.topk(router_probs, self.top_k, dim=-1)  # (seq_len, top_k)",
            "if self.norm_topk_prob:",
            "router_top_value = router_top_value.to(router_logits.dtype)",
            "shared_expert_output = F.sigmoid(self.shared_expert_gate(hidden_states_reshaped)) * shared_expert_output",
        ],
        "expert": "SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x)) per expert; shared_expert the same with "
        "shared_expert_intermediate_size; shared_expert_gate is Linear(H, 1, bias=False)",
    },
    "qwen3_moe": {
        "scoring": "softmax over all E logits (dtype=float) BEFORE top-k; norm_topk_prob True here, so the k "
        "values are renormalised to sum 1; the weights are cast back to the logits' dtype",
        "source": [
            "router_probs = torch.nn.functional.softmax(router_logits, dtype=torch.float, dim=-1)",
            "if self.norm_topk_prob:",
            "router_top_value /= router_top_value.sum(dim=-1, keepdim=True)",
            "router_top_value = router_top_value.to(router_logits.dtype)",
        ],
        "expert": "SwiGLU per expert (gate_proj, up_proj, down_proj); no shared expert",
    },
    "olmoe": {
        "scoring": "softmax over all E logits (dtype=float) BEFORE top-k; norm_topk_prob False here (the olmoe "
        "default), so the top-k probabilities are used as they are (they do not sum to 1); the weights are cast "
        "back to the logits' dtype",
        "source": [
            "router_probs = torch.nn.functional.softmax(router_logits, dtype=torch.float, dim=-1)",
            "if self.norm_topk_prob:",
            "router_top_value = router_top_value.to(router_logits.dtype)",
        ],
        "expert": "SwiGLU per expert (gate_proj, up_proj, down_proj); no shared expert",
    },
    "deepseek_v3": {
        "scoring": "router logits in float32 (input and gate.weight upcast); scores = sigmoid(logits); "
        "scores_for_choice = scores + e_score_correction_bias (the bias only CHOOSES); group score = sum of the "
        "top-2 scores_for_choice within each of n_group groups; the topk_group best groups are kept and the "
        "experts of the other groups are masked with -inf (not 0); top-k of the masked scores_for_choice "
        "(torch.topk sorted=False: the ORDER of the k indices is unspecified, compare as sets with their "
        "weights); weights = the UNBIASED sigmoid scores gathered at those indices; if norm_topk_prob they "
        "are divided by (their sum + 1e-20); then multiplied by routed_scaling_factor (after the "
        "normalisation); weights stay float32; plus the shared experts (SwiGLU, intermediate "
        "moe_intermediate_size * n_shared_experts) added unscaled",
        "source": [
            "router_logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))",
            "scores = router_logits.sigmoid()",
            "scores_for_choice = scores + self.e_score_correction_bias",
            ".topk(2, dim=-1)[0]",
            "group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]",
            'scores_for_choice = scores_for_choice.masked_fill(~score_mask.bool(), float("-inf"))',
            "topk_indices = torch.topk(scores_for_choice, k=self.top_k, dim=-1, sorted=False)[1]",
            "topk_weights = scores.gather(1, topk_indices)",
            "denominator = topk_weights.sum(dim=-1, keepdim=True) + 1e-20",
            "topk_weights = topk_weights * self.routed_scaling_factor",
            "hidden_states = hidden_states + self.shared_experts(residuals)",
        ],
        "expert": "SwiGLU per expert (gate_proj, up_proj, down_proj); shared_experts is one SwiGLU MLP",
    },
    "gpt_oss": {
        "scoring": "router logits = Linear WITH bias, in the model dtype; top-k of the raw LOGITS first, then "
        "softmax over the k selected logits only, in the logits' dtype (bf16 in the bf16 model); no "
        "renormalisation switch (the softmax already sums to 1)",
        "source": [
            "router_logits = F.linear(hidden_states, self.weight, self.bias)  # (num_tokens, num_experts)",
            "router_top_value, router_indices = torch.topk(router_logits, self.top_k, dim=-1)  # (num_tokens, top_k)",
            "router_scores = torch.nn.functional.softmax(router_top_value, dim=1, dtype=router_top_value.dtype)",
        ],
        "expert": "gate_up = x @ gate_up_proj[e] + gate_up_proj_bias[e] with gate_up_proj [E, H, 2I] "
        "(TRANSPOSED: [in, out]) and gate/up INTERLEAVED on the last dim (gate = [..., ::2], up = [..., 1::2]); "
        "gate = gate.clamp(max=limit); up = up.clamp(-limit, limit); glu = gate * sigmoid(alpha * gate); "
        "out = ((up + 1) * glu) @ down_proj[e] + down_proj_bias[e] with down_proj [E, I, H]; alpha 1.702, "
        "limit 7.0. The block returns (hidden_states, router_scores); `output` is hidden_states",
        "source_expert": [
            "gate, up = gate_up[..., ::2], gate_up[..., 1::2]",
            "gate = gate.clamp(min=None, max=self.limit)",
            "up = up.clamp(min=-self.limit, max=self.limit)",
            "glu = gate * torch.sigmoid(gate * self.alpha)",
            "gated_output = (up + 1) * glu",
            "gate_up = current_state @ self.gate_up_proj[expert_idx] + self.gate_up_proj_bias[expert_idx]",
            "out = gated_output @ self.down_proj[expert_idx] + self.down_proj_bias[expert_idx]",
        ],
    },
}


def check_quotes(model_type):
    """Every line quoted in ROUTING[model_type] is in the installed modeling file (else the notes are stale)."""
    mod = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    src = {line.strip() for line in open(mod.__file__).read().splitlines()}
    text = open(mod.__file__).read()
    quotes = ROUTING[model_type].get("source", []) + ROUTING[model_type].get("source_expert", [])
    missing = [q for q in quotes if q not in src and q not in text]
    if missing:
        raise SystemExit(f"{model_type}: the installed {mod.__file__} no longer has {missing}; update ROUTING")
    return os.path.basename(mod.__file__)


def family_specs():
    T_ = transformers
    return {
        "mixtral": dict(
            model_cls=T_.MixtralForCausalLM,
            config=lambda: T_.MixtralConfig(**COMMON, num_local_experts=8, num_experts_per_tok=2, intermediate_size=16),
            router="gate",
            std=0.3,
            xscale=1.0,
        ),
        "qwen2_moe": dict(
            model_cls=T_.Qwen2MoeForCausalLM,
            config=lambda: T_.Qwen2MoeConfig(
                **{k: v for k, v in COMMON.items() if k != "head_dim"},
                num_experts=8,
                num_experts_per_tok=2,
                moe_intermediate_size=16,
                shared_expert_intermediate_size=24,
                intermediate_size=24,  # the dense MLP of layer 0 (mlp_only_layers)
                decoder_sparse_step=1,
                mlp_only_layers=[0],
                norm_topk_prob=False,
            ),
            router="gate",
            std=0.3,
            xscale=1.0,
        ),
        "qwen3_moe": dict(
            model_cls=T_.Qwen3MoeForCausalLM,
            config=lambda: T_.Qwen3MoeConfig(
                **COMMON,
                num_experts=8,
                num_experts_per_tok=2,
                moe_intermediate_size=16,
                intermediate_size=24,
                decoder_sparse_step=1,
                mlp_only_layers=[0],
                norm_topk_prob=True,
            ),
            router="gate",
            std=0.3,
            xscale=1.0,
        ),
        "olmoe": dict(
            model_cls=T_.OlmoeForCausalLM,
            config=lambda: T_.OlmoeConfig(
                **{k: v for k, v in COMMON.items() if k != "head_dim"},
                num_experts=8,
                num_experts_per_tok=2,
                intermediate_size=16,
                norm_topk_prob=False,
                pad_token_id=1,
                eos_token_id=2,  # the default 50279 is outside this vocabulary (a config warning)
            ),
            router="gate",
            std=0.3,
            xscale=1.0,
        ),
        "deepseek_v3": dict(
            model_cls=T_.DeepseekV3ForCausalLM,
            config=lambda: T_.DeepseekV3Config(
                hidden_size=32,
                num_hidden_layers=2,
                vocab_size=64,
                num_attention_heads=2,
                num_key_value_heads=2,
                max_position_embeddings=64,
                tie_word_embeddings=False,
                q_lora_rank=16,
                kv_lora_rank=16,
                qk_rope_head_dim=4,
                qk_nope_head_dim=4,
                v_head_dim=8,
                intermediate_size=24,  # the dense MLP of layer 0
                moe_intermediate_size=16,
                n_routed_experts=8,
                num_experts_per_tok=2,
                n_shared_experts=1,
                n_group=4,
                topk_group=2,
                norm_topk_prob=True,
                routed_scaling_factor=2.5,
                first_k_dense_replace=1,
            ),
            router="gate",
            std=0.3,
            xscale=1.0,
        ),
        "gpt_oss": dict(
            model_cls=T_.GptOssForCausalLM,
            config=lambda: T_.GptOssConfig(
                **COMMON,
                num_local_experts=8,
                num_experts_per_tok=2,
                intermediate_size=16,
                layer_types=["sliding_attention", "full_attention"],
                sliding_window=4,
                rope_parameters={"rope_type": "default", "rope_theta": 150000.0},
                swiglu_alpha=1.702,
                swiglu_limit=7.0,
            ),
            router="router",
            std=0.3,
            # per-parameter std: large gate_up weights + x scaled by 2 push pre-activations past +-7
            std_by_name={"experts.gate_up_proj": 0.5, "experts.gate_up_proj_bias": 0.5, "experts.down_proj_bias": 0.3},
            xscale=2.0,
        ),
    }


CKPT_PREFIX = {
    "mixtral": f"model.layers.{LAYER}.block_sparse_moe.",
}


def moe_prefix(model_type):
    return CKPT_PREFIX.get(model_type, f"model.layers.{LAYER}.mlp.")


def n_experts(cfg):
    return int(cfg.num_local_experts if hasattr(cfg, "num_local_experts") else cfg.num_experts)


def versions():
    import safetensors

    return {"transformers": transformers.__version__, "torch": torch.__version__, "safetensors": safetensors.__version__}


def gen(seed):
    g = torch.Generator().manual_seed(seed)
    return g


def st_info(path):
    out = {}
    with safe_open(path, "pt") as f:
        for k in f.keys():
            sl = f.get_slice(k)
            out[k] = {"shape": list(sl.get_shape()), "dtype": sl.get_dtype()}
    return out


def checkpoint_tensors(d):
    """name -> (file, shape, dtype) over a single- or multi-file checkpoint."""
    files = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
    out = {}
    for fn in files:
        for k, v in st_info(os.path.join(d, fn)).items():
            out[k] = dict(v, file=fn)
    return out


class _WarnCatcher(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


LOAD_WORDS = ("load report", "missing", "newly initialized", "not initialized", "mismatch", "unexpected key", "not used")


def load_checked(spec, d, dtype, experts_implementation="eager"):
    """from_pretrained (by default with the eager experts implementation: the modeling file's own loop).
    Returns (model or None, problems): a non-empty loading_info, an exception, or a transformers warning
    about missing / unexpected / mismatched / newly initialised weights (its LOAD REPORT) are problems."""
    catcher = _WarnCatcher()
    tlog = logging.getLogger("transformers")
    tlog.addHandler(catcher)
    old = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_warning()
    problems = []
    model = None
    try:
        kw = {"experts_implementation": experts_implementation} if experts_implementation else {}
        model, info = spec["model_cls"].from_pretrained(d, dtype=dtype, output_loading_info=True, **kw)
        problems += [f"{k}: {v}" for k, v in info.items() if v]
    except Exception as e:  # noqa: BLE001 - reported, not raised
        problems.append(f"from_pretrained raised {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    finally:
        transformers.utils.logging.set_verbosity(old)
        tlog.removeHandler(catcher)
    for msg in catcher.records:
        if any(w in msg.lower() for w in LOAD_WORDS):
            problems.append("warning: " + " ".join(re.sub(r"\x1b\[[0-9;]*m", "", msg).split())[:300])
    if model is not None:
        model.eval()
    return model, problems


def load_model(spec, d, dtype, experts_implementation="eager"):
    model, problems = load_checked(spec, d, dtype, experts_implementation)
    if problems:
        raise SystemExit(f"from_pretrained({d}): {problems}")
    return model


def reinit_block(spec, model_type, block, seed):
    g = gen(seed)
    std_by_name = spec.get("std_by_name", {})
    with torch.no_grad():
        for name, p in sorted(block.named_parameters()):
            std = std_by_name.get(name, spec["std"])
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)
        if model_type == "deepseek_v3":
            b = block.gate.e_score_correction_bias
            b.copy_(torch.randn(b.shape, generator=g, dtype=torch.float32) * 0.1)


def run_block(model, spec, x, grad_out):
    """Forward + backward of layer 1's MoE block; returns output, router capture, gradInput, param grads."""
    block = model.model.layers[LAYER].mlp
    router = getattr(block, spec["router"])
    captured = {}

    def hook(_m, _inp, out):
        captured["logits"], captured["weights"], captured["indices"] = (t.detach() for t in out)

    h = router.register_forward_hook(hook)
    block.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_(True)
    out = block(xx)
    h.remove()
    if isinstance(out, tuple):  # gpt_oss returns (hidden_states, router_scores)
        out = out[0]
    out.backward(grad_out)
    grads = {n: p.grad.detach().clone() for n, p in block.named_parameters()}
    return out.detach(), captured, xx.grad.detach(), grads


def checkpoint_grads(model, grads, model_type, tmp):
    """The block's parameter gradients under the checkpoint's key names and layout.

    Every block parameter's data is replaced by its gradient, every other parameter zeroed, and the
    model saved with save_pretrained (so transformers' own save-time conversion, e.g. the Mixtral
    fused gate_up_proj -> experts.N.w1/w3, is applied). The layer-1 MoE keys are taken from the result;
    buffers (deepseek_v3's e_score_correction_bias) have no gradient and are left out."""
    m = copy.deepcopy(model)
    block = m.model.layers[LAYER].mlp
    block_params = {id(p): n for n, p in block.named_parameters()}
    with torch.no_grad():
        for p in m.parameters():
            if id(p) in block_params:
                p.copy_(grads[block_params[id(p)]])
            else:
                p.zero_()
    m.save_pretrained(tmp)
    pre = moe_prefix(model_type)
    buffers = {pre + n for n, _ in block.named_buffers()}
    out = {}
    for fn in sorted(os.listdir(tmp)):
        if fn.endswith(".safetensors"):
            for k, v in load_file(os.path.join(tmp, fn)).items():
                if k.startswith(pre) and k not in buffers and not k.endswith("e_score_correction_bias"):
                    out[k] = v.contiguous()
    shutil.rmtree(tmp)
    return out


def hf_aux_loss(model_type, logits, config):
    mod = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    fn = getattr(mod, "load_balancing_loss_func", None)
    if fn is None:
        return None
    E = n_experts(config)
    val = fn((logits,), E, config.num_experts_per_tok, None)
    return val


def check_aux_call(model_type, model, config):
    """Shows that the model's own aux_loss is load_balancing_loss_func(tuple of every MoE layer's logits,
    num_experts, num_experts_per_tok, attention_mask)."""
    mod = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    fn = getattr(mod, "load_balancing_loss_func", None)
    if fn is None:
        return None
    ids = torch.arange(B * T).reshape(B, T) % config.vocab_size
    with torch.no_grad():
        o = model(input_ids=ids, output_router_logits=True)
    E = n_experts(config)
    again = fn(o.router_logits, E, config.num_experts_per_tok, None)
    return {
        "modelAuxLoss": float(o.aux_loss),
        "recomputed": float(again),
        "numMoeLayersInTuple": len(o.router_logits),
        "equal": bool(torch.equal(o.aux_loss, again)),
    }


# ---------------------------------------------------------------------------- routing checks


def selection_margins(model_type, config, logits, block):
    """The smallest gap at each discrete decision of the routing (f32), and family-specific facts."""
    lg = logits.float()
    k = config.num_experts_per_tok
    facts = {}
    if model_type == "gpt_oss":
        s = lg.sort(dim=-1, descending=True).values
        margin = (s[:, k - 1] - s[:, k]).min()
    elif model_type == "deepseek_v3":
        bias = block.gate.e_score_correction_bias.float()
        ng, tg = config.n_group, config.topk_group
        E = lg.shape[-1]
        scores = lg.sigmoid()
        sfc = scores + bias
        gs = sfc.view(-1, ng, E // ng).topk(2, dim=-1)[0].sum(-1)
        gss = gs.sort(dim=-1, descending=True).values
        gmargin = (gss[:, tg - 1] - gss[:, tg]).min()
        gidx = gs.topk(tg, dim=-1).indices
        gmask = torch.zeros_like(gs).scatter_(1, gidx, 1).unsqueeze(-1).expand(-1, ng, E // ng).reshape(-1, E)
        masked = sfc.masked_fill(~gmask.bool(), float("-inf"))
        ms = masked.sort(dim=-1, descending=True).values
        emargin = (ms[:, k - 1] - ms[:, k]).min()
        margin = torch.minimum(gmargin, emargin)
        sel = lambda t: [sorted(r) for r in t.topk(k, dim=-1).indices.tolist()]
        grouped = sel(masked)
        facts["tokensWhereBiasChangesSelection"] = sum(
            a != b
            for a, b in zip(grouped, sel(scores.masked_fill(~_group_mask(scores, ng, tg, E).bool(), float("-inf"))))
        )
        facts["tokensWhereGroupMaskChangesSelection"] = sum(a != b for a, b in zip(grouped, sel(sfc)))
        facts["minGroupMargin"] = float(gmargin)
        facts["minExpertMargin"] = float(emargin)
    else:
        p = torch.softmax(lg, dim=-1).sort(dim=-1, descending=True).values
        margin = (p[:, k - 1] - p[:, k]).min()
    facts["minSelectionMargin"] = float(margin)
    return facts


def never_selected(indices, E):
    hit = set(indices.reshape(-1).tolist())
    return [e for e in range(E) if e not in hit]


def _group_mask(scores, ng, tg, E):
    gs = scores.view(-1, ng, E // ng).topk(2, dim=-1)[0].sum(-1)
    gidx = gs.topk(tg, dim=-1).indices
    return torch.zeros_like(gs).scatter_(1, gidx, 1).unsqueeze(-1).expand(-1, ng, E // ng).reshape(-1, E)


def gpt_oss_clamp_facts(block, x, indices, limit):
    ex = block.experts
    xs = x.reshape(-1, x.shape[-1]).float()
    gate_hi = up_hi = up_lo = total = 0
    mx = 0.0
    for t in range(xs.shape[0]):
        for e in indices[t].tolist():
            gu = xs[t] @ ex.gate_up_proj[e].float() + ex.gate_up_proj_bias[e].float()
            gate, up = gu[::2], gu[1::2]
            gate_hi += int((gate > limit).sum())
            up_hi += int((up > limit).sum())
            up_lo += int((up < -limit).sum())
            total += gate.numel()
            mx = max(mx, float(gu.abs().max()))
    return {
        "gatePreactsAboveLimit": gate_hi,
        "upPreactsAboveLimit": up_hi,
        "upPreactsBelowMinusLimit": up_lo,
        "preactsPerHalf": total,
        "maxAbsPreact": mx,
    }


def same_selection(a, b):
    return [sorted(r) for r in a.tolist()] == [sorted(r) for r in b.tolist()]


# ---------------------------------------------------------------------------- generation


def write_json(path, obj):
    text = json.dumps(obj, indent=2)
    # short lists of numbers on one line: [2, 5, 32]
    text = re.sub(r"\[\s*([-0-9.e, \n]*?)\s*\]", lambda m: "[" + ", ".join(re.split(r",\s*", m.group(1).strip())) + "]" if m.group(1).strip() else "[]", text)
    with open(path, "w") as f:
        f.write(text + "\n")


def router_dtype_of(model, spec):
    block = model.model.layers[LAYER].mlp
    router = getattr(block, spec["router"])
    return router.weight.dtype


def generate_family(model_type, spec, out_root, seed, tmp_root):
    """Returns None on success, or a string saying why this seed is rejected."""
    cfg = spec["config"]()
    torch.manual_seed(seed)
    model = spec["model_cls"](cfg)
    model.eval()
    block = model.model.layers[LAYER].mlp
    reinit_block(spec, model_type, block, seed + 1)

    H = cfg.hidden_size
    gx = gen(seed + 2)
    x32 = torch.randn(B, T, H, generator=gx) * spec["xscale"]
    g32 = torch.randn(B, T, H, generator=gx)

    d32 = os.path.join(out_root, f"{model_type}-f32")
    d16 = os.path.join(out_root, f"{model_type}-bf16")
    for d in (d32, d16):
        if os.path.exists(d):
            shutil.rmtree(d)
    model.save_pretrained(d32)
    # the SAME model cast to bfloat16 and saved in bf16 (every tensor, the deepseek_v3 router included)
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(d16)

    results = {}
    for tag, d, dtype in (("f32", d32, torch.float32), ("bf16", d16, torch.bfloat16)):
        m = load_model(spec, d, dtype)
        if tag == "f32":  # the reload reproduces the in-memory model exactly
            ref = dict(model.state_dict())
            for n, t in m.state_dict().items():
                if not torch.equal(t, ref[n]):
                    raise SystemExit(f"{model_type}: reload differs at {n}")
        x = x32.to(dtype)
        go = g32.to(dtype)
        out, cap, gin, grads = run_block(m, spec, x, go)
        io = {
            "x": x,
            "gradOutput": go,
            "output": out,
            "routerLogits": cap["logits"].float(),
            "indices": cap["indices"].to(torch.int64),
            "weights": cap["weights"].float(),
            "gradInput": gin,
        }
        aux = hf_aux_loss(model_type, cap["logits"], cfg)
        if aux is not None:
            io["hfAuxLoss"] = aux.detach().float().reshape(())
            io["hfAuxLossScaled"] = (aux.detach().float() * cfg.router_aux_loss_coef).reshape(())
        grads_ck = checkpoint_grads(m, grads, model_type, os.path.join(tmp_root, f"{model_type}-{tag}-grads"))
        facts = selection_margins(model_type, cfg, cap["logits"], m.model.layers[LAYER].mlp)
        if model_type == "gpt_oss":
            facts.update(gpt_oss_clamp_facts(m.model.layers[LAYER].mlp, x, cap["indices"], cfg.swiglu_limit))
        extra = {}
        # transformers' default experts implementation (grouped_mm where torch has it) against the eager loop
        md = load_model(spec, d, dtype, experts_implementation=None)
        with torch.no_grad():
            od = md.model.layers[LAYER].mlp(x)
        od = od[0] if isinstance(od, tuple) else od
        extra["defaultExperts"] = {
            "implementation": getattr(md.config, "_experts_implementation_internal", None) or md.config._experts_implementation,
            "outputMaxAbsDiffToEager": float((od.float() - out.float()).abs().max()),
        }
        del md
        if tag == "bf16":
            # the same computation on the same bf16-rounded weights and input, upcast to float32
            m32 = load_model(spec, d, torch.float32)
            out32, cap32, gin32, grads32 = run_block(m32, spec, x.float(), go.float())
            io["outputF32"] = out32
            io["gradInputF32"] = gin32
            extra["gradsF32"] = checkpoint_grads(m32, grads32, model_type, os.path.join(tmp_root, f"{model_type}-bf16-gradsF32"))
            extra["f32SameSelection"] = same_selection(cap["indices"], cap32["indices"])
            extra["bf16VsF32"] = {
                "outputMaxAbs": float((out.float() - out32).abs().max()),
                "outputMaxAbsRef": float(out32.abs().max()),
                "gradInputMaxAbs": float((gin.float() - gin32).abs().max()),
                "gradInputMaxAbsRef": float(gin32.abs().max()),
            }
            facts32 = selection_margins(model_type, cfg, cap32["logits"], m32.model.layers[LAYER].mlp)
            extra["f32Margins"] = facts32
        results[tag] = dict(model=m, d=d, io=io, grads=grads_ck, facts=facts, extra=extra, cap=cap)

    # seed acceptance: a clear routing decision everywhere, bf16 and f32 agree on the selection,
    # and the family's special features really change something
    f32 = results["f32"]
    if f32["facts"]["minSelectionMargin"] < 2e-3:
        return f"f32 selection margin {f32['facts']['minSelectionMargin']:.2e}"
    bf = results["bf16"]
    if bf["facts"]["minSelectionMargin"] <= 0 or bf["extra"]["f32Margins"]["minSelectionMargin"] < 2e-3:
        return "bf16 selection margin"
    if not bf["extra"]["f32SameSelection"]:
        return "bf16 and f32 select different experts"
    if not same_selection(bf["cap"]["indices"], f32["cap"]["indices"]):
        return "bf16 and the f32 fixture select different experts"
    if model_type == "deepseek_v3":
        for tag in ("f32", "bf16"):
            fx = results[tag]["facts"]
            if fx["tokensWhereBiasChangesSelection"] == 0 or fx["tokensWhereGroupMaskChangesSelection"] == 0:
                return f"{tag}: bias/group mask change nothing"
    if model_type == "gpt_oss":
        for tag in ("f32", "bf16"):
            fx = results[tag]["facts"]
            if min(fx["gatePreactsAboveLimit"], fx["upPreactsAboveLimit"], fx["upPreactsBelowMinusLimit"]) == 0:
                return f"{tag}: the swiglu clamp does not matter"

    if never_selected(f32["cap"]["indices"], n_experts(cfg)):
        return f"experts {never_selected(f32['cap']['indices'], n_experts(cfg))} never selected"
    aux_call = check_aux_call(model_type, results["f32"]["model"], cfg)
    for tag, r in results.items():
        d = r["d"]
        save_file({k: v.contiguous() for k, v in r["io"].items()}, os.path.join(d, "io.safetensors"))
        save_file(r["grads"], os.path.join(d, "grads.safetensors"))
        if tag == "bf16":
            save_file(r["extra"]["gradsF32"], os.path.join(d, "gradsF32.safetensors"))
        write_json(os.path.join(d, "meta.json"), make_meta(model_type, spec, cfg, tag, r, seed, aux_call))
    return None


def make_meta(model_type, spec, cfg, tag, r, seed, aux_call):
    d = r["d"]
    ck = checkpoint_tensors(d)
    pre = moe_prefix(model_type)
    moe = {k: v for k, v in sorted(ck.items()) if k.startswith(pre)}
    m = r["model"]
    rdt = router_dtype_of(m, spec)
    block = m.model.layers[LAYER].mlp
    io = r["io"]
    has_aux = "hfAuxLoss" in io
    notes = dict(ROUTING[model_type])
    notes["sourceFile"] = f"transformers/models/{model_type}/{check_quotes(model_type)} (every quoted line checked present)"
    notes["blockClass"] = type(block).__name__
    notes["routerClass"] = type(getattr(block, spec["router"])).__name__
    notes["expertsImplementation"] = (
        "every tensor here comes from from_pretrained(..., experts_implementation='eager'): the per-expert loop in "
        "the modeling file. defaultExperts: the implementation transformers picks by default on this CPU and the "
        "largest |difference| of its block output from the eager one"
    )
    notes["defaultExperts"] = r["extra"]["defaultExperts"]
    notes["captured"] = (
        f"routerLogits/weights/indices: a forward hook on block.{spec['router']} (its forward returns "
        "(router_logits, routing_weights, selected_indices)); routerLogits and weights cast to float32 here, "
        "indices int64 as torch.topk returns them; output = the block's hidden-states output; "
        "gradInput = d sum(output * gradOutput) / dx, by output.backward(gradOutput)"
    )
    if model_type == "deepseek_v3":
        notes["droppedGroupMask"] = (
            "-inf: `scores_for_choice = scores_for_choice.masked_fill(~score_mask.bool(), float(\"-inf\"))` "
            "(modeling_deepseek_v3.py, DeepseekV3TopkRouter.forward)"
        )
        notes["keepInFp32"] = (
            "DeepseekV3PreTrainedModel._keep_in_fp32_modules_strict = ['e_score_correction_bias', 'gate.weight']: "
            "the checkpoint holds them in bf16 (the whole model was cast), from_pretrained(dtype=bfloat16) upcasts "
            "them to float32 and the router runs in float32"
        )
        notes["eScoreCorrectionBias"] = (
            "a persistent buffer, saved in the checkpoint (moeKeys) but not a parameter: it has no gradient and is "
            "not in grads.safetensors; here random normal(std 0.1)"
        )
        notes["sharedExpertIntermediate"] = "moe_intermediate_size * n_shared_experts = 16"
        if tag == "bf16":
            notes["gateGradDtype"] = (
                "grads.safetensors holds gate.weight's gradient in float32 (the parameter is float32 at run time), "
                "the other gradients in bfloat16"
            )
    if model_type == "mixtral":
        notes["checkpointLayout"] = (
            "the checkpoint keeps the Hub's per-expert block_sparse_moe.experts.N.w1/w2/w3 names; transformers renames "
            "block_sparse_moe -> mlp and fuses the experts at load, and splits them back at save"
        )
    if model_type == "gpt_oss":
        notes["checkpointLayout"] = (
            "fused experts in the checkpoint as in memory: gate_up_proj [E, H, 2I] (x @ W, gate/up interleaved "
            "on the last dim), down_proj [E, I, H]; real Hub gpt-oss checkpoints are MXFP4 (_blocks/_scales), "
            "this unquantised layout is what save_pretrained writes for a bf16/f32 model"
        )
    if has_aux:
        notes["hfAuxLoss"] = (
            f"transformers.models.{model_type}.modeling_{model_type}.load_balancing_loss_func((routerLogits,), "
            f"num_experts={n_experts(cfg)}, "
            f"top_k={cfg.num_experts_per_tok}, attention_mask=None) on THIS layer's router logits alone, as the router "
            "returned them (in the router's dtype, so the softmax inside runs in bf16 for a bf16 router); "
            "it computes E * sum_e f_e * P_e with f_e = (number of top-k picks of expert e) / N_tokens (the "
            "function takes its own top-k of softmax(all logits), whatever the family's router does: the same "
            "experts here; f sums to k, not 1) and "
            "P_e = mean over tokens of softmax(logits)[e]; hfAuxLossScaled = router_aux_loss_coef * hfAuxLoss "
            f"(router_aux_loss_coef = {cfg.router_aux_loss_coef}). The model's own aux_loss is this function on the "
            "tuple of every MoE layer's logits, one sum over all layers' rows (checked: auxCheck)"
        )
        if aux_call is not None:
            notes["auxCheck"] = aux_call
    else:
        notes["hfAuxLoss"] = (
            "none: transformers' deepseek_v3 has no load_balancing_loss_func and no aux loss (DeepSeek-V3 balances "
            "with e_score_correction_bias); io.safetensors has no hfAuxLoss"
        )
    notes["routingFacts"] = r["facts"]
    if tag == "bf16":
        notes["bf16"] = {
            "howMade": "the f32 model (same seed) cast with .to(torch.bfloat16) and saved; io from "
            "from_pretrained(dir, dtype=torch.bfloat16); outputF32/gradInputF32/gradsF32.safetensors from "
            "from_pretrained(dir, dtype=torch.float32) (the bf16-rounded weights upcast) on x.float(), gradOutput.float()",
            "sameSelectionAsF32Computation": r["extra"]["f32SameSelection"],
            "distance": r["extra"]["bf16VsF32"],
            "f32ComputationRoutingFacts": r["extra"]["f32Margins"],
        }
    io_info = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in io.items()}
    grads_dtypes = sorted({str(v.dtype).replace("torch.", "") for v in r["grads"].values()})
    meta = {
        "model_type": model_type,
        "layer": LAYER,
        "dtype": "float32" if tag == "f32" else "bfloat16",
        **versions(),
        "seed": seed,
        "B": B,
        "T": T,
        "moeKeys": list(moe.keys()),
        "moeKeyInfo": {k: {"shape": v["shape"], "dtype": v["dtype"]} for k, v in moe.items()},
        "moduleKeyPrefix": pre,
        "routerDtype": str(rdt).replace("torch.", ""),
        "numExperts": n_experts(cfg),
        "topK": int(cfg.num_experts_per_tok),
        "io": io_info,
        "gradsDtypes": grads_dtypes,
        "gradKeys": sorted(r["grads"].keys()),
        "notes": notes,
    }
    return meta


def make_sharded(spec, out_root):
    src = os.path.join(out_root, "mixtral-f32")
    dst = os.path.join(out_root, "mixtral-f32-sharded")
    if os.path.exists(dst):
        shutil.rmtree(dst)
    m = load_model(spec, src, torch.float32)
    m.save_pretrained(dst, max_shard_size=40_000)
    with open(os.path.join(dst, "model.safetensors.index.json")) as f:
        index = json.load(f)["weight_map"]
    pre = moe_prefix("mixtral")
    shards = sorted(set(index.values()))
    moe_shards = sorted({v for k, v in index.items() if k.startswith(pre + "experts.")})
    if len(shards) < 3 or len(moe_shards) < 2:
        raise SystemExit(f"sharding: {len(shards)} shards, layer-1 experts in {moe_shards}")
    # the shards hold the same tensors as the single file
    a = load_file(os.path.join(src, "model.safetensors"))
    b = {}
    for s in shards:
        b.update(load_file(os.path.join(dst, s)))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    write_json(
        os.path.join(dst, "meta.json"),
        {
            "model_type": "mixtral",
            "layer": LAYER,
            "dtype": "float32",
            **versions(),
            "sameModelAs": "../mixtral-f32",
            "io": "../mixtral-f32/io.safetensors",
            "grads": "../mixtral-f32/grads.safetensors",
            "howMade": "from_pretrained(mixtral-f32).save_pretrained(dir, max_shard_size=40000)",
            "shards": shards,
            "layer1ExpertShards": moe_shards,
            "moeKeysByShard": {s: sorted(k for k, v in index.items() if v == s and k.startswith(pre)) for s in shards},
        },
    )


SEEDS = {"mixtral": 110, "qwen2_moe": 210, "qwen3_moe": 300, "olmoe": 440, "deepseek_v3": 530, "gpt_oss": 600}


def generate(out_root, only=None):
    os.makedirs(out_root, exist_ok=True)
    specs = family_specs()
    tmp_root = tempfile.mkdtemp(prefix="hf_fixtures_")
    chosen = {}
    try:
        for model_type, spec in specs.items():
            if only and model_type not in only:
                continue
            check_quotes(model_type)
            seed = SEEDS[model_type]
            for attempt in range(50):
                why = generate_family(model_type, spec, out_root, seed + 10 * attempt, tmp_root)
                if why is None:
                    break
                print(f"  {model_type}: seed {seed + 10 * attempt} rejected ({why})")
            else:
                raise SystemExit(f"{model_type}: no seed accepted")
            chosen[model_type] = seed + 10 * attempt
            report(out_root, model_type)
        if not only or "mixtral" in only:
            make_sharded(specs["mixtral"], out_root)
            print(f"mixtral-f32-sharded: {sorted(os.listdir(os.path.join(out_root, 'mixtral-f32-sharded')))}")
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return chosen


def report(out_root, model_type):
    for tag in ("f32", "bf16"):
        d = os.path.join(out_root, f"{model_type}-{tag}")
        io = load_file(os.path.join(d, "io.safetensors"))
        meta = json.load(open(os.path.join(d, "meta.json")))
        size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
        aux = io.get("hfAuxLoss")
        line = f"{model_type}-{tag}: seed {meta['seed']}, {size} bytes, router {meta['routerDtype']}"
        if aux is not None:
            line += f", hfAuxLoss {float(aux):.6f} (x coef {float(io['hfAuxLossScaled']):.6g})"
        else:
            line += ", no HF aux loss"
        line += f", margin {meta['notes']['routingFacts']['minSelectionMargin']:.3g}"
        print(line)


# ---------------------------------------------------------------------------- verify-roundtrip


def verify_roundtrip(fixtures, rt_dir):
    """<rt_dir>/<family>/layer.safetensors (layer-1 MoE keys written by our library) and
    <rt_dir>/<family>/expected.safetensors (x, output): merge the layer keys into a copy of the
    fixture checkpoint, from_pretrained it, run layer 1's mlp on x, compare."""
    specs = family_specs()
    failed = False
    for fam in sorted(os.listdir(rt_dir)):
        fdir = os.path.join(rt_dir, fam)
        if not os.path.isfile(os.path.join(fdir, "layer.safetensors")):
            continue
        model_type = fam.rsplit("-", 1)[0] if fam.endswith(("-f32", "-bf16")) else fam
        tag = "bf16" if fam.endswith("-bf16") else "f32"
        if model_type not in specs:
            print(f"{fam}: unknown family")
            failed = True
            continue
        spec = specs[model_type]
        src = os.path.join(fixtures, f"{model_type}-{tag}")
        dtype = torch.bfloat16 if tag == "bf16" else torch.float32
        layer = load_file(os.path.join(fdir, "layer.safetensors"))
        expected = load_file(os.path.join(fdir, "expected.safetensors"))
        with tempfile.TemporaryDirectory() as tmp:
            for f in os.listdir(src):
                if f in ("config.json",) or (f.startswith("model") and (f.endswith(".safetensors") or f.endswith(".json"))):
                    shutil.copy(os.path.join(src, f), tmp)
            ck = load_file(os.path.join(tmp, "model.safetensors"))
            pre = moe_prefix(model_type)
            orig_moe = {k for k in ck if k.startswith(pre)}
            problems = []
            if set(layer) != orig_moe:
                problems.append(
                    f"key sets differ: missing {sorted(orig_moe - set(layer))[:5]}, extra {sorted(set(layer) - orig_moe)[:5]}"
                )
            for k in list(ck):
                if k.startswith(pre):
                    del ck[k]
            ck.update(layer)
            save_file(ck, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
            model, load_problems = load_checked(spec, tmp, dtype)
            problems += load_problems
            if model is None:
                failed = True
                print(f"{fam}: FAIL {problems}")
                continue
            model.eval()
            x = expected["x"].to(dtype)
            with torch.no_grad():
                out = model.model.layers[LAYER].mlp(x)
            if isinstance(out, tuple):
                out = out[0]
            ref = expected["output"].float()
            diff = (out.float() - ref).abs()
            max_abs = float(diff.max())
            rel = max_abs / max(float(ref.abs().max()), 1e-30)
            bad = bool(problems) or (tag == "f32" and rel > 1e-5)
            failed |= bad
            print(f"{fam}: max abs {max_abs:.3e}, max rel {rel:.3e}, warnings/problems: {problems or 'none'}"
                  f"{'  FAIL' if bad else ''}")
    return 1 if failed else 0


# ---------------------------------------------------------------------------- --check


def _swiglu(x, g, u, d):
    F = torch.nn.functional
    return F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)


def reference_block(model_type, W, x, cfg, pre):
    """Layer 1's MoE block written out from the checkpoint tensors alone (float64), per the
    semantics in ROUTING: an independent check of the fixtures' keys, layouts and routing."""
    F = torch.nn.functional
    E, k = n_experts(cfg), cfg.num_experts_per_tok
    h = x.reshape(-1, x.shape[-1])
    out = torch.zeros_like(h)
    if model_type == "gpt_oss":
        logits = F.linear(h, W[pre + "router.weight"], W[pre + "router.bias"])
        top, idx = logits.topk(k, dim=-1)
        w = torch.softmax(top, dim=-1)
        lim, alpha = cfg.swiglu_limit, cfg.swiglu_alpha
        for t in range(h.shape[0]):
            for j in range(k):
                e = int(idx[t, j])
                gu = h[t] @ W[pre + "experts.gate_up_proj"][e] + W[pre + "experts.gate_up_proj_bias"][e]
                g, u = gu[::2].clamp(max=lim), gu[1::2].clamp(-lim, lim)
                o = ((u + 1) * g * torch.sigmoid(alpha * g)) @ W[pre + "experts.down_proj"][e] + W[pre + "experts.down_proj_bias"][e]
                out[t] = out[t] + w[t, j] * o
        return out.reshape(x.shape), logits, idx, w
    names = ("w1", "w3", "w2") if model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    logits = F.linear(h, W[pre + "gate.weight"])
    if model_type == "deepseek_v3":
        ng, tg = cfg.n_group, cfg.topk_group
        s = logits.sigmoid()
        sfc = s + W[pre + "gate.e_score_correction_bias"]
        gs = sfc.view(-1, ng, E // ng).topk(2, dim=-1)[0].sum(-1)
        keep = torch.zeros_like(gs).scatter_(1, gs.topk(tg, dim=-1).indices, 1)
        keep = keep.unsqueeze(-1).expand(-1, ng, E // ng).reshape(-1, E)
        idx = sfc.masked_fill(keep == 0, float("-inf")).topk(k, dim=-1).indices
        w = s.gather(1, idx)
        if cfg.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        w = w * cfg.routed_scaling_factor
    else:
        top, idx = torch.softmax(logits, dim=-1).topk(k, dim=-1)
        norm = model_type == "mixtral" or cfg.norm_topk_prob
        w = top / top.sum(-1, keepdim=True) if norm else top
    for t in range(h.shape[0]):
        for j in range(k):
            e = int(idx[t, j])
            ws = [W[f"{pre}experts.{e}.{n}.weight"] for n in names]
            out[t] = out[t] + w[t, j] * _swiglu(h[t], *ws)
    if model_type == "qwen2_moe":
        sh = [W[f"{pre}shared_expert.{n}.weight"] for n in names]
        out = out + torch.sigmoid(F.linear(h, W[pre + "shared_expert_gate.weight"])) * _swiglu(h, *sh)
    if model_type == "deepseek_v3":
        out = out + _swiglu(h, *[W[f"{pre}shared_experts.{n}.weight"] for n in names])
    return out.reshape(x.shape), logits, idx, w


def check_fixtures(root):
    """Recomputes every fixture's output, routing, input gradient and checkpoint-layout parameter
    gradients with `reference_block` in float64 from model.safetensors; prints the relative errors."""
    specs = family_specs()
    worst = 0.0
    for d in sorted(os.listdir(root)):
        mpath = os.path.join(root, d, "meta.json")
        if not os.path.isfile(mpath) or not os.path.isfile(os.path.join(root, d, "io.safetensors")):
            continue
        meta = json.load(open(mpath))
        mt, pre = meta["model_type"], meta["moduleKeyPrefix"]
        cfg = specs[mt]["config"]()
        ck = load_file(os.path.join(root, d, "model.safetensors"))
        W = {n: v.double().requires_grad_(True) for n, v in ck.items() if n.startswith(pre)}
        assert sorted(W) == sorted(meta["moeKeys"]), d
        io = load_file(os.path.join(root, d, "io.safetensors"))
        x = io["x"].double().requires_grad_(True)
        out, logits, idx, w = reference_block(mt, W, x, cfg, pre)
        (out * io["gradOutput"].double()).sum().backward()

        def rel(a, b):
            b = b.detach().double()
            return float((a.double() - b).abs().max()) / max(float(b.abs().max()), 1e-30)

        sel = [sorted(r) for r in idx.tolist()] == [sorted(r) for r in io["indices"].tolist()]
        wmap = {(t, int(idx[t, j])): float(w[t, j]) for t in range(idx.shape[0]) for j in range(idx.shape[1])}
        werr = max(abs(float(io["weights"][t, j]) - wmap.get((t, int(io["indices"][t, j])), float("inf")))
                   for t in range(idx.shape[0]) for j in range(idx.shape[1]))

        def grad_err(gfile):
            g = load_file(os.path.join(root, d, gfile))
            params = {n for n in W if not n.endswith("e_score_correction_bias")}
            assert set(g) == params, (d, gfile, sorted(set(g) ^ params))
            # an expert no token picked has no reference gradient: its gradient must be zero
            return max(rel(g[n], W[n].grad) if W[n].grad is not None else float(g[n].abs().max()) for n in g)

        errs = {"output": rel(io["output"], out), "gradInput": rel(io["gradInput"], x.grad),
                "routerLogits": rel(io["routerLogits"], logits), "weights": werr, "grads": grad_err("grads.safetensors")}
        if "outputF32" in io:
            errs.update(outputF32=rel(io["outputF32"], out), gradInputF32=rel(io["gradInputF32"], x.grad),
                        gradsF32=grad_err("gradsF32.safetensors"))
        if meta["dtype"] == "float32" or "outputF32" in io:
            f32errs = [v for n, v in errs.items() if meta["dtype"] == "float32" or n.endswith("F32")]
            worst = max(worst, max(f32errs))
        print(f"{d:18s} same experts {sel}  " + "  ".join(f"{n} {v:.1e}" for n, v in errs.items()))
        if not sel:
            worst = float("inf")
    print(f"worst float32 relative error: {worst:.2e}")
    return 0 if worst < 1e-5 else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="test/fixtures/hf", help="fixture root (written, or read by --verify-roundtrip)")
    ap.add_argument("--only", nargs="*", help="families to (re)generate")
    ap.add_argument("--verify-roundtrip", metavar="DIR", help="check a directory written by our JS code")
    ap.add_argument("--check", action="store_true", help="recompute the fixtures under --out from their checkpoints alone")
    args = ap.parse_args()
    if args.check:
        sys.exit(check_fixtures(args.out))
    if args.verify_roundtrip:
        sys.exit(verify_roundtrip(args.out, args.verify_roundtrip))
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    generate(args.out, args.only)


if __name__ == "__main__":
    main()
