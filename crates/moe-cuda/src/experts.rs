//! Grouped experts on the GPU: moe-core's `experts_forward` / `experts_backward` (the same
//! formulas, see crates/moe-core/src/experts.rs) with one cuBLAS GEMM per expert and GEMM
//! operand, on the device's stream, and the element work in kernels/activations.cu and
//! kernels/experts.cu.
//!
//! Precision: the GEMMs take the tokens' dtype (bf16, f16 or f32) and accumulate in f32. The
//! up-projection `h`, the weighted activation `a`, and the gradients `da` and `dh` are rounded
//! to the tokens' dtype, as the GEMMs that write or read them work in it (`h` and `dh` stay f32
//! when an up bias is given: it is added in f32); the activation's `exp` is CUDA's f32 `expf`.
//! The CPU core keeps every intermediate in f32 with its exact `exp`, so bf16 results agree with
//! it to bf16 tolerance, not bit for bit (f32 ones to ~1e-5).
//! Each result is rounded once to its dtype. Deterministic: cuBLAS's default algorithms with
//! a fixed problem and stream give the same bits run after run, and the element kernels use no
//! atomics.
//!
//! The GPU path needs the tokens, the weights and the biases in one dtype (cuBLAS multiplies
//! operands of one type); other inputs, and inputs that the core rejects, take the host path
//! (download, the core, upload), which also gives the core's errors word for word.
//! `tokensPerExpert` is read back to the host (4 bytes an expert): the GEMM sizes live there.

use std::cell::{Ref, RefCell};

use moe_core::activations::ActivationOptions;
use moe_core::experts::{
    check_experts, check_experts_backward, check_matmul, expert_offsets, experts_backward, experts_forward, ExpertsCheck, ExpertsGrads,
    ExpertsInputs,
};
use moe_core::tensor::{DType, TensorRef};

use crate::activations::{launch_activation, launch_activation_backward, ExpMath};
use crate::blas::{gemm, gemm_grouped, gemm_problem, gemm_row_blocks, mark, Operand, Output, Problem, SideBySide};
use crate::device::{Arg, Buffer, Device};
use crate::error::{Error, Result};
use crate::experts_grouped::{backward_grouped, forward_grouped, gather_selected, grouped_plan, grouped_plan_rows, Gather, TokenRows};
use crate::permute::row_launch;
use crate::switch::{Choice, Switch};
use crate::tensor::{tensor_ref, upload_owned_opt, DeviceArg, DeviceTensor};

/// The device tensors of a grouped-experts call (the core's [`ExpertsInputs`] on the GPU).
#[derive(Clone, Copy)]
pub struct DeviceExpertsInputs<'a> {
    /// `[N, dim]`, expert-major.
    pub tokens: &'a DeviceTensor,
    /// `[E]` int32.
    pub tokens_per_expert: &'a DeviceTensor,
    /// `[E, dim, width]`; `gate_and_up_name` is its argument name ("gateAndUpProjs" or "upProjs").
    pub gate_and_up: &'a DeviceTensor,
    pub gate_and_up_name: &'static str,
    /// `[E, inter, dim]`.
    pub down: &'a DeviceTensor,
    pub probs: Option<&'a DeviceTensor>,
    pub gate_up_bias: Option<&'a DeviceTensor>,
    pub down_bias: Option<&'a DeviceTensor>,
}

impl<'a> DeviceExpertsInputs<'a> {
    /// The tensors under the names errors give them.
    pub fn named(&self) -> ExpertsInputs<DeviceArg<'a>> {
        let arg = |name, tensor| DeviceArg { name, tensor };
        ExpertsInputs {
            tokens: arg("permutedTokens", self.tokens),
            tokens_per_expert: arg("tokensPerExpert", self.tokens_per_expert),
            gate_and_up: arg(self.gate_and_up_name, self.gate_and_up),
            down: arg("downProjs", self.down),
            probs: self.probs.map(|t| arg("permutedProbs", t)),
            gate_up_bias: self.gate_up_bias.map(|t| arg("gateUpProjBias", t)),
            down_bias: self.down_bias.map(|t| arg("downProjBias", t)),
        }
    }
}

impl<'a> From<ExpertsInputs<DeviceArg<'a>>> for DeviceExpertsInputs<'a> {
    /// The tensors as a binding read them (the up projection under the name it was given).
    fn from(i: ExpertsInputs<DeviceArg<'a>>) -> Self {
        DeviceExpertsInputs {
            tokens: i.tokens.tensor,
            tokens_per_expert: i.tokens_per_expert.tensor,
            gate_and_up: i.gate_and_up.tensor,
            gate_and_up_name: i.gate_and_up.name,
            down: i.down.tensor,
            probs: i.probs.map(|t| t.tensor),
            gate_up_bias: i.gate_up_bias.map(|t| t.tensor),
            down_bias: i.down_bias.map(|t| t.tensor),
        }
    }
}

/// What [`experts_backward_device`] returns: the core's [`ExpertsGrads`] as device tensors.
pub type DeviceExpertsGrads = ExpertsGrads<DeviceTensor>;

/// The gradient of the experts' output as a backward call takes it (`From<&DeviceTensor>`: the rows).
#[derive(Clone, Copy)]
pub enum GradOutput<'a> {
    /// `[N, dim]`, a row for each of the experts' rows (expert-major).
    Rows(&'a DeviceTensor),
    /// The gradient of the tokens in their own order (`tokens [T, dim]`) and the rows to take
    /// from it (int32 `[N]`, `gradGatherIndices`): row r is `tokens[rows[r]]`, the backward of an
    /// unweighted unpermute whose sortedIndices `rows` are. The call gathers them itself, and on
    /// the grouped GEMM frees that copy once `dW2` and `da` have read it, so the rows' gradient
    /// never lives beside `dh`, `dW1` and `dx` (the caller holds the `[T, dim]` gradient only).
    Gathered { tokens: &'a DeviceTensor, rows: &'a DeviceTensor },
}

impl<'a> From<&'a DeviceTensor> for GradOutput<'a> {
    fn from(t: &'a DeviceTensor) -> Self {
        GradOutput::Rows(t)
    }
}

/// Where a backward put the tokens' gradient ([`experts_backward_device_over_tokens`]).
pub enum TokensGrad {
    /// A tensor of its own.
    Own(DeviceTensor),
    /// Written over the tokens the call was lent (their values are gone): see [`TokensGrad::into_tensor`].
    OverTokens,
}

impl TokensGrad {
    /// The gradient as a tensor of the caller's, given the tokens it lent the call: their buffer
    /// where the gradient was written over them (as a new tensor: no facts, no plan), else the
    /// gradient's own (the tokens are dropped).
    pub fn into_tensor(self, tokens: DeviceTensor) -> DeviceTensor {
        match self {
            TokensGrad::Own(t) => t,
            TokensGrad::OverTokens => DeviceTensor::from_buffer(tokens.dtype, tokens.shape, tokens.buf),
        }
    }
}

/// The gradients of [`experts_backward_device_over_tokens`] with the tokens' as a tensor, given
/// the tokens the call was lent ([`TokensGrad::into_tensor`]).
pub fn grads_over_tokens(g: ExpertsGrads<DeviceTensor, TokensGrad>, tokens: DeviceTensor) -> DeviceExpertsGrads {
    g.map_tokens(|t| t.into_tensor(tokens))
}

