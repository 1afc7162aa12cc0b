//! Expert activations (forward, backward) and the aux router losses on the GPU
//! (kernels/activations.cu), bit for bit the CPU core's (`moe_core::activations`,
//! `moe_core::aux_loss`).
//!
//! * [`launch_activation`] / [`launch_activation_backward`]: the kernels over raw buffers, for
//!   the expert MLPs too (input and output dtypes may differ: an f32 input may give a bf16 or
//!   f16 output, each value computed in f32 and rounded once).
//! * [`activation_device`], [`activation_backward_device`], [`switch_load_balancing_loss_device`],
//!   [`switch_load_balancing_loss_from_logits_device`], [`z_loss_device`]: the core's ops on
//!   device tensors. Dtypes, shapes and options are checked by the core's check functions
//!   (`check_activation`, `check_activation_backward`, `check_switch_loss`, `check_z_loss`) on the
//!   tensors' `Meta`; when a check fails the op runs its host path (download, the core, upload),
//!   so the error is the core's, class and message. The losses synchronise once to read the loss (8 bytes) with a flag word
//!   that the kernels set for the values the core rejects (a non-finite input, a mask byte above 1,
//!   a negative count): then the host path runs and the core reports the error. The activations
//!   reject no values (NaN and infinities go through, as in the core), so they never synchronise.

use moe_core::activations::{check_activation, check_activation_backward, ActivationCheck, ActivationKind, ActivationOptions};
use moe_core::aux_loss::{check_switch_loss, check_z_loss, SwitchLossOptions};
use moe_core::tensor::DType;

use crate::device::{Arg, Buffer, Device};
use crate::error::{Error, Result};
use crate::switch::{Choice, Switch};
use crate::tensor::{on_host, opt_meta, upload_owned_opt, DeviceTensor};

/// Threads per block of the element-wise and per-row kernels.
const THREADS: u32 = 256;
/// The loss totals' block (LOSS_TOTAL_THREADS in kernels/activations.cu): one block adds the rows in order.
const LOSS_TOTAL_THREADS: u32 = 256;
/// At most this many blocks; the kernels loop (grid stride) beyond.
const MAX_BLOCKS: usize = 1 << 20;

/// Blocks for `items` work items (0 when there are none: the launch is skipped).
fn blocks(items: usize) -> u32 {
    items.div_ceil(THREADS as usize).min(MAX_BLOCKS) as u32
}

/// The grid of the loss kernels that take a row a warp (`LOSS_WARP_ROWS`: grid-stride over rows).
fn warp_rows(rows: usize) -> u32 {
    blocks(rows.saturating_mul(32))
}

/// Rows a thread of the forward kernels loads together (ACT_ROWS in kernels/activations.cu):
/// their grids cover `rows / ACT_ROWS` row groups (the backward kernels take one row at a time).
const ACT_ROWS: usize = 4;

/// The vectorised kernels (`act_fwdv_*`, `act_bwdv_*` in kernels/activations.cu) take
/// 16 / (input element size) consecutive columns a thread with 16-byte loads; by default they run
/// wherever they apply ([`vector_grid`]); `MOE_DISPATCH_ACT_VECTOR=off` or
/// [`set_vectorised`]`(Some(false))` keeps the one-column kernels (for comparisons).
static VECTOR: Switch = Switch::new("MOE_DISPATCH_ACT_VECTOR");

/// Overrides whether the vectorised activation kernels run where they apply: `Some(false)`
/// never, `Some(true)` or `None` (the default) yes.
pub fn set_vectorised(mode: Option<bool>) {
    VECTOR.set(mode);
}

/// The grid of a vectorised kernel over `rows` x `inter` output columns of an input of
/// `in_dtype`, or None where it does not apply: `inter` not a multiple of the columns a thread
/// takes, a buffer not 16-byte aligned, or more (row, column group) items than its u32 index
/// allows (it counts to 2^31), or switched off.
fn vector_grid(in_dtype: DType, rows: usize, inter: usize, ptrs: &[u64]) -> Option<u32> {
    let v = 16 / in_dtype.size();
    let items = rows.checked_mul(inter / v)?;
    let applies = inter % v == 0 && items > 0 && items <= i32::MAX as usize && ptrs.iter().all(|p| p % 16 == 0);
    (applies && VECTOR.on()).then(|| blocks(items).min(VECTOR_BLOCKS))
}

/// At most this many blocks for the vectorised kernels (a few items a thread beyond).
const VECTOR_BLOCKS: u32 = 8192;

/// Whether the fast backward with probs (the grouped experts) computes the probs gradient in the
/// vectorised backward's pass (`act_bwdgv_fast_*`) where that kernel applies: by default yes;
/// `MOE_DISPATCH_ACT_FUSED=off` or [`set_fused_probs_gradient`]`(Some(false))`: two passes.
static FUSED: Switch = Switch::new("MOE_DISPATCH_ACT_FUSED");

fn fused_probs_gradient() -> bool {
    FUSED.on()
}

/// Overrides [`fused_probs_gradient`]: `Some(false)` two passes, `Some(true)` or `None` (the
/// default) one where it applies.
pub fn set_fused_probs_gradient(mode: Option<bool>) {
    FUSED.set(mode);
}

/// Whether the vectorised kernels run their loop specialised to the activation kind
/// (kernels/activations.cu's `ACT_BY_KIND`: straight-line code, the same bits): by default yes;
/// `MOE_DISPATCH_ACT_BY_KIND=off` (or [`set_by_kind`]`(Some(false))`) passes the kind with the
/// `ACT_GENERIC` flag, so they run the generic loop that branches over the kinds per element (as
/// before the split; for comparisons). On an H100 (`moe-cuda-bench act`, swiglu, fast exp, probs)
/// the specialised loop took the forward from 0.532 to 0.479 ms, the backward from 0.894 to 0.793
/// and the one-pass backward with the probs gradient from 1.116 to 0.813 ms at the Mixtral-like
/// shape (16384 x 14336), and 0.165 -> 0.150, 0.273 -> 0.239, 0.434 -> 0.297 ms fine-grained
/// (49152 x 1408), byte for byte the same in 405 of 405 checks
/// (bench/results/2026-12-05-activations-h100.json).
static BY_KIND: Switch = Switch::new("MOE_DISPATCH_ACT_BY_KIND");

/// Overrides whether the vectorised kernels take their loop specialised to the kind:
/// `Some(true)` or `None` (the default) the specialised loop, `Some(false)` the generic one.
pub fn set_by_kind(mode: Option<bool>) {
    BY_KIND.set(mode);
}

