//! Training on the GPU: the AdamW step (kernels/train.cu) over a layer's parameters, with global
//! gradient-norm clipping and non-finite steps skipped, queued with no host wait.
//!
//! The arithmetic is `ts/optim.ts`'s (the reference the cpu and wasm backends run), so weights
//! agree bit for bit across backends: the gradient norm is a sum of exact f64 squares in a fixed
//! order (chunks of [`SQ_CHUNK`], each a 256-thread tree; the chunks' sums a 1024-thread tree),
//! the step's scalars are computed once in f64 on the device from the state (step count, the
//! betas' powers), and each element's update is f32 arithmetic without contraction.
//!
//! The state lives on the device ([`optimizer_state`]): a step that finds a non-finite gradient
//! norm leaves every weight and moment as it was, counts itself as skipped and does not advance
//! the step count; the host learns of it only when it reads the state.

use moe_core::tensor::DType;

use crate::blas::{gemm, Operand, Output, Problem};
use crate::device::{Arg, Device};
use crate::error::{Error, Result};
use crate::switch::Switch;
use crate::tensor::DeviceTensor;

/// Elements a chunk of the gradient norm's first level (SQ_CHUNK in kernels/train.cu).
pub const SQ_CHUNK: usize = 65536;
const SQ_THREADS: u32 = 256;
const FIN_THREADS: u32 = 1024;
/// Bytes of the state: 8 f64 words, then 16 f32 words.
const STATE_BYTES: usize = 8 * 8 + 16 * 4;

/// AdamW's hyper-parameters for one step (`lr` may change from step to step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWOptions {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Clip the gradients to this global norm (None: no clipping).
    pub max_grad_norm: Option<f64>,
}

/// What the host reads of the state (a read waits for the queued steps).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StateView {
    /// Steps applied.
    pub step: f64,
    pub beta1_pow: f64,
    pub beta2_pow: f64,
    /// Steps skipped for a non-finite gradient norm.
    pub skipped: f64,
    /// The last step's gradient norm (before clipping).
    pub grad_norm: f64,
    /// Whether the last step was applied.
    pub applied: bool,
}

/// The optimizer's scalar state on the device: a float32 tensor of [`STATE_WORDS`] words (its
/// bytes: 8 f64 words, then 16 f32 words; kernels/train.cu), so that it moves and is freed as any
/// device tensor.
pub const STATE_WORDS: usize = STATE_BYTES / 4;

fn state_tensor(dev: &Device, head: [f64; 8]) -> Result<DeviceTensor> {
    let mut words = [0u8; STATE_BYTES];
    words[..64].copy_from_slice(bytemuck::cast_slice(&head));
    Ok(DeviceTensor::from_buffer(DType::F32, vec![STATE_WORDS], dev.upload("the optimizer state", &words)?))
}

/// A fresh state: step 0, the betas' powers 1.
pub fn optimizer_state(dev: &Device) -> Result<DeviceTensor> {
    state_tensor(dev, [0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
}

/// A state restored from what [`read_state`] gave (a checkpoint).
pub fn restore_state(dev: &Device, v: &StateView) -> Result<DeviceTensor> {
    state_tensor(dev, [v.step, v.beta1_pow, v.beta2_pow, v.skipped, v.grad_norm, v.applied as u8 as f64, 0.0, 0.0])
}

fn check_state(state: &DeviceTensor) -> Result<()> {
    if state.dtype != DType::F32 || state.shape != [STATE_WORDS] {
        return Err(moe_core::Error::type_error(
            "state",
            format!("an optimizer state (float32 [{STATE_WORDS}])"),
            format!("{} {:?}", state.dtype.name(), state.shape),
        )
        .into());
    }
    Ok(())
}

/// Waits for the queued steps and reads the state.
pub fn read_state(dev: &Device, state: &DeviceTensor) -> Result<StateView> {
    check_state(state)?;
    let w: [f64; 6] = dev.read_head("the optimizer state", &state.buf, 0)?;
    Ok(StateView { step: w[0], beta1_pow: w[1], beta2_pow: w[2], skipped: w[3], grad_norm: w[4], applied: w[5] != 0.0 })
}

/// One parameter of a step: its float32 master weight and moments (updated in place), its
/// gradient (float32, bfloat16 or float16), and optionally the 16-bit copy the layer computes
/// with (rewritten from the new master weight).
pub struct AdamWParam<'a> {
    pub name: &'a str,
    pub master: &'a DeviceTensor,
    pub exp_avg: &'a DeviceTensor,
    pub exp_avg_sq: &'a DeviceTensor,
    pub grad: &'a DeviceTensor,
    pub low: Option<&'a DeviceTensor>,
    /// Whether weight decay applies to it.
    pub decay: bool,
}

fn kernel_dtype(d: DType) -> Option<&'static str> {
    match d {
        DType::F32 => Some("F32"),
        DType::BF16 => Some("BF16"),
        DType::F16 => Some("F16"),
        _ => None,
    }
}

