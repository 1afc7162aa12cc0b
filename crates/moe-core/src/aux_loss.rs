//! Auxiliary router losses (Megatron-Core `moe_utils`): the Switch load-balancing loss and the
//! z-loss, each with its gradient. Losses are accumulated in f64 in token order (so every
//! thread count and both backends give the same bits) and returned as f64; gradients are
//! computed in f64 and rounded once to f32.
//!
//! `tokenMask` (true = a real token) follows NeMo Automodel's Gate: masked tokens add nothing
//! to the loss, get a zero gradient, and are not counted in the token count.

use crate::detmath::{exp, ln};
use crate::error::{opt_size_arg, size_arg, Error, Result};
use crate::par::for_each_row;
use crate::tensor::{DType, Meta, Tensor, TensorRef};

/// A scalar loss and its gradient with respect to the op's first input.
#[derive(Debug, Clone, PartialEq)]
pub struct Loss {
    pub loss: f64,
    /// `[T, E]` f32, shaped like the first input.
    pub grad: Tensor,
}

/// Options of the Switch load-balancing loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SwitchLossOptions {
    /// Experts per token (the k of the routing that produced `tokensPerExpert`).
    pub topk: usize,
    /// Loss coefficient (`moe_aux_loss_coeff`); finite, >= 0.
    pub coeff: f64,
    /// The token count of the normalisation (Megatron's `total_num_tokens`); defaults to the
    /// number of unmasked rows (at least 1).
    pub num_tokens: Option<usize>,
}

/// The coefficient when none is given: the losses are then the plain, unscaled ones.
pub const DEFAULT_COEFF: f64 = 1.0;

impl SwitchLossOptions {
    /// Builds the options from what a binding received (JavaScript numbers).
    pub fn from_args(topk: f64, coeff: Option<f64>, num_tokens: Option<f64>) -> Result<SwitchLossOptions> {
        Ok(SwitchLossOptions {
            topk: size_arg("topk", topk)?,
            coeff: coeff.unwrap_or(DEFAULT_COEFF),
            num_tokens: opt_size_arg("numTokens", num_tokens)?,
        })
    }
}

fn check_coeff(coeff: f64) -> Result<f64> {
    if !coeff.is_finite() || coeff < 0.0 {
        return Err(Error::range("coeff", format!("expected a finite number >= 0, got {coeff}")));
    }
    Ok(coeff)
}

/// `[T, E]` f32 input with finite values (on the host); returns (T, E).
fn check_matrix(t: Meta) -> Result<(usize, usize)> {
    let dims = t.expect_rank(2, "[numTokens, numExperts]")?;
    let (rows, cols) = (dims[0], dims[1]);
    t.expect_dtype(&[DType::F32])?;
    if cols == 0 {
        return Err(Error::range(format!("{}.shape[1]", t.name), "expected at least one expert, got 0"));
    }
    if let Some((i, v)) = t.first_non_finite()? {
        return Err(Error::range(t.name, format!("{}[{}][{}] = {} is not finite", t.name, i / cols, i % cols, v)));
    }
    Ok((rows, cols))
}

/// The mask: bool (0/1 on the host), one per row.
fn check_mask(mask: Option<Meta>, rows: usize) -> Result<()> {
    let Some(m) = mask else { return Ok(()) };
    m.check_mask()?;
    m.expect_shape(&[rows], "([numTokens])")
}

/// The mask as one flag per row (all true without a mask) and the number of true rows.
fn row_mask<'a>(mask: Option<&TensorRef<'a>>, rows: usize) -> (Option<&'a [u8]>, usize) {
    match mask {
        Some(m) => (Some(m.bytes()), m.bytes().iter().filter(|&&b| b != 0).count()),
        None => (None, rows),
    }
}

fn valid(mask: Option<&[u8]>, t: usize) -> bool {
    mask.is_none_or(|m| m[t] != 0)
}

/// A `rows x row_len` buffer filled by `row(t, out)` for every unmasked row `t` (masked rows stay
/// default), on the worker threads for large inputs (`cost` bytes of work per element).
fn masked_rows<T: Default + Clone + Send>(
    rows: usize,
    row_len: usize,
    cols: usize,
    cost: usize,
    mask: Option<&[u8]>,
    row: impl Fn(usize, &mut [T]) + Sync + Send,
) -> Vec<T> {
    let mut out = vec![T::default(); rows * row_len];
    for_each_row(
        &mut out,
        row_len,
        rows.saturating_mul(cols).saturating_mul(cost),
        || (),
        |_, t, o| {
            if valid(mask, t) {
                row(t, o);
            }
        },
    );
    out
}

