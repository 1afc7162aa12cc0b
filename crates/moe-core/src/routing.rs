//! Routing: from router logits `[T, E]` to each token's top-k experts and their weights, as
//! NeMo Automodel's `Gate._route_scores` computes them (score function, optional score-correction
//! bias used for selection only, group-limited top-k, normalisation, route scale).
//!
//! Scores are computed in f64 and rounded once to f32; selection then runs on f32 values exactly
//! as the reference's does (`score + bias` added in f32, groups masked as the reference masks
//! them). Our top-k order is part of our contract: descending selection score, ties to the lower
//! expert id.

use std::borrow::Cow;

use half::{bf16, f16};

use crate::alloc::{try_vec, try_with_capacity};
use crate::detmath::{exp, ln_1p};
use crate::error::{opt_size_arg, size_arg, Error, Result};
use crate::par::for_each_row;
use crate::tensor::{DType, Meta, Tensor, TensorRef};

/// How router logits become scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreFunction {
    /// softmax over the experts; top-k on the logits (weights: softmax over the k picked logits)
    /// or, with `softmax_before_topk`, on the softmax (weights: the softmax at the picks).
    Softmax,
    /// sigmoid; selection on `sigmoid + bias`; groups score by max (no bias) or top-2 sum (bias)
    /// and dropped groups are multiplied by 0.
    Sigmoid,
    /// softmax; selection on `softmax + bias`; groups score by top-2 sum, dropped groups are
    /// multiplied by 0.
    SoftmaxWithBias,
    /// sigmoid; selection on `sigmoid + bias`; groups score by top-2 sum, dropped groups are -inf.
    SigmoidWithBias,
    /// sqrt(softplus(x)); selection on `score + bias`; no groups.
    SqrtSoftplus,
}

impl ScoreFunction {
    pub const ALL: [ScoreFunction; 5] = [
        ScoreFunction::Softmax,
        ScoreFunction::Sigmoid,
        ScoreFunction::SoftmaxWithBias,
        ScoreFunction::SigmoidWithBias,
        ScoreFunction::SqrtSoftplus,
    ];

    /// The name used by the reference and by the JavaScript API.
    pub fn name(self) -> &'static str {
        match self {
            ScoreFunction::Softmax => "softmax",
            ScoreFunction::Sigmoid => "sigmoid",
            ScoreFunction::SoftmaxWithBias => "softmax_with_bias",
            ScoreFunction::SigmoidWithBias => "sigmoid_with_bias",
            ScoreFunction::SqrtSoftplus => "sqrtsoftplus",
        }
    }

    pub fn parse(name: &str) -> Result<ScoreFunction> {
        ScoreFunction::ALL.into_iter().find(|f| f.name() == name).ok_or_else(|| {
            Error::type_error(
                "scoreFunction",
                "one of 'softmax', 'sigmoid', 'softmax_with_bias', 'sigmoid_with_bias' or 'sqrtsoftplus'",
                format!("'{name}'"),
            )
        })
    }

    /// Whether the reference applies group-limited routing for this function.
    fn has_groups(self) -> bool {
        !matches!(self, ScoreFunction::Softmax | ScoreFunction::SqrtSoftplus)
    }
}

/// Options of [`route`] (the tensors `expertBias` and `tokenMask` are separate arguments).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouteOptions {
    /// Experts per token, `1..=E`.
    pub topk: usize,
    pub score_function: ScoreFunction,
    /// Softmax only: select on the softmax instead of the logits.
    pub softmax_before_topk: bool,
    /// Expert groups (1 = no group limit); must divide E.
    pub num_groups: usize,
    /// Groups kept per token; defaults to `num_groups` (no limit).
    pub topk_groups: Option<usize>,
    /// With k > 1: weights /= (their sum + 1e-20) and scores /= (row sum + 1e-20).
    pub norm_topk_prob: bool,
    /// Final factor on the weights.
    pub route_scale: f64,
}

impl RouteOptions {
    /// Defaults: softmax, top-k on logits, no groups, no normalisation, scale 1.
    pub fn new(topk: usize) -> RouteOptions {
        RouteOptions {
            topk,
            score_function: ScoreFunction::Softmax,
            softmax_before_topk: false,
            num_groups: 1,
            topk_groups: None,
            norm_topk_prob: false,
            route_scale: 1.0,
        }
    }

    /// Builds the options from what a binding received (JavaScript numbers, an optional name).
    pub fn from_args(
        topk: f64,
        score_function: Option<&str>,
        softmax_before_topk: Option<bool>,
        num_groups: Option<f64>,
        topk_groups: Option<f64>,
        norm_topk_prob: Option<bool>,
        route_scale: Option<f64>,
    ) -> Result<RouteOptions> {
        Ok(RouteOptions {
            topk: size_arg("topk", topk)?,
            score_function: score_function.map(ScoreFunction::parse).transpose()?.unwrap_or(ScoreFunction::Softmax),
            softmax_before_topk: softmax_before_topk.unwrap_or(false),
            num_groups: opt_size_arg("numGroups", num_groups)?.unwrap_or(1),
            topk_groups: opt_size_arg("topkGroups", topk_groups)?,
            norm_topk_prob: norm_topk_prob.unwrap_or(false),
            route_scale: route_scale.unwrap_or(1.0),
        })
    }
}

/// Output of [`route`].
#[derive(Debug, Clone, PartialEq)]
pub struct Routed {
    /// `[T, k]` f32: the weight of each picked expert (0 for masked tokens).
    pub weights: Tensor,
    /// `[T, k]` int32: picked experts, best first (ties to the lower id); -1 for masked tokens.
    pub indices: Tensor,
    /// `[T, E]` f32: the unbiased scores of every expert (normalised with `norm_topk_prob`, k > 1).
    pub scores: Tensor,
    /// `[E]` int32: how many unmasked tokens picked each expert.
    pub tokens_per_expert: Tensor,
}

/// Validated sizes of a routing problem.
struct Plan {
    num_experts: usize,
    topk: usize,
    /// Group count actually applied (1 when the score function has no groups).
    groups: usize,
    topk_groups: usize,
    /// Group score = sum of the two best (true) or the max (false).
    top2_group_score: bool,
}

fn check_options(options: &RouteOptions, num_experts: usize, has_bias: bool) -> Result<Plan> {
    let sf = options.score_function;
    let k = options.topk;
    if k == 0 || k > num_experts {
        return Err(Error::range("topk", format!("expected 1 to numExperts = {num_experts}, got {k}")));
    }
    if options.softmax_before_topk && sf != ScoreFunction::Softmax {
        return Err(Error::type_error(
            "softmaxBeforeTopk",
            "false or absent: only scoreFunction 'softmax' selects on logits and can select on the softmax instead",
            format!("true with scoreFunction '{}'", sf.name()),
        ));
    }
    if !options.route_scale.is_finite() {
        return Err(Error::range("routeScale", format!("expected a finite number, got {}", options.route_scale)));
    }
    let g = options.num_groups;
    if g == 0 {
        return Err(Error::range("numGroups", "expected at least 1, got 0"));
    }
    if g > 1 && !sf.has_groups() {
        return Err(Error::type_error(
            "numGroups",
            format!("1 or absent: scoreFunction '{}' has no group-limited routing", sf.name()),
            g.to_string(),
        ));
    }
    if num_experts % g != 0 {
        return Err(Error::range("numGroups", format!("numExperts = {num_experts} is not a multiple of numGroups = {g}")));
    }
    let kg = options.topk_groups.unwrap_or(g);
    if kg == 0 || kg > g {
        return Err(Error::range("topkGroups", format!("expected 1 to numGroups = {g}, got {kg}")));
    }
    let group_size = num_experts / g;
    if k > kg * group_size {
        return Err(Error::range(
            "topk",
            format!("{k} exceeds the {} experts of the topkGroups = {kg} groups of {group_size} that each token keeps", kg * group_size),
        ));
    }
    let top2 = sf != ScoreFunction::Sigmoid || has_bias;
    if g > 1 && top2 && group_size < 2 {
        return Err(Error::range(
            "numGroups",
            format!(
                "{g} groups of {group_size} expert: scoreFunction '{}'{} scores a group by the sum of its two best experts, so numGroups must be at most numExperts / 2 = {}",
                sf.name(),
                if sf == ScoreFunction::Sigmoid { " with expertBias" } else { "" },
                num_experts / 2
            ),
        ));
    }
    Ok(Plan { num_experts, topk: k, groups: g, topk_groups: kg, top2_group_score: top2 })
}