/// The one-pass backward with the probs gradient takes a block a row; by default its grid has
/// a block for every row (up to MAX_BLOCKS), each doing one row. [`set_probs_gradient_blocks`]
/// caps the grid (each block then walks rows `blockIdx.x + i * gridDim.x`: the same bits), for
/// comparisons.
static GP_BLOCKS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Caps the one-pass backward's grid at `blocks` (None: a block a row, the default).
pub fn set_probs_gradient_blocks(blocks: Option<usize>) {
    GP_BLOCKS.store(blocks.unwrap_or(0), std::sync::atomic::Ordering::Relaxed);
}

/// The one-pass backward with a warp a row instead of a block (`act_bwdgw_fast_bf16_bf16`: the
/// block kernel's summation tree replayed by one warp, the same bits, no block barrier a row),
/// bf16 only: by default (auto) where a row's activation is at most [`GP_WARP_MAX_INTER`] wide;
/// `MOE_DISPATCH_ACT_GP_WARP=on` always, `off` never (or [`set_probs_gradient_warp`]). On an
/// H100 (`moe-cuda-bench act`) a warp a row took 0.273 ms against the block's 0.295 at the
/// fine-grained shape (49152 rows of 1408) and 0.860 against 0.823 at the Mixtral-like one (16384
/// rows of 14336: a warp then walks 56 column groups a lane, the block 7 a thread;
/// bench/results/2026-12-05-activations-h100-run2.json).
static GP_WARP: Choice = Choice::new("MOE_DISPATCH_ACT_GP_WARP");

/// The widest activation row (columns of `a`) that the auto rule of [`GP_WARP`] gives a warp: the
/// two measured widths are 1408 (the warp faster) and 14336 (the block faster); the real models'
/// experts (768-2880 for Qwen-MoE, OLMoE, DeepSeek-V3, GPT-OSS) are on the warp's side.
pub const GP_WARP_MAX_INTER: usize = 4096;

/// Overrides whether the one-pass backward (bf16) takes a warp a row: `Some(true)` always,
/// `Some(false)` never (a block a row), `None` (the default) by [`GP_WARP_MAX_INTER`].
pub fn set_probs_gradient_warp(mode: Option<bool>) {
    GP_WARP.set(mode);
}

/// Whether the one-pass backward over rows of `inter` activation columns takes a warp a row.
fn probs_gradient_warp(inter: usize) -> bool {
    GP_WARP.get().unwrap_or(inter <= GP_WARP_MAX_INTER)
}

/// The warp-a-row one-pass backward's kernel (bf16 in and out).
const GP_WARP_KERNEL: &str = "act_bwdgw_fast_bf16_bf16";

fn probs_gradient_grid(rows: usize) -> u32 {
    let cap = GP_BLOCKS.load(std::sync::atomic::Ordering::Relaxed);
    rows.min(if cap == 0 { MAX_BLOCKS } else { cap.min(MAX_BLOCKS) }) as u32
}

/// kernels/activations.cu's `ACT_GENERIC`: a kind with this flag takes the generic loop.
const ACT_GENERIC: i32 = 16;

/// The kind argument of a vectorised kernel (with the generic flag when [`BY_KIND`] is off).
fn vector_kind(options: &ActivationOptions) -> Arg {
    Arg::I32(kind_code(options.kind) | if BY_KIND.on() { 0 } else { ACT_GENERIC })
}

/// `act_bwd_fast_*` -> `act_bwdgv_fast_*` (the vectorised backward with the probs gradient).
fn fused_name(name: &str) -> String {
    name.replacen("act_bwd_fast_", "act_bwdgv_fast_", 1)
}

/// `act_fwd_*` -> `act_fwdv_*`, `act_bwd_*` -> `act_bwdv_*` (the vectorised kernels).
fn vectorised_name(name: &str) -> String {
    name.replacen("act_fwd_", "act_fwdv_", 1).replacen("act_bwd_", "act_bwdv_", 1)
}

/// The (columns, rows) grid of the forward and backward kernels: blocks of 256 threads across a
/// row's `inter` output columns, and about 4096 blocks in all, each walking many rows (grid
/// stride): blocks that each did one row's 256 elements cost more to schedule than to run.
fn row_grid(rows: usize, inter: usize) -> (u32, u32) {
    if rows == 0 || inter == 0 {
        return (0, 0);
    }
    // one column a thread (kernels/activations.cu)
    let x = inter.div_ceil(THREADS as usize).min(MAX_BLOCKS);
    (x as u32, rows.min((4096 / x).max(1)).min(65_535) as u32)
}

/// The kind's code in kernels/activations.cu (the order of `ActivationKind::ALL`).
pub fn kind_code(kind: ActivationKind) -> i32 {
    match kind {
        ActivationKind::Swiglu => 0,
        ActivationKind::QuickGeglu => 1,
        ActivationKind::SwigluOai => 2,
        ActivationKind::SwigluClamped => 3,
        ActivationKind::Relu2 => 4,
    }
}

fn tag(d: DType) -> Option<&'static str> {
    match d {
        DType::F32 => Some("f32"),
        DType::BF16 => Some("bf16"),
        DType::F16 => Some("f16"),
        _ => None,
    }
}

/// The kernel suffix for an input and an output dtype: the same float dtype, or f32 to bf16/f16.
fn pair_suffix(input: DType, output: DType) -> Option<String> {
    let (i, o) = (tag(input)?, tag(output)?);
    (input == output || input == DType::F32).then(|| format!("{i}_{o}"))
}

/// The forward kernel for these dtypes, None for an unsupported pair.
pub fn forward_kernel(x_dtype: DType, out_dtype: DType) -> Option<String> {
    pair_suffix(x_dtype, out_dtype).map(|s| format!("act_fwd_{s}"))
}

/// The backward kernel for these dtypes, None for an unsupported pair.
pub fn backward_kernel(dtype: DType, grad_in_dtype: DType) -> Option<String> {
    pair_suffix(dtype, grad_in_dtype).map(|s| format!("act_bwd_{s}"))
}

/// The probs-gradient kernel for this dtype.
pub fn grad_probs_kernel(dtype: DType) -> Option<String> {
    tag(dtype).map(|t| format!("act_grad_probs_{t}"))
}

