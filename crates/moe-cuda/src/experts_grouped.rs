//! The experts on our own grouped GEMM ([`crate::grouped_gemm`], Hopper only): the forward and
//! backward of [`crate::experts`] with every expert's GEMM in one launch that reads the
//! per-expert counts on the GPU, so nothing is read back before the GEMMs are queued (no
//! synchronisation, no pointer arrays uploaded).
//!
//! Taken where it applies (bf16 tokens and weights, no expert biases, sizes multiples of 8, a
//! `tokensPerExpert` whose sum the GPU already knows: permute's, [`Facts::counts_total`]) as
//! `MOE_DISPATCH_EXPERTS_GEMM` says ([`experts_gemm`]): unset, `auto` or `grouped` (one and the
//! same), forward and backward wherever it applies; `cublas`, never. The activation passes are the
//! cuBLAS path's (`ExpMath::Fast`, the same kernels; or, with `MOE_DISPATCH_GG_FUSE=act`, the
//! forward's in the first GEMM's epilogue, the same code and bits), and the GEMMs sum over K in the same order
//! as cuBLAS does at these shapes (the kernel's outputs were bit-identical to cuBLAS's in
//! `moe-cuda-bench ggemm`), so both paths agree with the cpu backend to the same tolerance.
//!
//! [`Facts::counts_total`]: crate::tensor::Facts::counts_total

use moe_core::activations::ActivationOptions;
use moe_core::experts::{check_experts, check_experts_backward, ExpertsCheck, ExpertsGrads};
use moe_core::tensor::DType;

use crate::activations::{launch_activation, launch_activation_backward, ExpMath};
use crate::device::{Buffer, Device};
use crate::error::Result;
use crate::experts::{saved_tensors, DeviceExpertsInputs, ExpertsSaved, GradOutput, Held, SavedArg, TokensGrad};
use crate::grouped_gemm::{self, WeightLayout};
use crate::tensor::{DeviceArg, DeviceTensor};

/// The GEMMs the experts use on a Hopper GPU (`MOE_DISPATCH_EXPERTS_GEMM`, read once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertsGemm {
    /// cuBLAS, forward and backward (`cublas`).
    Cublas,
    /// Our grouped GEMM, forward and backward, wherever it applies, at any number of experts,
    /// and the opt-in fusions where they are asked for (`grouped` or `auto`, unset: the default).
    /// Until the thirty-third session `auto` kept cuBLAS below 32 experts and only `grouped` took
    /// the gather fusion; since the tail fixes of the thirty-first our GEMM was ahead of cuBLAS at
    /// the Mixtral-like shape (8 experts) in nine H100 rounds of ten (0.2% behind in one), with a
    /// lower peak (5.64 against 6.11 GB) and no wait for the counts, and 2.0x PyTorch's layer at
    /// the fine-grained one (64 experts) (docs/gpu-report.md).
    Grouped,
}

/// [`ExpertsGemm`] as `MOE_DISPATCH_EXPERTS_GEMM` sets it (`cublas`; `grouped` or `auto`, the
/// same; unset: grouped; another value: grouped, with a warning on stderr naming the values it
/// takes).
pub fn experts_gemm() -> ExpertsGemm {
    static SELECTED: std::sync::OnceLock<ExpertsGemm> = std::sync::OnceLock::new();
    *SELECTED.get_or_init(|| match std::env::var("MOE_DISPATCH_EXPERTS_GEMM").as_deref() {
        Ok("cublas") => ExpertsGemm::Cublas,
        Ok("grouped" | "auto") | Err(_) => ExpertsGemm::Grouped,
        Ok(other) => {
            eprintln!("moe-dispatch: MOE_DISPATCH_EXPERTS_GEMM={other:?}: expected cublas, grouped or auto; using grouped");
            ExpertsGemm::Grouped
        }
    })
}

/// The sizes of a problem the grouped path takes.
pub struct GroupedPlan {
    n: usize,
    dim: usize,
    width: usize,
    inter: usize,
    experts: usize,
}

impl GroupedPlan {
    pub fn rows(&self) -> usize {
        self.n
    }
    pub fn width(&self) -> usize {
        self.width
    }
    pub fn inter(&self) -> usize {
        self.inter
    }
}

