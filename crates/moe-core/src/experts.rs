//! Grouped experts, forward and backward (NeMo Automodel's `GroupedExperts` /
//! `GroupedExpertsDeepEP` on permuted tokens), and the plain `matmul` the router needs.
//!
//! The permuted tokens `x [N, dim]` hold each local expert's tokens as one contiguous block
//! (`tokensPerExpert [E]` rows each, in expert order, as `permute` leaves them). Expert `e`
//! computes, on its block `x_e`:
//!
//! ```text
//! h   = x_e @ W1[e] + b1[e]            W1: gateAndUpProjs [E, dim, 2*inter] (upProjs [E, dim, inter] for relu2)
//! a   = activation(h) * p              the activations module, weighted by the slot's prob p
//! y_e = a @ W2[e] + b2[e] * p          W2: downProjs [E, inter, dim]
//! ```
//!
//! which is the reference's DeepEP path (weighted activation, down bias scaled by the prob);
//! it equals `p * expert(x)` of the all-gather path. Without probs, `p = 1`.
//!
//! Arithmetic: every input (f32, bf16 or f16) is widened to f32, the GEMMs run in f32
//! (matrixmultiply's sgemm, accumulating in f32), and each output is rounded once to its
//! dtype. The GEMM kernels multiply and add separately on every target (no FMA: see
//! `.cargo/config.toml`), and a result element's sum runs over `k` in the same blocked order
//! whatever the thread count, so the native and WebAssembly backends return the same bits.
//! Experts run in parallel on the native backend (each expert's outputs belong to one thread).

use std::borrow::Cow;
use std::mem::MaybeUninit;

use half::{bf16, f16};

use crate::activations::{activation, activation_backward, ActivationOptions};
use crate::alloc::{try_filled_vec, try_vec, write_slice};
use crate::error::{Error, Result};
use crate::par::run_tasks;
use crate::permute::check_out_disjoint;
use crate::tensor::{DType, Data, Float, Meta, Tensor, TensorMut, TensorRef};

// ---------------------------------------------------------------------------------------
// GEMM.

/// A read-only f32 matrix view with strides (a transpose is a view with swapped strides).
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: isize,
    cs: isize,
}

impl<'a> Mat<'a> {
    /// A row-major `[rows, cols]` matrix.
    fn new(data: &'a [f32], rows: usize, cols: usize) -> Mat<'a> {
        Mat { data, rows, cols, rs: cols as isize, cs: 1 }
    }

    fn t(self) -> Mat<'a> {
        Mat { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }

    /// Whether every element the strides reach lies inside `data`.
    fn fits(&self) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        let last = (self.rows - 1) as isize * self.rs + (self.cols - 1) as isize * self.cs;
        last >= 0 && (last as usize) < self.data.len()
    }
}

/// `c [a.rows, b.cols] (row-major) = a @ b + beta * c`, through matrixmultiply's sgemm.
fn gemm(a: Mat, b: Mat, beta: f32, c: &mut [f32]) -> Result<()> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k || c.len() != m * n || !a.fits() || !b.fits() {
        return Err(Error::Internal(format!("gemm: [{m}, {k}] @ [{}, {n}] into {} elements", b.rows, c.len())));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        // The empty sum; matrixmultiply would do the same, but say it here.
        c.iter_mut().for_each(|v| *v *= beta);
        if beta == 0.0 {
            c.fill(0.0);
        }
        return Ok(());
    }
    // SAFETY: the views were checked to stay inside their slices (`fits`), `c` holds exactly
    // m * n row-major elements, and `c` cannot alias `a` or `b` (it is borrowed mutably).
    unsafe {
        matrixmultiply::sgemm(m, k, n, 1.0, a.data.as_ptr(), a.rs, a.cs, b.data.as_ptr(), b.rs, b.cs, beta, c.as_mut_ptr(), n as isize, 1);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Conversions.

/// The elements of a float tensor as f32: borrowed for float32, widened (exactly) otherwise.
fn widen<'a>(t: &TensorRef<'a>) -> Result<Cow<'a, [f32]>> {
    Ok(match t.expect_dtype(DType::TOKENS)? {
        DType::F32 => t.typed::<f32>()?,
        DType::BF16 => Cow::Owned(collect_f32(&t.typed::<bf16>()?, t.name)?),
        DType::F16 => Cow::Owned(collect_f32(&t.typed::<f16>()?, t.name)?),
        _ => return Err(Error::Internal("widen: dtype checked above".into())),
    })
}

fn collect_f32<T: Float>(src: &[T], arg: &str) -> Result<Vec<f32>> {
    let mut v = crate::alloc::try_with_capacity(src.len(), arg)?;
    v.extend(src.iter().map(|x| x.to_f32()));
    Ok(v)
}

/// An f32 result rounded once to `dtype` (moved, not copied, for float32).
fn narrow(dtype: DType, shape: Vec<usize>, v: Vec<f32>, arg: &str) -> Result<Tensor> {
    fn bits<T: Float>(v: &[f32], arg: &str) -> Result<Vec<T>> {
        try_filled_vec(v.len(), arg, |dst| round_into(dst, v))
    }
    Ok(match dtype {
        DType::F32 => Tensor::f32(shape, v),
        DType::BF16 => Tensor::from_elements(shape, bits::<bf16>(&v, arg)?),
        DType::F16 => Tensor::from_elements(shape, bits::<f16>(&v, arg)?),
        _ => return Err(Error::Internal(format!("narrow: {} is not a float dtype", dtype.name()))),
    })
}

/// [`narrow`] into a caller-owned output of `v`'s length (the dtype checked by the caller).
fn narrow_into(v: &[f32], out: &mut TensorMut) -> Result<()> {
    match out.dtype {
        DType::F32 => out.fill::<f32>(|dst| write_slice(dst, v)),
        DType::BF16 => out.fill::<bf16>(|dst| round_into(dst, v)),
        DType::F16 => out.fill::<f16>(|dst| round_into(dst, v)),
        other => return Err(Error::Internal(format!("narrow_into: {} is not a float dtype", other.name()))),
    }
    Ok(())
}

