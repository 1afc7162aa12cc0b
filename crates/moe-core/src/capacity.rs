//! Expert capacity: how many tokens an expert may take, dropping the tokens beyond it,
//! padding expert loads to a multiple, and counting tokens per expert.
//!
//! The reference is Megatron-Core's `get_capacity`, `apply_router_token_dropping` and
//! `pad_routing_map`. Where the reference leaves an order unspecified (`torch.topk` ties),
//! the order used here is written down next to the code and in `docs/semantics.md`.

use std::cmp::Ordering;

use crate::alloc::{try_vec, try_with_capacity};
use crate::error::{Error, Result};
use crate::tensor::{DType, Meta, Tensor, TensorRef};

/// Largest integer a JavaScript number holds exactly; sizes beyond it are refused.
const MAX_SAFE: f64 = 9_007_199_254_740_991.0;

/// `max(ceil(numTokens / numExperts * capacityFactor), minCapacity)`.
///
/// The arithmetic is the reference's, step by step in f64: one correctly rounded division,
/// one correctly rounded multiplication, then `ceil` (sizes up to 2^53 - 1 are exact in f64,
/// so this is what Python's `math.ceil((n / e) * f)` computes).
pub fn get_capacity(num_tokens: usize, num_experts: usize, capacity_factor: f64, min_capacity: Option<usize>) -> Result<usize> {
    if num_experts == 0 {
        return Err(Error::range("numExperts", "expected at least 1 (the capacity divides numTokens by it), got 0"));
    }
    check_capacity_factor(capacity_factor)?;
    let capacity = ((num_tokens as f64 / num_experts as f64) * capacity_factor).ceil();
    if capacity > MAX_SAFE {
        return Err(Error::range(
            "capacityFactor",
            format!(
                "{capacity_factor} gives a capacity of {capacity}, beyond 2^53 - 1 (numTokens = {num_tokens}, numExperts = {num_experts})"
            ),
        ));
    }
    // `capacity` is a non-negative integer (or -0) no larger than 2^53 - 1, so the cast is exact.
    let capacity = capacity as usize;
    Ok(min_capacity.map_or(capacity, |m| capacity.max(m)))
}

fn check_capacity_factor(capacity_factor: f64) -> Result<()> {
    if !capacity_factor.is_finite() || capacity_factor < 0.0 {
        return Err(Error::range("capacityFactor", format!("expected a finite non-negative number, got {capacity_factor}")));
    }
    Ok(())
}

/// How [`drop_tokens`] chooses the tokens an over-full expert keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DropPolicy {
    /// Keep the tokens with the highest probs (ties: lower token id first).
    #[default]
    Probs,
    /// Keep the first tokens routed to the expert, by token id.
    Position,
}

impl DropPolicy {
    /// Parses the JS option `dropPolicy` (`'probs'` when absent).
    pub fn parse(value: Option<&str>) -> Result<DropPolicy> {
        match value {
            None | Some("probs") => Ok(DropPolicy::Probs),
            Some("position") => Ok(DropPolicy::Position),
            Some(other) => Err(Error::type_error("dropPolicy", "'probs' or 'position'", format!("'{other}'"))),
        }
    }
}

/// Options of [`drop_tokens`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DropOptions {
    /// Experts per token; the capacity is computed for `numTokens * topk` routed entries.
    pub topk: usize,
    pub capacity_factor: f64,
    pub drop_policy: DropPolicy,
    /// The routing map becomes the capacity mask itself: every expert gets exactly `capacity`
    /// tokens (or all tokens when the capacity is larger), unselected ones padding it.
    pub pad_to_capacity: bool,
}

/// Output of [`drop_tokens`].
#[derive(Debug, Clone, PartialEq)]
pub struct Dropped {
    /// `[T, E]` bool: the routing map after dropping (and padding).
    pub routing_map: Tensor,
    /// `[T, E]` f32: `probs * routingMap` as the reference computes it: kept probs are
    /// copied, dropped ones become `p * 0` (`-0` for negative `p`, NaN for infinities).
    pub probs: Tensor,
    /// The capacity per expert that was applied.
    pub capacity: usize,
}