fn check_param(p: &AdamWParam) -> Result<()> {
    let same = |t: &DeviceTensor, what: &str, want: Option<DType>| -> Result<()> {
        if t.shape != p.master.shape {
            return Err(moe_core::Error::range(
                format!("{}.{what}", p.name),
                format!("expected the master weight's shape {:?}, got {:?}", p.master.shape, t.shape),
            )
            .into());
        }
        match want {
            Some(d) if t.dtype != d => {
                Err(moe_core::Error::type_error(format!("{}.{what}.dtype", p.name), d.name(), t.dtype.name()).into())
            }
            None if kernel_dtype(t.dtype).is_none() => {
                Err(moe_core::Error::type_error(format!("{}.{what}.dtype", p.name), "float32, bfloat16 or float16", t.dtype.name()).into())
            }
            _ => Ok(()),
        }
    };
    if p.master.dtype != DType::F32 {
        return Err(moe_core::Error::type_error(format!("{}.master.dtype", p.name), "float32", p.master.dtype.name()).into());
    }
    same(p.exp_avg, "expAvg", Some(DType::F32))?;
    same(p.exp_avg_sq, "expAvgSq", Some(DType::F32))?;
    same(p.grad, "grad", None)?;
    if let Some(l) = p.low {
        same(l, "low", None)?;
    }
    Ok(())
}

/// Queues one AdamW step over `params`: the gradient norm (every gradient), the step's scalars,
/// then each parameter's update. Nothing waits for the GPU.
pub fn adamw_step(dev: &Device, params: &[AdamWParam], state: &DeviceTensor, o: &AdamWOptions) -> Result<()> {
    adamw_norm(dev, params, state, o)?;
    adamw_updates(dev, params, state)
}

fn check_step(params: &[AdamWParam], state: &DeviceTensor) -> Result<()> {
    check_state(state)?;
    params.iter().try_for_each(check_param)
}

/// [`adamw_step`]'s first part: the gradient norm of every gradient and the step's scalars in
/// `state` (reads each gradient once).
pub fn adamw_norm(dev: &Device, params: &[AdamWParam], state: &DeviceTensor, o: &AdamWOptions) -> Result<()> {
    check_step(params, state)?;
    let chunks: Vec<usize> = params.iter().map(|p| p.grad.numel().div_ceil(SQ_CHUNK)).collect();
    let total: usize = chunks.iter().sum();
    let partials = dev.alloc("the gradient norm's partial sums", 8 * total.max(1))?;
    let s = dev.stream();
    let mut offset = 0usize;
    for (p, &c) in params.iter().zip(&chunks) {
        if c > 0 {
            let g = kernel_dtype(p.grad.dtype).expect("checked");
            let ptr = p.grad.buf.ptr(s);
            dev.launch(
                &format!("sum_squares_{g}"),
                (c as u32, 1),
                SQ_THREADS,
                // eight elements a load where the gradient is 16-byte aligned
                &[
                    Arg::U64(ptr),
                    Arg::I64(p.grad.numel() as i64),
                    Arg::U64(partials.ptr(s) + 8 * offset as u64),
                    Arg::I32((ptr % 16 == 0) as i32),
                ],
            )?;
        }
        offset += c;
    }
    if total == 0 {
        dev.memset_zero("the gradient norm's partial sums", &partials, 8)?;
    }
    dev.launch(
        "adamw_finish",
        (1, 1),
        FIN_THREADS,
        &[
            Arg::U64(partials.ptr(s)),
            Arg::I64(total as i64),
            Arg::U64(state.buf.ptr(s)),
            Arg::F64(o.lr),
            Arg::F64(o.beta1),
            Arg::F64(o.beta2),
            Arg::F64(o.eps),
            Arg::F64(o.weight_decay),
            Arg::F64(o.max_grad_norm.unwrap_or(-1.0)),
        ],
    )?;
    Ok(())
}