/// Each f32 rounded once to `T`.
fn round_into<T: Float>(dst: &mut [MaybeUninit<T>], v: &[f32]) {
    for (o, &x) in dst.iter_mut().zip(v) {
        o.write(T::from_f32(x));
    }
}

fn f32_data(t: Tensor) -> Result<Vec<f32>> {
    match t.data {
        Data::F32(v) => Ok(v),
        _ => Err(Error::Internal("expected an f32 intermediate".into())),
    }
}

// ---------------------------------------------------------------------------------------
// matmul.

/// `a @ b` with optional transposes: `a` is `[M, K]` (`[K, M]` with `transA`), `b` is
/// `[K, N]` (`[N, K]` with `transB`); the result is `[M, N]` in the dtype of `a`. Inputs
/// may be float32, bfloat16 or float16 (widened exactly); the sum runs in float32 and is
/// rounded once. Rows are split over threads on the native backend, which does not change a
/// single bit (each output row's sums are the same wherever they run).
pub fn matmul(a: &TensorRef, b: &TensorRef, trans_a: bool, trans_b: bool) -> Result<Tensor> {
    let (m, k, n) = check_matmul(a.meta(), b.meta(), trans_a, trans_b)?;
    let (da, db) = (&a.shape, &b.shape);
    let av = widen(a)?;
    let bv = widen(b)?;
    let am = Mat::new(&av, da[0], da[1]);
    let am = if trans_a { am.t() } else { am };
    let bm = Mat::new(&bv, db[0], db[1]);
    let bm = if trans_b { bm.t() } else { bm };
    let mut out = try_vec(0f32, m * n, "output")?;
    // One row block per thread (each packs all of b once), at least 64 rows (the GEMM's own
    // row block) and only when the product is large enough for threads to pay.
    let threads = if m * n * k >= 1 << 22 { crate::num_threads() } else { 1 };
    let rows_per_task = m.div_ceil(threads).max(64);
    let tasks: Vec<(usize, &mut [f32])> = out.chunks_mut(rows_per_task * n.max(1)).enumerate().collect();
    let work = m * n * k;
    run_tasks(tasks, work, |(i, c)| {
        let r0 = i * rows_per_task;
        let rows = c.len() / n.max(1);
        let sub = Mat { data: &am.data[offset(am, r0)..], rows, cols: k, rs: am.rs, cs: am.cs };
        gemm(sub, bm, 0.0, c)
    })?;
    narrow(a.dtype, vec![m, n], out, "output")
}

/// Every check of [`matmul`]: `(M, K, N)`.
pub fn check_matmul(a: Meta, b: Meta, trans_a: bool, trans_b: bool) -> Result<(usize, usize, usize)> {
    let da = a.expect_rank(2, if trans_a { "[K, M] (transA)" } else { "[M, K]" })?;
    let db = b.expect_rank(2, if trans_b { "[N, K] (transB)" } else { "[K, N]" })?;
    a.expect_dtype(DType::TOKENS)?;
    b.expect_dtype(DType::TOKENS)?;
    let (m, k) = if trans_a { (da[1], da[0]) } else { (da[0], da[1]) };
    let (kb, n) = if trans_b { (db[1], db[0]) } else { (db[0], db[1]) };
    if kb != k {
        return Err(Error::range(
            format!("{}.shape", b.name),
            format!("the inner dimensions differ: {} has K = {k}, {} has {kb} (shapes [{}, {}] and [{}, {}], transA {trans_a}, transB {trans_b})", a.name, b.name, da[0], da[1], db[0], db[1]),
        ));
    }
    Ok((m, k, n))
}

/// The index of row `r`'s first element in a view.
fn offset(m: Mat, r: usize) -> usize {
    if m.rows == 0 || m.cols == 0 {
        0
    } else {
        (r as isize * m.rs) as usize
    }
}

// ---------------------------------------------------------------------------------------
// Grouped experts.

/// The tensors of a grouped-experts call: `T` is how a tensor is held (the CPU ops take
/// [`TensorRef`]s, their checks [`Meta`]s, a device backend its own tensors). Names in errors
/// are the names the bindings give: `permutedTokens`, `tokensPerExpert`, `gateAndUpProjs` (or
/// `upProjs`), `downProjs`, `permutedProbs`, `gateUpProjBias`, `downProjBias`.
#[derive(Debug, Clone, Copy)]
pub struct ExpertsInputs<T> {
    /// `[N, dim]`, expert-major.
    pub tokens: T,
    /// `[E]` int32 or int64, summing to `N`.
    pub tokens_per_expert: T,
    /// `[N]` or `[N, 1]` float32: each slot's routing prob.
    pub probs: Option<T>,
    /// `[E, dim, 2 * inter]` (gate | up halves, interleaved pairs for quick_geglu), or
    /// `[E, dim, inter]` for relu2.
    pub gate_and_up: T,
    /// `[E, inter, dim]`.
    pub down: T,
    /// `[E, 2 * inter]` (`[E, inter]` for relu2).
    pub gate_up_bias: Option<T>,
    /// `[E, dim]`.
    pub down_bias: Option<T>,
}

impl<T> ExpertsInputs<T> {
    /// The same tensors seen through `f` (e.g. [`TensorRef::meta`], for the checks).
    pub fn map<'s, U>(&'s self, f: impl Fn(&'s T) -> U) -> ExpertsInputs<U> {
        self.try_map(|t| Ok::<U, std::convert::Infallible>(f(t))).unwrap_or_else(|e| match e {})
    }