/// Every check of the Switch losses ([`switch_load_balancing_loss`] on probs,
/// [`switch_load_balancing_loss_from_logits`] on logits: `x`), in their order: `x [T, E]`
/// float32 (finite on the host), `tokensPerExpert [E]` (not negative on the host), the mask,
/// then the options. Returns (T, E).
pub fn check_switch_loss(
    x: Meta,
    tokens_per_expert: Meta,
    token_mask: Option<Meta>,
    options: &SwitchLossOptions,
) -> Result<(usize, usize)> {
    let (rows, cols) = check_matrix(x)?;
    tokens_per_expert.expect_dtype(DType::INDICES)?;
    tokens_per_expert.expect_shape(&[cols], "([numExperts], the columns of the scores)")?;
    if let Some((e, c)) = tokens_per_expert.find_index(|v| v < 0)? {
        return Err(Error::range("tokensPerExpert", format!("tokensPerExpert[{e}] = {c} is negative")));
    }
    check_mask(token_mask, rows)?;
    if options.topk == 0 {
        return Err(Error::range("topk", "expected at least 1, got 0"));
    }
    check_coeff(options.coeff)?;
    if options.num_tokens == Some(0) {
        return Err(Error::range("numTokens", "expected at least 1, got 0"));
    }
    Ok((rows, cols))
}

/// Every check of [`z_loss`], in its order: `logits [T, E]` float32 (finite on the host), the
/// mask, the coefficient. Returns (T, E).
pub fn check_z_loss(logits: Meta, token_mask: Option<Meta>, coeff: f64) -> Result<(usize, usize)> {
    let (rows, cols) = check_matrix(logits)?;
    check_mask(token_mask, rows)?;
    check_coeff(coeff)?;
    Ok((rows, cols))
}

/// `tokensPerExpert [E]` as f64 counts (checked by [`check_switch_loss`]).
fn counts(tokens_per_expert: &TensorRef) -> Result<Vec<f64>> {
    Ok(tokens_per_expert.indices()?.iter().map(|&v| v as f64).collect())
}

/// Tokens a block of the losses' totals. A loss's per-row terms are added in token order within
/// blocks of this many consecutive tokens (masked rows left out), and the blocks' sums in block
/// order: every backend gives these bits, and the GPUs add the blocks side by side (one chain
/// of 8192 dependent additions took 0.06 ms of each training step on an H100; 64 chains of 128
/// and one of 128, about 2 us).
pub const TOTAL_BLOCK: usize = 64;

/// A loss's total: `term(t)` for the valid rows, in [`TOTAL_BLOCK`]s as it says, each block's sum
/// and the total starting at `init` (0.0 for the Switch loss on probs, -0.0, Rust's `sum()`, for
/// the others: the same bits as the plain token-order sums had for an empty or all-zero total).
pub fn blocked_total(rows: usize, mask: Option<&[u8]>, init: f64, term: impl Fn(usize) -> f64) -> f64 {
    let mut total = init;
    for b0 in (0..rows).step_by(TOTAL_BLOCK) {
        let mut block = init;
        for t in (b0..(b0 + TOTAL_BLOCK).min(rows)).filter(|&t| valid(mask, t)) {
            block += term(t);
        }
        total += block;
    }
    total
}

/// The factor `E * coeff / (k * N * N)` of the Switch loss (options checked by [`check_switch_loss`]).
fn switch_factor(options: &SwitchLossOptions, num_experts: usize, valid_rows: usize) -> f64 {
    let n = options.num_tokens.unwrap_or(valid_rows.max(1)) as f64;
    num_experts as f64 * options.coeff / (options.topk as f64 * n * n)
}