/// The gradients of a backward that wrote the tokens' in a tensor of its own.
fn own_tokens_grad(g: ExpertsGrads<DeviceTensor, TokensGrad>) -> Result<DeviceExpertsGrads> {
    g.try_map_tokens(|t| match t {
        TokensGrad::Own(t) => Ok(t),
        TokensGrad::OverTokens => {
            Err(Error::Cuda("expertsBackward: the tokens' gradient was written over the tokens unasked (a bug in moe-dispatch)".into()))
        }
    })
}

/// A tensor an op borrowed or made itself (freed when dropped).
pub(crate) enum Held<'a> {
    Lent(&'a DeviceTensor),
    Made(DeviceTensor),
}

impl std::ops::Deref for Held<'_> {
    type Target = DeviceTensor;
    fn deref(&self) -> &DeviceTensor {
        match self {
            Held::Lent(t) => t,
            Held::Made(t) => t,
        }
    }
}

impl<'a> GradOutput<'a> {
    /// Checked as [`checked_gather`] checks `gatherIndices` (Rows: as it is; its shape is the
    /// experts' checks').
    fn checked(self, dev: &Device) -> Result<GradOutput<'a>> {
        if let GradOutput::Gathered { tokens, rows } = self {
            checked_gather_named(dev, tokens, rows, GRAD_GATHER)?;
        }
        Ok(self)
    }

    /// The dtype and shape of the rows (`[N, dim]` where gathered), for the experts' checks.
    pub(crate) fn meta_with<R>(&self, f: impl FnOnce(moe_core::tensor::Meta) -> R) -> R {
        match self {
            GradOutput::Rows(t) => f(t.meta("gradOutput")),
            GradOutput::Gathered { tokens, rows } => {
                let shape = [rows.numel(), tokens.shape.get(1).copied().unwrap_or(0)];
                f(moe_core::tensor::Meta::shape_only("gradOutput", tokens.dtype, &shape))
            }
        }
    }

    pub(crate) fn dtype(&self) -> DType {
        match self {
            GradOutput::Rows(t) | GradOutput::Gathered { tokens: t, .. } => t.dtype,
        }
    }

    /// The rows: borrowed, or gathered now (a copy the caller frees by dropping it).
    pub(crate) fn rows(self, dev: &Device) -> Result<Held<'a>> {
        Ok(match self {
            GradOutput::Rows(t) => Held::Lent(t),
            GradOutput::Gathered { tokens, rows } => Held::Made(gathered_rows(dev, tokens, Gather { rows, x_rows: tokens.shape[0] })?),
        })
    }
}

/// Sizes of a problem that takes the GPU path.
struct Plan {
    dtype: DType,
    n: usize,
    dim: usize,
    width: usize,
    inter: usize,
    /// Row offsets of the experts, `E + 1` entries (host), and the same on the GPU.
    offsets: Vec<usize>,
    d_offsets: Buffer,
}

impl Plan {
    fn experts(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Each expert's row count (what `tokensPerExpert` held).
    fn counts(&self) -> Vec<i32> {
        self.offsets.windows(2).map(|w| (w[1] - w[0]) as i32).collect()
    }
}

/// The GPU plan, or None when the host path must run (the core then errors, or computes): the
/// core's checks (`check_experts`, with `grad_output` `check_experts_backward`) on the tensors'
/// `Meta`, the counts read back (they must add up), and the GPU's limits (one dtype for every
/// GEMM operand, int32 sizes).
///
/// `known`: the counts as a forward pass read them (its [`ExpertsSaved::counts`]); used instead of
/// reading `tokensPerExpert` again when there is one per expert (they must still add up).
fn plan(
    dev: &Device,
    inp: &DeviceExpertsInputs,
    act: &ActivationOptions,
    grad_output: Option<&DeviceTensor>,
    known: Option<&[i32]>,
) -> Result<Option<Plan>> {
    let meta = inp.named().map(DeviceArg::meta);
    let checked = match grad_output {
        Some(g) => check_experts_backward(g.meta("gradOutput"), &meta, act),
        None => check_experts(&meta, act),
    };
    let Ok(ExpertsCheck { n, dim, experts, width, inter, .. }) = checked else { return Ok(None) };
    let dtype = inp.tokens.dtype;
    let operands = [Some(inp.gate_and_up), Some(inp.down), inp.gate_up_bias, inp.down_bias];
    if operands.into_iter().flatten().any(|t| t.dtype != dtype) || i32::try_from(n.max(dim).max(width)).is_err() {
        return Ok(None);
    }
    let offsets_of = |c: &[i32]| {
        let c: Vec<i64> = c.iter().map(|&v| i64::from(v)).collect();
        expert_offsets(&c, n, "tokensPerExpert", "permutedTokens").ok()
    };
    // the forward's counts where they fit these inputs, else read back
    let offsets = match known.filter(|k| k.len() == experts).and_then(offsets_of) {
        Some(o) => o,
        None => {
            let counts: Vec<i32> = dev.download_new("tokensPerExpert", &inp.tokens_per_expert.buf, experts)?;
            let Some(o) = offsets_of(&counts) else { return Ok(None) };
            o
        }
    };
    let offs32: Vec<i32> = offsets.iter().map(|&o| o as i32).collect();
    let d_offsets = dev.upload("the expert offsets", &offs32)?;
    Ok(Some(Plan { dtype, n, dim, width, inter, offsets, d_offsets }))
}

fn tag(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        _ => "f16",
    }
}

/// The address of row `row` of a row-major buffer of `width` elements of `dtype`.
fn at(dev: &Device, buf: &Buffer, dtype: DType, row: usize, width: usize) -> u64 {
    buf.ptr(dev.stream()) + (row * width * dtype.size()) as u64
}

/// The dtype of the up-projection `h` and of the activation gradient `da`: the tokens' dtype
/// (what cuBLAS writes fastest, and what the next passes read at half the bytes of f32), except
/// that an up bias is added in f32.
fn h_dtype(p: &Plan, inp: &DeviceExpertsInputs) -> DType {
    if inp.gate_up_bias.is_some() {
        DType::F32
    } else {
        p.dtype
    }
}

/// `h [N, width] (see [`h_dtype`]) = x_e @ W1[e] (+ b1[e])` for every expert.
fn up_projection(dev: &Device, p: &Plan, inp: &DeviceExpertsInputs) -> Result<Buffer> {
    let hd = h_dtype(p, inp);
    let h = dev.alloc("the up-projection", p.n * p.width * hd.size())?;
    let dt = p.dtype;
    per_expert(dev, p, (dt, false), (dt, false), hd, |e, r0, c| Problem {
        m: c,
        n: p.width,
        k: p.dim,
        a: at(dev, &inp.tokens.buf, dt, r0, p.dim),
        b: at(dev, &inp.gate_and_up.buf, dt, e * p.dim, p.width),
        c: at(dev, &h, hd, r0, p.width),
    })?;
    if let Some(b1) = inp.gate_up_bias {
        launch_rows(
            dev,
            &format!("experts_add_bias_{}", tag(p.dtype)),
            p.n,
            p.width,
            &[
                Arg::U64(h.ptr(dev.stream())),
                Arg::I64(p.width as i64),
                Arg::U64(b1.buf.ptr(dev.stream())),
                Arg::U64(p.d_offsets.ptr(dev.stream())),
                Arg::I32(p.experts() as i32),
            ],
        )?;
    }
    Ok(h)
}