    /// [`map`](Self::map) with a conversion that may fail (the first error is returned).
    pub fn try_map<'s, U, E>(&'s self, f: impl Fn(&'s T) -> std::result::Result<U, E>) -> std::result::Result<ExpertsInputs<U>, E> {
        Ok(ExpertsInputs {
            tokens: f(&self.tokens)?,
            tokens_per_expert: f(&self.tokens_per_expert)?,
            probs: self.probs.as_ref().map(&f).transpose()?,
            gate_and_up: f(&self.gate_and_up)?,
            down: f(&self.down)?,
            gate_up_bias: self.gate_up_bias.as_ref().map(&f).transpose()?,
            down_bias: self.down_bias.as_ref().map(&f).transpose()?,
        })
    }
}

/// A grouped-experts call's arguments once checked: the sizes of the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertsCheck {
    pub n: usize,
    pub dim: usize,
    pub experts: usize,
    /// Width of the up-projection output: `2 * inter` (gated) or `inter`.
    pub width: usize,
    pub inter: usize,
    /// Row offset of each expert's block, `experts + 1` entries, when the counts are on the host
    /// (else see [`expert_offsets`]).
    pub offsets: Option<Vec<usize>>,
}

/// The row offsets (`counts.len() + 1` entries) of experts with these token counts, which must
/// not be negative and must add up to `n`, the rows of the tokens (the counts' and the tokens'
/// names say which arguments are wrong).
pub fn expert_offsets(counts: &[i64], n: usize, counts_name: &str, tokens_name: &str) -> Result<Vec<usize>> {
    let mut offsets = Vec::with_capacity(counts.len() + 1);
    offsets.push(0usize);
    for (e, &c) in counts.iter().enumerate() {
        if c < 0 {
            return Err(Error::range(counts_name, format!("{counts_name}[{e}] = {c} is negative")));
        }
        let next = offsets[e].checked_add(c as usize).filter(|&s| s <= n);
        match next {
            Some(s) => offsets.push(s),
            None => {
                return Err(Error::range(
                    counts_name,
                    format!("the counts add up to more than {n}, the rows of {tokens_name} (through expert {e})"),
                ))
            }
        }
    }
    let total = offsets[counts.len()];
    if total != n {
        return Err(Error::range(counts_name, format!("the counts add up to {total}, but {tokens_name} has {n} rows")));
    }
    Ok(offsets)
}

/// Every check of [`experts_forward`], in its order (the counts' values on the host).
pub fn check_experts(inp: &ExpertsInputs<Meta>, act: &ActivationOptions) -> Result<ExpertsCheck> {
    let t = inp.tokens.expect_rank(2, "[numSlots, dim]")?;
    inp.tokens.expect_dtype(DType::TOKENS)?;
    let (n, dim) = (t[0], t[1]);
    let gated = act.kind.is_gated();
    let w1 = inp.gate_and_up.expect_rank(3, if gated { "[numLocalExperts, dim, 2 * inter]" } else { "[numLocalExperts, dim, inter]" })?;
    inp.gate_and_up.expect_dtype(DType::TOKENS)?;
    let (experts, width) = (w1[0], w1[2]);
    if w1[1] != dim {
        return Err(Error::range(
            format!("{}.shape[1]", inp.gate_and_up.name),
            format!("expected {dim} (dim, the width of {}), got {}", inp.tokens.name, w1[1]),
        ));
    }
    if gated && width % 2 != 0 {
        return Err(Error::range(
            format!("{}.shape[2]", inp.gate_and_up.name),
            format!("{} needs an even width (2 * inter: gate and up), got {width}", act.kind.name()),
        ));
    }
    let inter = if gated { width / 2 } else { width };
    inp.down.expect_rank(3, "[numLocalExperts, inter, dim]")?;
    inp.down.expect_dtype(DType::TOKENS)?;
    inp.down.expect_shape(&[experts, inter, dim], "([numLocalExperts, inter, dim])")?;
    let counts = &inp.tokens_per_expert;
    counts.expect_dtype(DType::INDICES)?;
    counts.expect_shape(&[experts], "([numLocalExperts]: one count per expert of the weights)")?;
    let offsets = counts.index_values()?.map(|c| expert_offsets(&c, n, counts.name, inp.tokens.name)).transpose()?;
    if let Some(p) = &inp.probs {
        p.expect_dtype(&[DType::F32])?;
        if p.shape.len() == 1 {
            p.expect_shape(&[n], "([numSlots]: one prob per row of the tokens)")?;
        } else {
            p.expect_rank(2, "[numSlots] or [numSlots, 1]")?;
            p.expect_shape(&[n, 1], "([numSlots, 1]: one prob per row of the tokens)")?;
        }
    }
    if let Some(b) = &inp.gate_up_bias {
        b.expect_dtype(DType::TOKENS)?;
        b.expect_rank(2, "[numLocalExperts, width of the up-projection]")?;
        b.expect_shape(&[experts, width], "([numLocalExperts, width of gateAndUpProjs])")?;
    }
    if let Some(b) = &inp.down_bias {
        b.expect_dtype(DType::TOKENS)?;
        b.expect_rank(2, "[numLocalExperts, dim]")?;
        b.expect_shape(&[experts, dim], "([numLocalExperts, dim])")?;
    }
    Ok(ExpertsCheck { n, dim, experts, width, inter, offsets })
}

/// Every check of [`experts_backward`], in its order.
pub fn check_experts_backward(grad_output: Meta, inp: &ExpertsInputs<Meta>, act: &ActivationOptions) -> Result<ExpertsCheck> {
    let d = check_experts(inp, act)?;
    grad_output.expect_rank(2, "[numSlots, dim]")?;
    grad_output.expect_shape(&[d.n, d.dim], "([numSlots, dim]: the shape of the forward output)")?;
    if grad_output.dtype != inp.tokens.dtype {
        return Err(Error::type_error(
            format!("{}.dtype", grad_output.name),
            format!("{} (the dtype of {})", inp.tokens.dtype.name(), inp.tokens.name),
            grad_output.dtype.name(),
        ));
    }
    Ok(d)
}