/// Switch Transformer load-balancing loss on router probabilities `probs [T, E]`:
/// `loss = E * coeff / (k * N^2) * sum_e (sum_t probs[t, e]) * tokensPerExpert[e]`,
/// and `grad[t, e] = E * coeff / (k * N^2) * tokensPerExpert[e]` (0 for masked rows).
pub fn switch_load_balancing_loss(
    probs: &TensorRef,
    tokens_per_expert: &TensorRef,
    token_mask: Option<&TensorRef>,
    options: SwitchLossOptions,
) -> Result<Loss> {
    let (rows, cols) = check_switch_loss(probs.meta(), tokens_per_expert.meta(), token_mask.map(|m| m.meta()), &options)?;
    let p = probs.typed::<f32>()?;
    let c = counts(tokens_per_expert)?;
    let (mask, valid_rows) = row_mask(token_mask, rows);
    let factor = switch_factor(&options, cols, valid_rows);
    let total = blocked_total(rows, mask, 0.0, |t| p[t * cols..(t + 1) * cols].iter().zip(&c).map(|(&v, &n)| v as f64 * n).sum::<f64>());
    let g: Vec<f32> = c.iter().map(|&n| (n * factor) as f32).collect();
    let grad = masked_rows(rows, cols, cols, 4, mask, |_, out: &mut [f32]| out.copy_from_slice(&g));
    Ok(Loss { loss: total * factor, grad: Tensor::f32(vec![rows, cols], grad) })
}

/// Per-row softmax statistics: max, sum of `exp(x - max)`, and one weighted sum.
#[derive(Debug, Clone, Copy, Default)]
struct RowStats {
    max: f64,
    sum: f64,
    /// `sum_e exp(x_e - max) * w_e` for the op's per-expert weights `w` (0 when unused).
    weighted: f64,
}

fn row_stats(row: &[f32], weights: Option<&[f64]>) -> RowStats {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let (mut sum, mut weighted) = (0.0, 0.0);
    for (e, &v) in row.iter().enumerate() {
        let p = exp(v as f64 - max);
        sum += p;
        if let Some(w) = weights {
            weighted += p * w[e];
        }
    }
    RowStats { max, sum, weighted }
}

fn all_row_stats(x: &[f32], rows: usize, cols: usize, mask: Option<&[u8]>, weights: Option<&[f64]>) -> Vec<RowStats> {
    masked_rows(rows, 1, cols, 8, mask, |t, out: &mut [RowStats]| out[0] = row_stats(&x[t * cols..(t + 1) * cols], weights))
}

/// The Switch loss of `probs = softmax(logits)` and its gradient with respect to the logits:
/// with `g_e = E * coeff / (k * N^2) * tokensPerExpert[e]` (the probs gradient),
/// `grad[t, i] = p_ti * (g_i - sum_j p_tj g_j)`. The softmax is computed in f64.
pub fn switch_load_balancing_loss_from_logits(
    logits: &TensorRef,
    tokens_per_expert: &TensorRef,
    token_mask: Option<&TensorRef>,
    options: SwitchLossOptions,
) -> Result<Loss> {
    let (rows, cols) = check_switch_loss(logits.meta(), tokens_per_expert.meta(), token_mask.map(|m| m.meta()), &options)?;
    let x = logits.typed::<f32>()?;
    let c = counts(tokens_per_expert)?;
    let (mask, valid_rows) = row_mask(token_mask, rows);
    let factor = switch_factor(&options, cols, valid_rows);
    let stats = all_row_stats(&x, rows, cols, mask, Some(&c));
    // sum_t sum_e p_te * count_e, in blocks of tokens
    let total = blocked_total(rows, mask, -0.0, |t| stats[t].weighted / stats[t].sum);
    let grad = masked_rows(rows, cols, cols, 8, mask, |t, out: &mut [f32]| {
        let s = stats[t];
        let mean_g = s.weighted / s.sum * factor;
        for ((o, &v), &n) in out.iter_mut().zip(&x[t * cols..(t + 1) * cols]).zip(&c) {
            let p = exp(v as f64 - s.max) / s.sum;
            *o = (p * (n * factor - mean_g)) as f32;
        }
    });
    Ok(Loss { loss: total * factor, grad: Tensor::f32(vec![rows, cols], grad) })
}