/// What a backend that routes elsewhere (the CUDA crate) needs once the core has checked
/// `route`'s options for `num_experts` experts (`has_bias`: an expertBias is given): the group
/// count, the groups each token keeps, and whether a group scores by its two best experts.
/// The errors are `route`'s own.
pub fn route_config(options: &RouteOptions, num_experts: usize, has_bias: bool) -> Result<(usize, usize, bool)> {
    if has_bias && options.score_function == ScoreFunction::Softmax {
        return Err(Error::type_error(
            "expertBias",
            "no expertBias with scoreFunction 'softmax' (it selects on logits or softmax only; use 'softmax_with_bias')",
            "a tensor",
        ));
    }
    let plan = check_options(options, num_experts, has_bias)?;
    Ok((plan.groups, plan.topk_groups, plan.top2_group_score))
}

/// The index of the first non-finite value, if any.
fn first_non_finite(values: &[f32]) -> Option<usize> {
    values.iter().position(|v| !v.is_finite())
}

/// Routes every token: scores, top-k selection, weights. See `docs/semantics.md`. `logits` may be
/// float32, bfloat16 or float16 (16-bit logits are converted exactly to float32 first, so the
/// result is that of their float32 conversion).
pub fn route(logits: &TensorRef, expert_bias: Option<&TensorRef>, token_mask: Option<&TensorRef>, options: RouteOptions) -> Result<Routed> {
    let checked = check_route_inputs(logits, expert_bias, token_mask, &options)?;
    route_checked(&checked.logits, checked.num_tokens, &checked.plan, &options, checked.bias.as_deref(), checked.mask)
}

/// The dtypes `route` and `route_backward` take for `logits`: float32, and bfloat16 / float16
/// (a bf16 model's router logits), converted exactly to float32 first.
pub const LOGITS_DTYPES: &[DType] = DType::TOKENS;

/// `logits` (float32, bfloat16 or float16) as float32 values: borrowed for float32, converted
/// exactly (every bf16/f16 value is an f32 value) for the 16-bit dtypes.
pub fn logits_f32<'a>(logits: &TensorRef<'a>) -> Result<Cow<'a, [f32]>> {
    match logits.expect_dtype(LOGITS_DTYPES)? {
        DType::BF16 => {
            let mut v = try_with_capacity(logits.numel(), "logits")?;
            v.extend(logits.raw::<u16>().iter().map(|&b| bf16::from_bits(b).to_f32()));
            Ok(Cow::Owned(v))
        }
        DType::F16 => {
            let mut v = try_with_capacity(logits.numel(), "logits")?;
            v.extend(logits.raw::<u16>().iter().map(|&b| f16::from_bits(b).to_f32()));
            Ok(Cow::Owned(v))
        }
        _ => logits.typed::<f32>(),
    }
}

/// route's inputs once checked (shared with [`route_backward`], so that both report the same errors).
struct CheckedRoute<'a> {
    num_tokens: usize,
    plan: Plan,
    logits: Cow<'a, [f32]>,
    bias: Option<Cow<'a, [f32]>>,
    mask: Option<&'a [u8]>,
}

/// route's (and routeBackward's) arguments once checked: what a kernel needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteCheck {
    pub num_tokens: usize,
    pub num_experts: usize,
    /// Expert groups, and the groups each token keeps.
    pub groups: usize,
    pub topk_groups: usize,
    /// Whether a group scores by the sum of its two best experts.
    pub top2_group_score: bool,
}

/// Every check of [`route`] but the logits' finiteness (their values, checked last), in the op's
/// order; on the host also expertBias's finiteness and tokenMask's 0/1 values.
pub fn check_route(logits: Meta, expert_bias: Option<Meta>, token_mask: Option<Meta>, options: &RouteOptions) -> Result<RouteCheck> {
    let dims = logits.expect_rank(2, "[numTokens, numExperts]")?;
    let (num_tokens, num_experts) = (dims[0], dims[1]);
    logits.expect_dtype(LOGITS_DTYPES)?;
    if i32::try_from(num_experts).is_err() {
        return Err(Error::range("logits.shape[1]", format!("numExperts = {num_experts} does not fit in int32 indices")));
    }
    let (groups, topk_groups, top2_group_score) = route_config(options, num_experts, expert_bias.is_some())?;
    if let Some(b) = expert_bias {
        b.expect_dtype(&[DType::F32])?;
        b.expect_shape(&[num_experts], "([numExperts])")?;
        if let Some((e, v)) = b.first_non_finite()? {
            return Err(Error::range("expertBias", format!("expertBias[{e}] = {v} is not finite")));
        }
    }
    if let Some(m) = token_mask {
        m.check_mask()?;
        m.expect_shape(&[num_tokens], "([numTokens])")?;
    }
    Ok(RouteCheck { num_tokens, num_experts, groups, topk_groups, top2_group_score })
}

fn check_route_inputs<'a>(
    logits: &TensorRef<'a>,
    expert_bias: Option<&TensorRef<'a>>,
    token_mask: Option<&TensorRef<'a>>,
    options: &RouteOptions,
) -> Result<CheckedRoute<'a>> {
    let c = check_route(logits.meta(), expert_bias.map(|b| b.meta()), token_mask.map(|m| m.meta()), options)?;
    let (num_tokens, num_experts) = (c.num_tokens, c.num_experts);
    let plan = Plan { num_experts, topk: options.topk, groups: c.groups, topk_groups: c.topk_groups, top2_group_score: c.top2_group_score };
    let bias = expert_bias.map(|b| b.typed::<f32>()).transpose()?;
    let mask = token_mask.map(|m| m.mask()).transpose()?;
    let x = logits_f32(logits)?;
    if let Some(i) = first_non_finite(&x) {
        return Err(Error::range(
            "logits",
            format!("logits[{}][{}] = {} is not finite (router logits must be finite numbers)", i / num_experts, i % num_experts, x[i]),
        ));
    }
    Ok(CheckedRoute { num_tokens, plan, logits: x, bias, mask })
}

fn route_checked(
    x: &[f32],
    num_tokens: usize,
    plan: &Plan,
    options: &RouteOptions,
    bias: Option<&[f32]>,
    mask: Option<&[u8]>,
) -> Result<Routed> {
    let (e_count, k) = (plan.num_experts, plan.topk);
    let sf = options.score_function;
    let work = num_tokens.saturating_mul(e_count).saturating_mul(12);

    // 1. Unbiased scores, f64 arithmetic rounded once to f32.
    let mut scores = vec![0f32; num_tokens * e_count];
    for_each_row(&mut scores, e_count, work, Vec::<f64>::new, |tmp, t, out| {
        let row = &x[t * e_count..(t + 1) * e_count];
        match sf {
            ScoreFunction::Softmax | ScoreFunction::SoftmaxWithBias => softmax_into(row, tmp, out),
            ScoreFunction::Sigmoid | ScoreFunction::SigmoidWithBias => {
                for (o, &v) in out.iter_mut().zip(row) {
                    *o = sigmoid(v as f64) as f32;
                }
            }
            ScoreFunction::SqrtSoftplus => {
                for (o, &v) in out.iter_mut().zip(row) {
                    *o = softplus(v as f64).sqrt() as f32;
                }
            }
        }
    });

    // 2. Selection and weights, one row of k (expert, weight) pairs per token.
    let normalise = options.norm_topk_prob && k > 1;
    let mut picks = vec![(0i32, 0f32); num_tokens * k];
    let scores_ref = &scores;
    for_each_row(
        &mut picks,
        k,
        work,
        || Scratch::new(e_count, k, plan.groups),
        |s, t, out| {
            if mask.is_some_and(|m| m[t] == 0) {
                out.fill((-1, 0.0));
                return;
            }
            let logit_row = &x[t * e_count..(t + 1) * e_count];
            let score_row = &scores_ref[t * e_count..(t + 1) * e_count];
            // The keys the top-k runs on.
            match (sf, bias) {
                (ScoreFunction::Softmax, _) if !options.softmax_before_topk => s.keys.copy_from_slice(logit_row),
                (_, Some(b)) => {
                    for ((key, &v), &bv) in s.keys.iter_mut().zip(score_row).zip(b) {
                        *key = v + bv;
                    }
                }
                _ => s.keys.copy_from_slice(score_row),
            }
            if plan.groups > 1 {
                limit_groups(s, plan, sf);
            }
            top_k(&s.keys, &mut s.picked, &mut s.vals, &mut s.order);
            // Weights, f32 as the reference holds them, then normalised and scaled in f64.
            if sf == ScoreFunction::Softmax && !options.softmax_before_topk {
                let m = logit_row[s.picked[0]] as f64;
                let mut sum = 0.0;
                for (w, &e) in s.wide.iter_mut().zip(&s.picked) {
                    *w = exp(logit_row[e] as f64 - m);
                    sum += *w;
                }
                for w in s.wide.iter_mut() {
                    *w = (*w / sum) as f32 as f64;
                }
            } else {
                for (w, &e) in s.wide.iter_mut().zip(&s.picked) {
                    *w = score_row[e] as f64;
                }
            }
            let denom = if normalise { s.wide.iter().sum::<f64>() + 1e-20 } else { 1.0 };
            for ((o, &e), &w) in out.iter_mut().zip(&s.picked).zip(&s.wide) {
                let w = if normalise { w / denom } else { w };
                *o = (e as i32, (w * options.route_scale) as f32);
            }
        },
    );

    // 3. Scores normalised per row when the weights are.
    if normalise {
        for_each_row(
            &mut scores,
            e_count,
            work,
            || (),
            |_, _, row| {
                let denom = row.iter().map(|&v| v as f64).sum::<f64>() + 1e-20;
                for v in row.iter_mut() {
                    *v = (*v as f64 / denom) as f32;
                }
            },
        );
    }

    let mut tokens_per_expert = try_vec(0i32, e_count, "logits.shape[1]")?;
    for &(e, _) in &picks {
        if e >= 0 {
            tokens_per_expert[e as usize] += 1;
        }
    }
    let (indices, weights): (Vec<i32>, Vec<f32>) = picks.into_iter().unzip();
    Ok(Routed {
        weights: Tensor::f32(vec![num_tokens, k], weights),
        indices: Tensor::i32(vec![num_tokens, k], indices),
        scores: Tensor::f32(vec![num_tokens, e_count], scores),
        tokens_per_expert: Tensor::i32(vec![e_count], tokens_per_expert),
    })
}