/// [`adamw_step`]'s second part: each parameter's update by the scalars [`adamw_norm`] left in `state`.
pub fn adamw_updates(dev: &Device, params: &[AdamWParam], state: &DeviceTensor) -> Result<()> {
    check_step(params, state)?;
    let s = dev.stream();
    for p in params {
        let n = p.master.numel();
        if n == 0 {
            continue;
        }
        let g = kernel_dtype(p.grad.dtype).expect("checked");
        let l = p.low.map_or("F32", |l| kernel_dtype(l.dtype).expect("checked"));
        let ptrs =
            [p.master.buf.ptr(s), p.exp_avg.buf.ptr(s), p.exp_avg_sq.buf.ptr(s), p.grad.buf.ptr(s), p.low.map_or(0, |l| l.buf.ptr(s))];
        // four elements a thread where every pointer allows the vector loads (16 bytes for float32, 8 for 16-bit)
        let vec4 = n % 4 == 0
            && ptrs
                .iter()
                .zip([4, 4, 4, p.grad.dtype.size(), p.low.map_or(4, |l| l.dtype.size())])
                .all(|(&q, size)| q % (4 * size as u64) == 0);
        let blocks = grid(dev, if vec4 { n / 4 } else { n });
        dev.launch(
            &format!("adamw_update_{g}_{l}"),
            (blocks, 1),
            256,
            &[
                Arg::U64(ptrs[0]),
                Arg::U64(ptrs[1]),
                Arg::U64(ptrs[2]),
                Arg::U64(ptrs[3]),
                Arg::U64(ptrs[4]),
                Arg::I64(n as i64),
                Arg::U64(state.buf.ptr(s)),
                Arg::I32(p.decay as i32),
                Arg::I32(vec4 as i32),
            ],
        )?;
    }
    Ok(())
}

/// A new float32 tensor of zeros shaped as `like` (the moments' start).
pub fn zeros_f32(dev: &Device, what: &str, shape: Vec<usize>) -> Result<DeviceTensor> {
    let t = DeviceTensor::alloc(dev, what, DType::F32, shape)?;
    dev.memset_zero(what, &t.buf, t.bytes())?;
    Ok(t)
}

/// `src` converted to `dtype` in a new tensor: exact when widening to float32, rounded once
/// (nearest, ties to even) when narrowing from float32; a copy when the dtypes are equal.
pub fn cast(dev: &Device, src: &DeviceTensor, dtype: DType) -> Result<DeviceTensor> {
    let out = DeviceTensor::alloc(dev, "a converted copy", dtype, src.shape.clone())?;
    let n = src.numel();
    if n == 0 {
        return Ok(out);
    }
    let name = match (src.dtype, dtype) {
        (a, b) if a == b => {
            dev.copy(&out.buf, &src.buf, src.bytes())?;
            return Ok(out);
        }
        (DType::BF16, DType::F32) => "widen_BF16",
        (DType::F16, DType::F32) => "widen_F16",
        (DType::F32, DType::BF16) => "narrow_BF16",
        (DType::F32, DType::F16) => "narrow_F16",
        (a, b) => {
            return Err(Error::Core(moe_core::Error::type_error(
                "tensor.dtype",
                format!("a dtype that converts to {} (float32 <-> bfloat16 / float16)", b.name()),
                a.name(),
            )))
        }
    };
    let s = dev.stream();
    dev.launch(name, (grid(dev, n), 1), 256, &[Arg::U64(src.buf.ptr(s)), Arg::U64(out.buf.ptr(s)), Arg::I64(n as i64)])?;
    Ok(out)
}

/// Blocks of 256 threads for an element-wise kernel over `n` items (grid-stride beyond).
fn grid(dev: &Device, n: usize) -> u32 {
    n.div_ceil(256).clamp(1, 16 * dev.sm_count()) as u32
}