/// Descending order of probs with NaN above everything (as `torch.topk` ranks it) and
/// `-0 == +0`; equal probs fall back to ascending token id, so the order is total.
fn by_prob_desc(p: &[f32], num_experts: usize, e: usize) -> impl Fn(&usize, &usize) -> Ordering + '_ {
    move |&a, &b| {
        let (x, y) = (p[a * num_experts + e], p[b * num_experts + e]);
        let prob_order = match (x.is_nan(), y.is_nan()) {
            (true, true) => Ordering::Equal,
            (true, false) => Ordering::Less,
            (false, true) => Ordering::Greater,
            (false, false) => y.partial_cmp(&x).unwrap_or(Ordering::Equal),
        };
        prob_order.then(a.cmp(&b))
    }
}

/// [`drop_tokens`]'s arguments once checked: the map's size and the capacity it applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropCheck {
    pub num_tokens: usize,
    pub num_experts: usize,
    pub capacity: usize,
}

/// Every check of [`drop_tokens`], in its order (the routing map's 0/1 values on the host), and
/// the capacity it applies.
pub fn check_drop_tokens(probs: Meta, routing_map: Meta, options: &DropOptions) -> Result<DropCheck> {
    let (num_tokens, num_experts) = check_map(routing_map)?;
    probs.expect_dtype(&[DType::F32])?;
    probs.expect_shape(&[num_tokens, num_experts], "(the shape of routingMap)")?;
    if num_experts == 0 {
        return Err(Error::range("routingMap.shape[1]", "dropTokens needs at least one expert (the capacity divides by numExperts)"));
    }
    let routed = num_tokens
        .checked_mul(options.topk)
        .filter(|&n| n as f64 <= MAX_SAFE)
        .ok_or_else(|| Error::range("topk", format!("numTokens * topk = {num_tokens} * {} is beyond 2^53 - 1", options.topk)))?;
    let capacity = get_capacity(routed, num_experts, options.capacity_factor, None)?;
    Ok(DropCheck { num_tokens, num_experts, capacity })
}

/// A routing map `[numTokens, numExperts]` bool (0/1 on the host): `(numTokens, numExperts)`.
pub(crate) fn check_map(routing_map: Meta) -> Result<(usize, usize)> {
    let dims = routing_map.expect_rank(2, "[numTokens, numExperts]")?;
    routing_map.check_mask()?;
    Ok((dims[0], dims[1]))
}

/// Every check of [`pad_routing_map`]: `(numTokens, numExperts)`.
pub fn check_pad_routing_map(routing_map: Meta, pad_multiple: usize) -> Result<(usize, usize)> {
    let dims = check_map(routing_map)?;
    if pad_multiple == 0 {
        return Err(Error::range("padMultiple", "expected at least 1, got 0"));
    }
    Ok(dims)
}

/// Every check of [`tokens_per_expert`]: `(numTokens, numExperts)`.
pub fn check_tokens_per_expert(routing_map: Meta) -> Result<(usize, usize)> {
    let (num_tokens, num_experts) = check_map(routing_map)?;
    if i32::try_from(num_tokens).is_err() {
        return Err(Error::range("routingMap.shape[0]", format!("{num_tokens} tokens do not fit in int32 counts")));
    }
    Ok((num_tokens, num_experts))
}