/// The checks of [`route_backward`]'s own arguments (route's come first, by [`check_route`]):
/// `indices [T, k]` int32/int64, `grad_weights [T, k]` f32, `grad_scores [T, E]` f32.
fn check_route_backward_grads(
    grad_weights: Meta,
    indices: Meta,
    grad_scores: Option<Meta>,
    num_tokens: usize,
    e_count: usize,
    k: usize,
) -> Result<()> {
    indices.expect_rank(2, "[numTokens, topk]")?;
    indices.expect_dtype(DType::INDICES)?;
    indices.expect_shape(&[num_tokens, k], "([numTokens, topk]: route's indices for these logits and topk)")?;
    grad_weights.expect_rank(2, "[numTokens, topk]")?;
    grad_weights.expect_dtype(&[DType::F32])?;
    grad_weights.expect_shape(&[num_tokens, k], "([numTokens, topk]: the shape of route's weights)")?;
    if let Some(g) = grad_scores {
        g.expect_rank(2, "[numTokens, numExperts]")?;
        g.expect_dtype(&[DType::F32])?;
        g.expect_shape(&[num_tokens, e_count], "([numTokens, numExperts]: the shape of route's scores)")?;
    }
    Ok(())
}

/// Every check of [`route_backward`] that needs no element values (a backend that computes it
/// elsewhere runs this on its tensors' [`Meta`], then checks the values itself or falls back to
/// the core): route's checks ([`check_route`]), then its own argument shapes. The logits'
/// finiteness and the picks' values (range, -1 rows, repeats) are checked by the op.
pub fn check_route_backward(
    grad_weights: Meta,
    logits: Meta,
    indices: Meta,
    grad_scores: Option<Meta>,
    expert_bias: Option<Meta>,
    token_mask: Option<Meta>,
    options: &RouteOptions,
) -> Result<RouteCheck> {
    let c = check_route(logits, expert_bias, token_mask, options)?;
    check_route_backward_grads(grad_weights, indices, grad_scores, c.num_tokens, c.num_experts, options.topk)?;
    Ok(c)
}

/// The gradient of [`route`] with respect to its logits, given route's picks.
///
/// `grad_weights [T, k]` f32 is the gradient of a loss with respect to route's `weights`,
/// `grad_scores [T, E]` f32 (optional) the one with respect to its `scores`; `indices [T, k]`
/// (int32 or int64) are route's picks for these logits and options. Returns `grad_logits [T, E]`
/// f32. Given the picks, the selection (keys, bias, groups) is piecewise constant in the
/// logits, so the gradient flows through the values of the weights (and scores) only: through
/// the softmax over the picked logits, or the score function at the picks, the normalisation
/// (`norm_topk_prob`, k > 1) and `route_scale`. Masked tokens (`token_mask` false, or an
/// indices row of -1s as route gives them) get a zero row, also from `grad_scores`.
///
/// The options, `expert_bias` and `token_mask` are route's, checked by route's own checks (so a
/// caller passes the same options); `logits` may be 16-bit as in route. Each token's gradient
/// is computed in f64 from the logits (not from route's rounded outputs) and rounded once to
/// f32; the result does not depend on the thread count. Non-finite gradients propagate.
pub fn route_backward(
    grad_weights: &TensorRef,
    logits: &TensorRef,
    indices: &TensorRef,
    grad_scores: Option<&TensorRef>,
    expert_bias: Option<&TensorRef>,
    token_mask: Option<&TensorRef>,
    options: RouteOptions,
) -> Result<Tensor> {
    let checked = check_route_inputs(logits, expert_bias, token_mask, &options)?;
    let (num_tokens, e_count, k) = (checked.num_tokens, checked.plan.num_experts, checked.plan.topk);
    check_route_backward_grads(grad_weights.meta(), indices.meta(), grad_scores.map(|g| g.meta()), num_tokens, e_count, k)?;
    let gw = grad_weights.typed::<f32>()?;
    let gsc = grad_scores.map(|g| g.typed::<f32>()).transpose()?;

    // The picks, checked: -1 or an expert id; a row that is used holds k distinct experts.
    let idx = indices.indices()?;
    let mask = checked.mask;
    let mut picks = try_vec(0usize, num_tokens * k, "indices")?;
    // `live[t]`: token t gets a gradient (not masked, picks given).
    let mut live = try_vec(false, num_tokens, "indices")?;
    // Per expert: 1 + the last row that picked it, and where in that row (duplicate check, O(T k)).
    let mut seen = try_vec((0usize, 0usize), e_count, "indices")?;
    for t in 0..num_tokens {
        let row = &idx[t * k..(t + 1) * k];
        for (j, &v) in row.iter().enumerate() {
            if v < -1 || v >= e_count as i64 {
                return Err(Error::range(
                    "indices",
                    format!("indices[{t}][{j}] = {v} is out of range: expected an expert id 0 to {} (numExperts = {e_count}), or -1 for a masked token", e_count - 1),
                ));
            }
        }
        if mask.is_some_and(|m| m[t] == 0) || row.iter().all(|&v| v == -1) {
            continue;
        }
        for (j, &v) in row.iter().enumerate() {
            if v == -1 {
                return Err(Error::range(
                    "indices",
                    format!("indices[{t}][{j}] = -1 in a row of picks: -1 marks a masked token, whose whole row is -1 (as route gives it)"),
                ));
            }
            let e = v as usize;
            if seen[e].0 == t + 1 {
                return Err(Error::range(
                    "indices",
                    format!("indices[{t}][{j}] = {v} repeats indices[{t}][{}]: a token's picks are distinct experts", seen[e].1),
                ));
            }
            seen[e] = (t + 1, j);
            picks[t * k + j] = e;
        }
        live[t] = true;
    }

    let x = &checked.logits;
    let c = BackwardRow {
        sf: options.score_function,
        on_logits: options.score_function == ScoreFunction::Softmax && !options.softmax_before_topk,
        normalise: options.norm_topk_prob && k > 1,
        scale: options.route_scale,
    };
    let mut grad = try_vec(0f32, num_tokens * e_count, "logits")?;
    let work = num_tokens.saturating_mul(e_count).saturating_mul(16);
    let (picks, live, gw, gsc) = (&picks, &live, &gw, gsc.as_deref());
    for_each_row(&mut grad, e_count, work, BackwardScratch::default, |s, t, out| {
        if !live[t] {
            out.fill(0.0);
            return;
        }
        let rows = e_count * t..e_count * (t + 1);
        c.row(&x[rows.clone()], &picks[t * k..(t + 1) * k], &gw[t * k..(t + 1) * k], gsc.map(|g| &g[rows]), s, out);
    });
    Ok(Tensor::f32(vec![num_tokens, e_count], grad))
}

/// What every row of [`route_backward`] shares.
struct BackwardRow {
    sf: ScoreFunction,
    /// 'softmax' selecting on the logits: the weights are a softmax over the picked logits.
    on_logits: bool,
    normalise: bool,
    scale: f64,
}