/// Checked sizes of a grouped-experts problem on the host (the offsets known).
struct Dims {
    n: usize,
    dim: usize,
    experts: usize,
    width: usize,
    inter: usize,
    offsets: Vec<usize>,
}

impl Dims {
    fn of(c: ExpertsCheck) -> Result<Dims> {
        let offsets = c.offsets.ok_or_else(|| Error::Internal("experts: the counts were checked on the host".into()))?;
        Ok(Dims { n: c.n, dim: c.dim, experts: c.experts, width: c.width, inter: c.inter, offsets })
    }
}

/// The inputs widened to f32 once.
struct Wide<'a> {
    x: Cow<'a, [f32]>,
    w1: Cow<'a, [f32]>,
    w2: Cow<'a, [f32]>,
    p: Option<Cow<'a, [f32]>>,
    b1: Option<Cow<'a, [f32]>>,
    b2: Option<Cow<'a, [f32]>>,
}

fn wide<'a>(inp: &ExpertsInputs<TensorRef<'a>>) -> Result<Wide<'a>> {
    Ok(Wide {
        x: widen(&inp.tokens)?,
        w1: widen(&inp.gate_and_up)?,
        w2: widen(&inp.down)?,
        p: inp.probs.as_ref().map(|p| p.typed::<f32>()).transpose()?,
        b1: inp.gate_up_bias.as_ref().map(widen).transpose()?,
        b2: inp.down_bias.as_ref().map(widen).transpose()?,
    })
}

/// `h = x_e @ W1[e] + b1[e]` for the rows of one expert (f32, `[rows, width]`).
fn up_projection(w: &Wide, d: &Dims, e: usize, rows: std::ops::Range<usize>) -> Result<Vec<f32>> {
    let count = rows.len();
    let x = Mat::new(&w.x[rows.start * d.dim..rows.end * d.dim], count, d.dim);
    let w1 = Mat::new(&w.w1[e * d.dim * d.width..(e + 1) * d.dim * d.width], d.dim, d.width);
    let mut h = try_vec(0f32, count * d.width, "intermediate")?;
    gemm(x, w1, 0.0, &mut h)?;
    if let Some(b1) = &w.b1 {
        let b = &b1[e * d.width..(e + 1) * d.width];
        for row in h.chunks_mut(d.width.max(1)) {
            row.iter_mut().zip(b).for_each(|(v, &bv)| *v += bv);
        }
    }
    Ok(h)
}

/// The weighted activation of `h` (through the activations module).
fn activate(h: &[f32], probs: Option<&[f32]>, d: &Dims, count: usize, act: &ActivationOptions) -> Result<Vec<f32>> {
    let hr = TensorRef::of("x", vec![count, d.width], h)?;
    let pr = probs.map(|p| TensorRef::of("probs", vec![count], p)).transpose()?;
    f32_data(activation(&hr, pr.as_ref(), act)?)
}

/// Splits `buf` into consecutive pieces of the given lengths.
fn split_mut<T>(mut buf: &mut [T], lens: impl Iterator<Item = usize>) -> Vec<&mut [T]> {
    let mut out = Vec::new();
    for len in lens {
        let (head, tail) = std::mem::take(&mut buf).split_at_mut(len);
        out.push(head);
        buf = tail;
    }
    out
}

/// Grouped experts forward: `[N, dim]` in the dtype of the tokens.
pub fn experts_forward(inp: &ExpertsInputs<TensorRef>, act: &ActivationOptions) -> Result<Tensor> {
    let d = Dims::of(check_experts(&inp.map(TensorRef::meta), act)?)?;
    let w = wide(inp)?;
    let mut y = try_vec(0f32, d.n * d.dim, "output")?;
    forward_rows(&w, &d, act, &mut y)?;
    narrow(inp.tokens.dtype, vec![d.n, d.dim], y, "output")
}

/// [`experts_forward`] writing into a caller-owned `out` (`[numSlots, dim]` of the dtype of
/// permutedTokens, sharing no memory with an input), checked with every other argument before a
/// byte is written; the same bits as the allocating call. A float32 `out` receives the GEMMs'
/// results directly; a 16-bit one the rounded f32 rows. On an error after the checks (the
/// intermediates cannot be allocated) `out` may be partly written.
pub fn experts_forward_into(inp: &ExpertsInputs<TensorRef>, act: &ActivationOptions, out: &mut TensorMut) -> Result<()> {
    let d = Dims::of(check_experts(&inp.map(TensorRef::meta), act)?)?;
    out.expect(inp.tokens.dtype, &[d.n, d.dim], "([numSlots, dim] of the dtype of permutedTokens)")?;
    let inputs = [
        Some(&inp.tokens),
        Some(&inp.tokens_per_expert),
        Some(&inp.gate_and_up),
        Some(&inp.down),
        inp.probs.as_ref(),
        inp.gate_up_bias.as_ref(),
        inp.down_bias.as_ref(),
    ];
    check_out_disjoint(out, &inputs)?;
    let w = wide(inp)?;
    if out.dtype == DType::F32 {
        return out.modify::<f32, _>(|y| forward_rows(&w, &d, act, y));
    }
    let mut y = try_vec(0f32, d.n * d.dim, "output")?;
    forward_rows(&w, &d, act, &mut y)?;
    narrow_into(&y, out)
}

