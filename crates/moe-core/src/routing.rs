//! Routing: from router logits `[T, E]` to each token's top-k experts and their weights, as
//! NeMo Automodel's `Gate._route_scores` computes them (score function, optional score-correction
//! bias used for selection only, group-limited top-k, normalisation, route scale).
//!
//! Scores are computed in f64 and rounded once to f32; selection then runs on f32 values exactly
//! as the reference's does (`score + bias` added in f32, groups masked as the reference masks
//! them). Our top-k order is part of our contract: descending selection score, ties to the lower
//! expert id.

use crate::detmath::{exp, ln_1p};
use crate::alloc::try_vec;
use crate::error::{opt_size_arg, size_arg, Error, Result};
use crate::par::for_each_row;
use crate::tensor::{DType, Tensor, TensorRef};

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
    pub const ALL: [ScoreFunction; 5] =
        [ScoreFunction::Softmax, ScoreFunction::Sigmoid, ScoreFunction::SoftmaxWithBias, ScoreFunction::SigmoidWithBias, ScoreFunction::SqrtSoftplus];

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

/// Routes every token: scores, top-k selection, weights. See `docs/semantics.md`.
pub fn route(logits: &TensorRef, expert_bias: Option<&TensorRef>, token_mask: Option<&TensorRef>, options: RouteOptions) -> Result<Routed> {
    let dims = logits.expect_rank(2, "[numTokens, numExperts]")?;
    let (num_tokens, num_experts) = (dims[0], dims[1]);
    logits.expect_dtype(&[DType::F32])?;
    if i32::try_from(num_experts).is_err() {
        return Err(Error::range("logits.shape[1]", format!("numExperts = {num_experts} does not fit in int32 indices")));
    }
    if expert_bias.is_some() && options.score_function == ScoreFunction::Softmax {
        return Err(Error::type_error(
            "expertBias",
            "no expertBias with scoreFunction 'softmax' (it selects on logits or softmax only; use 'softmax_with_bias')",
            "a tensor",
        ));
    }
    let plan = check_options(&options, num_experts, expert_bias.is_some())?;
    let bias = match expert_bias {
        Some(b) => {
            b.expect_dtype(&[DType::F32])?;
            b.expect_shape(&[num_experts], "([numExperts])")?;
            let v = b.typed::<f32>()?;
            if let Some(e) = first_non_finite(&v) {
                return Err(Error::range("expertBias", format!("expertBias[{e}] = {} is not finite", v[e])));
            }
            Some(v)
        }
        None => None,
    };
    let mask = match token_mask {
        Some(m) => {
            let bytes = m.mask()?;
            m.expect_shape(&[num_tokens], "([numTokens])")?;
            Some(bytes)
        }
        None => None,
    };
    let x = logits.typed::<f32>()?;
    if let Some(i) = first_non_finite(&x) {
        return Err(Error::range(
            "logits",
            format!("logits[{}][{}] = {} is not finite (router logits must be finite numbers)", i / num_experts, i % num_experts, x[i]),
        ));
    }
    route_checked(&x, num_tokens, &plan, &options, bias.as_deref(), mask)
}

fn route_checked(x: &[f32], num_tokens: usize, plan: &Plan, options: &RouteOptions, bias: Option<&[f32]>, mask: Option<&[u8]>) -> Result<Routed> {
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
    for_each_row(&mut picks, k, work, || Scratch::new(e_count, k, plan.groups), |s, t, out| {
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
    });

    // 3. Scores normalised per row when the weights are.
    if normalise {
        for_each_row(&mut scores, e_count, work, || (), |_, _, row| {
            let denom = row.iter().map(|&v| v as f64).sum::<f64>() + 1e-20;
            for v in row.iter_mut() {
                *v = (*v as f64 / denom) as f32;
            }
        });
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

/// The `k` largest entries of every row of `values [T, E]` (e.g. router probs), in the same
/// order as [`route`]'s selection: descending, ties to the lower column, -0 equal to +0.
/// NaN is refused (a RangeError naming the position) since its rank would be arbitrary.
pub fn topk(values: &TensorRef, k: usize) -> Result<TopK> {
    let dims = values.expect_rank(2, "[numTokens, numExperts]")?;
    let (num_tokens, num_experts) = (dims[0], dims[1]);
    let v = values.typed::<f32>()?;
    if k == 0 || k > num_experts {
        return Err(Error::range("k", format!("expected 1 <= k <= numExperts = {num_experts}, got {k}")));
    }
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
            (RouteOptions { num_groups: 3, score_function: ScoreFunction::Sigmoid, ..RouteOptions::new(1) }, None, "numGroups:", ErrorKind::RangeError),
            (RouteOptions { num_groups: 2, ..RouteOptions::new(1) }, None, "numGroups:", ErrorKind::TypeError),
            (RouteOptions { num_groups: 4, score_function: ScoreFunction::SigmoidWithBias, ..RouteOptions::new(1) }, None, "numGroups:", ErrorKind::RangeError),
            (RouteOptions { num_groups: 2, topk_groups: Some(3), score_function: ScoreFunction::Sigmoid, ..RouteOptions::new(1) }, None, "topkGroups:", ErrorKind::RangeError),
            (RouteOptions { num_groups: 2, topk_groups: Some(1), score_function: ScoreFunction::Sigmoid, ..RouteOptions::new(3) }, None, "topk:", ErrorKind::RangeError),
            (RouteOptions { route_scale: f64::NAN, ..RouteOptions::new(1) }, None, "routeScale:", ErrorKind::RangeError),
            (RouteOptions { softmax_before_topk: true, score_function: ScoreFunction::Sigmoid, ..RouteOptions::new(1) }, None, "softmaxBeforeTopk:", ErrorKind::TypeError),
            (RouteOptions::new(1), Some(&[0.0; 4]), "expertBias:", ErrorKind::TypeError),
            (RouteOptions { score_function: ScoreFunction::Sigmoid, ..RouteOptions::new(1) }, Some(&[0.0; 3]), "expertBias.shape:", ErrorKind::RangeError),
            (RouteOptions { score_function: ScoreFunction::Sigmoid, ..RouteOptions::new(1) }, Some(&[0.0, f32::NAN, 0.0, 0.0]), "expertBias:", ErrorKind::RangeError),
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