/// Per-worker buffers of [`route_backward`] (grown to the row's size on first use).
#[derive(Default)]
struct BackwardScratch {
    /// The scores, f64 (not rounded).
    s: Vec<f64>,
    /// d loss / d scores.
    gs: Vec<f64>,
    /// d loss / d logits.
    gx: Vec<f64>,
    /// The picks' weights before normalisation and scale.
    u: Vec<f64>,
    /// d loss / d u.
    gu: Vec<f64>,
}

impl BackwardRow {
    /// One token's gradient: `x` its logits, `picks` its k experts, `gw` d loss / d weights,
    /// `gsc` d loss / d scores; written to `out`, each element rounded once.
    fn row(&self, x: &[f32], picks: &[usize], gw: &[f32], gsc: Option<&[f32]>, s: &mut BackwardScratch, out: &mut [f32]) {
        let e_count = x.len();
        let need_scores = gsc.is_some() || !self.on_logits;
        s.gx.clear();
        s.gx.resize(e_count, 0.0);
        if need_scores {
            scores_f64(self.sf, x, &mut s.s);
            s.gs.clear();
            s.gs.resize(e_count, 0.0);
        }
        // The weights before normalisation: u_j.
        s.u.clear();
        if self.on_logits {
            let m = picks.iter().map(|&e| x[e]).fold(f32::NEG_INFINITY, f32::max) as f64;
            s.u.extend(picks.iter().map(|&e| exp(x[e] as f64 - m)));
            let sum: f64 = s.u.iter().sum();
            s.u.iter_mut().for_each(|u| *u /= sum);
        } else {
            s.u.extend(picks.iter().map(|&e| s.s[e]));
        }
        // d/du of (routeScale * u / (sum u + 1e-20)) or (routeScale * u).
        s.gu.clear();
        s.gu.extend(gw.iter().map(|&g| g as f64 * self.scale));
        if self.normalise {
            let denom = s.u.iter().sum::<f64>() + 1e-20;
            let dot: f64 = s.gu.iter().zip(&s.u).map(|(g, u)| g * (u / denom)).sum();
            s.gu.iter_mut().for_each(|g| *g = (*g - dot) / denom);
        }
        if self.on_logits {
            // through the softmax over the picked logits
            let dot: f64 = s.gu.iter().zip(&s.u).map(|(g, u)| g * u).sum();
            for ((&e, &u), &g) in picks.iter().zip(&s.u).zip(&s.gu) {
                s.gx[e] += u * (g - dot);
            }
        } else {
            for (&e, &g) in picks.iter().zip(&s.gu) {
                s.gs[e] += g;
            }
        }
        if let Some(g) = gsc {
            if self.normalise {
                let denom = s.s.iter().sum::<f64>() + 1e-20;
                let dot: f64 = g.iter().zip(&s.s).map(|(&g, v)| g as f64 * (v / denom)).sum();
                for (gs, &g) in s.gs.iter_mut().zip(g) {
                    *gs += (g as f64 - dot) / denom;
                }
            } else {
                for (gs, &g) in s.gs.iter_mut().zip(g) {
                    *gs += g as f64;
                }
            }
        }
        if need_scores {
            // through the score function
            match self.sf {
                ScoreFunction::Softmax | ScoreFunction::SoftmaxWithBias => {
                    let dot: f64 = s.gs.iter().zip(&s.s).map(|(g, v)| g * v).sum();
                    for ((gx, &g), &v) in s.gx.iter_mut().zip(&s.gs).zip(&s.s) {
                        *gx += v * (g - dot);
                    }
                }
                ScoreFunction::Sigmoid | ScoreFunction::SigmoidWithBias => {
                    // sigmoid'(x) = sigmoid(x) sigmoid(-x): accurate in both tails
                    for (((gx, &g), &v), &xe) in s.gx.iter_mut().zip(&s.gs).zip(&s.s).zip(x) {
                        *gx += g * (v * sigmoid(-(xe as f64)));
                    }
                }
                ScoreFunction::SqrtSoftplus => {
                    for (((gx, &g), &v), &xe) in s.gx.iter_mut().zip(&s.gs).zip(&s.s).zip(x) {
                        *gx += g * sqrt_softplus_derivative(xe as f64, v);
                    }
                }
            }
        }
        for (o, &g) in out.iter_mut().zip(&s.gx) {
            *o = g as f32;
        }
    }
}

/// The unbiased scores of one row in f64 (route's step 1 before its rounding to f32).
fn scores_f64(sf: ScoreFunction, x: &[f32], out: &mut Vec<f64>) {
    out.clear();
    match sf {
        ScoreFunction::Softmax | ScoreFunction::SoftmaxWithBias => {
            let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            out.extend(x.iter().map(|&v| exp(v as f64 - m)));
            let sum: f64 = out.iter().sum();
            out.iter_mut().for_each(|v| *v /= sum);
        }
        ScoreFunction::Sigmoid | ScoreFunction::SigmoidWithBias => out.extend(x.iter().map(|&v| sigmoid(v as f64))),
        ScoreFunction::SqrtSoftplus => out.extend(x.iter().map(|&v| softplus(v as f64).sqrt())),
    }
}

/// d sqrt(softplus(x)) / dx, given `s = sqrt(softplus(x))`: sigmoid(x) / (2 s), and 1 / (2 s)
/// above 20 where softplus is exactly x (torch's threshold, whose backward passes the gradient
/// through there). 0 where softplus underflows to 0 (x below about -745; the true value,
/// about e^(x/2) / 2, is far below the smallest f32 there).
fn sqrt_softplus_derivative(x: f64, s: f64) -> f64 {
    if s == 0.0 {
        0.0
    } else if x > 20.0 {
        0.5 / s
    } else {
        sigmoid(x) / (2.0 * s)
    }
}

/// Per-worker buffers of the selection pass.
struct Scratch {
    keys: Vec<f32>,
    picked: Vec<usize>,
    wide: Vec<f64>,
    vals: Vec<f32>,
    order: Vec<usize>,
    group_keys: Vec<f32>,
    group_picked: Vec<usize>,
    group_kept: Vec<bool>,
}

impl Scratch {
    fn new(num_experts: usize, k: usize, groups: usize) -> Scratch {
        Scratch {
            keys: vec![0.0; num_experts],
            picked: vec![0; k],
            wide: vec![0.0; k],
            vals: Vec::new(),
            order: Vec::new(),
            group_keys: vec![0.0; groups],
            group_picked: Vec::new(),
            group_kept: vec![false; groups],
        }
    }
}

/// Group-limited routing on `s.keys`: score each group, keep the best `topk_groups`, and mask
/// the experts of the others (0 for 'sigmoid' and 'softmax_with_bias', as the reference's
/// multiplication by the group mask gives; -inf for 'sigmoid_with_bias').
fn limit_groups(s: &mut Scratch, plan: &Plan, sf: ScoreFunction) {
    let size = plan.num_experts / plan.groups;
    for (g, gk) in s.group_keys.iter_mut().enumerate() {
        let group = &s.keys[g * size..(g + 1) * size];
        *gk = if plan.top2_group_score {
            let (mut first, mut second) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
            for &v in group {
                if v > first {
                    second = first;
                    first = v;
                } else if v > second {
                    second = v;
                }
            }
            first + second
        } else {
            group.iter().copied().fold(f32::NEG_INFINITY, f32::max)
        };
    }
    s.group_picked.resize(plan.topk_groups, 0);
    top_k(&s.group_keys, &mut s.group_picked, &mut s.vals, &mut s.order);
    s.group_kept.fill(false);
    for &g in &s.group_picked {
        s.group_kept[g] = true;
    }
    let masked = if sf == ScoreFunction::SigmoidWithBias { f32::NEG_INFINITY } else { 0.0 };
    for (g, &kept) in s.group_kept.iter().enumerate() {
        if !kept {
            s.keys[g * size..(g + 1) * size].fill(masked);
        }
    }
}

/// Keys as the top-k compares them: -0 equals +0, NaN (which validated inputs never produce)
/// ranks below everything.
#[inline(always)]
fn canon(v: f32) -> f32 {
    if v.is_nan() {
        f32::NEG_INFINITY
    } else if v == 0.0 {
        0.0
    } else {
        v
    }
}

/// Up to this k, the top-k keeps a sorted buffer (O(E k) at worst, O(E) typically); above it,
/// a partial selection (`select_nth_unstable`) and a sort of the k picked.
const INSERTION_MAX_K: usize = 16;

