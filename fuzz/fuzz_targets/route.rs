//! `route` with arbitrary logits (NaN, Inf, subnormals: any f32 bits), bias, mask and options
//! (topk, score function, groups, topk groups, normalisation, scale: any values, including
//! 0, more than numExperts, non-finite scales), and `topk`. Ok or a typed Err, never a panic;
//! on Ok the picks are in range, distinct per token, -1 exactly for masked tokens, and the
//! per-expert counts add up. Then `route_backward` on route's own outputs (same options, random
//! gradients): Ok, `[T, E]`, zero rows for masked tokens, finite for |routeScale| <= 2.5; and on
//! one index made arbitrary: Ok or a typed Err. The logits' upper halves as bfloat16: route gives
//! the results of their f32 conversion.
#![no_main]
use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use moe_core::routing::{self, RouteOptions, ScoreFunction};
use moe_core::{DType, Data, ErrorKind, TensorRef};

fn run(u: &mut Unstructured) -> arbitrary::Result<()> {
    let t = u.int_in_range(0..=8usize)?;
    let e = u.int_in_range(0..=12usize)?;
    let logits: Vec<f32> = (0..t * e).map(|_| u.arbitrary::<u32>().map(f32::from_bits)).collect::<Result<_, _>>()?;
    let bias: Vec<f32> = (0..e).map(|_| u.arbitrary::<i8>().map(|b| b as f32 / 16.0)).collect::<Result<_, _>>()?;
    let mask: Vec<u8> = (0..t).map(|_| u.int_in_range(0..=1u8)).collect::<Result<_, _>>()?;
    let options = RouteOptions {
        topk: u.int_in_range(0..=14usize)?,
        score_function: *u.choose(&ScoreFunction::ALL)?,
        softmax_before_topk: u.arbitrary()?,
        num_groups: u.int_in_range(0..=13usize)?,
        topk_groups: if u.arbitrary()? { Some(u.int_in_range(0..=13usize)?) } else { None },
        norm_topk_prob: u.arbitrary()?,
        route_scale: *u.choose(&[1.0, 2.5, 0.0, -1.0, f64::NAN, f64::INFINITY, 1e300])?,
    };
    let (use_bias, use_mask) = (u.arbitrary::<bool>()?, u.arbitrary::<bool>()?);
    let logits_t = TensorRef::of("logits", vec![t, e], &logits).unwrap();
    let bias_t = TensorRef::of("expertBias", vec![e], &bias).unwrap();
    let mask_t = TensorRef::new("tokenMask", DType::Bool, vec![t], &mask).unwrap();
    let routed = routing::route(&logits_t, use_bias.then_some(&bias_t), use_mask.then_some(&mask_t), options);
    if let Ok(r) = &routed {
        let k = options.topk;
        let Data::I32(idx) = &r.indices.data else { panic!("indices not int32") };
        assert_eq!(r.indices.shape, vec![t, k]);
        assert_eq!(r.weights.shape, vec![t, k]);
        assert_eq!(r.scores.shape, vec![t, e]);
        let mut counts = vec![0i32; e];
        for tok in 0..t {
            let row = &idx[tok * k..(tok + 1) * k];
            let masked = use_mask && mask[tok] == 0;
            for (j, &x) in row.iter().enumerate() {
                if masked {
                    assert_eq!(x, -1, "masked token {tok} picked {x}");
                } else {
                    assert!(x >= 0 && (x as usize) < e, "token {tok} pick {x} out of range");
                    assert!(!row[..j].contains(&x), "token {tok} picked {x} twice");
                    counts[x as usize] += 1;
                }
            }
        }
        let Data::I32(per_expert) = &r.tokens_per_expert.data else { panic!() };
        assert_eq!(per_expert, &counts);

        // route_backward on route's own output
        let gw: Vec<f32> = (0..t * k).map(|_| u.arbitrary::<i8>().map(|v| v as f32 / 128.0)).collect::<Result<_, _>>()?;
        let gs: Vec<f32> = (0..t * e).map(|_| u.arbitrary::<i8>().map(|v| v as f32 / 128.0)).collect::<Result<_, _>>()?;
        let use_gs = u.arbitrary::<bool>()?;
        let gw_t = TensorRef::of("gradWeights", vec![t, k], &gw).unwrap();
        let gs_t = TensorRef::of("gradScores", vec![t, e], &gs).unwrap();
        let backward = |indices: &TensorRef| {
            routing::route_backward(
                &gw_t,
                &logits_t,
                indices,
                use_gs.then_some(&gs_t),
                use_bias.then_some(&bias_t),
                use_mask.then_some(&mask_t),
                options,
            )
        };
        let idx_t = TensorRef::of("indices", vec![t, k], idx.as_slice()).unwrap();
        let g = backward(&idx_t).unwrap_or_else(|err| panic!("route_backward refuses route's own output: {err}"));
        assert_eq!(g.shape, vec![t, e]);
        let Data::F32(grad) = &g.data else { panic!("gradLogits not f32") };
        for tok in 0..t {
            let row = &grad[tok * e..(tok + 1) * e];
            if idx[tok * k] < 0 {
                assert!(row.iter().all(|v| v.to_bits() == 0), "masked token {tok}: {row:?}");
            } else if options.route_scale.abs() <= 2.5 {
                assert!(row.iter().all(|v| v.is_finite()), "token {tok}: {row:?}");
            }
        }
        // one index made arbitrary: Ok or a typed error
        if t * k > 0 {
            let mut bad = idx.to_vec();
            let at = u.choose_index(bad.len())?;
            bad[at] = u.arbitrary()?;
            let bad_t = TensorRef::of("indices", vec![t, k], bad.as_slice()).unwrap();
            if let Err(err) = backward(&bad_t) {
                assert_ne!(err.kind(), ErrorKind::Error, "{err}");
            }
        }
    }
    // 16-bit logits: the results of their f32 conversion
    let halves: Vec<u16> = logits.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
    let widened: Vec<f32> = halves.iter().map(|&h| f32::from_bits((h as u32) << 16)).collect();
    let half_t = TensorRef::new("logits", DType::BF16, vec![t, e], bytemuck_cast(&halves)).unwrap();
    let wide_t = TensorRef::of("logits", vec![t, e], &widened).unwrap();
    let a = routing::route(&half_t, use_bias.then_some(&bias_t), use_mask.then_some(&mask_t), options);
    let b = routing::route(&wide_t, use_bias.then_some(&bias_t), use_mask.then_some(&mask_t), options);
    assert_eq!(a, b, "bfloat16 logits vs their f32 conversion");
    let k = u.int_in_range(0..=14usize)?;
    if let Ok(top) = routing::topk(&logits_t, k) {
        assert_eq!(top.indices.shape, vec![t, k]);
    }
    Ok(())
}

/// u16s as their little-endian bytes (the fuzz crate does not depend on bytemuck).
fn bytemuck_cast(v: &[u16]) -> &[u8] {
    // SAFETY: u8 has alignment 1 and the byte length is exact; u16 has no padding.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 2) }
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