/// `out [T, k] = dense[t, indices[t, j]]` (0 for -1): the gradient of route's weights from the
/// dense `[T, E]` gradient of its probs (permute's backward), by route's own indices.
pub fn gather_picks(dev: &Device, dense: &DeviceTensor, indices: &DeviceTensor) -> Result<DeviceTensor> {
    let ok = dense.dtype == DType::F32
        && indices.dtype == DType::I32
        && dense.shape.len() == 2
        && indices.shape.len() == 2
        && dense.shape[0] == indices.shape[0]
        && i32::try_from(dense.shape[1]).is_ok();
    if !ok {
        return Err(Error::Cuda(format!(
            "gather_picks: dense {:?} {:?} and indices {:?} {:?} do not fit (a bug in moe-dispatch)",
            dense.dtype, dense.shape, indices.dtype, indices.shape
        )));
    }
    let (t, k) = (indices.shape[0], indices.shape[1]);
    let out = DeviceTensor::alloc(dev, "gradWeights", DType::F32, vec![t, k])?;
    if t * k == 0 {
        return Ok(out);
    }
    let s = dev.stream();
    dev.launch(
        "gather_picks",
        ((t * k).div_ceil(256) as u32, 1),
        256,
        &[
            Arg::U64(dense.buf.ptr(s)),
            Arg::U64(indices.buf.ptr(s)),
            Arg::I64(t as i64),
            Arg::I32(dense.shape[1] as i32),
            Arg::I32(k as i32),
            Arg::U64(out.buf.ptr(s)),
        ],
    )?;
    Ok(out)
}

/// The kernel name tag of a float dtype, or an error naming `what` (for the layer's element steps).
fn float_tag(t: &DeviceTensor, what: &str) -> Result<&'static str> {
    kernel_dtype(t.dtype)
        .ok_or_else(|| Error::Core(moe_core::Error::type_error(format!("{what}.dtype"), "float32, bfloat16 or float16", t.dtype.name())))
}

fn dtype_tag(d: DType, what: &str) -> Result<&'static str> {
    kernel_dtype(d).ok_or_else(|| Error::Core(moe_core::Error::type_error(what.to_string(), "float32, bfloat16 or float16", d.name())))
}

fn same_shape(a: &DeviceTensor, b: &DeviceTensor, what: &str) -> Result<()> {
    if a.shape != b.shape {
        return Err(Error::Core(moe_core::Error::range(format!("{what}.shape"), format!("expected {:?}, got {:?}", a.shape, b.shape))));
    }
    Ok(())
}

/// The router's logits from the float32 GEMM result `raw [N, E]`: `f32(raw + bias[j])` (bias of
/// any float dtype, optional), rounded to `round_to` and widened back (a 16-bit router), as
/// MoELayer's `#logits` does on the host.
pub fn logits_epilogue(dev: &Device, raw: &DeviceTensor, bias: Option<&DeviceTensor>, round_to: DType) -> Result<DeviceTensor> {
    if raw.dtype != DType::F32 || raw.shape.len() != 2 {
        return Err(Error::Core(moe_core::Error::type_error(
            "raw",
            "a float32 [N, E] tensor",
            format!("{} {:?}", raw.dtype.name(), raw.shape),
        )));
    }
    let (rows, cols) = (raw.shape[0], raw.shape[1]);
    if let Some(b) = bias {
        if b.shape != [cols] {
            return Err(Error::Core(moe_core::Error::range("bias.shape", format!("expected [{cols}], got {:?}", b.shape))));
        }
    }
    let b = bias.map_or(Ok("F32"), |b| float_tag(b, "bias"))?;
    let r = dtype_tag(round_to, "roundTo")?;
    let out = DeviceTensor::alloc(dev, "logits", DType::F32, raw.shape.clone())?;
    let n = rows * cols;
    if n > 0 {
        let s = dev.stream();
        dev.launch(
            &format!("logits_epilogue_{b}_{r}"),
            (grid(dev, n), 1),
            256,
            &[
                Arg::U64(raw.buf.ptr(s)),
                Arg::U64(bias.map_or(0, |b| b.buf.ptr(s))),
                Arg::I64(rows as i64),
                Arg::I32(cols as i32),
                Arg::U64(out.buf.ptr(s)),
            ],
        )?;
    }
    Ok(out)
}

/// `out = dtype(f32((f64(a) + f64(b)) + f64(c)))` element by element (`c` optional), the sums
/// MoELayer forms on the host: the routed output and the shared expert's (a, b of the layer's
/// dtype, no c); the input gradient (a of the dtype, b and c float32); the logits' gradient
/// (all float32).
pub fn add3(dev: &Device, a: &DeviceTensor, b: &DeviceTensor, c: Option<&DeviceTensor>, dtype: DType) -> Result<DeviceTensor> {
    same_shape(a, b, "b")?;
    if let Some(c) = c {
        same_shape(a, c, "c")?;
    }
    let (ta, tb, to) = (float_tag(a, "a")?, float_tag(b, "b")?, dtype_tag(dtype, "dtype")?);
    // without c, the kernel of c's type as b's (c is not read)
    let tc = c.map_or(Ok(tb), |c| float_tag(c, "c"))?;
    let name = format!("add3_{ta}_{tb}_{tc}_{to}");
    let out = DeviceTensor::alloc(dev, "a sum", dtype, a.shape.clone())?;
    let n = a.numel();
    if n > 0 {
        let s = dev.stream();
        dev.launch(
            &name,
            (grid(dev, n), 1),
            256,
            &[
                Arg::U64(a.buf.ptr(s)),
                Arg::U64(b.buf.ptr(s)),
                Arg::U64(c.map_or(0, |c| c.buf.ptr(s))),
                Arg::U64(out.buf.ptr(s)),
                Arg::I64(n as i64),
            ],
        )?;
    }
    Ok(out)
}