/// Writes the indices of the `out.len()` largest `keys` into `out`, best first, ties to the
/// lower index. `vals` and `order` are scratch.
pub(crate) fn top_k(keys: &[f32], out: &mut [usize], vals: &mut Vec<f32>, order: &mut Vec<usize>) {
    let k = out.len();
    debug_assert!(k <= keys.len());
    if k == 0 {
        return;
    }
    if k <= INSERTION_MAX_K {
        vals.clear();
        vals.resize(k, f32::NEG_INFINITY);
        let mut n = 0;
        for (e, &raw) in keys.iter().enumerate() {
            let v = canon(raw);
            if n == k {
                // Strictly better than the current k-th, or it stays out (a tie keeps the lower id).
                if v <= vals[k - 1] {
                    continue;
                }
                n = k - 1;
            }
            let mut j = n;
            while j > 0 && v > vals[j - 1] {
                vals[j] = vals[j - 1];
                out[j] = out[j - 1];
                j -= 1;
            }
            vals[j] = v;
            out[j] = e;
            n += 1;
        }
    } else {
        let before = |a: &usize, b: &usize| canon(keys[*b]).total_cmp(&canon(keys[*a])).then(a.cmp(b));
        order.clear();
        order.extend(0..keys.len());
        if k < order.len() {
            order.select_nth_unstable_by(k - 1, before);
        }
        order[..k].sort_unstable_by(before);
        out.copy_from_slice(&order[..k]);
    }
}

/// Output of [`topk`].
#[derive(Debug, Clone, PartialEq)]
pub struct TopK {
    /// `[T, k]` f32: the k largest values of each row, largest first.
    pub values: Tensor,
    /// `[T, k]` int32: their column ids (ties to the lower id).
    pub indices: Tensor,
}

/// topk's checks but its values' (no NaN, checked last): `(numTokens, numExperts)`.
pub fn check_topk(values: Meta, k: usize) -> Result<(usize, usize)> {
    let dims = values.expect_rank(2, "[numTokens, numExperts]")?;
    let (num_tokens, num_experts) = (dims[0], dims[1]);
    values.expect_dtype(&[DType::F32])?;
    if k == 0 || k > num_experts {
        return Err(Error::range("k", format!("expected 1 <= k <= numExperts = {num_experts}, got {k}")));
    }
    Ok((num_tokens, num_experts))
}

/// The `k` largest entries of every row of `values [T, E]` (e.g. router probs), in the same
/// order as [`route`]'s selection: descending, ties to the lower column, -0 equal to +0.
/// NaN is refused (a RangeError naming the position) since its rank would be arbitrary.
pub fn topk(values: &TensorRef, k: usize) -> Result<TopK> {
    let (num_tokens, num_experts) = check_topk(values.meta(), k)?;
    let v = values.typed::<f32>()?;
    if let Some(i) = v.iter().position(|x| x.is_nan()) {
        return Err(Error::range("values", format!("element [{}][{}] is NaN", i / num_experts, i % num_experts)));
    }
    let mut out_values = try_vec(0f32, num_tokens * k, "k")?;
    let mut out_indices = try_vec(0i32, num_tokens * k, "k")?;
    let (mut picked, mut vals, mut order) = (try_vec(0usize, k, "k")?, Vec::new(), Vec::new());
    for t in 0..num_tokens {
        let row = &v[t * num_experts..(t + 1) * num_experts];
        top_k(row, &mut picked, &mut vals, &mut order);
        for (j, &e) in picked.iter().enumerate() {
            out_values[t * k + j] = row[e];
            out_indices[t * k + j] = e as i32;
        }
    }
    Ok(TopK { values: Tensor::f32(vec![num_tokens, k], out_values), indices: Tensor::i32(vec![num_tokens, k], out_indices) })
}

/// softmax of one row, in f64, rounded to f32.
fn softmax_into(row: &[f32], tmp: &mut Vec<f64>, out: &mut [f32]) {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    tmp.clear();
    tmp.extend(row.iter().map(|&v| exp(v as f64 - m)));
    let sum: f64 = tmp.iter().sum();
    for (o, &e) in out.iter_mut().zip(tmp.iter()) {
        *o = (e / sum) as f32;
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + exp(-x))
}