/// ST-MoE z-loss: `loss = coeff * mean over unmasked tokens of logsumexp(logits_t)^2` and
/// `grad[t, i] = 2 * coeff / N * lse_t * softmax(logits_t)_i` (N = unmasked tokens, at least 1).
pub fn z_loss(logits: &TensorRef, token_mask: Option<&TensorRef>, coeff: f64) -> Result<Loss> {
    let (rows, cols) = check_z_loss(logits.meta(), token_mask.map(|m| m.meta()), coeff)?;
    let x = logits.typed::<f32>()?;
    let (mask, valid_rows) = row_mask(token_mask, rows);
    let n = valid_rows.max(1) as f64;
    let stats = all_row_stats(&x, rows, cols, mask, None);
    let lse = |s: &RowStats| s.max + ln(s.sum);
    let total = blocked_total(rows, mask, -0.0, |t| lse(&stats[t]).powi(2));
    let grad = masked_rows(rows, cols, cols, 8, mask, |t, out: &mut [f32]| {
        let s = stats[t];
        let scale = 2.0 * coeff / n * lse(&s) / s.sum;
        for (o, &v) in out.iter_mut().zip(&x[t * cols..(t + 1) * cols]) {
            *o = (scale * exp(v as f64 - s.max)) as f32;
        }
    });
    Ok(Loss { loss: coeff * total / n, grad: Tensor::f32(vec![rows, cols], grad) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    fn f32s(t: &Tensor) -> &[f32] {
        t.data.as_f32().expect("f32 data")
    }

    #[test]
    fn totals_add_blocks_of_tokens() {
        // terms of very different sizes, so that the order of the additions shows in the bits
        let rows = 3 * TOTAL_BLOCK + 17;
        let probs: Vec<f32> = (0..rows).map(|t| if t % 7 == 0 { 1.0e8 + t as f32 } else { 0.1 + (t % 13) as f32 * 1.0e-3 }).collect();
        let mut mask = vec![1u8; rows];
        mask[5] = 0;
        mask[TOTAL_BLOCK + 3] = 0;
        let p = TensorRef::of("probs", vec![rows, 1], &probs).unwrap();
        let c = TensorRef::of("tokensPerExpert", vec![1], &[3i32][..]).unwrap();
        let m = TensorRef::new("tokenMask", crate::DType::Bool, vec![rows], &mask).unwrap();
        let got = switch_load_balancing_loss(&p, &c, Some(&m), opts(1, 1.0)).unwrap().loss;
        let term = |t: usize| probs[t] as f64 * 3.0;
        let mut blocked = 0.0;
        for (b, block) in mask.chunks(TOTAL_BLOCK).enumerate() {
            let mut s = 0.0;
            for (i, &m) in block.iter().enumerate() {
                if m != 0 {
                    s += term(b * TOTAL_BLOCK + i);
                }
            }
            blocked += s;
        }
        let sequential = (0..rows).filter(|&t| mask[t] != 0).fold(0.0, |a, t| a + term(t));
        assert_ne!(blocked.to_bits(), sequential.to_bits(), "the test's terms must tell the orders apart");
        let valid = (rows - 2) as f64;
        assert_eq!(got.to_bits(), (blocked * (1.0 / (valid * valid))).to_bits());
    }

    const LOGITS: [f32; 8] = [0.5, -1.0, 2.0, 0.25, -0.5, 1.5, 0.0, -2.0];
    const COUNTS: [i32; 4] = [1, 1, 2, 0];

    fn opts(topk: usize, coeff: f64) -> SwitchLossOptions {
        SwitchLossOptions { topk, coeff, num_tokens: None }
    }

    fn softmax(row: &[f32]) -> Vec<f64> {
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let e: Vec<f64> = row.iter().map(|&v| (v as f64 - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|v| v / s).collect()
    }

    fn switch_from_logits_f64(x: &[f32], counts: &[i32], k: usize, coeff: f64) -> f64 {
        let rows = x.len() / counts.len();
        let mut total = 0.0;
        for t in 0..rows {
            let p = softmax(&x[t * 4..t * 4 + 4]);
            total += p.iter().zip(counts).map(|(p, &c)| p * c as f64).sum::<f64>();
        }
        total * counts.len() as f64 * coeff / (k as f64 * (rows * rows) as f64)
    }

    #[test]
    fn switch_loss_matches_the_formula() {
        let probs: Vec<f32> = LOGITS.chunks(4).flat_map(|r| softmax(r).into_iter().map(|v| v as f32)).collect();
        let p = TensorRef::of("probs", vec![2, 4], &probs).unwrap();
        let c = TensorRef::of("tokensPerExpert", vec![4], &COUNTS).unwrap();
        let out = switch_load_balancing_loss(&p, &c, None, opts(2, 0.01)).unwrap();
        let mut want = 0.0;
        for e in 0..4 {
            want += (probs[e] as f64 + probs[4 + e] as f64) * COUNTS[e] as f64;
        }
        want *= 4.0 * 0.01 / (2.0 * 4.0);
        assert!((out.loss - want).abs() < 1e-15, "{} vs {want}", out.loss);
        let g = f32s(&out.grad);
        assert_eq!(g[2], (2.0 * 4.0 * 0.01 / 8.0) as f32);
        assert_eq!(g[3], 0.0);
        assert_eq!(&g[..4], &g[4..]);
    }

    #[test]
    fn gradients_match_finite_differences() {
        let c = TensorRef::of("tokensPerExpert", vec![4], &COUNTS).unwrap();
        let l = TensorRef::of("logits", vec![2, 4], &LOGITS).unwrap();
        let sw = switch_load_balancing_loss_from_logits(&l, &c, None, opts(2, 0.5)).unwrap();
        assert!((sw.loss - switch_from_logits_f64(&LOGITS, &COUNTS, 2, 0.5)).abs() < 1e-12);
        let z = z_loss(&l, None, 0.5).unwrap();
        let z_f64 = |x: &[f32]| {
            let mut s = 0.0;
            for r in x.chunks(4) {
                let m = r.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
                let lse = m + r.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
                s += lse * lse;
            }
            0.5 * s / 2.0
        };
        assert!((z.loss - z_f64(&LOGITS)).abs() < 1e-12);
        let h = 1e-3f32;
        for i in 0..8 {
            let (mut up, mut down) = (LOGITS, LOGITS);
            up[i] += h;
            down[i] -= h;
            let step = (up[i] as f64 - down[i] as f64).max(1e-30);
            let fd_sw = (switch_from_logits_f64(&up, &COUNTS, 2, 0.5) - switch_from_logits_f64(&down, &COUNTS, 2, 0.5)) / step;
            let fd_z = (z_f64(&up) - z_f64(&down)) / step;
            assert!((f32s(&sw.grad)[i] as f64 - fd_sw).abs() < 1e-5, "switch {i}: {} vs {fd_sw}", f32s(&sw.grad)[i]);
            assert!((f32s(&z.grad)[i] as f64 - fd_z).abs() < 1e-4, "z {i}: {} vs {fd_z}", f32s(&z.grad)[i]);
        }
    }

    #[test]
    fn masked_rows_are_left_out() {
        let mask = [0u8, 1];
        let m = TensorRef::new("tokenMask", DType::Bool, vec![2], &mask).unwrap();
        let c = TensorRef::of("tokensPerExpert", vec![4], &COUNTS).unwrap();
        let l = TensorRef::of("logits", vec![2, 4], &LOGITS).unwrap();
        let second = TensorRef::of("logits", vec![1, 4], &LOGITS[4..]).unwrap();
        let masked = z_loss(&l, Some(&m), 0.1).unwrap();
        let alone = z_loss(&second, None, 0.1).unwrap();
        assert_eq!(masked.loss, alone.loss);
        assert_eq!(&f32s(&masked.grad)[..4], &[0.0; 4]);
        assert_eq!(&f32s(&masked.grad)[4..], f32s(&alone.grad));
        let masked = switch_load_balancing_loss_from_logits(&l, &c, Some(&m), opts(1, 0.1)).unwrap();
        let alone = switch_load_balancing_loss_from_logits(&second, &c, None, opts(1, 0.1)).unwrap();
        assert_eq!(masked.loss, alone.loss);
        assert_eq!(&f32s(&masked.grad)[4..], f32s(&alone.grad));
        // All rows masked: N is clamped to 1, the loss is 0.
        let none = TensorRef::new("tokenMask", DType::Bool, vec![2], &[0u8, 0]).unwrap();
        assert_eq!(z_loss(&l, Some(&none), 0.1).unwrap().loss, 0.0);
    }

    #[test]
    fn num_tokens_overrides_the_row_count() {
        let c = TensorRef::of("tokensPerExpert", vec![4], &COUNTS).unwrap();
        let l = TensorRef::of("logits", vec![2, 4], &LOGITS).unwrap();
        let base = switch_load_balancing_loss_from_logits(&l, &c, None, opts(2, 1.0)).unwrap();
        let wide = switch_load_balancing_loss_from_logits(&l, &c, None, SwitchLossOptions { num_tokens: Some(4), ..opts(2, 1.0) }).unwrap();
        assert!((wide.loss * 4.0 - base.loss).abs() < 1e-15);
    }

    #[test]
    fn validation() {
        let c = TensorRef::of("tokensPerExpert", vec![4], &COUNTS).unwrap();
        let l = TensorRef::of("logits", vec![2, 4], &LOGITS).unwrap();
        let p = TensorRef::of("probs", vec![2, 4], &LOGITS).unwrap();
        let check = |r: Result<Loss>, prefix: &str, kind: ErrorKind| {
            let err = r.unwrap_err();
            assert!(err.to_string().starts_with(prefix), "{err}");
            assert_eq!(err.kind(), kind, "{err}");
        };
        check(switch_load_balancing_loss(&p, &c, None, opts(0, 1.0)), "topk:", ErrorKind::RangeError);
        check(switch_load_balancing_loss(&p, &c, None, opts(1, -1.0)), "coeff:", ErrorKind::RangeError);
        check(switch_load_balancing_loss(&p, &c, None, opts(1, f64::INFINITY)), "coeff:", ErrorKind::RangeError);
        check(
            switch_load_balancing_loss(&p, &c, None, SwitchLossOptions { num_tokens: Some(0), ..opts(1, 1.0) }),
            "numTokens:",
            ErrorKind::RangeError,
        );
        let bad = [1i32, -1, 0, 0];
        let bad = TensorRef::of("tokensPerExpert", vec![4], &bad).unwrap();
        check(switch_load_balancing_loss(&p, &bad, None, opts(1, 1.0)), "tokensPerExpert: tokensPerExpert[1] = -1", ErrorKind::RangeError);
        let short = TensorRef::of("tokensPerExpert", vec![3], &COUNTS[..3]).unwrap();
        check(switch_load_balancing_loss(&p, &short, None, opts(1, 1.0)), "tokensPerExpert.shape:", ErrorKind::RangeError);
        let float_counts = TensorRef::of("tokensPerExpert", vec![4], &LOGITS[..4]).unwrap();
        check(switch_load_balancing_loss(&p, &float_counts, None, opts(1, 1.0)), "tokensPerExpert.dtype:", ErrorKind::TypeError);
        check(z_loss(&l, None, f64::NAN), "coeff:", ErrorKind::RangeError);
        let nan = [0.0f32, f32::NAN];
        let nan = TensorRef::of("logits", vec![1, 2], &nan).unwrap();
        check(z_loss(&nan, None, 1.0), "logits: logits[0][1] = NaN", ErrorKind::RangeError);
        let m = TensorRef::new("tokenMask", DType::Bool, vec![3], &[1u8, 1, 1]).unwrap();
        check(z_loss(&l, Some(&m), 1.0), "tokenMask.shape:", ErrorKind::RangeError);
    }

    /// The check functions on a backend's tensors (`Meta::shape_only`) skip the values (a NaN
    /// logit, a negative count, a mask byte of 2) and still check dtypes, shapes and options.
    #[test]
    fn checks_without_the_values() {
        let x = [0.5f32, f32::NAN, 1.0, 2.0];
        let counts = [-1i32, 3];
        let mask = [2u8, 1];
        let meta = |name, dtype, shape: &'static [usize]| Meta::shape_only(name, dtype, shape);
        let (x_m, c_m, m_m) =
            (meta("logits", DType::F32, &[2, 2]), meta("tokensPerExpert", DType::I32, &[2]), meta("tokenMask", DType::Bool, &[2]));
        assert_eq!(check_switch_loss(x_m, c_m, Some(m_m), &opts(1, 1.0)).unwrap(), (2, 2));
        assert_eq!(check_z_loss(x_m, Some(m_m), 1.0).unwrap(), (2, 2));
        let err = check_switch_loss(x_m, c_m, None, &opts(0, 1.0)).unwrap_err();
        assert_eq!(err.to_string(), "topk: expected at least 1, got 0");
        // on the host the same functions report the values, as the ops do
        let l = TensorRef::of("logits", vec![2, 2], &x).unwrap();
        let c = TensorRef::of("tokensPerExpert", vec![2], &counts).unwrap();
        let m = TensorRef::new("tokenMask", DType::Bool, vec![2], &mask).unwrap();
        let op = switch_load_balancing_loss_from_logits(&l, &c, Some(&m), opts(1, 1.0)).unwrap_err();
        assert_eq!(check_switch_loss(l.meta(), c.meta(), Some(m.meta()), &opts(1, 1.0)).unwrap_err(), op);
        assert!(op.to_string().starts_with("logits: logits[0][1] = NaN"), "{op}");
    }
}