/// Whether the per-expert GEMMs of one step go to cuBLAS as one grouped call
/// (`cublasGemmGroupedBatchedEx`) instead of one call each: as set by
/// `MOE_DISPATCH_GROUPED_GEMM` (`on` / `off`) or [`set_grouped_gemm`]; by default (`auto`) not,
/// since on an H100 with CUDA 13.0 the grouped call was slower at both benchmark shapes
/// (mixtral experts forward 22.9 ms vs 9.6, fine-grained 3.5 ms vs 2.3:
/// bench/results/2026-11-23-gpu.json).
pub fn use_grouped(active_experts: usize) -> bool {
    let _ = active_experts; // the auto rule may use it once a grouped call pays
    GROUPED.get() == Some(true)
}

static GROUPED: Choice = Choice::new("MOE_DISPATCH_GROUPED_GEMM");

/// Overrides the grouped-GEMM choice: `Some(true)` always, `Some(false)` never, `None` auto.
pub fn set_grouped_gemm(mode: Option<bool>) {
    GROUPED.set(mode);
}

/// One step's GEMM for every expert with tokens: `f(e, r0, count)` gives expert e's problem.
#[allow(clippy::too_many_arguments)]
fn per_expert(
    dev: &Device,
    p: &Plan,
    a: (DType, bool),
    b: (DType, bool),
    c: DType,
    f: impl Fn(usize, usize, usize) -> Problem,
) -> Result<()> {
    run_gemms(dev, &expert_problems(p, f), a, b, c)
}

/// One step's problems, one for every expert with tokens: `f(e, r0, count)` gives expert e's.
fn expert_problems(p: &Plan, f: impl Fn(usize, usize, usize) -> Problem) -> Vec<Problem> {
    (0..p.experts()).filter(|&e| p.offsets[e + 1] > p.offsets[e]).map(|e| f(e, p.offsets[e], p.offsets[e + 1] - p.offsets[e])).collect()
}

/// The side-by-side streams where [`run_gemms`] would run `count` weight-gradient GEMMs (A
/// transposed, so never in row blocks) side by side; the backward then queues them there
/// beside its token-side GEMMs instead of a step at a time ([`crate::blas::SideQueue`]). On an
/// H200 (fine-grained experts, 15 interleaved rounds in 5 processes) the backward GEMMs ran at
/// 68-84% of the bf16 rate, median 78%, against 66-74%, median 71%, a step at a time
/// (docs/gpu-report.md, fifth session).
/// `MOE_DISPATCH_GEMM_BESIDE=off` (or [`set_weight_gradients_beside`]`(Some(false))`) queues
/// them a step at a time instead, as before (for measurements).
pub fn weight_gradients_beside(dev: &Device, count: usize) -> Option<&SideBySide> {
    (BESIDE.on() && count >= SideBySide::MIN_PROBLEMS && !use_grouped(count) && side_by_side()).then(|| dev.side_blas().ok()).flatten()
}

static BESIDE: Switch = Switch::new("MOE_DISPATCH_GEMM_BESIDE");

/// Overrides [`weight_gradients_beside`]: `Some(false)` never, `Some(true)` or `None` (the
/// default) where side by side applies.
pub fn set_weight_gradients_beside(mode: Option<bool>) {
    BESIDE.set(mode);
}

/// Whether many small GEMMs ([`SideBySide::MIN_PROBLEMS`] or more) that are not cut into row
/// blocks ([`row_blocks`]: with the defaults, the weight gradients) run side by side
/// ([`SideBySide`]): by default yes; `MOE_DISPATCH_GEMM_STREAMS=off` or
/// [`set_side_by_side`]`(Some(false))` turns it off. On an H100 (fine-grained experts, 64 GEMMs of
/// ~780 rows a step) it raised the GEMMs from 57-65% of the bf16 rate one call after another to
/// 61-73%, with a wide spread: the host queues a cuBLAS call in about 10 us, about as long as a
/// quarter of the GPU runs one (docs/gpu-report.md).
fn side_by_side() -> bool {
    // off, or on (a number: how many streams, crate::blas::SideBySide::STREAMS by default)
    SIDE.on()
}

/// The row block of [`gemm_row_blocks`] for these problems, if they run that way:
/// `MOE_DISPATCH_GEMM_BLOCKS` = a block size in rows, or `off` / `0`, or [`set_row_blocks`]; by
/// default [`DEFAULT_ROW_BLOCK`] rows when a step has at least [`SideBySide::MIN_PROBLEMS`] GEMMs
/// and at least half of them have that many rows (the weight-gradient steps, which reduce over
/// the tokens, are not cut and run side by side). On an H100 a cuBLAS call costs about 10 us of
/// host time, and the fine-grained experts' 64 GEMMs a step queued about as long as they ran;
/// the token-side steps as two batched calls each queue in a tenth of the time. Fine-grained, the
/// same machine, two processes each: forward / backward GEMMs at 72-73% / 69-70% of the bf16
/// rate with 256-row blocks, 66-70% / 65-68% with 128, 63-72% / 60-65% with side by side alone;
/// Mixtral-like experts (8 of ~2016 rows a step) do not qualify (they lost: 93% -> 51% / 81%).
pub fn row_blocks(problems: &[Problem]) -> Option<usize> {
    let mode = match ROW_BLOCK.load(std::sync::atomic::Ordering::Relaxed) {
        ROW_BLOCK_UNSET => {
            let m = match std::env::var("MOE_DISPATCH_GEMM_BLOCKS").as_deref() {
                Ok("off") => 0,
                Ok(v) => v.parse::<usize>().ok().filter(|&b| b < ROW_BLOCK_AUTO).unwrap_or(ROW_BLOCK_AUTO),
                Err(_) => ROW_BLOCK_AUTO,
            };
            ROW_BLOCK.store(m, std::sync::atomic::Ordering::Relaxed);
            m
        }
        m => m,
    };
    match mode {
        0 => None,
        ROW_BLOCK_AUTO => {
            let big = problems.iter().filter(|p| p.m >= DEFAULT_ROW_BLOCK).count();
            (problems.len() >= SideBySide::MIN_PROBLEMS && 2 * big >= problems.len()).then_some(DEFAULT_ROW_BLOCK)
        }
        b => (!problems.is_empty()).then_some(b),
    }
}

/// The default row block of [`row_blocks`].
pub const DEFAULT_ROW_BLOCK: usize = 256;
const ROW_BLOCK_AUTO: usize = usize::MAX - 1;
const ROW_BLOCK_UNSET: usize = usize::MAX;
static ROW_BLOCK: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(ROW_BLOCK_UNSET);

/// Overrides the row-block choice: `Some(rows)` always (0: never), `None` the default.
pub fn set_row_blocks(mode: Option<usize>) {
    ROW_BLOCK.store(mode.map_or(ROW_BLOCK_AUTO, |b| b.min(ROW_BLOCK_AUTO - 1)), std::sync::atomic::Ordering::Relaxed);
}