/// log(1 + e^x); like torch (threshold 20), exactly x above 20.
fn softplus(x: f64) -> f64 {
    if x > 20.0 {
        x
    } else {
        x.max(0.0) + ln_1p(exp(-x.abs()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    fn f32s(t: &Tensor) -> &[f32] {
        t.data.as_f32().expect("f32 data")
    }
    fn i32s(t: &Tensor) -> &[i32] {
        t.data.as_i32().expect("int32 data")
    }

    fn run(logits: &[f32], shape: [usize; 2], bias: Option<&[f32]>, mask: Option<&[u8]>, o: RouteOptions) -> Result<Routed> {
        let l = TensorRef::of("logits", shape.to_vec(), logits).unwrap();
        let b = bias.map(|b| TensorRef::of("expertBias", vec![b.len()], b).unwrap());
        let m = mask.map(|m| TensorRef::new("tokenMask", DType::Bool, vec![m.len()], m).unwrap());
        route(&l, b.as_ref(), m.as_ref(), o)
    }

    fn softmax64(row: &[f64]) -> Vec<f64> {
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = row.iter().map(|v| (v - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|v| v / s).collect()
    }

    #[test]
    fn softmax_on_logits_weights_are_a_softmax_of_the_picks() {
        let logits = [1.0f32, 3.0, 2.0, -1.0, 0.5, 0.5, 0.5, 0.0];
        let out = run(&logits, [2, 4], None, None, RouteOptions::new(2)).unwrap();
        // Row 0: 3.0 (e1) then 2.0 (e2). Row 1: a three-way tie at 0.5 keeps the lowest ids.
        assert_eq!(i32s(&out.indices), &[1, 2, 0, 1]);
        let w = f32s(&out.weights);
        let want = softmax64(&[3.0, 2.0]);
        assert_eq!(w[0], want[0] as f32);
        assert_eq!(w[1], want[1] as f32);
        assert_eq!(&w[2..], &[0.5, 0.5]);
        let s = f32s(&out.scores);
        let full = softmax64(&[1.0, 3.0, 2.0, -1.0]);
        for e in 0..4 {
            assert_eq!(s[e], full[e] as f32);
        }
        assert_eq!(i32s(&out.tokens_per_expert), &[1, 2, 1, 0]);
    }

    #[test]
    fn norm_and_scale_apply_only_for_k_above_one() {
        let logits = [0.0f32, 1.0, -1.0, 2.0];
        let mut o = RouteOptions::new(1);
        o.score_function = ScoreFunction::Sigmoid;
        o.norm_topk_prob = true;
        o.route_scale = 2.0;
        let out = run(&logits, [1, 4], None, None, o).unwrap();
        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
        assert_eq!(i32s(&out.indices), &[3]);
        assert_eq!(f32s(&out.weights)[0], ((sig(2.0) as f32) as f64 * 2.0) as f32);
        assert_eq!(f32s(&out.scores)[1], sig(1.0) as f32, "k = 1: scores stay unnormalised");

        o.topk = 2;
        let out = run(&logits, [1, 4], None, None, o).unwrap();
        let w = f32s(&out.weights);
        assert_eq!(i32s(&out.indices), &[3, 1]);
        assert!(((w[0] + w[1]) as f64 - 2.0).abs() < 1e-6);
        let s = f32s(&out.scores);
        assert!((s.iter().map(|&v| v as f64).sum::<f64>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn bias_steers_selection_but_not_weights() {
        let logits = [2.0f32, 1.0, 0.0, -1.0];
        let bias = [0.0f32, 0.0, 0.0, 10.0];
        let mut o = RouteOptions::new(1);
        o.score_function = ScoreFunction::SqrtSoftplus;
        let out = run(&logits, [1, 4], Some(&bias), None, o).unwrap();
        assert_eq!(i32s(&out.indices), &[3]);
        let want = ((-1.0f64).exp().ln_1p()).sqrt() as f32;
        assert_eq!(f32s(&out.weights)[0], want);
    }

    #[test]
    fn groups_mask_by_zero_or_minus_infinity() {
        // 4 experts in 2 groups; keep 1 group, pick 2 experts. Group 0 wins on its top-2 sum
        // (bias makes expert 1 negative), so with mask-by-zero a dropped expert (score 0) beats
        // expert 1; with -inf the pick stays inside group 0.
        let logits = [3.0f32, 0.0, -3.0, -3.0];
        let bias = [5.0f32, -0.9, 0.0, 0.0];
        let mut o = RouteOptions::new(2);
        o.num_groups = 2;
        o.topk_groups = Some(1);
        o.score_function = ScoreFunction::Sigmoid;
        let out = run(&logits, [1, 4], Some(&bias), None, o).unwrap();
        assert_eq!(i32s(&out.indices), &[0, 2]);
        o.score_function = ScoreFunction::SigmoidWithBias;
        let out = run(&logits, [1, 4], Some(&bias), None, o).unwrap();
        assert_eq!(i32s(&out.indices), &[0, 1]);
        // Without bias, 'sigmoid' scores a group by its max: group 1's max is lower.
        o.score_function = ScoreFunction::Sigmoid;
        let out = run(&logits, [1, 4], None, None, o).unwrap();
        assert_eq!(i32s(&out.indices), &[0, 1]);
    }

    #[test]
    fn masked_tokens_get_minus_one_and_zero() {
        let logits = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let out = run(&logits, [3, 2], None, Some(&[1, 0, 1]), RouteOptions::new(1)).unwrap();
        assert_eq!(i32s(&out.indices), &[1, -1, 1]);
        assert_eq!(f32s(&out.weights), &[1.0, 0.0, 1.0]);
        assert_eq!(i32s(&out.tokens_per_expert), &[0, 2]);
        // Scores are still computed for the masked token.
        assert!(f32s(&out.scores)[3] > 0.5);
    }

    #[test]
    fn top_k_paths_agree_and_order_ties_by_id() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..300 {
            let n = 1 + (next() % 70) as usize;
            // Few distinct values so that ties are common; signed zeros included.
            let keys: Vec<f32> = (0..n).map(|_| [-1.0, -0.0, 0.0, 0.5, 2.0, f32::NEG_INFINITY][(next() % 6) as usize]).collect();
            let k = 1 + (next() % n as u64) as usize;
            let mut want: Vec<usize> = (0..n).collect();
            want.sort_by(|&a, &b| canon(keys[b]).partial_cmp(&canon(keys[a])).unwrap().then(a.cmp(&b)));
            want.truncate(k);
            let (mut vals, mut order) = (Vec::new(), Vec::new());
            let mut got = vec![0; k];
            top_k(&keys, &mut got, &mut vals, &mut order);
            assert_eq!(got, want, "round {round}: {keys:?} k={k}");
            if k <= INSERTION_MAX_K {
                // Force the selection path too.
                let before = |a: &usize, b: &usize| canon(keys[*b]).total_cmp(&canon(keys[*a])).then(a.cmp(b));
                let mut o: Vec<usize> = (0..n).collect();
                if k < n {
                    o.select_nth_unstable_by(k - 1, before);
                }
                o[..k].sort_unstable_by(before);
                assert_eq!(&o[..k], &want[..]);
            }
        }
    }

    #[test]
    fn large_k_uses_the_selection_path() {
        let logits: Vec<f32> = (0..40).map(|i| ((i * 7) % 40) as f32).collect();
        let out = run(&logits, [1, 40], None, None, RouteOptions::new(20)).unwrap();
        let idx = i32s(&out.indices);
        let vals: Vec<f32> = idx.iter().map(|&e| logits[e as usize]).collect();
        assert!(vals.windows(2).all(|w| w[0] > w[1]));
        assert_eq!(vals[0], 39.0);
        assert_eq!(vals[19], 20.0);
    }

    #[test]
    fn validation_names_the_option() {
        let logits = [0f32; 8];
        let cases: Vec<(RouteOptions, Option<&[f32]>, &str, ErrorKind)> = vec![
            (RouteOptions::new(0), None, "topk:", ErrorKind::RangeError),
            (RouteOptions::new(5), None, "topk:", ErrorKind::RangeError),
            (
                RouteOptions { num_groups: 3, score_function: ScoreFunction::Sigmoid, ..RouteOptions::new(1) },
                None,
                "numGroups:",
                ErrorKind::RangeError,
            ),
            (RouteOptions { num_groups: 2, ..RouteOptions::new(1) }, None, "numGroups:", ErrorKind::TypeError),
            (
                RouteOptions { num_groups: 4, score_function: ScoreFunction::SigmoidWithBias, ..RouteOptions::new(1) },
                None,
                "numGroups:",
                ErrorKind::RangeError,
            ),
            (
                RouteOptions { num_groups: 2, topk_groups: Some(3), score_function: ScoreFunction::Sigmoid, ..RouteOptions::new(1) },
                None,
                "topkGroups:",
                ErrorKind::RangeError,
            ),
            (
                RouteOptions { num_groups: 2, topk_groups: Some(1), score_function: ScoreFunction::Sigmoid, ..RouteOptions::new(3) },
                None,
                "topk:",
                ErrorKind::RangeError,
            ),
            (RouteOptions { route_scale: f64::NAN, ..RouteOptions::new(1) }, None, "routeScale:", ErrorKind::RangeError),
            (
                RouteOptions { softmax_before_topk: true, score_function: ScoreFunction::Sigmoid, ..RouteOptions::new(1) },
                None,
                "softmaxBeforeTopk:",
                ErrorKind::TypeError,
            ),
            (RouteOptions::new(1), Some(&[0.0; 4]), "expertBias:", ErrorKind::TypeError),
            (
                RouteOptions { score_function: ScoreFunction::Sigmoid, ..RouteOptions::new(1) },
                Some(&[0.0; 3]),
                "expertBias.shape:",
                ErrorKind::RangeError,
            ),
            (
                RouteOptions { score_function: ScoreFunction::Sigmoid, ..RouteOptions::new(1) },
                Some(&[0.0, f32::NAN, 0.0, 0.0]),
                "expertBias:",
                ErrorKind::RangeError,
            ),
        ];
        for (o, bias, prefix, kind) in cases {
            let err = run(&logits, [2, 4], bias, None, o).unwrap_err();
            assert!(err.to_string().starts_with(prefix), "{o:?}: {err}");
            assert_eq!(err.kind(), kind, "{err}");
        }
        let err = run(&[0.0, f32::INFINITY], [1, 2], None, None, RouteOptions::new(1)).unwrap_err();
        assert!(err.to_string().starts_with("logits: logits[0][1] = inf"), "{err}");
        let err = ScoreFunction::parse("relu").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TypeError);
        assert!(err.to_string().contains("'sqrtsoftplus'"));
        let err = run(&logits, [2, 4], None, Some(&[1]), RouteOptions::new(1)).unwrap_err();
        assert!(err.to_string().starts_with("tokenMask.shape:"), "{err}");
        let err = RouteOptions::from_args(1.5, None, None, None, None, None, None).unwrap_err();
        assert!(err.to_string().starts_with("topk:"), "{err}");
    }

    #[test]
    fn empty_token_dimension() {
        let out = run(&[], [0, 4], None, None, RouteOptions::new(2)).unwrap();
        assert_eq!(out.indices.shape, vec![0, 2]);
        assert_eq!(out.scores.shape, vec![0, 4]);
        assert_eq!(i32s(&out.tokens_per_expert), &[0, 0, 0, 0]);
    }

    #[test]
    fn topk_orders_descending_with_ties_to_the_lower_id() {
        let v: Vec<f32> = vec![0.1, 0.5, 0.5, -0.0, 0.0, 0.2];
        let t = TensorRef::of("values", vec![2, 3], &v).unwrap();
        let out = topk(&t, 2).unwrap();
        assert_eq!(i32s(&out.indices), &[1, 2, 2, 0]);
        assert_eq!(f32s(&out.values), &[0.5, 0.5, 0.2, -0.0]);
        assert!(topk(&t, 4).unwrap_err().to_string().starts_with("k: expected 1 <= k <= numExperts = 3"));
        let nan = vec![0.0, f32::NAN, 1.0];
        let err = topk(&TensorRef::of("values", vec![1, 3], &nan).unwrap(), 1).unwrap_err();
        assert_eq!(err.to_string(), "values: element [0][1] is NaN");
    }
}

#[cfg(test)]
mod backward_tests {
    use super::*;
    use crate::ErrorKind;

    /// xorshift64*, uniform in [0, 1).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
        }
        fn vec(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f32> {
            (0..n).map(|_| (lo + (hi - lo) * self.next()) as f32).collect()
        }
    }

    struct Problem {
        t: usize,
        e: usize,
        logits: Vec<f32>,
        bias: Option<Vec<f32>>,
        mask: Option<Vec<u8>>,
        options: RouteOptions,
    }

    impl Problem {
        fn route(&self) -> Routed {
            let l = TensorRef::of("logits", vec![self.t, self.e], &self.logits).unwrap();
            let b = self.bias.as_ref().map(|b| TensorRef::of("expertBias", vec![self.e], b).unwrap());
            let m = self.mask.as_ref().map(|m| TensorRef::new("tokenMask", DType::Bool, vec![self.t], m).unwrap());
            route(&l, b.as_ref(), m.as_ref(), self.options).unwrap()
        }

        fn backward(&self, gw: &[f32], indices: &[i32], gsc: Option<&[f32]>) -> Result<Vec<f32>> {
            let k = self.options.topk;
            let l = TensorRef::of("logits", vec![self.t, self.e], &self.logits).unwrap();
            let g = TensorRef::of("gradWeights", vec![self.t, k], gw).unwrap();
            let i = TensorRef::of("indices", vec![self.t, k], indices).unwrap();
            let gs = gsc.map(|g| TensorRef::of("gradScores", vec![self.t, self.e], g).unwrap());
            let b = self.bias.as_ref().map(|b| TensorRef::of("expertBias", vec![self.e], b).unwrap());
            let m = self.mask.as_ref().map(|m| TensorRef::new("tokenMask", DType::Bool, vec![self.t], m).unwrap());
            let out = route_backward(&g, &l, &i, gs.as_ref(), b.as_ref(), m.as_ref(), self.options)?;
            assert_eq!(out.shape, vec![self.t, self.e]);
            Ok(out.data.as_f32().unwrap().to_vec())
        }
    }

    /// route's weights (at fixed picks) and scores of one token, in f64 with std's exp: the
    /// function the gradient is checked against. Returns sum_j gw_j w_j + sum_e gsc_e s_e.
    fn loss64(x: &[f64], picks: &[usize], gw: &[f64], gsc: Option<&[f64]>, o: &RouteOptions) -> f64 {
        let sigmoid = |v: f64| 1.0 / (1.0 + (-v).exp());
        let softmax = |row: &[f64]| {
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = row.iter().map(|v| (v - m).exp()).collect();
            let sum: f64 = e.iter().sum();
            e.into_iter().map(|v| v / sum).collect::<Vec<f64>>()
        };
        let s: Vec<f64> = match o.score_function {
            ScoreFunction::Softmax | ScoreFunction::SoftmaxWithBias => softmax(x),
            ScoreFunction::Sigmoid | ScoreFunction::SigmoidWithBias => x.iter().map(|&v| sigmoid(v)).collect(),
            ScoreFunction::SqrtSoftplus => x.iter().map(|&v| if v > 20.0 { v.sqrt() } else { v.exp().ln_1p().sqrt() }).collect(),
        };
        let mut w: Vec<f64> = if o.score_function == ScoreFunction::Softmax && !o.softmax_before_topk {
            softmax(&picks.iter().map(|&e| x[e]).collect::<Vec<_>>())
        } else {
            picks.iter().map(|&e| s[e]).collect()
        };
        let normalise = o.norm_topk_prob && picks.len() > 1;
        let mut sc = s.clone();
        if normalise {
            let d = w.iter().sum::<f64>() + 1e-20;
            w.iter_mut().for_each(|v| *v /= d);
            let d = s.iter().sum::<f64>() + 1e-20;
            sc.iter_mut().for_each(|v| *v /= d);
        }
        let mut loss: f64 = w.iter().zip(gw).map(|(w, g)| w * o.route_scale * g).sum();
        if let Some(g) = gsc {
            loss += sc.iter().zip(g).map(|(s, g)| s * g).sum::<f64>();
        }
        loss
    }

    /// Checks route_backward on `p` (picks from route) against central differences of [`loss64`].
    fn check(p: &Problem, rng: &mut Rng, with_scores: bool, what: &str) {
        let (t, e, k) = (p.t, p.e, p.options.topk);
        let routed = p.route();
        let idx = routed.indices.data.as_i32().unwrap().to_vec();
        let gw = rng.vec(t * k, -1.0, 1.0);
        let gsc = with_scores.then(|| rng.vec(t * e, -1.0, 1.0));
        let got = p.backward(&gw, &idx, gsc.as_deref()).unwrap();
        for tok in 0..t {
            let row = &got[tok * e..(tok + 1) * e];
            if idx[tok * k] < 0 {
                assert!(row.iter().all(|&v| v.to_bits() == 0), "{what}: masked token {tok} has a gradient {row:?}");
                continue;
            }
            let picks: Vec<usize> = idx[tok * k..(tok + 1) * k].iter().map(|&v| v as usize).collect();
            let gw64: Vec<f64> = gw[tok * k..(tok + 1) * k].iter().map(|&v| v as f64).collect();
            let gsc64: Option<Vec<f64>> = gsc.as_ref().map(|g| g[tok * e..(tok + 1) * e].iter().map(|&v| v as f64).collect());
            let mut x: Vec<f64> = p.logits[tok * e..(tok + 1) * e].iter().map(|&v| v as f64).collect();
            let mut want = vec![0.0; e];
            for i in 0..e {
                let x0 = x[i];
                let h = 1e-5 * x0.abs().max(1.0);
                x[i] = x0 + h;
                let up = loss64(&x, &picks, &gw64, gsc64.as_deref(), &p.options);
                x[i] = x0 - h;
                let down = loss64(&x, &picks, &gw64, gsc64.as_deref(), &p.options);
                x[i] = x0;
                want[i] = (up - down) / (2.0 * h);
            }
            let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            for i in 0..e {
                let err = (row[i] as f64 - want[i]).abs();
                assert!(
                    err <= 1e-6 * want[i].abs() + 1e-7 * scale + 1e-12,
                    "{what}: token {tok} expert {i}: {} vs finite differences {} (picks {picks:?})",
                    row[i],
                    want[i]
                );
            }
        }
    }

    #[test]
    fn matches_finite_differences_for_every_score_function_and_option() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut cases = 0;
        for sf in ScoreFunction::ALL {
            for sbt in [false, true] {
                if sbt && sf != ScoreFunction::Softmax {
                    continue;
                }
                for norm in [false, true] {
                    for scale in [1.0, 2.5, -0.75] {
                        for with_scores in [false, true] {
                            for k in [1, 3, 8] {
                                let (t, e) = (6, 8);
                                let options = RouteOptions {
                                    score_function: sf,
                                    softmax_before_topk: sbt,
                                    norm_topk_prob: norm,
                                    route_scale: scale,
                                    ..RouteOptions::new(k)
                                };
                                let mask = (k == 3).then(|| vec![1, 0, 1, 1, 0, 1]);
                                let p = Problem { t, e, logits: rng.vec(t * e, -4.0, 4.0), bias: None, mask, options };
                                check(
                                    &p,
                                    &mut rng,
                                    with_scores,
                                    &format!("{} sbt={sbt} norm={norm} scale={scale} scores={with_scores} k={k}", sf.name()),
                                );
                                cases += 1;
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(cases, 6 * 2 * 3 * 2 * 3);
    }

    #[test]
    fn matches_finite_differences_with_groups_and_bias() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        for sf in [ScoreFunction::Sigmoid, ScoreFunction::SoftmaxWithBias, ScoreFunction::SigmoidWithBias, ScoreFunction::SqrtSoftplus] {
            for norm in [false, true] {
                for with_scores in [false, true] {
                    let (t, e) = (8, 16);
                    let grouped = sf != ScoreFunction::SqrtSoftplus;
                    let options = RouteOptions {
                        score_function: sf,
                        num_groups: if grouped { 4 } else { 1 },
                        topk_groups: grouped.then_some(2),
                        norm_topk_prob: norm,
                        route_scale: 2.5,
                        ..RouteOptions::new(4)
                    };
                    let p = Problem {
                        t,
                        e,
                        logits: rng.vec(t * e, -3.0, 3.0),
                        bias: Some(rng.vec(e, -0.5, 0.5)),
                        mask: Some(vec![1, 1, 0, 1, 1, 1, 0, 1]),
                        options,
                    };
                    check(&p, &mut rng, with_scores, &format!("{} groups bias norm={norm} scores={with_scores}", sf.name()));
                }
            }
        }
    }

    #[test]
    fn sixteen_bit_logits_give_the_results_of_their_f32_conversion() {
        let mut rng = Rng(77);
        let (t, e, k) = (5, 8, 3);
        let wide = rng.vec(t * e, -6.0, 6.0);
        for dtype in [DType::BF16, DType::F16] {
            let bits: Vec<u16> =
                wide.iter().map(|&v| if dtype == DType::BF16 { bf16::from_f32(v).to_bits() } else { f16::from_f32(v).to_bits() }).collect();
            let as_f32: Vec<f32> =
                bits.iter().map(|&b| if dtype == DType::BF16 { bf16::from_bits(b).to_f32() } else { f16::from_bits(b).to_f32() }).collect();
            let half = TensorRef::new("logits", dtype, vec![t, e], bytemuck::cast_slice(&bits)).unwrap();
            let full = TensorRef::of("logits", vec![t, e], &as_f32).unwrap();
            for sf in ScoreFunction::ALL {
                let o = RouteOptions { score_function: sf, norm_topk_prob: true, ..RouteOptions::new(k) };
                let a = route(&half, None, None, o).unwrap();
                let b = route(&full, None, None, o).unwrap();
                assert_eq!(a, b, "{dtype:?} {}", sf.name());
                let gw = rng.vec(t * k, -1.0, 1.0);
                let gs = rng.vec(t * e, -1.0, 1.0);
                let g = TensorRef::of("gradWeights", vec![t, k], &gw).unwrap();
                let gsr = TensorRef::of("gradScores", vec![t, e], &gs).unwrap();
                let idx = TensorRef::of("indices", vec![t, k], b.indices.data.as_i32().unwrap()).unwrap();
                let ga = route_backward(&g, &half, &idx, Some(&gsr), None, None, o).unwrap();
                let gb = route_backward(&g, &full, &idx, Some(&gsr), None, None, o).unwrap();
                assert_eq!(ga, gb, "{dtype:?} {}", sf.name());
            }
        }
        // a 16-bit infinity is reported like an f32 one
        let bits = [0u16, 0x7f80, 0, 0];
        let l = TensorRef::new("logits", DType::BF16, vec![1, 4], bytemuck::cast_slice(&bits)).unwrap();
        let err = route(&l, None, None, RouteOptions::new(1)).unwrap_err();
        assert!(err.to_string().starts_with("logits: logits[0][1] = inf"), "{err}");
        let l = TensorRef::of("logits", vec![1, 2], &[1i32, 2]).unwrap();
        let err = route(&l, None, None, RouteOptions::new(1)).unwrap_err();
        assert_eq!(err.to_string(), "logits.dtype: expected float32, bfloat16 or float16, got int32");
    }

    #[test]
    fn masked_rows_and_rows_of_minus_one_get_zero() {
        let p = Problem {
            t: 3,
            e: 4,
            logits: vec![1.0, 2.0, 3.0, 4.0, 0.5, -0.5, 1.5, 2.0, 0.0, 0.1, 0.2, 0.3],
            bias: None,
            mask: Some(vec![1, 0, 1]),
            options: RouteOptions { score_function: ScoreFunction::Sigmoid, ..RouteOptions::new(2) },
        };
        let gsc = [1.0f32; 12];
        // the mask wins over whatever the indices say there; a row of -1s without a mask is masked too
        let got = p.backward(&[1.0; 6], &[3, 2, 0, 1, -1, -1], Some(&gsc)).unwrap();
        assert!(got[4..].iter().all(|&v| v == 0.0), "{got:?}");
        assert!(got[..4].iter().all(|&v| v > 0.0), "{got:?}");
        let unmasked = Problem { mask: None, ..p };
        let got = unmasked.backward(&[1.0; 6], &[3, 2, 0, 1, -1, -1], None).unwrap();
        assert!(got[8..].iter().all(|&v| v == 0.0) && got[4] > 0.0, "{got:?}");
    }

    #[test]
    fn extreme_logits_give_finite_gradients() {
        for sf in ScoreFunction::ALL {
            let logits = vec![-800.0f32, -100.0, -30.0, 0.0, 19.5, 20.5, 100.0, 800.0];
            let o = RouteOptions { score_function: sf, norm_topk_prob: true, ..RouteOptions::new(4) };
            let p = Problem { t: 1, e: 8, logits, bias: None, mask: None, options: o };
            let idx = p.route().indices.data.as_i32().unwrap().to_vec();
            let got = p.backward(&[1.0, -1.0, 0.5, 2.0], &idx, Some(&[0.25; 8])).unwrap();
            assert!(got.iter().all(|v| v.is_finite()), "{}: {got:?}", sf.name());
        }
        // sigmoid'(x) in the tails, not 0 from 1 - sigmoid(x)
        let o = RouteOptions { score_function: ScoreFunction::Sigmoid, ..RouteOptions::new(1) };
        let p = Problem { t: 1, e: 2, logits: vec![40.0, -40.0], bias: None, mask: None, options: o };
        let got = p.backward(&[1.0], &[0], Some(&[0.0, 1.0])).unwrap();
        let want = (-40.0f64).exp() as f32;
        assert!((got[0] / want - 1.0).abs() < 1e-6 && (got[1] / want - 1.0).abs() < 1e-6, "{got:?} vs {want}");
    }

    #[test]
    fn errors_name_the_argument() {
        let p = Problem {
            t: 2,
            e: 4,
            logits: vec![0.0, 1.0, 2.0, 3.0, 3.0, 2.0, 1.0, 0.0],
            bias: None,
            mask: None,
            options: RouteOptions::new(2),
        };
        let cases: Vec<(&[i32], &str, ErrorKind)> = vec![
            (&[3, 2, 0, 0], "indices: indices[1][1] = 0 repeats indices[1][0]", ErrorKind::RangeError),
            (&[3, 4, 0, 1], "indices: indices[0][1] = 4 is out of range", ErrorKind::RangeError),
            (&[3, 2, -2, 1], "indices: indices[1][0] = -2 is out of range", ErrorKind::RangeError),
            (&[3, -1, 0, 1], "indices: indices[0][1] = -1 in a row of picks", ErrorKind::RangeError),
        ];
        for (idx, prefix, kind) in cases {
            let err = p.backward(&[1.0; 4], idx, None).unwrap_err();
            assert!(err.to_string().starts_with(prefix), "{err}");
            assert_eq!(err.kind(), kind);
        }
        // route's own option checks, with route's messages
        let bad = Problem { options: RouteOptions { num_groups: 2, ..RouteOptions::new(2) }, ..p };
        let err = bad.backward(&[1.0; 4], &[3, 2, 0, 1], None).unwrap_err();
        let l = TensorRef::of("logits", vec![2, 4], &bad.logits).unwrap();
        assert_eq!(err, route(&l, None, None, bad.options).unwrap_err());
        let p = Problem { options: RouteOptions::new(2), ..bad };
        // shapes and dtypes
        let l = TensorRef::of("logits", vec![2, 4], &p.logits).unwrap();
        let gw = [1.0f32; 4];
        let g = TensorRef::of("gradWeights", vec![2, 2], &gw).unwrap();
        let i = TensorRef::of("indices", vec![2, 2], &[3i32, 2, 0, 1]).unwrap();
        let short = TensorRef::of("indices", vec![2, 1], &[3i32, 0]).unwrap();
        let err = route_backward(&g, &l, &short, None, None, None, p.options).unwrap_err();
        assert!(err.to_string().starts_with("indices.shape: expected [2, 2]"), "{err}");
        let as_f32 = TensorRef::of("indices", vec![2, 2], &[3.0f32, 2.0, 0.0, 1.0]).unwrap();
        let err = route_backward(&g, &l, &as_f32, None, None, None, p.options).unwrap_err();
        assert_eq!(err.to_string(), "indices.dtype: expected int32 or int64, got float32");
        let i64s = TensorRef::of("indices", vec![2, 2], &[3i64, 2, 0, 1]).unwrap();
        assert_eq!(
            route_backward(&g, &l, &i64s, None, None, None, p.options).unwrap(),
            route_backward(&g, &l, &i, None, None, None, p.options).unwrap()
        );
        let g3 = TensorRef::of("gradWeights", vec![2, 2, 1], &gw).unwrap();
        let err = route_backward(&g3, &l, &i, None, None, None, p.options).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TypeError);
        assert!(err.to_string().starts_with("gradWeights.shape:"), "{err}");
        let gs = TensorRef::of("gradScores", vec![2, 3], &[0.0f32; 6]).unwrap();
        let err = route_backward(&g, &l, &i, Some(&gs), None, None, p.options).unwrap_err();
        assert!(err.to_string().starts_with("gradScores.shape: expected [2, 4]"), "{err}");
        let gwh = [0u16; 4];
        let g16 = TensorRef::new("gradWeights", DType::BF16, vec![2, 2], bytemuck::cast_slice(&gwh)).unwrap();
        let err = route_backward(&g16, &l, &i, None, None, None, p.options).unwrap_err();
        assert_eq!(err.to_string(), "gradWeights.dtype: expected float32, got bfloat16");
        // no tokens
        let l0 = TensorRef::of("logits", vec![0, 4], &[] as &[f32]).unwrap();
        let g0 = TensorRef::of("gradWeights", vec![0, 2], &[] as &[f32]).unwrap();
        let i0 = TensorRef::of("indices", vec![0, 2], &[] as &[i32]).unwrap();
        assert_eq!(route_backward(&g0, &l0, &i0, None, None, None, p.options).unwrap().shape, vec![0, 4]);
    }
}