/// The grouped path's plan, or None where it does not apply (the caller's cuBLAS path runs):
/// the core's checks pass, bf16 everywhere, no biases, sizes multiples of 8 and within int32,
/// the counts' sum known on the GPU to be the rows', the device a Hopper.
pub fn grouped_plan(
    dev: &Device,
    inp: &DeviceExpertsInputs,
    act: &ActivationOptions,
    grad_output: Option<GradOutput>,
) -> Option<GroupedPlan> {
    grouped_plan_rows(dev, inp, None, act, grad_output)
}

/// [`grouped_plan`], or with `gather` (`Some(rows)`: [`Gather`]'s rows) the plan of the experts
/// reading `rows` rows gathered from the tokens (`inp.tokens` then holds the tokens in their own
/// order).
pub fn grouped_plan_rows(
    dev: &Device,
    inp: &DeviceExpertsInputs,
    gather: Option<usize>,
    act: &ActivationOptions,
    grad_output: Option<GradOutput>,
) -> Option<GroupedPlan> {
    let mode = experts_gemm();
    if mode == ExpertsGemm::Cublas || inp.gate_up_bias.is_some() || inp.down_bias.is_some() {
        return None;
    }
    let gathered_shape = gather.map(|rows| [rows, inp.tokens.shape.get(1).copied().unwrap_or(0)]);
    let mut meta = inp.named().map(DeviceArg::meta);
    if let Some(shape) = &gathered_shape {
        meta.tokens = moe_core::tensor::Meta::shape_only("permutedTokens", inp.tokens.dtype, shape);
    }
    let checked = match grad_output {
        Some(g) => g.meta_with(|m| check_experts_backward(m, &meta, act)),
        None => check_experts(&meta, act),
    };
    let ExpertsCheck { n, dim, experts, width, inter, .. } = checked.ok()?;
    let bf16 = [inp.tokens, inp.gate_and_up, inp.down].iter().all(|t| t.dtype == DType::BF16)
        && grad_output.is_none_or(|g| g.dtype() == DType::BF16);
    let sizes = [dim, width, inter].iter().all(|&d| d % 8 == 0 && d > 0) && i32::try_from(n.max(dim).max(width)).is_ok();
    let known = inp.tokens_per_expert.facts.counts_total == Some(n);
    (bf16 && sizes && known && n > 0 && grouped_gemm::arch(dev).is_ok()).then_some(GroupedPlan { n, dim, width, inter, experts })
}

fn ptr(dev: &Device, b: &Buffer) -> u64 {
    b.ptr(dev.stream())
}

/// `out [n, cols] = x [n, k] @ W[e]` (or `W[e]^T` with `layout` NK) for every expert, bf16.
#[allow(clippy::too_many_arguments)]
fn gemm(
    dev: &Device,
    p: &GroupedPlan,
    x: &Buffer,
    w: &DeviceTensor,
    layout: WeightLayout,
    counts: &DeviceTensor,
    out: &Buffer,
    cols: usize,
    k: usize,
) -> Result<()> {
    grouped_gemm::launch(
        dev,
        ptr(dev, x),
        ptr(dev, &w.buf),
        layout,
        ptr(dev, &counts.buf),
        ptr(dev, out),
        DType::BF16,
        p.experts,
        p.n,
        cols,
        k,
        grouped_gemm::experts_tile(),
    )
}

/// `dw [E, rows, cols] = x_e^T dy_e` for every expert, bf16 (zeros for an expert without rows).
#[allow(clippy::too_many_arguments)]
fn wgrad(
    dev: &Device,
    p: &GroupedPlan,
    x: &Buffer,
    dy: &Buffer,
    counts: &DeviceTensor,
    dw: &DeviceTensor,
    rows: usize,
    cols: usize,
) -> Result<()> {
    grouped_gemm::launch_wgrad(
        dev,
        ptr(dev, x),
        ptr(dev, dy),
        ptr(dev, &counts.buf),
        ptr(dev, &dw.buf),
        DType::BF16,
        p.experts,
        p.n,
        rows,
        cols,
        grouped_gemm::experts_tile(),
    )
}

/// The experts' rows gathered from the tokens on load (the `_gather` kernels): row r of the
/// experts' input is `tokens[rows[r]]`, `tokens [x_rows, dim]` in their own order, `rows` int32
/// on the GPU (checked by the caller: every index below `x_rows`).
#[derive(Clone, Copy)]
pub struct Gather<'a> {
    pub rows: &'a DeviceTensor,
    pub x_rows: usize,
}