static SIDE: Switch = Switch::new("MOE_DISPATCH_GEMM_STREAMS");

/// Overrides the side-by-side choice: `Some(true)` or `None` (the default) for many GEMMs,
/// `Some(false)` never.
pub fn set_side_by_side(mode: Option<bool>) {
    SIDE.set(mode);
}

/// Independent GEMMs of one dtype and transpose pattern (`a` and `b`: dtype, transposed), the
/// way the experts run them: opted in, one grouped call ([`use_grouped`]); for many token-side
/// GEMMs, batched row blocks ([`row_blocks`]); else, for many GEMMs, side by side on four streams
/// whose cuBLAS handles are sized for a quarter of the SMs each ([`side_by_side`], [`SideBySide`];
/// four plain handles without the SM target gave nothing); else one cuBLAS call each on the
/// device's stream.
pub fn run_gemms(dev: &Device, problems: &[Problem], a: (DType, bool), b: (DType, bool), c: DType) -> Result<()> {
    let name = || {
        let (k, n) = problems.first().map_or((0, 0), |q| (q.k, q.n));
        format!("cublas: experts' GEMMs{} (n {n}, k {k})", if a.1 { ", A^T" } else { "" })
    };
    dev.span(name, || run_gemms_now(dev, problems, a, b, c))
}

fn run_gemms_now(dev: &Device, problems: &[Problem], a: (DType, bool), b: (DType, bool), c: DType) -> Result<()> {
    if use_grouped(problems.len()) {
        return gemm_grouped(dev, problems, a.0, a.1, b.0, b.1, c);
    }
    if let Some(block) = row_blocks(problems) {
        if gemm_row_blocks(dev, problems, a, b, c, block)? {
            return Ok(());
        }
    }
    if problems.len() >= SideBySide::MIN_PROBLEMS && side_by_side() {
        if let Ok(side) = dev.side_blas() {
            return side.run(dev, problems, a, b, c);
        }
    }
    let blas = dev.blas()?;
    problems.iter().try_for_each(|q| gemm_problem(blas, q, a, b, c))
}

/// A (rows, column blocks) launch of a row kernel over `width` columns.
fn launch_rows(dev: &Device, name: &str, rows: usize, width: usize, args: &[Arg]) -> Result<()> {
    if rows == 0 || width == 0 {
        return Ok(());
    }
    let (threads, blocks) = row_launch(width)?;
    let rows = u32::try_from(rows).map_err(|_| Error::Cuda(format!("{name}: {rows} rows exceed one launch")))?;
    dev.launch(name, (rows, blocks), threads, args)
}

/// A 1-D launch over `n` items, 256 threads a block.
fn launch_flat(dev: &Device, name: &str, n: usize, args: &[Arg]) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let blocks = u32::try_from(n.div_ceil(256).min(1 << 20)).unwrap_or(1 << 20);
    dev.launch(name, (blocks, 1), 256, args)
}

/// Per-expert sums over rows of `x [N, width]` (dtype `dtype`), times the probs when given, into
/// a new `[E, width]` f32 buffer.
fn column_sums(dev: &Device, p: &Plan, x: &Buffer, dtype: DType, width: usize, probs: Option<&Buffer>) -> Result<Buffer> {
    let out = dev.alloc("a bias gradient", p.experts() * width * 4)?;
    if p.experts() == 0 || width == 0 {
        return Ok(out);
    }
    let blocks = u32::try_from(width.div_ceil(256)).map_err(|_| Error::Cuda("bias too wide".into()))?;
    let s = dev.stream();
    dev.launch(
        &format!("experts_colsum_{}", tag(dtype)),
        (p.experts() as u32, blocks),
        256,
        &[
            Arg::U64(x.ptr(s)),
            Arg::I64(width as i64),
            Arg::U64(probs.map_or(0, |b| b.ptr(s))),
            Arg::U64(p.d_offsets.ptr(s)),
            Arg::U64(out.ptr(s)),
        ],
    )?;
    Ok(out)
}

/// An f32 buffer of `numel` values rounded to `dtype` (the buffer itself for f32).
fn narrow(dev: &Device, what: &str, f: Buffer, numel: usize, dtype: DType, shape: Vec<usize>) -> Result<DeviceTensor> {
    if dtype == DType::F32 {
        return Ok(DeviceTensor::from_buffer(dtype, shape, f));
    }
    let out = DeviceTensor::alloc(dev, what, dtype, shape)?;
    let s = dev.stream();
    launch_flat(
        dev,
        &format!("convert_f32_to_{}", tag(dtype)),
        numel,
        &[Arg::U64(f.ptr(s)), Arg::U64(out.buf.ptr(s)), Arg::I64(numel as i64)],
    )?;
    Ok(out)
}

/// The host path: the core (`f`) on downloaded inputs (its errors, or its results).
fn on_host<R>(dev: &Device, inp: &DeviceExpertsInputs, f: impl FnOnce(&ExpertsInputs<TensorRef>) -> Result<R>) -> Result<R> {
    let host = inp.named().try_map(|t| t.download(dev, t.name).map(|h| (t.name, h)))?;
    f(&host.try_map(|(name, t)| tensor_ref(name, t))?)
}

/// What a forward pass can keep for its backward pass: the up-projection `h` (`[N, width]`, the
/// tokens' dtype, f32 with an up bias) and the weighted activation `a` (`[N, inter]`, the tokens'
/// dtype). With them the backward pass skips recomputing `h = x W1` (a third of its GEMM work).
/// `counts`: the rows of each expert as the forward read them from `tokensPerExpert` (the one
/// synchronisation of a forward); the backward pass takes them instead of reading them again.
pub struct ExpertsSaved {
    pub up_projection: DeviceTensor,
    pub activation: DeviceTensor,
    /// None where the forward read no counts (the grouped GEMM's path: crate::experts_grouped).
    pub counts: Option<Vec<i32>>,
}

/// An [`ExpertsSaved`] passed back to the backward pass (borrowed: the caller keeps it).
#[derive(Clone, Copy)]
pub struct SavedRef<'a> {
    pub up_projection: &'a DeviceTensor,
    pub activation: &'a DeviceTensor,
    /// The forward's counts (None: the backward reads `tokensPerExpert`).
    pub counts: Option<&'a [i32]>,
}

impl ExpertsSaved {
    pub fn as_ref(&self) -> SavedRef<'_> {
        SavedRef { up_projection: &self.up_projection, activation: &self.activation, counts: self.counts.as_deref() }
    }
}

/// An [`ExpertsSaved`] given to the backward pass to free as it goes (`freeSaved`): on the grouped
/// GEMM the call takes the tensors out once its checks pass and drops `a` after `dW2` and `h` after
/// the activation's backward; the other paths read them and leave them here. Until then (a
/// failed check, say) they stay in the slots, for the caller to take back ([`SavedSlots::into_parts`]).
pub struct SavedSlots {
    up_projection: RefCell<Option<DeviceTensor>>,
    activation: RefCell<Option<DeviceTensor>>,
    counts: Option<Vec<i32>>,
}

impl SavedSlots {
    pub fn new(saved: ExpertsSaved) -> SavedSlots {
        SavedSlots {
            up_projection: RefCell::new(Some(saved.up_projection)),
            activation: RefCell::new(Some(saved.activation)),
            counts: saved.counts,
        }
    }