/// Column sums of a float32 `[N, E]` tensor, each in float64 over the rows in order, rounded
/// to `dtype` (a router bias's gradient).
pub fn column_sums(dev: &Device, g: &DeviceTensor, dtype: DType) -> Result<DeviceTensor> {
    if g.dtype != DType::F32 || g.shape.len() != 2 {
        return Err(Error::Core(moe_core::Error::type_error("g", "a float32 [N, E] tensor", format!("{} {:?}", g.dtype.name(), g.shape))));
    }
    let (rows, cols) = (g.shape[0], g.shape[1]);
    let out = DeviceTensor::alloc(dev, "column sums", dtype, vec![cols])?;
    let o = dtype_tag(dtype, "dtype")?;
    if cols > 0 {
        let s = dev.stream();
        dev.launch(
            &format!("column_sums_{o}"),
            (cols.div_ceil(64) as u32, 1),
            64,
            &[Arg::U64(g.buf.ptr(s)), Arg::I64(rows as i64), Arg::I32(cols as i32), Arg::U64(out.buf.ptr(s))],
        )?;
    }
    Ok(out)
}

/// The mean squared error of `y` against `target` (same dtype and shape, any float dtype): the
/// loss (read back: one f64, a synchronisation) and its gradient `dtype(f32(2 (y - t) / n))`;
/// the loss's sum in [`adamw_step`]'s fixed order (ts/train.ts's `mseLoss` on the host: the same bits).
pub fn mse_loss(dev: &Device, y: &DeviceTensor, target: &DeviceTensor) -> Result<(f64, DeviceTensor)> {
    same_shape(y, target, "target")?;
    let t = float_tag(y, "y")?;
    if target.dtype != y.dtype {
        return Err(Error::Core(moe_core::Error::type_error("target.dtype", y.dtype.name(), target.dtype.name())));
    }
    let n = y.numel();
    let grad = DeviceTensor::alloc(dev, "the loss's gradient", y.dtype, y.shape.clone())?;
    let chunks = n.div_ceil(SQ_CHUNK);
    let partials = dev.alloc("the loss's partial sums", 8 * chunks.max(1))?;
    let out = dev.alloc("the loss", 8)?;
    let s = dev.stream();
    if chunks > 0 {
        dev.launch(
            &format!("mse_{t}"),
            (chunks as u32, 1),
            SQ_THREADS,
            &[
                Arg::U64(y.buf.ptr(s)),
                Arg::U64(target.buf.ptr(s)),
                Arg::I64(n as i64),
                Arg::U64(grad.buf.ptr(s)),
                Arg::U64(partials.ptr(s)),
            ],
        )?;
    }
    dev.launch(
        "mse_finish",
        (1, 1),
        FIN_THREADS,
        &[Arg::U64(partials.ptr(s)), Arg::I64(chunks as i64), Arg::I64(n as i64), Arg::U64(out.ptr(s))],
    )?;
    let [loss]: [f64; 1] = dev.read_head("the loss", &out, 0)?;
    Ok((loss, grad))
}

/// `a @ b` (16-bit or float32 operands of one dtype, optionally transposed) with a float32
/// result: one cuBLAS GEMM accumulating in float32 (tensor cores for 16-bit operands) and no
/// rounding of the output to the operands' dtype; the router's logits of a 16-bit layer without
/// widening its input first. Shapes and dtypes: the core's matmul checks (its errors), and one dtype.
pub fn matmul_f32_out(dev: &Device, a: &DeviceTensor, b: &DeviceTensor, trans_a: bool, trans_b: bool) -> Result<DeviceTensor> {
    let sizes = moe_core::experts::check_matmul(a.meta("a"), b.meta("b"), trans_a, trans_b)?;
    if b.dtype != a.dtype {
        return Err(Error::Core(moe_core::Error::type_error("b.dtype", format!("{} (a's dtype)", a.dtype.name()), b.dtype.name())));
    }
    crate::experts::gemm_to_new(dev, a, b, (trans_a, trans_b), sizes, DType::F32)
}