/// How the grouped backward takes `inp.tokens`.
#[derive(Clone, Copy)]
pub enum TokenRows<'a> {
    /// The experts' rows (expert-major), lent: the caller's still.
    Lent,
    /// The experts' rows, given: dx is written over them once dW1, their last reader, is queued.
    Given,
    /// The tokens in their own order, the experts' rows gathered on load.
    Gathered(Gather<'a>),
}

/// Whether the experts gather their rows on load where the layer asks them to
/// (`MOE_DISPATCH_GG_FUSE=gather`, read once; `act,gather` takes both fusions): the grouped
/// path's first GEMM reads the tokens through the permutation ([`grouped_gemm::launch_gather`]),
/// so the forward makes and keeps no permuted copy of the tokens; the backward's weight gradient
/// copies the rows out for its kernel and drops them after it (or gathers on load too:
/// [`wgrad_gather_selected`]).
/// Off by default.
pub fn gather_selected() -> bool {
    static SELECTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SELECTED.get_or_init(|| fuse_selected("gather"))
}

/// Whether experts given `gatherIndices` on `dev` gather on load (the grouped GEMM not turned off,
/// the gather fusion selected, a Hopper GPU) for bf16 tokens and weights without expert biases: the
/// layer then leaves the permuted copy of the tokens unmade. Elsewhere `gatherIndices` still
/// works, by copying the rows out first.
pub fn gathers_on_load(dev: &Device) -> bool {
    experts_gemm() == ExpertsGemm::Grouped && gather_selected() && grouped_gemm::arch(dev).is_ok()
}

/// Whether `MOE_DISPATCH_GG_FUSE` (a comma-separated list) names the fusion `name`.
fn fuse_selected(name: &str) -> bool {
    std::env::var("MOE_DISPATCH_GG_FUSE").is_ok_and(|v| names_fusion(&v, name))
}

/// Whether the comma-separated `list` names `name` (spaces around the names allowed).
fn names_fusion(list: &str, name: &str) -> bool {
    list.split(',').any(|f| f.trim() == name)
}

/// The gathering kernels' epilogue for the experts: the twin of [`grouped_gemm::experts_tile`]'s.
fn gather_kernel_tile() -> grouped_gemm::TileN {
    grouped_gemm::gather_tile(grouped_gemm::experts_tile())
}

/// Whether the gathering experts' weight gradient `dW1 = x^T dh` also gathers x's rows on load
/// ([`grouped_gemm::launch_wgrad_gather`]; `MOE_DISPATCH_GG_FUSE=gather,gather-wgrad`, read once).
/// Off by default: with `gather` alone the backward copies the rows out for the plain kernel and
/// drops the copy after it (the forward still keeps none), which ran faster on an H100 (the copy +
/// TMA-store kernel 0.935 ms against the gathering kernel's 1.032 at the fine-grained shape;
/// docs/gpu-report.md, twenty-seventh session).
pub fn wgrad_gather_selected() -> bool {
    static SELECTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SELECTED.get_or_init(|| fuse_selected("gather-wgrad"))
}

/// Whether the first GEMM takes the activation into its epilogue (`MOE_DISPATCH_GG_FUSE=act`,
/// read once; for `[gate | up]` kinds: [`grouped_gemm::launch_act`]). Off by default: measured
/// no faster than the GEMM + activation kernel (0.86-0.99x on the H100 and H200 over three
/// designs, docs/gpu-report.md "Nineteenth session").
pub fn fused_activation_selected() -> bool {
    static SELECTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SELECTED.get_or_init(|| fuse_selected("act"))
}