/// The output width of an input row of `width` (`width / 2` for gated kinds); None when a gated
/// kind gets an odd width.
pub fn inter_of(kind: ActivationKind, width: usize) -> Option<usize> {
    if !kind.is_gated() {
        Some(width)
    } else if width % 2 == 0 {
        Some(width / 2)
    } else {
        None
    }
}

fn i64_arg(v: usize) -> Arg {
    Arg::I64(v as i64)
}

/// How the element kernels compute `exp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpMath {
    /// The core's f64 `exp`, rounded once: the CPU backends' bits (the activation ops).
    Exact,
    /// CUDA's f32 `expf` (within 2 ulp): for callers that compare to a tolerance anyway (the
    /// grouped experts, whose GEMMs sum in cuBLAS's order), at memory speed.
    Fast,
}

/// The kernel of `name` (an exact one, `act_fwd_*`, `act_bwd_*`, `act_grad_probs_*`) for `math`:
/// the fast ones are `act_fwd_fast_*` etc.
pub fn with_math(name: String, math: ExpMath) -> String {
    match math {
        ExpMath::Exact => name,
        ExpMath::Fast => ["act_fwd_", "act_bwd_", "act_grad_probs_"]
            .iter()
            .find_map(|p| name.strip_prefix(p).map(|rest| format!("{p}fast_{rest}")))
            .unwrap_or(name),
    }
}

fn option_args(options: &ActivationOptions) -> [Arg; 4] {
    [
        Arg::I32(kind_code(options.kind)),
        Arg::F64(options.alpha as f64),
        Arg::F64(options.limit as f64),
        Arg::F64(options.linear_offset as f64),
    ]
}

/// Checks that `buf` holds at least `elems` elements of `dtype` (a caller's bug otherwise).
fn check_buffer(what: &str, buf: &Buffer, elems: usize, size: usize) -> Result<()> {
    match elems.checked_mul(size) {
        Some(b) if b <= buf.bytes() => Ok(()),
        _ => Err(Error::Cuda(format!(
            "{what}: the buffer holds {} bytes, fewer than {elems} elements of {size} bytes (a bug in moe-dispatch)",
            buf.bytes()
        ))),
    }
}

/// The kernel `name` (None: no kernel for these dtypes) in `math`, and the output width for an
/// input of `width`: what both launchers need first (an error here is a caller's bug).
fn kernel_and_inter(
    op: &str,
    name: Option<String>,
    math: ExpMath,
    from: DType,
    to: DType,
    options: &ActivationOptions,
    width: usize,
) -> Result<(String, usize)> {
    let name = name
        .map(|n| with_math(n, math))
        .ok_or_else(|| Error::Cuda(format!("{op}: no kernel from {} to {} (a bug in moe-dispatch)", from.name(), to.name())))?;
    let inter = inter_of(options.kind, width)
        .ok_or_else(|| Error::Cuda(format!("{op}: {} needs an even width, got {width} (a bug in moe-dispatch)", options.kind.name())))?;
    Ok((name, inter))
}

/// `activation` over raw buffers: `x` (`[rows, width]` of `x_dtype`) to `out` (`[rows, inter]`
/// of `out_dtype`), times `probs` (`[rows]` f32) per row when given. `out_dtype` is `x_dtype`,
/// or bf16/f16 when `x_dtype` is f32. Queued on the stream; nothing is synchronised.
#[allow(clippy::too_many_arguments)]
pub fn launch_activation(
    dev: &Device,
    options: &ActivationOptions,
    math: ExpMath,
    x_dtype: DType,
    x: &Buffer,
    rows: usize,
    width: usize,
    probs: Option<&Buffer>,
    out_dtype: DType,
    out: &Buffer,
) -> Result<()> {
    let (name, inter) = kernel_and_inter("activation", forward_kernel(x_dtype, out_dtype), math, x_dtype, out_dtype, options, width)?;
    check_buffer("activation's input", x, rows.saturating_mul(width), x_dtype.size())?;
    check_buffer("activation's output", out, rows.saturating_mul(inter), out_dtype.size())?;
    if let Some(p) = probs {
        check_buffer("activation's probs", p, rows, 4)?;
    }
    let s = dev.stream();
    let [kind, alpha, limit, offset] = option_args(options);
    let (xp, outp) = (x.ptr(s), out.ptr(s));
    let (name, grid, kind) = match vector_grid(x_dtype, rows, inter, &[xp, outp]) {
        Some(g) => (vectorised_name(&name), (g, 1), vector_kind(options)),
        None => (name, row_grid(rows.div_ceil(ACT_ROWS), inter), kind),
    };
    dev.launch(
        &name,
        grid,
        THREADS,
        &[
            Arg::U64(xp),
            i64_arg(rows),
            i64_arg(width),
            i64_arg(inter),
            Arg::U64(probs.map_or(0, |p| p.ptr(s))),
            kind,
            alpha,
            limit,
            offset,
            Arg::U64(outp),
        ],
    )
}