/// The forward's f32 rows `y [N, dim]`, each expert's block on its own task; every row is
/// written (the GEMM overwrites its output), so `y` may hold anything before.
fn forward_rows(w: &Wide, d: &Dims, act: &ActivationOptions, y: &mut [f32]) -> Result<()> {
    let blocks = split_mut(y, d.offsets.windows(2).map(|o| (o[1] - o[0]) * d.dim));
    let work = d.n * d.dim * d.width * 2;
    run_tasks(blocks.into_iter().enumerate().collect(), work, |(e, out)| {
        let rows = d.offsets[e]..d.offsets[e + 1];
        let count = rows.len();
        if count == 0 {
            return Ok(());
        }
        let p = w.p.as_ref().map(|p| &p[rows.clone()]);
        let h = up_projection(w, d, e, rows)?;
        let a = activate(&h, p, d, count, act)?;
        let w2 = Mat::new(&w.w2[e * d.inter * d.dim..(e + 1) * d.inter * d.dim], d.inter, d.dim);
        gemm(Mat::new(&a, count, d.inter), w2, 0.0, out)?;
        if let Some(b2) = &w.b2 {
            let b = &b2[e * d.dim..(e + 1) * d.dim];
            for (r, row) in out.chunks_mut(d.dim.max(1)).enumerate() {
                match p {
                    Some(p) => row.iter_mut().zip(b).for_each(|(v, &bv)| *v += bv * p[r]),
                    None => row.iter_mut().zip(b).for_each(|(v, &bv)| *v += bv),
                }
            }
        }
        Ok(())
    })
}

/// Output of [`experts_backward`] (`T`: how a tensor is held; a device backend's are its own;
/// `G`: how the tokens' gradient is, where a backend can write it somewhere else).
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertsGrads<T = Tensor, G = T> {
    /// `[N, dim]`, the dtype of the tokens.
    pub grad_tokens: G,
    /// Shaped and typed like `gateAndUpProjs` (or `upProjs`).
    pub grad_gate_and_up: T,
    /// Shaped and typed like `downProjs`.
    pub grad_down: T,
    /// Like `gateUpProjBias`, when given.
    pub grad_gate_up_bias: Option<T>,
    /// Like `downProjBias`, when given.
    pub grad_down_bias: Option<T>,
    /// Like `permutedProbs` (float32), when given.
    pub grad_probs: Option<T>,
}

impl<T, G> ExpertsGrads<T, G> {
    /// The same gradients with the tokens' turned into another form by `f` (or `f`'s error).
    pub fn try_map_tokens<H, E>(self, f: impl FnOnce(G) -> std::result::Result<H, E>) -> std::result::Result<ExpertsGrads<T, H>, E> {
        let ExpertsGrads { grad_tokens, grad_gate_and_up, grad_down, grad_gate_up_bias, grad_down_bias, grad_probs } = self;
        Ok(ExpertsGrads { grad_tokens: f(grad_tokens)?, grad_gate_and_up, grad_down, grad_gate_up_bias, grad_down_bias, grad_probs })
    }

    /// [`ExpertsGrads::try_map_tokens`] with a conversion that cannot fail.
    pub fn map_tokens<H>(self, f: impl FnOnce(G) -> H) -> ExpertsGrads<T, H> {
        match self.try_map_tokens(|g| Ok::<H, std::convert::Infallible>(f(g))) {
            Ok(g) => g,
            Err(never) => match never {},
        }
    }
}