/// Whether [`matmul_mixed`] splits its float32 operand (on by default; `MOE_DISPATCH_MATMUL_MIXED=off`
/// or [`set_matmul_mixed`]`(Some(false))`: the bfloat16 operand widened and one float32 GEMM, for
/// comparisons).
static MATMUL_MIXED: Switch = Switch::new("MOE_DISPATCH_MATMUL_MIXED");

/// Overrides whether [`matmul_mixed`] splits its float32 operand (`None`: the default, on).
pub fn set_matmul_mixed(mode: Option<bool>) {
    MATMUL_MIXED.set(mode);
}

/// `a @ b` where one operand is float32 and the other bfloat16 (each optionally transposed), with
/// a float32 result: the float32 operand as three bfloat16 parts whose sum is it exactly
/// (kernels/train.cu `split3_bf16`), so one tensor-core GEMM of bfloat16 operands forms the widened
/// float32 GEMM's products exactly (a part times a bfloat16 fits a float32) and sums them in
/// float32, where the widened GEMM runs on the CUDA cores (the router's backward: its weight's
/// gradient `x^T g` and the input's part `g W^T`, g float32).
///
/// The parts go where they cost least: along K (a GEMM of depth 3K, the bfloat16 operand repeated
/// three times: `repeat3_u16`) where the bfloat16 operand is no bigger than the result, else
/// along the float32 operand's other dimension (a result three times as big, its parts then
/// added, `(p0 + p1) + p2`: `sum3_f32`). Shapes: the core's matmul checks; dtypes: one float32
/// and one bfloat16 operand.
pub fn matmul_mixed(dev: &Device, a: &DeviceTensor, b: &DeviceTensor, trans_a: bool, trans_b: bool) -> Result<DeviceTensor> {
    matmul_mixed_plus(dev, a, b, trans_a, trans_b, None)
}

