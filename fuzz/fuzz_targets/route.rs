//! `route` with arbitrary logits (NaN, Inf, subnormals: any f32 bits), bias, mask and options
//! (topk, score function, groups, topk groups, normalisation, scale: any values, including
//! 0, more than numExperts, non-finite scales), and `topk`. Ok or a typed Err, never a panic;
//! on Ok the picks are in range, distinct per token, -1 exactly for masked tokens, and the
//! per-expert counts add up.
#![no_main]
use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use moe_core::routing::{self, RouteOptions, ScoreFunction};
use moe_core::{DType, Data, TensorRef};

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
    if let Ok(r) = routing::route(&logits_t, use_bias.then_some(&bias_t), use_mask.then_some(&mask_t), options) {
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
    }
    let k = u.int_in_range(0..=14usize)?;
    if let Ok(top) = routing::topk(&logits_t, k) {
        assert_eq!(top.indices.shape, vec![t, k]);
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