    /// What the call left: `(upProjection, activation)`, each None once taken.
    pub fn into_parts(self) -> (Option<DeviceTensor>, Option<DeviceTensor>) {
        (self.up_projection.into_inner(), self.activation.into_inner())
    }

    /// Both tensors, out of the slots (an error if a call took them already).
    fn take(&self) -> Result<(DeviceTensor, DeviceTensor)> {
        let up = self.up_projection.borrow_mut().take().ok_or_else(taken)?;
        let act = self.activation.borrow_mut().take().ok_or_else(taken)?;
        Ok((up, act))
    }
}

/// The error of slots a call emptied already (the binding gives each call new slots).
fn taken() -> Error {
    Error::Cuda("saved: its tensors were taken by an earlier call (a bug in moe-dispatch)".into())
}

/// What a backward pass is given of its forward's [`ExpertsSaved`]: lent, or to free as it goes.
#[derive(Clone, Copy)]
pub enum SavedArg<'a> {
    Lent(SavedRef<'a>),
    Given(&'a SavedSlots),
}

impl<'a> From<SavedRef<'a>> for SavedArg<'a> {
    fn from(r: SavedRef<'a>) -> Self {
        SavedArg::Lent(r)
    }
}

/// A [`SavedArg`]'s tensors borrowed for a while (from the slots: until this is dropped).
enum SavedView<'a> {
    Lent(SavedRef<'a>),
    Given(Ref<'a, Option<DeviceTensor>>, Ref<'a, Option<DeviceTensor>>, Option<&'a [i32]>),
}

impl<'a> SavedArg<'a> {
    fn view(self) -> Result<SavedView<'a>> {
        Ok(match self {
            SavedArg::Lent(r) => SavedView::Lent(r),
            SavedArg::Given(s) => {
                let (up, act) = (s.up_projection.borrow(), s.activation.borrow());
                if up.is_none() || act.is_none() {
                    return Err(taken());
                }
                SavedView::Given(up, act, s.counts.as_deref())
            }
        })
    }
}

impl SavedView<'_> {
    fn get(&self) -> SavedRef<'_> {
        match self {
            SavedView::Lent(r) => *r,
            SavedView::Given(up, act, counts) => SavedRef {
                up_projection: up.as_ref().expect("checked by SavedArg::view"),
                activation: act.as_ref().expect("checked by SavedArg::view"),
                counts: *counts,
            },
        }
    }
}

/// `saved`'s tensors as the grouped backward reads them: borrowed (Lent), or taken out of the
/// slots (Given: the caller's checks have passed; dropping one frees it).
pub(crate) fn saved_tensors<'a>(saved: SavedArg<'a>) -> Result<(Held<'a>, Held<'a>)> {
    Ok(match saved {
        SavedArg::Lent(r) => (Held::Lent(r.up_projection), Held::Lent(r.activation)),
        SavedArg::Given(s) => {
            let (up, act) = s.take()?;
            (Held::Made(up), Held::Made(act))
        }
    })
}

/// `saved`'s tensors fit a backward of `n` rows (`h [n, width]` of `hd`, `a [n, inter]` of
/// `dt`), or a TypeError naming them.
fn check_saved(sv: SavedRef, hd: DType, dt: DType, n: usize, width: usize, inter: usize) -> Result<()> {
    for (t, name, dtype, shape) in
        [(sv.up_projection, "saved.upProjection", hd, [n, width]), (sv.activation, "saved.activation", dt, [n, inter])]
    {
        if t.dtype != dtype || t.shape != shape {
            return Err(Error::Core(moe_core::Error::type_error(
                name,
                format!("{} {:?} (what expertsForward with saveForBackward returned for these inputs)", dtype.name(), shape),
                format!("{} {:?}", t.dtype.name(), t.shape),
            )));
        }
    }
    Ok(())
}

/// Grouped experts forward on device tensors: `[N, dim]` in the tokens' dtype.
pub fn experts_forward_device(dev: &Device, inp: &DeviceExpertsInputs, act: &ActivationOptions) -> Result<DeviceTensor> {
    Ok(experts_forward_device_saving(dev, inp, act, false)?.0)
}

/// [`experts_forward_device`], keeping `h` and `a` for the backward pass when `save` (None when
/// the GPU path does not run: the host path keeps nothing, and the backward recomputes).
pub fn experts_forward_device_saving(
    dev: &Device,
    inp: &DeviceExpertsInputs,
    act: &ActivationOptions,
    save: bool,
) -> Result<(DeviceTensor, Option<ExpertsSaved>)> {
    if let Some(g) = grouped_plan(dev, inp, act, None) {
        return forward_grouped(dev, &g, inp, None, act, save);
    }
    let Some(p) = plan(dev, inp, act, None, None)? else {
        let out = on_host(dev, inp, |i| Ok(experts_forward(i, act)?))?;
        return Ok((DeviceTensor::upload_owned(dev, "the output", &out)?, None));
    };
    let s = dev.stream();
    let out = DeviceTensor::alloc(dev, "the output", p.dtype, vec![p.n, p.dim])?;
    let hd = h_dtype(&p, inp);
    if p.n == 0 || p.dim == 0 {
        let saved = save
            .then(|| -> Result<ExpertsSaved> {
                Ok(ExpertsSaved {
                    up_projection: DeviceTensor::alloc(dev, "the up-projection", hd, vec![p.n, p.width])?,
                    activation: DeviceTensor::alloc(dev, "the activation", p.dtype, vec![p.n, p.inter])?,
                    counts: Some(p.counts()),
                })
            })
            .transpose()?;
        return Ok((out, saved));
    }
    let h = up_projection(dev, &p, inp)?;
    let a = dev.alloc("the activation", p.n * p.inter * p.dtype.size())?;
    let probs = inp.probs.map(|t| &t.buf);
    launch_activation(dev, act, ExpMath::Fast, hd, &h, p.n, p.width, probs, p.dtype, &a)?;
    let yf = inp.down_bias.map(|_| dev.alloc("the down-projection", p.n * p.dim * 4)).transpose()?;
    let (target, target_dtype) = match &yf {
        Some(f) => (f, DType::F32),
        None => (&out.buf, p.dtype),
    };
    per_expert(dev, &p, (p.dtype, false), (p.dtype, false), target_dtype, |e, r0, c| Problem {
        m: c,
        n: p.dim,
        k: p.inter,
        a: at(dev, &a, p.dtype, r0, p.inter),
        b: at(dev, &inp.down.buf, p.dtype, e * p.inter, p.dim),
        c: at(dev, target, target_dtype, r0, p.dim),
    })?;
    if let (Some(f), Some(b2)) = (&yf, inp.down_bias) {
        launch_rows(
            dev,
            &format!("experts_epilogue_{}", tag(p.dtype)),
            p.n,
            p.dim,
            &[
                Arg::U64(f.ptr(s)),
                Arg::U64(out.buf.ptr(s)),
                Arg::I64(p.dim as i64),
                Arg::U64(b2.buf.ptr(s)),
                Arg::U64(probs.map_or(0, |b| b.ptr(s))),
                Arg::U64(p.d_offsets.ptr(s)),
                Arg::I32(p.experts() as i32),
            ],
        )?;
    }
    let saved = save.then(|| ExpertsSaved {
        up_projection: DeviceTensor::from_buffer(hd, vec![p.n, p.width], h),
        activation: DeviceTensor::from_buffer(p.dtype, vec![p.n, p.inter], a),
        counts: Some(p.counts()),
    });
    Ok((out, saved))
}