/// [`matmul_mixed`] with `addend` (`[m, n]`, float32, bfloat16 or float16) added:
/// `addend.dtype(f32(addend + a @ b))`, [`add3`]`(addend, a @ b)`'s bits for the product's float32
/// result (the layer's input gradient: the experts' part plus the router's). Where the product is
/// one GEMM (the parts along K), cuBLASLt's epilogue adds the addend and rounds once (no float32
/// result written and read back: [`crate::blaslt::Lt::matmul_plus`]); elsewhere, or without
/// cuBLASLt, the float32 result and `add3`. The GEMM is not the float32-result GEMM's kernel, so
/// its sums may differ from [`matmul_mixed`]'s in the last bits, as any two GEMMs' (run to run, the
/// same bits).
pub fn matmul_mixed_plus(
    dev: &Device,
    a: &DeviceTensor,
    b: &DeviceTensor,
    trans_a: bool,
    trans_b: bool,
    addend: Option<&DeviceTensor>,
) -> Result<DeviceTensor> {
    let (m, k, n) = moe_core::experts::check_matmul(a.meta("a"), b.meta("b"), trans_a, trans_b)?;
    if let Some(c) = addend {
        float_tag(c, "addend")?;
        if c.shape != [m, n] {
            return Err(Error::Core(moe_core::Error::range(
                "addend.shape",
                format!("expected [{m}, {n}] (the product's), got {:?}", c.shape),
            )));
        }
    }
    // the float32 product, then the addend added by add3 (where the GEMM does not add it)
    let plus = |product: DeviceTensor| match addend {
        Some(c) => add3(dev, c, &product, None, c.dtype),
        None => Ok(product),
    };
    let f_is_a = match (a.dtype, b.dtype) {
        (DType::F32, DType::BF16) => true,
        (DType::BF16, DType::F32) => false,
        (DType::F32, other) | (DType::BF16, other) => {
            let want = if a.dtype == DType::F32 { "bfloat16" } else { "float32" };
            return Err(Error::Core(moe_core::Error::type_error(
                "b.dtype",
                format!("{want} (one float32 and one bfloat16 operand)"),
                other.name(),
            )));
        }
        (other, _) => {
            return Err(Error::Core(moe_core::Error::type_error("a.dtype", "float32 or bfloat16 (one of each)", other.name())));
        }
    };
    let (f, other, f_trans, other_trans) = if f_is_a { (a, b, trans_a, trans_b) } else { (b, a, trans_b, trans_a) };
    if m == 0 || n == 0 {
        return plus(DeviceTensor::alloc(dev, "output", DType::F32, vec![m, n])?);
    }
    if k == 0 {
        return plus(zeros_f32(dev, "output", vec![m, n])?);
    }
    if !MATMUL_MIXED.on() {
        // the widened GEMM (CUDA cores), for comparisons
        let wide = cast(dev, other, DType::F32)?;
        let (wa, wb) = if f_is_a { (a, &wide) } else { (&wide, b) };
        return plus(crate::experts::gemm_to_new(dev, wa, wb, (trans_a, trans_b), (m, k, n), DType::F32)?);
    }
    let split_k = other.numel() <= m * n;
    // Where part j of an operand stored [rows, cols] goes: `stack_rows` puts the parts one
    // matrix after another ([3 rows, cols]), else side by side in each row ([rows, 3 cols]);
    // either way the split dimension's index i becomes j * len + i.
    let layout = |t: &DeviceTensor, stack_rows: bool| {
        let (rows, cols) = (t.shape[0], t.shape[1]);
        if stack_rows {
            (rows, cols, cols, rows * cols)
        } else {
            (rows, cols, 3 * cols, cols)
        }
    };
    // An operand's storage rows are its logical first dimension unless transposed: A [m, k], B [k, n].
    let k_is_rows = |is_a: bool, trans: bool| if is_a { trans } else { !trans };
    let s = dev.stream();
    let launch3 = |name: &str, src: u64, (rows, cols, rs, js): (usize, usize, usize, usize), dst: u64| {
        let count = rows * cols;
        dev.launch(
            name,
            (grid(dev, count), 1),
            256,
            &[Arg::U64(src), Arg::I64(rows as i64), Arg::I64(cols as i64), Arg::I64(rs as i64), Arg::I64(js as i64), Arg::U64(dst)],
        )
    };
    let f_k_rows = k_is_rows(f_is_a, f_trans);
    // split along K, or along f's other dimension (M of A, N of B)
    let f_layout = layout(f, if split_k { f_k_rows } else { !f_k_rows });
    let parts = dev.alloc("the float32 operand's bfloat16 parts", 3 * f.numel() * 2)?;
    launch3("split3_bf16", f.buf.ptr(s), f_layout, parts.ptr(s))?;
    let f_op = Operand { ptr: parts.ptr(s), dtype: DType::BF16, trans: f_trans };
    if split_k {
        let copies = dev.alloc("the bfloat16 operand, three times", 3 * other.numel() * 2)?;
        launch3("repeat3_u16", other.buf.ptr(s), layout(other, k_is_rows(!f_is_a, other_trans)), copies.ptr(s))?;
        let o_op = Operand { ptr: copies.ptr(s), dtype: DType::BF16, trans: other_trans };
        let (a_op, b_op) = if f_is_a { (f_op, o_op) } else { (o_op, f_op) };
        // (cuBLASLt opened only where a product has an addend; where it cannot be, add3 below)
        if let Some((c, lt)) = addend.and_then(|c| dev.lt().ok().map(|lt| (c, lt))) {
            let out = DeviceTensor::alloc(dev, "output", c.dtype, vec![m, n])?;
            let q = Problem { m, n, k: 3 * k, a: a_op.ptr, b: b_op.ptr, c: out.buf.ptr(s) };
            let added = dev.span(
                || format!("cublasLt: gemm [{m}, {}] x [{}, {n}] + addend", 3 * k, 3 * k),
                || lt.matmul_plus(dev, &q, c.buf.ptr(s), (DType::BF16, a_op.trans), (DType::BF16, b_op.trans), c.dtype),
            )?;
            if added {
                return Ok(out);
            }
        }
        let out = DeviceTensor::alloc(dev, "output", DType::F32, vec![m, n])?;
        gemm(dev, m, n, 3 * k, a_op, b_op, Output { ptr: out.buf.ptr(s), dtype: DType::F32 }, 0.0)?;
        return plus(out);
    }
    let out = DeviceTensor::alloc(dev, "output", DType::F32, vec![m, n])?;
    // the result's three parts: [3m, n] (A's parts are its rows j * m + i), [m, 3n] (B's)
    let (pm, pn, sum_layout) = if f_is_a { (3 * m, n, (m, n, n, m * n)) } else { (m, 3 * n, (m, n, 3 * n, n)) };
    let partial = dev.alloc("the parts' products", pm * pn * 4)?;
    let o_op = Operand { ptr: other.buf.ptr(s), dtype: DType::BF16, trans: other_trans };
    let (a_op, b_op) = if f_is_a { (f_op, o_op) } else { (o_op, f_op) };
    gemm(dev, pm, pn, k, a_op, b_op, Output { ptr: partial.ptr(s), dtype: DType::F32 }, 0.0)?;
    launch3("sum3_f32", partial.ptr(s), sum_layout, out.buf.ptr(s))?;
    plus(out)
}