/// Backward of [`experts_forward`]: `gradOutput [N, dim]` (the dtype of the tokens) to the
/// gradients of every input. The up-projection and activation are recomputed per expert
/// (nothing is kept from the forward), in exactly the forward's arithmetic.
pub fn experts_backward(grad_output: &TensorRef, inp: &ExpertsInputs<TensorRef>, act: &ActivationOptions) -> Result<ExpertsGrads> {
    let d = Dims::of(check_experts_backward(grad_output.meta(), &inp.map(TensorRef::meta), act)?)?;
    let w = wide(inp)?;
    let g = widen(grad_output)?;
    let (e_count, dim, width, inter) = (d.experts, d.dim, d.width, d.inter);
    let mut dx = try_vec(0f32, d.n * dim, "gradTokens")?;
    let mut dw1 = try_vec(0f32, e_count * dim * width, "gradGateAndUpProjs")?;
    let mut dw2 = try_vec(0f32, e_count * inter * dim, "gradDownProjs")?;
    let mut db1 = try_vec(0f32, if w.b1.is_some() { e_count * width } else { 0 }, "gradGateUpProjBias")?;
    let mut db2 = try_vec(0f32, if w.b2.is_some() { e_count * dim } else { 0 }, "gradDownProjBias")?;
    let mut dp = try_vec(0f32, if w.p.is_some() { d.n } else { 0 }, "gradProbs")?;
    let counts: Vec<usize> = d.offsets.windows(2).map(|o| o[1] - o[0]).collect();
    let tasks: Vec<_> = split_mut(&mut dx, counts.iter().map(|c| c * dim))
        .into_iter()
        .zip(split_mut(&mut dw1, (0..e_count).map(|_| dim * width)))
        .zip(split_mut(&mut dw2, (0..e_count).map(|_| inter * dim)))
        .zip(split_mut(&mut db1, (0..e_count).map(|_| if w.b1.is_some() { width } else { 0 })))
        .zip(split_mut(&mut db2, (0..e_count).map(|_| if w.b2.is_some() { dim } else { 0 })))
        .zip(split_mut(&mut dp, counts.iter().map(|&c| if w.p.is_some() { c } else { 0 })))
        .enumerate()
        .collect();
    let work = d.n * dim * width * 6;
    run_tasks(tasks, work, |(e, (((((dx_e, dw1_e), dw2_e), db1_e), db2_e), dp_e))| {
        let rows = d.offsets[e]..d.offsets[e + 1];
        let count = rows.len();
        if count == 0 {
            return Ok(()); // every gradient of an expert without tokens is 0
        }
        let p = w.p.as_ref().map(|p| &p[rows.clone()]);
        let g_e = &g[rows.start * dim..rows.end * dim];
        let h = up_projection(&w, &d, e, rows.clone())?;
        let a = activate(&h, p, &d, count, act)?;
        // Down-projection: dW2 = a^T g, da = g W2^T.
        gemm(Mat::new(&a, count, inter).t(), Mat::new(g_e, count, dim), 0.0, dw2_e)?;
        let w2 = Mat::new(&w.w2[e * inter * dim..(e + 1) * inter * dim], inter, dim);
        let mut da = try_vec(0f32, count * inter, "intermediate")?;
        gemm(Mat::new(g_e, count, dim), w2.t(), 0.0, &mut da)?;
        // Down bias: db2 = sum_rows g * p; its share of d p is g . b2.
        if let Some(b2) = &w.b2 {
            let b = &b2[e * dim..(e + 1) * dim];
            for (r, gr) in g_e.chunks(dim.max(1)).enumerate() {
                let pr = p.map_or(1.0, |p| p[r]);
                db2_e.iter_mut().zip(gr).for_each(|(acc, &gv)| *acc += gv * pr);
                if p.is_some() {
                    dp_e[r] = gr.iter().zip(b).map(|(&gv, &bv)| (gv * bv) as f64).sum::<f64>() as f32;
                }
            }
        }
        // Through the (weighted) activation.
        let dar = TensorRef::of("grad", vec![count, inter], &da)?;
        let hr = TensorRef::of("x", vec![count, width], &h)?;
        let pr = p.map(|p| TensorRef::of("probs", vec![count], p)).transpose()?;
        let ag = activation_backward(&dar, &hr, pr.as_ref(), act)?;
        let dh = f32_data(ag.grad_input)?;
        if let Some(gp) = ag.grad_probs {
            for (acc, v) in dp_e.iter_mut().zip(f32_data(gp)?) {
                *acc = (*acc as f64 + v as f64) as f32;
            }
        }
        // Up-projection: dW1 = x^T dh, db1 = colsum dh, dx = dh W1^T.
        let x = Mat::new(&w.x[rows.start * dim..rows.end * dim], count, dim);
        gemm(x.t(), Mat::new(&dh, count, width), 0.0, dw1_e)?;
        if w.b1.is_some() {
            for row in dh.chunks(width.max(1)) {
                db1_e.iter_mut().zip(row).for_each(|(acc, &v)| *acc += v);
            }
        }
        let w1 = Mat::new(&w.w1[e * dim * width..(e + 1) * dim * width], dim, width);
        gemm(Mat::new(&dh, count, width), w1.t(), 0.0, dx_e)
    })?;
    Ok(ExpertsGrads {
        grad_tokens: narrow(inp.tokens.dtype, vec![d.n, dim], dx, "gradTokens")?,
        grad_gate_and_up: narrow(inp.gate_and_up.dtype, inp.gate_and_up.shape.clone(), dw1, "gradGateAndUpProjs")?,
        grad_down: narrow(inp.down.dtype, inp.down.shape.clone(), dw2, "gradDownProjs")?,
        grad_gate_up_bias: inp.gate_up_bias.as_ref().map(|b| narrow(b.dtype, b.shape.clone(), db1, "gradGateUpProjBias")).transpose()?,
        grad_down_bias: inp.down_bias.as_ref().map(|b| narrow(b.dtype, b.shape.clone(), db2, "gradDownProjBias")).transpose()?,
        grad_probs: inp.probs.as_ref().map(|p| Tensor::f32(p.shape.clone(), dp)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::activations::ActivationKind;
    use crate::error::ErrorKind;

    #[test]
    fn map_tokens_converts_the_tokens_gradient_alone() {
        let g: ExpertsGrads<u8, u32> = ExpertsGrads {
            grad_tokens: 7,
            grad_gate_and_up: 1,
            grad_down: 2,
            grad_gate_up_bias: Some(3),
            grad_down_bias: None,
            grad_probs: Some(5),
        };
        let m = g.clone().map_tokens(|t| format!("t{t}"));
        assert_eq!(m.grad_tokens, "t7");
        assert_eq!((m.grad_gate_and_up, m.grad_down, m.grad_gate_up_bias, m.grad_down_bias, m.grad_probs), (1, 2, Some(3), None, Some(5)));
        assert_eq!(g.clone().try_map_tokens(|t| if t == 7 { Err("no") } else { Ok(t) }).err(), Some("no"));
        assert_eq!(g.try_map_tokens(|t| Ok::<u32, ()>(t + 1)).map(|m| m.grad_tokens), Ok(8));
    }

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn rand(n: usize, seed: &mut u64, scale: f32) -> Vec<f32> {
        (0..n).map(|_| lcg(seed) * scale).collect()
    }

    fn f32s(t: &Tensor) -> &[f32] {
        match &t.data {
            Data::F32(v) => v,
            other => panic!("expected f32, got {other:?}"),
        }
    }

    /// Plain float64 reference of one expert row.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        x: &[f32],
        counts: &[i32],
        w1: &[f32],
        w2: &[f32],
        p: &[f32],
        b1: &[f32],
        b2: &[f32],
        dim: usize,
        inter: usize,
    ) -> Vec<f64> {
        let width = 2 * inter;
        let mut out = vec![0f64; x.len()];
        let mut row = 0;
        for (e, &c) in counts.iter().enumerate() {
            for _ in 0..c {
                let xr = &x[row * dim..(row + 1) * dim];
                let h: Vec<f64> = (0..width)
                    .map(|j| {
                        (0..dim).map(|k| xr[k] as f64 * w1[e * dim * width + k * width + j] as f64).sum::<f64>() + b1[e * width + j] as f64
                    })
                    .collect();
                let a: Vec<f64> = (0..inter).map(|j| h[j] / (1.0 + (-h[j]).exp()) * h[inter + j] * p[row] as f64).collect();
                for k in 0..dim {
                    out[row * dim + k] = (0..inter).map(|j| a[j] * w2[e * inter * dim + j * dim + k] as f64).sum::<f64>()
                        + b2[e * dim + k] as f64 * p[row] as f64;
                }
                row += 1;
            }
        }
        out
    }

    #[test]
    fn matmul_matches_a_plain_product_with_transposes() {
        let mut s = 7;
        let (m, k, n) = (37, 300, 19); // k beyond one 256 block, ragged tiles
        let a = rand(m * k, &mut s, 1.0);
        let b = rand(k * n, &mut s, 1.0);
        let want: Vec<f64> = (0..m * n).map(|i| (0..k).map(|j| a[i / n * k + j] as f64 * b[j * n + i % n] as f64).sum()).collect();
        let out = matmul(&TensorRef::of("a", vec![m, k], &a).unwrap(), &TensorRef::of("b", vec![k, n], &b).unwrap(), false, false).unwrap();
        assert_eq!(out.shape, vec![m, n]);
        for (g, w) in f32s(&out).iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-4 * (1.0 + w.abs()), "{g} vs {w}");
        }
        // a^T stored as [k, m], b^T stored as [n, k].
        let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let out2 =
            matmul(&TensorRef::of("a", vec![k, m], &at).unwrap(), &TensorRef::of("b", vec![n, k], &bt).unwrap(), true, true).unwrap();
        assert_eq!(f32s(&out2), f32s(&out), "transposed views give the same bits");
        let err =
            matmul(&TensorRef::of("a", vec![m, k], &a).unwrap(), &TensorRef::of("b", vec![n, k], &bt).unwrap(), false, false).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::RangeError);
        assert!(err.to_string().starts_with("b.shape: the inner dimensions differ"), "{err}");
    }

    #[test]
    fn forward_matches_the_f64_reference_with_empty_experts() {
        let mut s = 11;
        let (dim, inter) = (12, 5);
        let counts = [3i32, 0, 4, 1];
        let n = 8;
        let e = counts.len();
        let x = rand(n * dim, &mut s, 1.0);
        let w1 = rand(e * dim * 2 * inter, &mut s, 0.5);
        let w2 = rand(e * inter * dim, &mut s, 0.5);
        let p = rand(n, &mut s, 1.0);
        let b1 = rand(e * 2 * inter, &mut s, 0.3);
        let b2 = rand(e * dim, &mut s, 0.3);
        let (xr, cr) =
            (TensorRef::of("permutedTokens", vec![n, dim], &x).unwrap(), TensorRef::of("tokensPerExpert", vec![e], &counts).unwrap());
        let (w1r, w2r) = (
            TensorRef::of("gateAndUpProjs", vec![e, dim, 2 * inter], &w1).unwrap(),
            TensorRef::of("downProjs", vec![e, inter, dim], &w2).unwrap(),
        );
        let pr = TensorRef::of("permutedProbs", vec![n], &p).unwrap();
        let (b1r, b2r) =
            (TensorRef::of("gateUpProjBias", vec![e, 2 * inter], &b1).unwrap(), TensorRef::of("downProjBias", vec![e, dim], &b2).unwrap());
        let inp = ExpertsInputs {
            tokens: xr.clone(),
            tokens_per_expert: cr.clone(),
            gate_and_up: w1r.clone(),
            down: w2r.clone(),
            probs: Some(pr.clone()),
            gate_up_bias: Some(b1r.clone()),
            down_bias: Some(b2r.clone()),
        };
        let act = ActivationOptions::new(ActivationKind::Swiglu);
        let out = experts_forward(&inp, &act).unwrap();
        let want = reference(&x, &counts, &w1, &w2, &p, &b1, &b2, dim, inter);
        for (g, w) in f32s(&out).iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-5 * (1.0 + w.abs()), "{g} vs {w}");
        }
        // Backward runs and the expert without tokens gets zero weight gradients.
        let grads = experts_backward(&xr, &inp, &act).unwrap();
        let dw1 = f32s(&grads.grad_gate_and_up);
        assert!(dw1[dim * 2 * inter..2 * dim * 2 * inter].iter().all(|&v| v == 0.0));
        assert!(dw1[..dim * 2 * inter].iter().any(|&v| v != 0.0));
        assert_eq!(grads.grad_probs.unwrap().shape, vec![n]);
    }

    /// A small swiglu problem with probs and both biases, in `dtype` (widened from f32 values).
    fn problem(dtype: DType) -> (Vec<Vec<u8>>, [usize; 4]) {
        let mut s = 5;
        let (dim, inter, counts) = (9usize, 4usize, [2i32, 0, 3]);
        let (n, e) = (5usize, counts.len());
        let bytes = |v: Vec<f32>| -> Vec<u8> {
            match dtype {
                DType::F32 => bytemuck::cast_slice(&v).to_vec(),
                DType::BF16 => v.iter().flat_map(|&x| bf16::from_f32(x).to_bits().to_le_bytes()).collect(),
                _ => v.iter().flat_map(|&x| f16::from_f32(x).to_bits().to_le_bytes()).collect(),
            }
        };
        let bufs = vec![
            bytes(rand(n * dim, &mut s, 1.0)),
            bytemuck::cast_slice(&counts).to_vec(),
            bytes(rand(e * dim * 2 * inter, &mut s, 0.5)),
            bytes(rand(e * inter * dim, &mut s, 0.5)),
            bytemuck::cast_slice(&rand(n, &mut s, 1.0)).to_vec(),
            bytes(rand(e * 2 * inter, &mut s, 0.3)),
            bytes(rand(e * dim, &mut s, 0.3)),
        ];
        (bufs, [n, dim, inter, e])
    }

    fn inputs(b: &[Vec<u8>], dtype: DType, [n, dim, inter, e]: [usize; 4]) -> ExpertsInputs<TensorRef<'_>> {
        let t = |name, dt, shape, i: usize| TensorRef::new(name, dt, shape, &b[i]).unwrap();
        ExpertsInputs {
            tokens: t("permutedTokens", dtype, vec![n, dim], 0),
            tokens_per_expert: t("tokensPerExpert", DType::I32, vec![e], 1),
            gate_and_up: t("gateAndUpProjs", dtype, vec![e, dim, 2 * inter], 2),
            down: t("downProjs", dtype, vec![e, inter, dim], 3),
            probs: Some(t("permutedProbs", DType::F32, vec![n], 4)),
            gate_up_bias: Some(t("gateUpProjBias", dtype, vec![e, 2 * inter], 5)),
            down_bias: Some(t("downProjBias", dtype, vec![e, dim], 6)),
        }
    }

    #[test]
    fn forward_into_writes_the_allocating_results_bits_and_checks_first() {
        let act = ActivationOptions::new(ActivationKind::Swiglu);
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let (bufs, dims) = problem(dtype);
            let [n, dim, ..] = dims;
            let inp = inputs(&bufs, dtype, dims);
            let want = experts_forward(&inp, &act).unwrap();
            let want: &[u8] = match &want.data {
                Data::F32(v) => bytemuck::cast_slice(v),
                Data::U16(v) => bytemuck::cast_slice(v),
                other => panic!("a float tensor, got {other:?}"),
            };
            // A reused output full of NaNs, aligned and not: every byte is overwritten.
            let size = n * dim * dtype.size();
            for offset in [0, 1] {
                let mut buf = vec![0xffu8; size + offset];
                let mut out = TensorMut::new("out", dtype, vec![n, dim], &mut buf[offset..]).unwrap();
                experts_forward_into(&inp, &act, &mut out).unwrap();
                assert_eq!(out.bytes(), want, "{} offset {offset}", dtype.name());
            }
            // Wrong dtype or shape: errors naming out, nothing written (an out over an input: the facade's tests).
            let other = if dtype == DType::F32 { DType::BF16 } else { DType::F32 };
            let mut buf = vec![7u8; n * dim * other.size()];
            let err = experts_forward_into(&inp, &act, &mut TensorMut::new("out", other, vec![n, dim], &mut buf).unwrap()).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::TypeError);
            assert!(err.to_string().starts_with(&format!("out.dtype: expected {}", dtype.name())), "{err}");
            let mut buf = vec![7u8; size];
            let err = experts_forward_into(&inp, &act, &mut TensorMut::new("out", dtype, vec![dim, n], &mut buf).unwrap()).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::RangeError);
            assert!(err.to_string().starts_with(&format!("out.shape: expected [{n}, {dim}]")), "{err}");
            assert!(buf.iter().all(|&b| b == 7));
        }
    }

    #[test]
    fn errors_name_the_argument() {
        let x = [0f32; 8];
        let w1 = [0f32; 2 * 4 * 6];
        let w2 = [0f32; 2 * 3 * 4];
        let (xr, w1r, w2r) = (
            TensorRef::of("permutedTokens", vec![2, 4], &x).unwrap(),
            TensorRef::of("gateAndUpProjs", vec![2, 4, 6], &w1).unwrap(),
            TensorRef::of("downProjs", vec![2, 3, 4], &w2).unwrap(),
        );
        let act = ActivationOptions::new(ActivationKind::Swiglu);
        let bad = [1i32, 2];
        let cr = TensorRef::of("tokensPerExpert", vec![2], &bad).unwrap();
        let inp = ExpertsInputs {
            tokens: xr.clone(),
            tokens_per_expert: cr.clone(),
            gate_and_up: w1r.clone(),
            down: w2r.clone(),
            probs: None,
            gate_up_bias: None,
            down_bias: None,
        };
        let err = experts_forward(&inp, &act).unwrap_err();
        assert!(err.to_string().starts_with("tokensPerExpert: the counts add up to more than 2"), "{err}");
        let good = [1i32, 1];
        let cr = TensorRef::of("tokensPerExpert", vec![2], &good).unwrap();
        let w2bad = TensorRef::of("downProjs", vec![2, 4, 3], &w2).unwrap();
        let inp = ExpertsInputs {
            tokens: xr.clone(),
            tokens_per_expert: cr.clone(),
            gate_and_up: w1r.clone(),
            down: w2bad.clone(),
            probs: None,
            gate_up_bias: None,
            down_bias: None,
        };
        let err = experts_forward(&inp, &act).unwrap_err();
        assert!(err.to_string().starts_with("downProjs.shape: expected [2, 3, 4]"), "{err}");
        let relu = ActivationOptions::new(ActivationKind::Relu2);
        let inp = ExpertsInputs {
            tokens: xr.clone(),
            tokens_per_expert: cr.clone(),
            gate_and_up: w1r.clone(),
            down: w2r.clone(),
            probs: None,
            gate_up_bias: None,
            down_bias: None,
        };
        let err = experts_forward(&inp, &relu).unwrap_err();
        assert!(err.to_string().starts_with("downProjs.shape: expected [2, 6, 4]"), "{err}");
        // the check on a backend's tensors (no values): the sizes, no offsets; the counts are
        // checked by expert_offsets once read, with the op's words
        let shape_only = inp.map(|t| Meta::shape_only(t.name, t.dtype, &t.shape));
        let c = check_experts(&shape_only, &act).unwrap();
        assert_eq!((c.n, c.dim, c.experts, c.width, c.inter, c.offsets), (2, 4, 2, 6, 3, None));
        assert_eq!(check_experts(&inp.map(TensorRef::meta), &act).unwrap().offsets, Some(vec![0, 1, 2]));
        let err = expert_offsets(&[1, 2], 2, "tokensPerExpert", "permutedTokens").unwrap_err();
        assert!(err.to_string().starts_with("tokensPerExpert: the counts add up to more than 2"), "{err}");
        let err = expert_offsets(&[1, -1], 2, "tokensPerExpert", "permutedTokens").unwrap_err();
        assert_eq!(err.to_string(), "tokensPerExpert: tokensPerExpert[1] = -1 is negative");
        assert_eq!(check_matmul(xr.meta(), w2r.meta(), false, true).unwrap_err().to_string().split(':').next(), Some("downProjs.shape"));
    }
}