/// The argument names of a gather: the tensor in its own order and the indices.
type GatherNames = (&'static str, &'static str, &'static str);
/// `permutedTokens` with `gatherIndices` (the experts' rows).
const TOKENS_GATHER: GatherNames = ("permutedTokens", "gatherIndices", "the tokens in their own order");
/// `gradOutput` with `gradGatherIndices` (the gradient of the experts' rows).
const GRAD_GATHER: GatherNames = ("gradOutput", "gradGatherIndices", "the tokens' gradient in their own order");

/// The experts' rows as `gatherIndices` names them: `inp.tokens [T, dim]` holds the tokens in their
/// own order and row r of the experts' input is `tokens[rows[r]]` (`rows`: int32 `[N]`, permute's
/// sortedIndices; the counts and probs are of the N rows). Indices from permute on these tokens
/// (their plan says so) are taken as they are; others are read back and checked (each in
/// `[0, T)`, else a RangeError naming the first bad one).
fn checked_gather<'a>(dev: &Device, tokens: &DeviceTensor, rows: &'a DeviceTensor) -> Result<Gather<'a>> {
    checked_gather_named(dev, tokens, rows, TOKENS_GATHER)
}

/// [`checked_gather`] under the names of `names` (the tensor, the indices, what the tensor holds).
fn checked_gather_named<'a>(dev: &Device, tokens: &DeviceTensor, rows: &'a DeviceTensor, names: GatherNames) -> Result<Gather<'a>> {
    let (tokens_name, rows_name, holds) = names;
    let bad = |e: moe_core::Error| Err(Error::Core(e));
    if rows.dtype != DType::I32 {
        return bad(moe_core::Error::type_error(rows_name, "an int32 device tensor (permute's sortedIndices)", rows.dtype.name()));
    }
    if rows.shape.len() != 1 {
        return bad(moe_core::Error::range(rows_name, format!("expected a 1-D tensor [numRows], got shape {:?}", rows.shape)));
    }
    if tokens.shape.len() != 2 {
        return bad(moe_core::Error::range(
            tokens_name,
            format!("with {rows_name}: expected {holds}, [numTokens, hidden], got shape {:?}", tokens.shape),
        ));
    }
    let (t, n) = (tokens.shape[0], rows.numel());
    let known = rows.plan.as_ref().is_some_and(|p| p.num_tokens == t && p.num_slots == n);
    if !known && n > 0 {
        let idx: Vec<i32> = dev.download_new(rows_name, &rows.buf, n)?;
        if let Some((i, v)) = idx.iter().enumerate().find(|(_, &v)| v < 0 || v as usize >= t) {
            return bad(moe_core::Error::range(
                rows_name,
                format!("element {i} = {v} is outside [0, {t}) (a row of {tokens_name}, {holds})"),
            ));
        }
    }
    Ok(Gather { rows, x_rows: t })
}

/// The rows `g` names, copied out (`[N, dim]`, [`crate::permute::launch_rows_of`]): for the
/// paths that do not gather on load.
pub(crate) fn gathered_rows(dev: &Device, tokens: &DeviceTensor, g: Gather) -> Result<DeviceTensor> {
    let dim = tokens.shape[1];
    let out = DeviceTensor::alloc(dev, "the gathered rows", tokens.dtype, vec![g.rows.numel(), dim])?;
    crate::permute::launch_rows_of(dev, &tokens.buf, dim * tokens.dtype.size(), g.rows, g.x_rows, &out.buf)?;
    Ok(out)
}

/// [`experts_forward_device_saving`] with the experts' rows gathered from the tokens
/// (`gatherIndices`, see [`checked_gather`]): on the grouped GEMM with
/// [`gather_selected`] the first GEMM reads them through the indices and the permuted copy of
/// the tokens is never made; elsewhere the rows are copied out first (the same results).
pub fn experts_forward_device_gathering(
    dev: &Device,
    inp: &DeviceExpertsInputs,
    rows: &DeviceTensor,
    act: &ActivationOptions,
    save: bool,
) -> Result<(DeviceTensor, Option<ExpertsSaved>)> {
    let g = checked_gather(dev, inp.tokens, rows)?;
    if gather_selected() {
        if let Some(p) = grouped_plan_rows(dev, inp, Some(rows.numel()), act, None) {
            return forward_grouped(dev, &p, inp, Some(g), act, save);
        }
    }
    let permuted = gathered_rows(dev, inp.tokens, g)?;
    experts_forward_device_saving(dev, &DeviceExpertsInputs { tokens: &permuted, ..*inp }, act, save)
}

/// [`experts_backward_device_saved`] with the experts' rows gathered from the tokens (as
/// [`experts_forward_device_gathering`]): `gradTokens` is the gradient of the N gathered rows.
pub fn experts_backward_device_gathering<'g>(
    dev: &Device,
    grad_output: impl Into<GradOutput<'g>>,
    inp: &DeviceExpertsInputs,
    rows: &DeviceTensor,
    act: &ActivationOptions,
    saved: Option<SavedArg>,
) -> Result<DeviceExpertsGrads> {
    let g = checked_gather(dev, inp.tokens, rows)?;
    let grad = grad_output.into().checked(dev)?;
    if gather_selected() {
        if let Some(p) = grouped_plan_rows(dev, inp, Some(rows.numel()), act, Some(grad)) {
            if let Some(sv) = saved {
                check_saved(sv.view()?.get(), DType::BF16, DType::BF16, p.rows(), p.width(), p.inter())?;
            }
            return own_tokens_grad(backward_grouped(dev, &p, grad, inp, TokenRows::Gathered(g), act, saved)?);
        }
    }
    let permuted = gathered_rows(dev, inp.tokens, g)?;
    experts_backward_device_saved(dev, grad, &DeviceExpertsInputs { tokens: &permuted, ..*inp }, act, saved)
}

/// Backward of [`experts_forward_device`]: the up-projection and activation are recomputed (as
/// the core does), then per expert `dW2 = a^T g`, `da = g W2^T`, `dh` through the activation,
/// `dW1 = x^T dh`, `dx = dh W1^T`; bias gradients are per-expert column sums.
pub fn experts_backward_device<'g>(
    dev: &Device,
    grad_output: impl Into<GradOutput<'g>>,
    inp: &DeviceExpertsInputs,
    act: &ActivationOptions,
) -> Result<DeviceExpertsGrads> {
    experts_backward_device_saved(dev, grad_output, inp, act, None)
}

/// [`experts_backward_device`] with what the forward pass kept ([`ExpertsSaved`]): `h` and `a`
/// are taken from there instead of recomputed. They must be the forward's own (same inputs); a
/// shape or dtype that does not fit is a TypeError naming `saved.upProjection` /
/// `saved.activation`. `grad_output`: the rows' gradient, or the tokens' with the rows to gather
/// ([`GradOutput`]).
pub fn experts_backward_device_saved<'g>(
    dev: &Device,
    grad_output: impl Into<GradOutput<'g>>,
    inp: &DeviceExpertsInputs,
    act: &ActivationOptions,
    saved: Option<SavedArg>,
) -> Result<DeviceExpertsGrads> {
    own_tokens_grad(backward_device(dev, grad_output.into(), inp, act, saved, false)?)
}