/// `h = x W1` and `a = act(h) * probs` (bf16 buffers of `[n, width]` and `[n, inter]`): the first
/// GEMM with the activation in its epilogue where [`fused_activation_selected`] and
/// [`grouped_gemm::fuses_activation`], else the GEMM then the activation kernel (the same bits either way).
fn up_and_activation(
    dev: &Device,
    p: &GroupedPlan,
    inp: &DeviceExpertsInputs,
    gather: Option<Gather>,
    act: &ActivationOptions,
) -> Result<(Buffer, Buffer)> {
    let h = dev.alloc("the up-projection", p.n * p.width * 2)?;
    let a = dev.alloc("the activation", p.n * p.inter * 2)?;
    if let Some(g) = gather {
        // (the activation fusion does not gather: its kernel after the gathering GEMM)
        grouped_gemm::launch_gather(
            dev,
            ptr(dev, &inp.tokens.buf),
            g.x_rows,
            ptr(dev, &g.rows.buf),
            ptr(dev, &inp.gate_and_up.buf),
            ptr(dev, &inp.tokens_per_expert.buf),
            ptr(dev, &h),
            p.experts,
            p.n,
            p.width,
            p.dim,
            gather_kernel_tile(),
        )?;
        launch_activation(dev, act, ExpMath::Fast, DType::BF16, &h, p.n, p.width, inp.probs.map(|t| &t.buf), DType::BF16, &a)?;
    } else if fused_activation_selected() && grouped_gemm::fuses_activation(act.kind) {
        grouped_gemm::launch_act(
            dev,
            ptr(dev, &inp.tokens.buf),
            ptr(dev, &inp.gate_and_up.buf),
            ptr(dev, &inp.tokens_per_expert.buf),
            ptr(dev, &h),
            ptr(dev, &a),
            inp.probs.map_or(0, |t| ptr(dev, &t.buf)),
            act,
            p.experts,
            p.n,
            p.inter,
            p.dim,
        )?;
    } else {
        gemm(dev, p, &inp.tokens.buf, inp.gate_and_up, WeightLayout::KN, inp.tokens_per_expert, &h, p.width, p.dim)?;
        launch_activation(dev, act, ExpMath::Fast, DType::BF16, &h, p.n, p.width, inp.probs.map(|t| &t.buf), DType::BF16, &a)?;
    }
    Ok((h, a))
}

/// The forward on the grouped GEMM: `h = x W1` (x's rows gathered on load with `gather`), the
/// activation (weighted by the probs), `y = a W2`; with `save`, h and a for the backward (no host
/// counts: none were read).
pub fn forward_grouped(
    dev: &Device,
    p: &GroupedPlan,
    inp: &DeviceExpertsInputs,
    gather: Option<Gather>,
    act: &ActivationOptions,
    save: bool,
) -> Result<(DeviceTensor, Option<ExpertsSaved>)> {
    let dt = DType::BF16;
    let (h, a) = up_and_activation(dev, p, inp, gather, act)?;
    let out = DeviceTensor::alloc(dev, "the output", dt, vec![p.n, p.dim])?;
    gemm(dev, p, &a, inp.down, WeightLayout::KN, inp.tokens_per_expert, &out.buf, p.dim, p.inter)?;
    let saved = save.then(|| ExpertsSaved {
        up_projection: DeviceTensor::from_buffer(dt, vec![p.n, p.width], h),
        activation: DeviceTensor::from_buffer(dt, vec![p.n, p.inter], a),
        counts: None,
    });
    Ok((out, saved))
}