/// `activationBackward` over raw buffers: `grad` (`[rows, inter]`) and `x` (`[rows, width]`),
/// both of `dtype`, to `grad_in` (`[rows, width]` of `grad_in_dtype`: `dtype`, or bf16/f16 when
/// `dtype` is f32) and, when `probs` (`[rows]` f32) is given, `grad_probs` (`[rows]` f32: the
/// unweighted activation times `grad`, summed per row in f64). Queued; nothing is synchronised.
#[allow(clippy::too_many_arguments)]
pub fn launch_activation_backward(
    dev: &Device,
    options: &ActivationOptions,
    math: ExpMath,
    dtype: DType,
    grad: &Buffer,
    x: &Buffer,
    rows: usize,
    width: usize,
    probs: Option<&Buffer>,
    grad_in_dtype: DType,
    grad_in: &Buffer,
    grad_probs: Option<&Buffer>,
) -> Result<()> {
    let (name, inter) =
        kernel_and_inter("activationBackward", backward_kernel(dtype, grad_in_dtype), math, dtype, grad_in_dtype, options, width)?;
    check_buffer("activationBackward's grad", grad, rows.saturating_mul(inter), dtype.size())?;
    check_buffer("activationBackward's input", x, rows.saturating_mul(width), dtype.size())?;
    check_buffer("activationBackward's gradInput", grad_in, rows.saturating_mul(width), grad_in_dtype.size())?;
    if let Some(p) = probs {
        check_buffer("activationBackward's probs", p, rows, 4)?;
    }
    let s = dev.stream();
    let [kind, alpha, limit, offset] = option_args(options);
    let (gradp, xp, gip) = (grad.ptr(s), x.ptr(s), grad_in.ptr(s));
    let vector = vector_grid(dtype, rows, inter, &[gradp, xp, gip]);
    let args = |probs_ptr: u64, kind: Arg| {
        vec![
            Arg::U64(gradp),
            Arg::U64(xp),
            i64_arg(rows),
            i64_arg(width),
            i64_arg(inter),
            Arg::U64(probs_ptr),
            kind,
            alpha,
            limit,
            offset,
            Arg::U64(gip),
        ]
    };
    if let (Some(_), Some(p), Some(gp), ExpMath::Fast, true) = (vector, probs, grad_probs, math, fused_probs_gradient()) {
        // one pass: the gradients and the probs gradient (a block a row, its column groups)
        check_buffer("activationBackward's gradProbs", gp, rows, 4)?;
        let groups = inter / (16 / dtype.size());
        let threads = groups.next_multiple_of(32).min(THREADS as usize) as u32;
        let mut a = args(p.ptr(s), vector_kind(options));
        a.push(Arg::U64(gp.ptr(s)));
        if probs_gradient_warp(inter) && dtype == DType::BF16 && grad_in_dtype == DType::BF16 {
            // a warp a row, 8 rows a block of 256 threads
            let warps = THREADS as usize / 32;
            return dev.launch(GP_WARP_KERNEL, (probs_gradient_grid(rows.div_ceil(warps)), 1), THREADS, &a);
        }
        return dev.launch(&fused_name(&name), (probs_gradient_grid(rows), 1), threads, &a);
    }
    let (vname, grid, vkind) = match vector {
        Some(g) => (vectorised_name(&name), (g, 1), vector_kind(options)),
        None => (name, row_grid(rows, inter), kind),
    };
    dev.launch(&vname, grid, THREADS, &args(probs.map_or(0, |p| p.ptr(s)), vkind))?;
    if let (Some(_), Some(gp)) = (probs, grad_probs) {
        check_buffer("activationBackward's gradProbs", gp, rows, 4)?;
        let name = grad_probs_kernel(dtype)
            .map(|n| with_math(n, math))
            .ok_or_else(|| Error::Cuda(format!("activationBackward: no kernel for {} (a bug in moe-dispatch)", dtype.name())))?;
        // (kernels/activations.cu: 32 rows a block, a summing warp and 8 producer warps)
        dev.launch_block(
            &name,
            (rows.div_ceil(32).min(MAX_BLOCKS) as u32, 1),
            (32, 9),
            &[
                Arg::U64(gradp),
                Arg::U64(xp),
                i64_arg(rows),
                i64_arg(width),
                i64_arg(inter),
                kind,
                alpha,
                limit,
                offset,
                Arg::U64(gp.ptr(s)),
            ],
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Activations on device tensors

/// [`moe_core::activations::activation`] on device tensors: `x [N, 2I]` (`[N, I]` for relu2) to
/// `[N, I]` in the dtype of `x`.
pub fn activation_device(
    dev: &Device,
    x: &DeviceTensor,
    probs: Option<&DeviceTensor>,
    options: &ActivationOptions,
) -> Result<DeviceTensor> {
    let Ok(c) = check_activation(x.meta("x"), opt_meta(probs, "probs"), options) else {
        return activation_host(dev, x, probs, options);
    };
    let out = DeviceTensor::alloc(dev, "the output", x.dtype, vec![c.rows, c.inter])?;
    launch_activation(dev, options, ExpMath::Exact, x.dtype, &x.buf, c.rows, c.width, probs.map(|p| &p.buf), x.dtype, &out.buf)?;
    Ok(out)
}

fn activation_host(dev: &Device, x: &DeviceTensor, probs: Option<&DeviceTensor>, options: &ActivationOptions) -> Result<DeviceTensor> {
    let out = on_host(dev, [("x", x)], [("probs", probs)], |[x], [p]| moe_core::activations::activation(&x, p.as_ref(), options))?;
    DeviceTensor::upload_owned(dev, "the output", &out)
}

/// [`moe_core::activations::activation_backward`] on device tensors: `(gradInput, gradProbs)`,
/// gradProbs (shaped like `probs`, f32) when probs are given.
pub fn activation_backward_device(
    dev: &Device,
    grad: &DeviceTensor,
    x: &DeviceTensor,
    probs: Option<&DeviceTensor>,
    options: &ActivationOptions,
) -> Result<(DeviceTensor, Option<DeviceTensor>)> {
    let Ok(ActivationCheck { rows, width, .. }) =
        check_activation_backward(grad.meta("grad"), x.meta("x"), opt_meta(probs, "probs"), options)
    else {
        return activation_backward_host(dev, grad, x, probs, options);
    };
    let grad_in = DeviceTensor::alloc(dev, "gradInput", x.dtype, vec![rows, width])?;
    let grad_probs = probs.map(|p| DeviceTensor::alloc(dev, "gradProbs", DType::F32, p.shape.clone())).transpose()?;
    launch_activation_backward(
        dev,
        options,
        ExpMath::Exact,
        x.dtype,
        &grad.buf,
        &x.buf,
        rows,
        width,
        probs.map(|p| &p.buf),
        x.dtype,
        &grad_in.buf,
        grad_probs.as_ref().map(|p| &p.buf),
    )?;
    Ok((grad_in, grad_probs))
}

fn activation_backward_host(
    dev: &Device,
    grad: &DeviceTensor,
    x: &DeviceTensor,
    probs: Option<&DeviceTensor>,
    options: &ActivationOptions,
) -> Result<(DeviceTensor, Option<DeviceTensor>)> {
    let out = on_host(dev, [("grad", grad), ("x", x)], [("probs", probs)], |[g, x], [p]| {
        moe_core::activations::activation_backward(&g, &x, p.as_ref(), options)
    })?;
    Ok((DeviceTensor::upload_owned(dev, "gradInput", &out.grad_input)?, upload_owned_opt(dev, "gradProbs", out.grad_probs.as_ref())?))
}

// ---------------------------------------------------------------------------------------
// Aux losses on device tensors

/// LOSS_SWITCH / LOSS_Z in kernels/activations.cu.
const MODE_SWITCH: i32 = 0;
const MODE_Z: i32 = 1;

/// The result words: loss, scalar, flags (zeroed), as an int64 `[4]` device tensor.
fn result_buffer(dev: &Device) -> Result<DeviceTensor> {
    let r = DeviceTensor::alloc(dev, "the loss", DType::I64, vec![4])?;
    dev.memset_u32("the loss", &r.buf, 0, 8)?;
    Ok(r)
}

/// A loss of the GPU: its value (read back, or the host path's), or, queued lazily, the kernels'
/// result words still on the GPU (nothing waited for), read by [`read_device_loss`].
pub enum DeviceLoss {
    Value(f64),
    Pending(DeviceTensor),
}

/// Reads a pending loss's words (a synchronisation): the loss, or None when a kernel flagged an
/// input value (the op's host path then gives the core's error). A tensor that is not a loss's
/// words is a TypeError naming `words`.
pub fn read_device_loss(dev: &Device, words: &DeviceTensor) -> Result<Option<f64>> {
    if words.dtype != DType::I64 || words.shape != [4] {
        return Err(Error::Core(moe_core::Error::type_error(
            "words",
            "a loss's result words (int64 [4], from a lazy loss)",
            format!("{} {:?}", words.dtype.name(), words.shape),
        )));
    }
    let [loss, _, flags] = dev.read_head::<u64, 3>("the loss", &words.buf, 0)?;
    Ok((flags == 0).then_some(f64::from_bits(loss)))
}

/// An eager loss from a queued one: the value read back, or the host path where a kernel flagged a value.
fn eager(
    dev: &Device,
    (loss, grad): (DeviceLoss, DeviceTensor),
    host: impl FnOnce() -> Result<(f64, DeviceTensor)>,
) -> Result<(f64, DeviceTensor)> {
    match loss {
        DeviceLoss::Value(v) => Ok((v, grad)),
        DeviceLoss::Pending(words) => match read_device_loss(dev, &words)? {
            Some(v) => Ok((v, grad)),
            None => host(),
        },
    }
}

/// The host path's result as a [`DeviceLoss`].
fn valued((loss, grad): (f64, DeviceTensor)) -> (DeviceLoss, DeviceTensor) {
    (DeviceLoss::Value(loss), grad)
}

fn num_tokens_arg(options: &SwitchLossOptions) -> Arg {
    Arg::F64(options.num_tokens.map_or(-1.0, |n| n as f64))
}

/// [`moe_core::aux_loss::switch_load_balancing_loss`] on device tensors: the loss (read back)
/// and `gradProbs` (`[T, E]` f32, on the GPU).
pub fn switch_load_balancing_loss_device(
    dev: &Device,
    probs: &DeviceTensor,
    tokens_per_expert: &DeviceTensor,
    token_mask: Option<&DeviceTensor>,
    options: SwitchLossOptions,
) -> Result<(f64, DeviceTensor)> {
    let queued = switch_load_balancing_loss_device_lazy(dev, probs, tokens_per_expert, token_mask, options)?;
    eager(dev, queued, || loss_host(dev, LossOp::Switch(options), probs, Some(tokens_per_expert), token_mask))
}

/// [`switch_load_balancing_loss_device`] with the loss left on the GPU (nothing waits): the
/// input values are checked when the loss is read ([`read_device_loss`]: None means that the
/// eager op gives the error; the gradient is then not to be used). Dtype and shape errors are
/// raised at once, as in the eager op.
pub fn switch_load_balancing_loss_device_lazy(
    dev: &Device,
    probs: &DeviceTensor,
    tokens_per_expert: &DeviceTensor,
    token_mask: Option<&DeviceTensor>,
    options: SwitchLossOptions,
) -> Result<(DeviceLoss, DeviceTensor)> {
    let Ok((rows, cols)) =
        check_switch_loss(probs.meta("probs"), tokens_per_expert.meta("tokensPerExpert"), opt_meta(token_mask, "tokenMask"), &options)
    else {
        return loss_host(dev, LossOp::Switch(options), probs, Some(tokens_per_expert), token_mask).map(valued);
    };
    let s = dev.stream();
    let result = result_buffer(dev)?;
    let r = result.buf.ptr(s);
    let partial = dev.alloc("the loss (row sums)", rows * 8)?;
    let grad = DeviceTensor::alloc(dev, "gradProbs", DType::F32, vec![rows, cols])?;
    let (x, c, m) = (probs.buf.ptr(s), tokens_per_expert.buf.ptr(s), token_mask.map_or(0, |m| m.buf.ptr(s)));
    dev.launch(
        "loss_switch_rows",
        (warp_rows(rows), 1),
        THREADS,
        &[Arg::U64(x), Arg::U64(c), Arg::U64(m), i64_arg(rows), i64_arg(cols), Arg::U64(partial.ptr(s)), Arg::U64(r)],
    )?;
    dev.launch(
        "loss_switch_total",
        (1, 1),
        LOSS_TOTAL_THREADS,
        &[
            Arg::U64(partial.ptr(s)),
            Arg::U64(c),
            Arg::U64(m),
            i64_arg(rows),
            i64_arg(cols),
            Arg::F64(options.topk as f64),
            Arg::F64(options.coeff),
            num_tokens_arg(&options),
            Arg::U64(r),
        ],
    )?;
    dev.launch(
        "loss_switch_grad",
        (warp_rows(rows), 1),
        THREADS,
        &[Arg::U64(c), Arg::U64(m), i64_arg(rows), i64_arg(cols), Arg::U64(r), Arg::U64(grad.buf.ptr(s))],
    )?;
    Ok((DeviceLoss::Pending(result), grad))
}

/// [`moe_core::aux_loss::switch_load_balancing_loss_from_logits`] on device tensors: the loss
/// (read back) and `gradLogits` (`[T, E]` f32, on the GPU).
pub fn switch_load_balancing_loss_from_logits_device(
    dev: &Device,
    logits: &DeviceTensor,
    tokens_per_expert: &DeviceTensor,
    token_mask: Option<&DeviceTensor>,
    options: SwitchLossOptions,
) -> Result<(f64, DeviceTensor)> {
    let queued = switch_load_balancing_loss_from_logits_device_lazy(dev, logits, tokens_per_expert, token_mask, options)?;
    eager(dev, queued, || loss_host(dev, LossOp::SwitchFromLogits(options), logits, Some(tokens_per_expert), token_mask))
}

/// [`switch_load_balancing_loss_from_logits_device`] with the loss left on the GPU (see
/// [`switch_load_balancing_loss_device_lazy`]).
pub fn switch_load_balancing_loss_from_logits_device_lazy(
    dev: &Device,
    logits: &DeviceTensor,
    tokens_per_expert: &DeviceTensor,
    token_mask: Option<&DeviceTensor>,
    options: SwitchLossOptions,
) -> Result<(DeviceLoss, DeviceTensor)> {
    let Ok(dims) =
        check_switch_loss(logits.meta("logits"), tokens_per_expert.meta("tokensPerExpert"), opt_meta(token_mask, "tokenMask"), &options)
    else {
        return loss_host(dev, LossOp::SwitchFromLogits(options), logits, Some(tokens_per_expert), token_mask).map(valued);
    };
    let args = LogitsArgs { mode: MODE_SWITCH, topk: options.topk as f64, coeff: options.coeff, num_tokens: num_tokens_arg(&options) };
    logits_loss(dev, logits, Some(tokens_per_expert), token_mask, dims, args)
}

/// [`moe_core::aux_loss::z_loss`] on device tensors: the loss (read back) and `gradLogits`
/// (`[T, E]` f32, on the GPU).
pub fn z_loss_device(dev: &Device, logits: &DeviceTensor, token_mask: Option<&DeviceTensor>, coeff: f64) -> Result<(f64, DeviceTensor)> {
    let queued = z_loss_device_lazy(dev, logits, token_mask, coeff)?;
    eager(dev, queued, || loss_host(dev, LossOp::Z(coeff), logits, None, token_mask))
}

/// [`z_loss_device`] with the loss left on the GPU (see [`switch_load_balancing_loss_device_lazy`]).
pub fn z_loss_device_lazy(
    dev: &Device,
    logits: &DeviceTensor,
    token_mask: Option<&DeviceTensor>,
    coeff: f64,
) -> Result<(DeviceLoss, DeviceTensor)> {
    let Ok(dims) = check_z_loss(logits.meta("logits"), opt_meta(token_mask, "tokenMask"), coeff) else {
        return loss_host(dev, LossOp::Z(coeff), logits, None, token_mask).map(valued);
    };
    let args = LogitsArgs { mode: MODE_Z, topk: 1.0, coeff, num_tokens: Arg::F64(-1.0) };
    logits_loss(dev, logits, None, token_mask, dims, args)
}

struct LogitsArgs {
    mode: i32,
    topk: f64,
    coeff: f64,
    num_tokens: Arg,
}

/// The losses on logits (kernels loss_logits_*), queued.
fn logits_loss(
    dev: &Device,
    logits: &DeviceTensor,
    counts: Option<&DeviceTensor>,
    token_mask: Option<&DeviceTensor>,
    (rows, cols): (usize, usize),
    a: LogitsArgs,
) -> Result<(DeviceLoss, DeviceTensor)> {
    let s = dev.stream();
    let result = result_buffer(dev)?;
    let r = result.buf.ptr(s);
    let stats = dev.alloc("the loss (row statistics)", rows.saturating_mul(24))?;
    let grad = DeviceTensor::alloc(dev, "gradLogits", DType::F32, vec![rows, cols])?;
    let (x, c, m) = (logits.buf.ptr(s), counts.map_or(0, |c| c.buf.ptr(s)), token_mask.map_or(0, |m| m.buf.ptr(s)));
    dev.launch(
        "loss_logits_rows",
        (warp_rows(rows), 1),
        THREADS,
        &[Arg::U64(x), Arg::U64(c), Arg::U64(m), i64_arg(rows), i64_arg(cols), Arg::I32(a.mode), Arg::U64(stats.ptr(s)), Arg::U64(r)],
    )?;
    dev.launch(
        "loss_logits_total",
        (1, 1),
        LOSS_TOTAL_THREADS,
        &[
            Arg::U64(stats.ptr(s)),
            Arg::U64(c),
            Arg::U64(m),
            i64_arg(rows),
            i64_arg(cols),
            Arg::I32(a.mode),
            Arg::F64(a.topk),
            Arg::F64(a.coeff),
            a.num_tokens,
            Arg::U64(r),
        ],
    )?;
    dev.launch(
        "loss_logits_grad",
        (warp_rows(rows), 1),
        THREADS,
        &[
            Arg::U64(x),
            Arg::U64(c),
            Arg::U64(m),
            i64_arg(rows),
            i64_arg(cols),
            Arg::I32(a.mode),
            Arg::F64(a.coeff),
            Arg::U64(stats.ptr(s)),
            Arg::U64(r),
            Arg::U64(grad.buf.ptr(s)),
        ],
    )?;
    Ok((DeviceLoss::Pending(result), grad))
}

/// Which loss the host path computes.
enum LossOp {
    Switch(SwitchLossOptions),
    SwitchFromLogits(SwitchLossOptions),
    Z(f64),
}

/// The host path of the losses: download, the core (its checks, its errors), upload of the gradient.
fn loss_host(
    dev: &Device,
    op: LossOp,
    x: &DeviceTensor,
    counts: Option<&DeviceTensor>,
    token_mask: Option<&DeviceTensor>,
) -> Result<(f64, DeviceTensor)> {
    let first = if matches!(op, LossOp::Switch(_)) { "probs" } else { "logits" };
    let missing = || moe_core::Error::Internal("the Switch loss without tokensPerExpert (a bug in moe-dispatch)".into());
    let out = on_host(dev, [(first, x)], [("tokensPerExpert", counts), ("tokenMask", token_mask)], |[x], [c, m]| match op {
        LossOp::Switch(o) => moe_core::aux_loss::switch_load_balancing_loss(&x, &c.ok_or_else(missing)?, m.as_ref(), o),
        LossOp::SwitchFromLogits(o) => {
            moe_core::aux_loss::switch_load_balancing_loss_from_logits(&x, &c.ok_or_else(missing)?, m.as_ref(), o)
        }
        LossOp::Z(coeff) => moe_core::aux_loss::z_loss(&x, m.as_ref(), coeff),
    })?;
    let what = if matches!(op, LossOp::Switch(_)) { "gradProbs" } else { "gradLogits" };
    Ok((out.loss, DeviceTensor::upload_owned(dev, what, &out.grad)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile;
    use crate::device::kernel_names;

    fn all_kernels() -> Vec<String> {
        let mut names = Vec::new();
        for (i, o) in [
            (DType::F32, DType::F32),
            (DType::BF16, DType::BF16),
            (DType::F16, DType::F16),
            (DType::F32, DType::BF16),
            (DType::F32, DType::F16),
        ] {
            names.push(forward_kernel(i, o).unwrap());
            names.push(backward_kernel(i, o).unwrap());
            names.push(with_math(forward_kernel(i, o).unwrap(), ExpMath::Fast));
            names.push(with_math(backward_kernel(i, o).unwrap(), ExpMath::Fast));
            names.push(fused_name(&with_math(backward_kernel(i, o).unwrap(), ExpMath::Fast)));
            for n in [forward_kernel(i, o).unwrap(), backward_kernel(i, o).unwrap()] {
                names.push(vectorised_name(&n));
                names.push(vectorised_name(&with_math(n, ExpMath::Fast)));
            }
        }
        for d in DType::TOKENS {
            names.push(grad_probs_kernel(*d).unwrap());
            names.push(with_math(grad_probs_kernel(*d).unwrap(), ExpMath::Fast));
        }
        names.push(GP_WARP_KERNEL.to_string());
        for n in ["loss_switch_rows", "loss_switch_total", "loss_switch_grad", "loss_logits_rows", "loss_logits_total", "loss_logits_grad"]
        {
            names.push(n.to_string());
        }
        names
    }

    #[test]
    fn kernel_names_lists_every_kernel() {
        let listed = kernel_names(compile::ACTIVATIONS.source);
        for n in all_kernels() {
            assert!(listed.contains(&n), "{n} not found by kernel_names: {listed:?}");
        }
        assert_eq!(listed.len(), all_kernels().len(), "{listed:?}");
        assert!(compile::ALL.iter().any(|s| s.file == "activations.cu"));
    }

    #[test]
    fn loss_totals_add_the_cores_blocks() {
        // the kernels' blocks are the core's (the totals' bits depend on them), and a chunk of
        // rows holds whole blocks, at most one a thread
        let define = |name: &str| -> usize {
            let line = compile::ACTIVATIONS
                .source
                .lines()
                .find(|l| l.starts_with(&format!("#define {name} ")))
                .unwrap_or_else(|| panic!("{name}"));
            line.split_whitespace().nth(2).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{line}"))
        };
        let (block, chunk, threads) = (define("LOSS_TOTAL_BLOCK"), define("LOSS_TOTAL_CHUNK"), define("LOSS_TOTAL_THREADS"));
        assert_eq!(block, moe_core::aux_loss::TOTAL_BLOCK);
        assert_eq!(chunk % block, 0);
        assert!(chunk / block <= threads);
        assert_eq!(threads, LOSS_TOTAL_THREADS as usize);
    }

    #[test]
    fn dtype_pairs() {
        assert_eq!(forward_kernel(DType::F32, DType::BF16).as_deref(), Some("act_fwd_f32_bf16"));
        assert_eq!(forward_kernel(DType::BF16, DType::BF16).as_deref(), Some("act_fwd_bf16_bf16"));
        assert_eq!(forward_kernel(DType::BF16, DType::F32), None);
        assert_eq!(forward_kernel(DType::BF16, DType::F16), None);
        assert_eq!(backward_kernel(DType::F16, DType::F16).as_deref(), Some("act_bwd_f16_f16"));
        assert_eq!(backward_kernel(DType::F32, DType::F16).as_deref(), Some("act_bwd_f32_f16"));
        assert_eq!(backward_kernel(DType::I32, DType::I32), None);
        assert_eq!(grad_probs_kernel(DType::Bool), None);
    }

    /// The one-pass backward's warp-a-row choice: by row width by default, forced either way.
    /// (The one test that sets it: tests of one binary share the process.)
    #[test]
    fn probs_gradient_warp_by_width() {
        set_probs_gradient_warp(None);
        assert!(probs_gradient_warp(1408) && probs_gradient_warp(GP_WARP_MAX_INTER));
        assert!(!probs_gradient_warp(GP_WARP_MAX_INTER + 8) && !probs_gradient_warp(14336));
        set_probs_gradient_warp(Some(true));
        assert!(probs_gradient_warp(14336));
        set_probs_gradient_warp(Some(false));
        assert!(!probs_gradient_warp(1408));
        set_probs_gradient_warp(None);
        assert!(probs_gradient_warp(1408));
    }

    #[test]
    fn kind_codes_follow_the_core_order() {
        for (i, k) in ActivationKind::ALL.into_iter().enumerate() {
            assert_eq!(kind_code(k), i as i32, "{}", k.name());
        }
        // The kernels' codes (ACT_* defines, in common.cuh: the grouped GEMM's fused epilogue
        // uses them too) agree.
        let src = compile::ACTIVATIONS.source;
        for (code, name) in [(0, "ACT_SWIGLU"), (1, "ACT_QUICK_GEGLU"), (2, "ACT_SWIGLU_OAI"), (3, "ACT_SWIGLU_CLAMPED"), (4, "ACT_RELU2")]
        {
            assert!(compile::COMMON.contains(&format!("#define {name} {code}\n")), "{name}");
        }
        // the generic loop's flag, and no kind code that carries it
        assert!(src.contains(&format!("#define ACT_GENERIC {ACT_GENERIC}\n")));
        assert!(ActivationKind::ALL.into_iter().all(|k| kind_code(k) & ACT_GENERIC == 0));
        assert!(src.contains(&format!("#define LOSS_SWITCH {MODE_SWITCH}\n")) && src.contains(&format!("#define LOSS_Z {MODE_Z}\n")));
        assert_eq!(inter_of(ActivationKind::Relu2, 5), Some(5));
        assert_eq!(inter_of(ActivationKind::Swiglu, 5), None);
        assert_eq!(inter_of(ActivationKind::QuickGeglu, 6), Some(3));
        // the 2-D grid: every column covered by x, at most 65535 block rows (grid stride beyond),
        // about 4096 blocks in all, nothing launched for empty inputs
        assert_eq!(row_grid(0, 100), (0, 0));
        assert_eq!(row_grid(100, 0), (0, 0));
        assert_eq!(row_grid(3, 10), (1, 3));
        let (x, y) = row_grid(16384, 14336);
        assert!(x as usize * THREADS as usize >= 14336);
        assert!(x as usize * y as usize <= 4096 + x as usize && y >= 1, "{x} x {y}");
        let (x, y) = row_grid(1 << 20, 1);
        assert_eq!((x, y), (1, 4096));
        let (x, y) = row_grid(10, 1 << 30);
        assert_eq!((x as usize, y), ((1usize << 30).div_ceil(THREADS as usize).min(MAX_BLOCKS), 1));
        assert_eq!(blocks(0), 0);
        assert_eq!(blocks(1), 1);
        assert_eq!(blocks(257), 2);
        // the vectorised kernels: their names, and where they apply (8 bf16 / 4 f32 columns a
        // thread, 16-byte aligned buffers, a u32 index)
        assert_eq!(vectorised_name("act_fwd_fast_bf16_bf16"), "act_fwdv_fast_bf16_bf16");
        assert_eq!(vectorised_name("act_bwd_f32_f16"), "act_bwdv_f32_f16");
        assert_eq!(fused_name("act_bwd_fast_bf16_bf16"), "act_bwdgv_fast_bf16_bf16");
        assert_eq!(vector_grid(DType::BF16, 49152, 1408, &[0, 256]), Some(8192));
        assert_eq!(vector_grid(DType::BF16, 3, 16, &[0, 256]), Some(1));
        assert_eq!(vector_grid(DType::BF16, 3, 12, &[0, 256]), None);
        assert_eq!(vector_grid(DType::F32, 3, 12, &[0, 256]), Some(1));
        assert_eq!(vector_grid(DType::F32, 3, 12, &[0, 8]), None);
        assert_eq!(vector_grid(DType::F32, 0, 12, &[0, 256]), None);
        assert_eq!(vector_grid(DType::BF16, 1 << 28, 64, &[0, 256]), None);
        assert_eq!(vector_grid(DType::BF16, (1 << 28) - 1, 64, &[0, 256]), Some(VECTOR_BLOCKS));
    }

    /// The bits of a float tensor, every NaN as one value (NaN payloads after arithmetic are not
    /// part of the contract).
    fn bits(t: &moe_core::Tensor) -> (Vec<usize>, Vec<u32>) {
        use moe_core::tensor::Data;
        let v = match &t.data {
            Data::F32(v) => v.iter().map(|x| if x.is_nan() { u32::MAX } else { x.to_bits() }).collect(),
            Data::U16(v) => v
                .iter()
                .map(|&b| {
                    let nan =
                        if t.dtype == DType::BF16 { b & 0x7f80 == 0x7f80 && b & 0x7f != 0 } else { b & 0x7c00 == 0x7c00 && b & 0x3ff != 0 };
                    if nan {
                        u32::MAX
                    } else {
                        b as u32
                    }
                })
                .collect(),
            _ => panic!("not a float tensor"),
        };
        (t.shape.clone(), v)
    }

    /// Against the core, bit for bit, where a GPU is present (skipped otherwise).
    #[test]
    fn gpu_matches_the_core() {
        use moe_core::tensor::TensorRef;
        let Ok(dev) = Device::global() else { return };
        let mut seed = 12345u64;
        let mut next = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) as f64 / (1u64 << 31) as f64) as f32 * 20.0 - 10.0
        };
        let (rows, width) = (7usize, 10usize);
        let mut xs: Vec<f32> = (0..rows * width).map(|_| next()).collect();
        xs[3] = f32::INFINITY;
        xs[4] = -0.0;
        let gs: Vec<f32> = (0..rows * width).map(|_| next()).collect();
        let ps: Vec<f32> = (0..rows).map(|_| next() / 10.0).collect();
        for kind in ActivationKind::ALL {
            let o = ActivationOptions { limit: 3.0, ..ActivationOptions::new(kind) };
            let inter = inter_of(kind, width).unwrap();
            let x = TensorRef::of("x", vec![rows, width], &xs).unwrap();
            let g = TensorRef::of("grad", vec![rows, inter], &gs[..rows * inter]).unwrap();
            let p = TensorRef::of("probs", vec![rows], &ps).unwrap();
            let (xd, gd, pd) =
                (DeviceTensor::upload(dev, &x).unwrap(), DeviceTensor::upload(dev, &g).unwrap(), DeviceTensor::upload(dev, &p).unwrap());
            let want = moe_core::activations::activation(&x, Some(&p), &o).unwrap();
            let got = activation_device(dev, &xd, Some(&pd), &o).unwrap().download(dev, "out").unwrap();
            assert_eq!(bits(&got), bits(&want), "{}", kind.name());
            let want = moe_core::activations::activation_backward(&g, &x, Some(&p), &o).unwrap();
            let (gi, gp) = activation_backward_device(dev, &gd, &xd, Some(&pd), &o).unwrap();
            assert_eq!(bits(&gi.download(dev, "gi").unwrap()), bits(&want.grad_input), "{}", kind.name());
            assert_eq!(bits(&gp.unwrap().download(dev, "gp").unwrap()), bits(&want.grad_probs.unwrap()), "{}", kind.name());
        }
        let logits: Vec<f32> = (0..rows * 4).map(|_| next()).collect();
        let counts = [3i32, 0, 5, 6];
        let mask = [1u8, 0, 1, 1, 0, 1, 1];
        let l = TensorRef::of("logits", vec![rows, 4], &logits).unwrap();
        let c = TensorRef::of("tokensPerExpert", vec![4], &counts).unwrap();
        let m = TensorRef::new("tokenMask", DType::Bool, vec![rows], &mask).unwrap();
        let (ld, cd, md) =
            (DeviceTensor::upload(dev, &l).unwrap(), DeviceTensor::upload(dev, &c).unwrap(), DeviceTensor::upload(dev, &m).unwrap());
        let o = SwitchLossOptions { topk: 2, coeff: 0.01, num_tokens: None };
        let want = moe_core::aux_loss::switch_load_balancing_loss_from_logits(&l, &c, Some(&m), o).unwrap();
        let (loss, grad) = switch_load_balancing_loss_from_logits_device(dev, &ld, &cd, Some(&md), o).unwrap();
        assert_eq!((loss.to_bits(), grad.download(dev, "g").unwrap()), (want.loss.to_bits(), want.grad));
        let want = moe_core::aux_loss::switch_load_balancing_loss(&l, &c, Some(&m), o).unwrap();
        let (loss, grad) = switch_load_balancing_loss_device(dev, &ld, &cd, Some(&md), o).unwrap();
        assert_eq!((loss.to_bits(), grad.download(dev, "g").unwrap()), (want.loss.to_bits(), want.grad));
        let want = moe_core::aux_loss::z_loss(&l, None, 0.5).unwrap();
        let (loss, grad) = z_loss_device(dev, &ld, None, 0.5).unwrap();
        assert_eq!((loss.to_bits(), grad.download(dev, "g").unwrap()), (want.loss.to_bits(), want.grad));
    }
}