/// [`experts_backward_device_saved`] for a caller that is done with the tokens (`freeTokens`):
/// on our grouped GEMM the tokens' gradient is written over the tokens once `dW1`, their last
/// reader, is queued ([`TokensGrad::OverTokens`]: the `[N, dim]` rows and their gradient never
/// take memory side by side); elsewhere it is a tensor of its own. Either way the caller turns
/// the result and its tokens into the gradient with [`TokensGrad::into_tensor`]. An error leaves
/// the tokens as they were (every check and allocation comes before that last GEMM).
pub fn experts_backward_device_over_tokens<'g>(
    dev: &Device,
    grad_output: impl Into<GradOutput<'g>>,
    inp: &DeviceExpertsInputs,
    act: &ActivationOptions,
    saved: Option<SavedArg>,
) -> Result<ExpertsGrads<DeviceTensor, TokensGrad>> {
    backward_device(dev, grad_output.into(), inp, act, saved, true)
}

fn backward_device(
    dev: &Device,
    grad_output: GradOutput,
    inp: &DeviceExpertsInputs,
    act: &ActivationOptions,
    saved: Option<SavedArg>,
    over_tokens: bool,
) -> Result<ExpertsGrads<DeviceTensor, TokensGrad>> {
    let grad = grad_output.checked(dev)?;
    if let Some(g) = grouped_plan(dev, inp, act, Some(grad)) {
        if let Some(sv) = saved {
            check_saved(sv.view()?.get(), DType::BF16, DType::BF16, g.rows(), g.width(), g.inter())?;
        }
        let rows = if over_tokens { TokenRows::Given } else { TokenRows::Lent };
        return backward_grouped(dev, &g, grad, inp, rows, act, saved);
    }
    Ok(backward_per_expert(dev, grad, inp, act, saved)?.map_tokens(TokensGrad::Own))
}

/// The backward off our grouped GEMM: cuBLAS per expert (weight gradients beside on other
/// streams), or the host core.
fn backward_per_expert(
    dev: &Device,
    grad: GradOutput,
    inp: &DeviceExpertsInputs,
    act: &ActivationOptions,
    saved: Option<SavedArg>,
) -> Result<DeviceExpertsGrads> {
    // the per-expert path reads saved's tensors to its end: borrowed from the slots until then
    let view = saved.map(SavedArg::view).transpose()?;
    let saved = view.as_ref().map(SavedView::get);
    // the per-expert GEMMs (some beside on other streams) read the rows to the end: a gathered
    // copy lives until the call returns
    let rows = grad.rows(dev)?;
    let grad_output: &DeviceTensor = &rows;
    let Some(p) = plan(dev, inp, act, Some(grad_output), saved.and_then(|s| s.counts))? else {
        let g = grad_output.download(dev, "gradOutput")?;
        let out: ExpertsGrads = on_host(dev, inp, |i| Ok(experts_backward(&tensor_ref("gradOutput", &g)?, i, act)?))?;
        let up = |t: &moe_core::Tensor, what: &str| DeviceTensor::upload_owned(dev, what, t);
        return Ok(DeviceExpertsGrads {
            grad_tokens: up(&out.grad_tokens, "gradTokens")?,
            grad_gate_and_up: up(&out.grad_gate_and_up, "gradGateAndUpProjs")?,
            grad_down: up(&out.grad_down, "gradDownProjs")?,
            grad_gate_up_bias: upload_owned_opt(dev, "gradGateUpProjBias", out.grad_gate_up_bias.as_ref())?,
            grad_down_bias: upload_owned_opt(dev, "gradDownProjBias", out.grad_down_bias.as_ref())?,
            grad_probs: upload_owned_opt(dev, "gradProbs", out.grad_probs.as_ref())?,
        });
    };
    let s = dev.stream();
    let dt = p.dtype;
    let (e_count, n, dim, width, inter) = (p.experts(), p.n, p.dim, p.width, p.inter);
    let grad_tokens = DeviceTensor::alloc(dev, "gradTokens", dt, vec![n, dim])?;
    let grad_w1 = DeviceTensor::alloc(dev, "gradGateAndUpProjs", dt, inp.gate_and_up.shape.clone())?;
    let grad_w2 = DeviceTensor::alloc(dev, "gradDownProjs", dt, inp.down.shape.clone())?;
    // experts without tokens get zero weight gradients (the others are written by their GEMMs)
    for e in (0..e_count).filter(|&e| p.offsets[e + 1] == p.offsets[e]) {
        dev.memset_zero_at("gradGateAndUpProjs", &grad_w1.buf, e * dim * width * dt.size(), dim * width * dt.size())?;
        dev.memset_zero_at("gradDownProjs", &grad_w2.buf, e * inter * dim * dt.size(), inter * dim * dt.size())?;
    }
    let probs = inp.probs.map(|t| &t.buf);
    let mut grad_probs = inp.probs.map(|t| DeviceTensor::alloc(dev, "gradProbs", DType::F32, t.shape.clone())).transpose()?;
    let mut grad_b1 = None;
    let mut grad_b2 = None;
    let hd = h_dtype(&p, inp);
    if let Some(sv) = saved {
        check_saved(sv, hd, dt, n, width, inter)?;
    }
    if n > 0 {
        let g = &grad_output.buf;
        let (h_own, a_own);
        let (h, a) = match saved {
            Some(sv) => (&sv.up_projection.buf, &sv.activation.buf),
            None => {
                h_own = up_projection(dev, &p, inp)?;
                a_own = dev.alloc("the activation", n * inter * dt.size())?;
                launch_activation(dev, act, ExpMath::Fast, hd, &h_own, n, width, probs, dt, &a_own)?;
                (&h_own, &a_own)
            }
        };
        let da = dev.alloc("the activation gradient", n * inter * hd.size())?;
        // dW2[e] [inter, dim] = a_e^T g_e
        let dw2 = expert_problems(&p, |e, r0, c| Problem {
            m: inter,
            n: dim,
            k: c,
            a: at(dev, a, dt, r0, inter),
            b: at(dev, g, dt, r0, dim),
            c: at(dev, &grad_w2.buf, dt, e * inter, dim),
        });
        // many experts: the weight gradients (2 x 64 small cuBLAS calls for 64 experts, each
        // ~10 us of host time) are queued last, beside the token-side GEMMs (a few batched calls)
        // that the GPU runs meanwhile, each after what it reads: a and g (now), dh (below)
        let beside = weight_gradients_beside(dev, dw2.len());
        let after_a = beside.map(|_| mark(dev)).transpose()?;
        if beside.is_none() {
            run_gemms(dev, &dw2, (dt, true), (dt, false), dt)?;
        }
        // da_e [c, inter] = g_e W2[e]^T
        per_expert(dev, &p, (dt, false), (dt, true), hd, |e, r0, c| Problem {
            m: c,
            n: inter,
            k: dim,
            a: at(dev, g, dt, r0, dim),
            b: at(dev, &inp.down.buf, dt, e * inter, dim),
            c: at(dev, &da, hd, r0, inter),
        })?;
        // the down bias: db2 = per-expert sums of g * p; its share of dp is g . b2
        let bias_dp = match (inp.down_bias, &grad_probs) {
            (Some(b2), Some(_)) => {
                let buf = dev.alloc("gradProbs (bias part)", n * 4)?;
                launch_flat(
                    dev,
                    &format!("experts_row_dot_{}", tag(dt)),
                    n,
                    &[
                        Arg::U64(g.ptr(s)),
                        Arg::I64(n as i64),
                        Arg::I64(dim as i64),
                        Arg::U64(b2.buf.ptr(s)),
                        Arg::U64(p.d_offsets.ptr(s)),
                        Arg::I32(e_count as i32),
                        Arg::U64(buf.ptr(s)),
                    ],
                )?;
                Some(buf)
            }
            _ => None,
        };
        if let Some(b2) = inp.down_bias {
            let sums = column_sums(dev, &p, g, dt, dim, probs)?;
            grad_b2 = Some(narrow(dev, "gradDownProjBias", sums, e_count * dim, b2.dtype, b2.shape.clone())?);
        }
        // through the weighted activation: dh (f32 when the up bias needs its column sums)
        let dh_dtype = if inp.gate_up_bias.is_some() { DType::F32 } else { dt };
        let dh = dev.alloc("the up-projection gradient", n * width * dh_dtype.size())?;
        let act_dp = grad_probs.as_ref().map(|_| dev.alloc("gradProbs (activation part)", n * 4)).transpose()?;
        launch_activation_backward(dev, act, ExpMath::Fast, hd, &da, h, n, width, probs, dh_dtype, &dh, act_dp.as_ref())?;
        drop(da);
        if let (Some(gp), Some(act_dp)) = (&mut grad_probs, act_dp) {
            match bias_dp {
                Some(bdp) => {
                    launch_flat(dev, "experts_add_probs_grad", n, &[Arg::U64(bdp.ptr(s)), Arg::U64(act_dp.ptr(s)), Arg::I64(n as i64)])?;
                    gp.buf = bdp;
                }
                None => gp.buf = act_dp,
            }
        }
        let dh = match inp.gate_up_bias {
            Some(b1) => {
                let sums = column_sums(dev, &p, &dh, DType::F32, width, None)?;
                grad_b1 = Some(narrow(dev, "gradGateUpProjBias", sums, e_count * width, b1.dtype, b1.shape.clone())?);
                if dt == DType::F32 {
                    dh
                } else {
                    narrow(dev, "the up-projection gradient", dh, n * width, dt, vec![n, width])?.buf
                }
            }
            None => dh,
        };
        // dW1[e] [dim, width] = x_e^T dh_e
        let dw1 = expert_problems(&p, |e, r0, c| Problem {
            m: dim,
            n: width,
            k: c,
            a: at(dev, &inp.tokens.buf, dt, r0, dim),
            b: at(dev, &dh, dt, r0, width),
            c: at(dev, &grad_w1.buf, dt, e * dim, width),
        });
        let after_dh = beside.map(|_| mark(dev)).transpose()?;
        // dx_e [c, dim] = dh_e W1[e]^T
        per_expert(dev, &p, (dt, false), (dt, true), dt, |e, r0, c| Problem {
            m: c,
            n: dim,
            k: width,
            a: at(dev, &dh, dt, r0, width),
            b: at(dev, &inp.gate_and_up.buf, dt, e * dim, width),
            c: at(dev, &grad_tokens.buf, dt, r0, dim),
        })?;
        match (beside, after_a, after_dh) {
            (Some(side), Some(after_a), Some(after_dh)) => {
                // (made after every buffer the GEMMs read: on an early return it is dropped,
                // and so joined, before they are freed)
                let mut queue = side.queue(dev)?;
                queue.push(&after_a, &dw2, (dt, true), (dt, false), dt)?;
                queue.push(&after_dh, &dw1, (dt, true), (dt, false), dt)?;
                dev.span(|| "waiting for the weight gradients beside".into(), || queue.join())?;
            }
            _ => run_gemms(dev, &dw1, (dt, true), (dt, false), dt)?,
        }
    } else {
        if let Some(gp) = &grad_probs {
            dev.memset_zero("gradProbs", &gp.buf, gp.bytes())?;
        }
        for (bias, slot, what) in
            [(inp.gate_up_bias, &mut grad_b1, "gradGateUpProjBias"), (inp.down_bias, &mut grad_b2, "gradDownProjBias")]
        {
            if let Some(b) = bias {
                let t = DeviceTensor::alloc(dev, what, b.dtype, b.shape.clone())?;
                dev.memset_zero(what, &t.buf, t.bytes())?;
                *slot = Some(t);
            }
        }
    }
    Ok(DeviceExpertsGrads {
        grad_tokens,
        grad_gate_and_up: grad_w1,
        grad_down: grad_w2,
        grad_gate_up_bias: grad_b1,
        grad_down_bias: grad_b2,
        grad_probs,
    })
}