/// Megatron-Core's `apply_router_token_dropping`: every expert keeps at most
/// `capacity = getCapacity(numTokens * topk, numExperts, capacityFactor)` tokens.
///
/// The capacity mask of expert `e` holds the first `capacity` tokens of an order over all
/// tokens: by prob, highest first, ties to the lower token id (`Probs`); or routed tokens
/// ascending, then unrouted tokens ascending (`Position`). When `capacity >= numTokens` the
/// mask holds every token. The output map is `routingMap AND mask`, or the mask itself with
/// `pad_to_capacity`; the output probs are `probs * map` (see [`times_zero`]).
pub fn drop_tokens(probs: &TensorRef, routing_map: &TensorRef, options: DropOptions) -> Result<Dropped> {
    let DropCheck { num_tokens, num_experts, capacity } = check_drop_tokens(probs.meta(), routing_map.meta(), &options)?;
    let map = routing_map.bytes();
    let p = probs.typed::<f32>()?;

    let mut mask = vec![0u8; num_tokens * num_experts];
    if capacity >= num_tokens {
        mask.fill(1);
    } else if capacity > 0 {
        let mut order: Vec<usize> = try_with_capacity(num_tokens, "probs.shape[0]")?;
        for e in 0..num_experts {
            order.clear();
            match options.drop_policy {
                DropPolicy::Position => {
                    order.extend((0..num_tokens).filter(|&t| map[t * num_experts + e] != 0));
                    order.extend((0..num_tokens).filter(|&t| map[t * num_experts + e] == 0));
                }
                DropPolicy::Probs => {
                    order.extend(0..num_tokens);
                    let cmp = by_prob_desc(&p, num_experts, e);
                    // Only the first `capacity` need to be found; the comparison is a total
                    // order (ids break ties), so the selected set is unique.
                    order.select_nth_unstable_by(capacity - 1, &cmp);
                }
            }
            for &t in &order[..capacity] {
                mask[t * num_experts + e] = 1;
            }
        }
    }
    let final_map: Vec<u8> =
        if options.pad_to_capacity { mask } else { map.iter().zip(&mask).map(|(&m, &c)| (m != 0 && c != 0) as u8).collect() };
    let final_probs = p.iter().zip(&final_map).map(|(&x, &m)| if m != 0 { x } else { times_zero(x) }).collect();
    Ok(Dropped {
        routing_map: Tensor::bool(vec![num_tokens, num_experts], final_map),
        probs: Tensor::f32(vec![num_tokens, num_experts], final_probs),
        capacity,
    })
}

/// `x * 0` as IEEE arithmetic defines it (`-0` for negative `x`, NaN for infinities, a NaN
/// stays itself), written out so that NaN bits do not depend on the platform (WebAssembly
/// leaves the sign and payload of a NaN produced by `*` unspecified).
fn times_zero(x: f32) -> f32 {
    if x.is_nan() {
        x
    } else if x.is_infinite() {
        f32::NAN
    } else {
        0f32.copysign(x)
    }
}

/// Megatron-Core's `pad_routing_map`: for each expert with `c` routed tokens, also route the
/// first `(-c) mod padMultiple` tokens (ascending id) that it did not select, so that every
/// column count becomes a multiple of `padMultiple`. An expert with fewer unselected tokens
/// than it needs gets all of them (its count is then `numTokens`, as in the reference).
pub fn pad_routing_map(routing_map: &TensorRef, pad_multiple: usize) -> Result<Tensor> {
    let (num_tokens, num_experts) = check_pad_routing_map(routing_map.meta(), pad_multiple)?;
    let map = routing_map.bytes();
    let mut out: Vec<u8> = map.iter().map(|&b| (b != 0) as u8).collect();
    let counts = column_counts(map, num_tokens, num_experts)?;
    for (e, &c) in counts.iter().enumerate() {
        let mut need = (pad_multiple - c % pad_multiple) % pad_multiple;
        let mut t = 0;
        while need > 0 && t < num_tokens {
            let cell = t * num_experts + e;
            if out[cell] == 0 {
                out[cell] = 1;
                need -= 1;
            }
            t += 1;
        }
    }
    Ok(Tensor::bool(vec![num_tokens, num_experts], out))
}

/// A RangeError when the counts cannot be allocated (a `[0, numExperts]` map holds no
/// elements whatever numExperts is).
fn column_counts(map: &[u8], num_tokens: usize, num_experts: usize) -> Result<Vec<usize>> {
    let mut counts = try_vec(0usize, num_experts, "routingMap.shape[1]")?;
    if num_experts > 0 {
        for row in map.chunks_exact(num_experts).take(num_tokens) {
            for (c, &b) in counts.iter_mut().zip(row) {
                *c += (b != 0) as usize;
            }
        }
    }
    Ok(counts)
}