fn rows_dim(t: &DeviceTensor, what: &str) -> Result<(usize, usize)> {
    if t.shape.len() != 2 || i32::try_from(t.shape[1]).is_err() {
        return Err(Error::Core(moe_core::Error::range(format!("{what}.shape"), format!("expected [rows, dim], got {:?}", t.shape))));
    }
    Ok((t.shape[0], t.shape[1]))
}

/// The shared expert's sigmoid gate, forward (kernels/train.cu `shared_gate_fwd`): from the gate
/// GEMM's float32 result `raw [N, 1]` and the shared MLP's output `out [N, dim]`, the gate logits
/// rounded to out's dtype `[N]` (float32, for the backward) and `contribution [N, dim]`.
pub fn shared_gate_forward(dev: &Device, raw: &DeviceTensor, out: &DeviceTensor) -> Result<(DeviceTensor, DeviceTensor)> {
    let (rows, dim) = rows_dim(out, "out")?;
    let t = float_tag(out, "out")?;
    if raw.dtype != DType::F32 || raw.numel() != rows {
        return Err(Error::Core(moe_core::Error::range(
            "raw",
            format!("expected float32 [{rows}, 1], got {} {:?}", raw.dtype.name(), raw.shape),
        )));
    }
    let gl = DeviceTensor::alloc(dev, "the gate logits", DType::F32, vec![rows])?;
    let contribution = DeviceTensor::alloc(dev, "the shared expert's contribution", out.dtype, out.shape.clone())?;
    if rows > 0 {
        let s = dev.stream();
        dev.launch(
            &format!("shared_gate_fwd_{t}"),
            (rows as u32, 1),
            256,
            &[
                Arg::U64(raw.buf.ptr(s)),
                Arg::U64(out.buf.ptr(s)),
                Arg::I64(rows as i64),
                Arg::I32(dim as i32),
                Arg::U64(gl.buf.ptr(s)),
                Arg::U64(contribution.buf.ptr(s)),
            ],
        )?;
    }
    Ok((gl, contribution))
}

/// The gate's backward (kernels/train.cu `shared_gate_bwd`): from `g [N, dim]` (d loss / d
/// output), the shared MLP's output and the gate logits, `gradOut [N, dim]` (to the MLP) and
/// `dgl [N, 1]` float32 (to the gate's GEMM).
pub fn shared_gate_backward(dev: &Device, g: &DeviceTensor, out: &DeviceTensor, gl: &DeviceTensor) -> Result<(DeviceTensor, DeviceTensor)> {
    let (rows, dim) = rows_dim(out, "out")?;
    same_shape(out, g, "g")?;
    let t = float_tag(out, "out")?;
    if g.dtype != out.dtype || gl.dtype != DType::F32 || gl.numel() != rows {
        return Err(Error::Core(moe_core::Error::type_error(
            "g",
            format!("{} [{rows}, {dim}] and float32 gate logits [{rows}]", out.dtype.name()),
            format!("{} and {} {:?}", g.dtype.name(), gl.dtype.name(), gl.shape),
        )));
    }
    let grad_out = DeviceTensor::alloc(dev, "the shared expert's output gradient", out.dtype, out.shape.clone())?;
    let dgl = DeviceTensor::alloc(dev, "the gate logits' gradient", DType::F32, vec![rows, 1])?;
    if rows > 0 {
        let s = dev.stream();
        dev.launch(
            &format!("shared_gate_bwd_{t}"),
            (rows as u32, 1),
            256,
            &[
                Arg::U64(g.buf.ptr(s)),
                Arg::U64(out.buf.ptr(s)),
                Arg::U64(gl.buf.ptr(s)),
                Arg::I64(rows as i64),
                Arg::I32(dim as i32),
                Arg::U64(grad_out.buf.ptr(s)),
                Arg::U64(dgl.buf.ptr(s)),
            ],
        )?;
    }
    Ok((grad_out, dgl))
}