/// The backward on the grouped GEMM: `dW2 = a^T g`, `da = g W2^T`, `dh` through the activation
/// (and the probs' gradient), `dW1 = x^T dh` (x's rows gathered on load with `gather`),
/// `dx = dh W1^T` (the gradient of the experts' rows, expert-major, either way); h and a from
/// `saved` (checked by the caller) or recomputed. `g` gathered here ([`GradOutput::Gathered`])
/// is freed once `dW2` and `da` are queued. Tokens given ([`TokenRows::Given`]): dx is written
/// over them ([`TokensGrad::OverTokens`]), so the two never take memory side by side.
pub fn backward_grouped(
    dev: &Device,
    p: &GroupedPlan,
    grad_output: GradOutput,
    inp: &DeviceExpertsInputs,
    rows: TokenRows,
    act: &ActivationOptions,
    saved: Option<SavedArg>,
) -> Result<ExpertsGrads<DeviceTensor, TokensGrad>> {
    let gather = match rows {
        TokenRows::Gathered(g) => Some(g),
        TokenRows::Lent | TokenRows::Given => None,
    };
    let dt = DType::BF16;
    let counts = inp.tokens_per_expert;
    // h and a: lent, given (freed below, each after its last reader), or recomputed (freed so too)
    let (h_t, a_t) = match saved {
        Some(sv) => saved_tensors(sv)?,
        None => {
            let (h, a) = up_and_activation(dev, p, inp, gather, act)?;
            (
                Held::Made(DeviceTensor::from_buffer(dt, vec![p.n, p.width], h)),
                Held::Made(DeviceTensor::from_buffer(dt, vec![p.n, p.inter], a)),
            )
        }
    };
    let (h, a) = (&h_t.buf, &a_t.buf);
    let g_rows = grad_output.rows(dev)?;
    let g = &g_rows.buf;
    let grad_w2 = DeviceTensor::alloc(dev, "gradDownProjs", dt, inp.down.shape.clone())?;
    wgrad(dev, p, a, g, counts, &grad_w2, p.inter, p.dim)?;
    // (each drop below frees what the call made or was given, after its last reader is queued:
    // one stream, so the free is ordered after it; a lent tensor stays the caller's)
    drop(a_t);
    let da = dev.alloc("the activation gradient", p.n * p.inter * 2)?;
    gemm(dev, p, g, inp.down, WeightLayout::NK, counts, &da, p.inter, p.dim)?;
    drop(g_rows);
    let dh = dev.alloc("the up-projection gradient", p.n * p.width * 2)?;
    let grad_probs = inp.probs.map(|t| DeviceTensor::alloc(dev, "gradProbs", DType::F32, t.shape.clone())).transpose()?;
    launch_activation_backward(
        dev,
        act,
        ExpMath::Fast,
        dt,
        &da,
        h,
        p.n,
        p.width,
        inp.probs.map(|t| &t.buf),
        dt,
        &dh,
        grad_probs.as_ref().map(|t| &t.buf),
    )?;
    drop(da);
    drop(h_t);
    let grad_w1 = DeviceTensor::alloc(dev, "gradGateAndUpProjs", dt, inp.gate_and_up.shape.clone())?;
    match gather {
        Some(g) if wgrad_gather_selected() => grouped_gemm::launch_wgrad_gather(
            dev,
            ptr(dev, &inp.tokens.buf),
            g.x_rows,
            ptr(dev, &g.rows.buf),
            ptr(dev, &dh),
            ptr(dev, &counts.buf),
            ptr(dev, &grad_w1.buf),
            p.experts,
            p.n,
            p.dim,
            p.width,
            gather_kernel_tile(),
        )?,
        Some(g) => {
            // the rows copied out for the plain kernel, and dropped after it: the forward kept no
            // copy, and the copy + the plain kernel ran faster than the gathering kernel
            // (docs/gpu-report.md, twenty-seventh session)
            let x = crate::experts::gathered_rows(dev, inp.tokens, g)?;
            wgrad(dev, p, &x.buf, &dh, counts, &grad_w1, p.dim, p.width)?;
        }
        None => wgrad(dev, p, &inp.tokens.buf, &dh, counts, &grad_w1, p.dim, p.width)?,
    }
    // dx over the tokens where given (dW1, their last reader, is queued before it on this
    // stream; the experts' rows are [n, dim] bf16 as dx is), else a tensor of its own
    let grad_tokens = match rows {
        TokenRows::Given => {
            gemm(dev, p, &dh, inp.gate_and_up, WeightLayout::NK, counts, &inp.tokens.buf, p.dim, p.width)?;
            TokensGrad::OverTokens
        }
        TokenRows::Lent | TokenRows::Gathered(_) => {
            let t = DeviceTensor::alloc(dev, "gradTokens", dt, vec![p.n, p.dim])?;
            gemm(dev, p, &dh, inp.gate_and_up, WeightLayout::NK, counts, &t.buf, p.dim, p.width)?;
            TokensGrad::Own(t)
        }
    };
    Ok(ExpertsGrads {
        grad_tokens,
        grad_gate_and_up: grad_w1,
        grad_down: grad_w2,
        grad_gate_up_bias: None,
        grad_down_bias: None,
        grad_probs,
    })
}

#[cfg(test)]
mod tests {
    use super::names_fusion;

    #[test]
    fn fusion_lists() {
        assert!(names_fusion("gather", "gather"));
        assert!(names_fusion("act,gather", "gather") && names_fusion("act,gather", "act"));
        assert!(names_fusion(" act , gather ", "gather"));
        assert!(!names_fusion("gathers", "gather"));
        assert!(!names_fusion("act", "gather"));
        assert!(!names_fusion("", "act"));
    }
}