/// Column sums of a routing map `[T, E]`: `[E]` int32.
pub fn tokens_per_expert(routing_map: &TensorRef) -> Result<Tensor> {
    let (num_tokens, num_experts) = check_tokens_per_expert(routing_map.meta())?;
    let map = routing_map.bytes();
    let counts = column_counts(map, num_tokens, num_experts)?;
    let mut out = try_with_capacity(num_experts, "routingMap.shape[1]")?;
    out.extend(counts.into_iter().map(|c| c as i32));
    Ok(Tensor::i32(vec![num_experts], out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::tensor::Data;

    fn map_ref(map: &[u8], t: usize, e: usize) -> TensorRef<'_> {
        TensorRef::new("routingMap", DType::Bool, vec![t, e], map).unwrap()
    }

    /// Found by the boundary fuzz (test/boundary-fuzz.test.ts): a `[0, 2^32 + 1]` map holds no
    /// elements, yet asked for 2^32 + 1 counts with an aborting allocation. Every per-expert or
    /// per-token buffer sized by an empty tensor's other dimension must be a RangeError.
    #[test]
    fn empty_maps_with_huge_dimensions_are_range_errors_not_aborts() {
        let huge = 1usize << 60;
        let empty: [u8; 0] = [];
        let wide = map_ref(&empty, 0, huge);
        let err = tokens_per_expert(&wide).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::RangeError);
        assert!(err.to_string().starts_with("routingMap.shape[1]:"), "{err}");
        assert_eq!(pad_routing_map(&wide, 2).unwrap_err().kind(), ErrorKind::RangeError);
        let tokens = TensorRef::new("tokens", DType::F32, vec![0, 4], &empty).unwrap();
        let err = crate::permute::permute(&tokens, &wide, None, Default::default()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::RangeError, "{err}");
        let indices = TensorRef::new("indices", DType::I32, vec![0, 2], &empty).unwrap();
        let weights = TensorRef::new("weights", DType::F32, vec![0, 2], &empty).unwrap();
        let err = crate::grouped::grouped_mm_sort(&indices, &weights, None, huge, 0).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::RangeError);
        assert!(err.to_string().starts_with("numLocalExperts:"), "{err}");
        let logits = TensorRef::new("logits", DType::F32, vec![0, huge], &empty).unwrap();
        assert_eq!(crate::routing::topk(&logits, huge).unwrap_err().kind(), ErrorKind::RangeError);
    }

    #[test]
    fn capacity_matches_the_reference_table() {
        // Rows of test/fixtures/golden/capacity.json, plus rounding-sensitive ones.
        assert_eq!(get_capacity(4096, 64, 1.0, None), Ok(64));
        assert_eq!(get_capacity(4096, 64, 1.25, None), Ok(80));
        assert_eq!(get_capacity(10, 3, 1.5, Some(4)), Ok(5));
        assert_eq!(get_capacity(7, 8, 0.5, None), Ok(1));
        assert_eq!(get_capacity(1, 256, 2.0, Some(1)), Ok(1));
        // (10 / 3) * 3 rounds to exactly 10.0 in f64, so no spurious + 1.
        assert_eq!(get_capacity(10, 3, 3.0, None), Ok(10));
        // (1 / 10) * 10 is 1.0 in f64 (0.1 * 10 rounds to 1).
        assert_eq!(get_capacity(1, 10, 10.0, None), Ok(1));
        // (50 / 5) * 1.1 is 11.0 in f64 (Python: math.ceil gives 11); computing
        // (50 * 1.1) / 5 instead would give 11.000000000000002 and a capacity of 12.
        assert_eq!(get_capacity(50, 5, 1.1, None), Ok(11));
        assert_eq!(get_capacity(0, 4, 1.0, None), Ok(0));
        assert_eq!(get_capacity(5, 4, 0.0, Some(2)), Ok(2));
    }

    #[test]
    fn capacity_rejects_bad_factors_and_zero_experts() {
        for bad in [-0.5, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let err = get_capacity(8, 2, bad, None).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::RangeError);
            assert!(err.to_string().starts_with("capacityFactor:"), "{err}");
        }
        let err = get_capacity(8, 0, 1.0, None).unwrap_err();
        assert!(err.to_string().starts_with("numExperts:"), "{err}");
        let err = get_capacity(1 << 52, 1, 4.0, None).unwrap_err();
        assert!(err.to_string().starts_with("capacityFactor:"), "{err}");
    }

    #[allow(clippy::too_many_arguments)]
    fn drop(probs: &[f32], map: &[u8], t: usize, e: usize, topk: usize, f: f64, policy: DropPolicy, pad: bool) -> Dropped {
        let pr = TensorRef::of("probs", vec![t, e], probs).unwrap();
        drop_tokens(&pr, &map_ref(map, t, e), DropOptions { topk, capacity_factor: f, drop_policy: policy, pad_to_capacity: pad }).unwrap()
    }

    #[test]
    fn drop_by_probs_keeps_the_highest_with_ties_to_lower_ids() {
        // 4 tokens, 2 experts, top-1, factor 1: capacity = ceil(4 / 2 * 1) = 2.
        // Expert 0 is chosen by tokens 0, 1, 2 (probs .5, .9, .5): keeps 1 and 0 (tie 0 vs 2 -> 0).
        let map = [1, 0, 1, 0, 1, 0, 0, 1];
        let probs = [0.5, 0.0, 0.9, 0.0, 0.5, 0.0, 0.0, 0.7];
        let out = drop(&probs, &map, 4, 2, 1, 1.0, DropPolicy::Probs, false);
        assert_eq!(out.capacity, 2);
        assert_eq!(out.routing_map.data, Data::Bool(vec![1, 0, 1, 0, 0, 0, 0, 1]));
        assert_eq!(out.probs.data, Data::F32(vec![0.5, 0.0, 0.9, 0.0, 0.0, 0.0, 0.0, 0.7]));
        // Padded: expert 1 has one token (3) and is padded by the lowest-id zero-prob token (0).
        let out = drop(&probs, &map, 4, 2, 1, 1.0, DropPolicy::Probs, true);
        assert_eq!(out.routing_map.data, Data::Bool(vec![1, 1, 1, 0, 0, 0, 0, 1]));
    }

    #[test]
    fn drop_by_position_keeps_the_first_routed() {
        let map = [1, 0, 1, 0, 1, 0, 0, 1];
        let probs = [0.1, 0.0, 0.9, 0.0, 0.8, 0.0, 0.0, 0.7];
        let out = drop(&probs, &map, 4, 2, 1, 1.0, DropPolicy::Position, false);
        assert_eq!(out.routing_map.data, Data::Bool(vec![1, 0, 1, 0, 0, 0, 0, 1]));
        let out = drop(&probs, &map, 4, 2, 1, 1.0, DropPolicy::Position, true);
        // expert 1: routed token 3, then unrouted 0
        assert_eq!(out.routing_map.data, Data::Bool(vec![1, 1, 1, 0, 0, 0, 0, 1]));
    }

    #[test]
    fn drop_with_large_capacity_keeps_everything_and_pads_everything() {
        let map = [1, 0, 0, 1];
        let probs = [-0.5, 2.0, 0.0, 0.25];
        let out = drop(&probs, &map, 2, 2, 2, 1.0, DropPolicy::Probs, false);
        assert_eq!(out.capacity, 2);
        assert_eq!(out.routing_map.data, Data::Bool(vec![1, 0, 0, 1]));
        // -0.5 * 1 kept; 2.0 * 0 = 0
        assert_eq!(out.probs.data, Data::F32(vec![-0.5, 0.0, 0.0, 0.25]));
        let out = drop(&[-0.5, -2.0, 0.0, 0.25], &map, 2, 2, 2, 1.0, DropPolicy::Probs, true);
        assert_eq!(out.routing_map.data, Data::Bool(vec![1, 1, 1, 1]));
        let out = drop(&[-0.5, -2.0, 0.0, 0.25], &map, 2, 2, 2, 1.0, DropPolicy::Probs, false);
        let Data::F32(p) = out.probs.data else { unreachable!() };
        assert_eq!(p[1].to_bits(), (-0.0f32).to_bits(), "-2 * 0 is -0, as in the reference's product");
        assert!(times_zero(f32::INFINITY).is_nan());
        assert_eq!(times_zero(f32::from_bits(0xffc0_0001)).to_bits(), 0xffc0_0001);
    }

    #[test]
    fn drop_ranks_nan_first_and_zero_capacity_drops_all() {
        let map = [1, 1, 1];
        let probs = [0.5, f32::NAN, 0.9];
        // 3 tokens, 1 expert, topk 1, factor 0.5: capacity = ceil(1.5) = 2 -> NaN token and 0.9
        let out = drop(&probs, &map, 3, 1, 1, 0.5, DropPolicy::Probs, false);
        assert_eq!(out.routing_map.data, Data::Bool(vec![0, 1, 1]));
        let out = drop(&probs, &map, 3, 1, 1, 0.0, DropPolicy::Probs, true);
        assert_eq!(out.capacity, 0);
        assert_eq!(out.routing_map.data, Data::Bool(vec![0, 0, 0]));
    }

    #[test]
    fn drop_errors_name_their_argument() {
        let map = [1u8, 0];
        let probs = [1f32, 0.0];
        let pr = TensorRef::of("probs", vec![1, 2], &probs[..]).unwrap();
        let opts = DropOptions { topk: 1, capacity_factor: -1.0, drop_policy: DropPolicy::Probs, pad_to_capacity: false };
        let err = drop_tokens(&pr, &map_ref(&map, 1, 2), opts).unwrap_err();
        assert!(err.to_string().starts_with("capacityFactor:"), "{err}");
        let pr3 = TensorRef::of("probs", vec![2, 1], &probs[..]).unwrap();
        let err = drop_tokens(&pr3, &map_ref(&map, 1, 2), DropOptions { capacity_factor: 1.0, ..opts }).unwrap_err();
        assert!(err.to_string().starts_with("probs.shape:"), "{err}");
        let err = DropPolicy::parse(Some("random")).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TypeError);
        assert!(err.to_string().starts_with("dropPolicy:"), "{err}");
        let empty: [u8; 0] = [];
        let pe = TensorRef::of::<f32>("probs", vec![2, 0], &[]).unwrap();
        let err = drop_tokens(&pe, &map_ref(&empty, 2, 0), DropOptions { capacity_factor: 1.0, ..opts }).unwrap_err();
        assert!(err.to_string().starts_with("routingMap.shape[1]:"), "{err}");
    }

    #[test]
    fn pad_routing_map_pads_each_column_with_lowest_unselected() {
        // Expert 0: tokens 1, 2 (c = 2, pad to 4 with tokens 0, 3). Expert 1: none (c = 0,
        // nothing to pad). Expert 2: token 0 (c = 1, pad with 1, 2, 3). Multiple 2: expert 2
        // gets token 1 only.
        let map = [0, 0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0];
        let out = pad_routing_map(&map_ref(&map, 4, 3), 4).unwrap();
        assert_eq!(out.data, Data::Bool(vec![1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 0, 1]));
        let out = pad_routing_map(&map_ref(&map, 4, 3), 2).unwrap();
        assert_eq!(out.data, Data::Bool(vec![0, 0, 1, 1, 0, 1, 1, 0, 0, 0, 0, 0]));
        // Not enough tokens: all of them, count 3, not a multiple of 4.
        let map = [1, 0, 0];
        let out = pad_routing_map(&map_ref(&map, 3, 1), 4).unwrap();
        assert_eq!(out.data, Data::Bool(vec![1, 1, 1]));
        let err = pad_routing_map(&map_ref(&map, 3, 1), 0).unwrap_err();
        assert!(err.to_string().starts_with("padMultiple:"), "{err}");
    }

    #[test]
    fn tokens_per_expert_counts_columns() {
        let map = [1, 0, 1, 0, 0, 1];
        let out = tokens_per_expert(&map_ref(&map, 2, 3)).unwrap();
        assert_eq!(out.data, Data::I32(vec![1, 0, 2]));
        assert_eq!(out.shape, vec![3]);
    }
}