/// `matmul` on device tensors (one cuBLAS GEMM, f32 accumulation, the result in `a`'s dtype).
/// Operands of two dtypes, and shapes the core rejects, take the host path.
pub fn matmul_device(dev: &Device, a: &DeviceTensor, b: &DeviceTensor, trans_a: bool, trans_b: bool) -> Result<DeviceTensor> {
    let fast = check_matmul(a.meta("a"), b.meta("b"), trans_a, trans_b)
        .ok()
        .filter(|&(m, k, n)| a.dtype == b.dtype && i32::try_from(m.max(n).max(k)).is_ok());
    let Some((m, k, n)) = fast else {
        let (ha, hb) = (a.download(dev, "a")?, b.download(dev, "b")?);
        let out = moe_core::experts::matmul(&tensor_ref("a", &ha)?, &tensor_ref("b", &hb)?, trans_a, trans_b)?;
        return DeviceTensor::upload_owned(dev, "output", &out);
    };
    gemm_to_new(dev, a, b, (trans_a, trans_b), (m, k, n), a.dtype)
}

/// `a @ b` (operands of one dtype, sizes checked by the caller) into a new `[m, n]` tensor of
/// `out_dtype`: one cuBLAS GEMM accumulating in float32; zeros when `k` is 0.
pub fn gemm_to_new(
    dev: &Device,
    a: &DeviceTensor,
    b: &DeviceTensor,
    (trans_a, trans_b): (bool, bool),
    (m, k, n): (usize, usize, usize),
    out_dtype: DType,
) -> Result<DeviceTensor> {
    let out = DeviceTensor::alloc(dev, "output", out_dtype, vec![m, n])?;
    if k == 0 {
        dev.memset_zero("output", &out.buf, out.bytes())?;
        return Ok(out);
    }
    let s = dev.stream();
    gemm(
        dev,
        m,
        n,
        k,
        Operand { ptr: a.buf.ptr(s), dtype: a.dtype, trans: trans_a },
        Operand { ptr: b.buf.ptr(s), dtype: b.dtype, trans: trans_b },
        Output { ptr: out.buf.ptr(s), dtype: out_dtype },
        0.0,
    )?;
    Ok(out)
}
