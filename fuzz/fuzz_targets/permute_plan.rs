//! Routing plan construction, permute and unpermute (and their backwards) from arbitrary
//! bytes: any shapes (including 0 tokens / 0 experts / 0 hidden), any map, capacities that
//! may or may not divide. Every call must return Ok or a typed Err, never panic; on Ok the
//! outputs must be consistent (shapes, token ids in range, the round trip sums each token's copies).
#![no_main]
use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use moe_core::permute::{self, PermuteOptions, UnpermuteOptions};
use moe_core::{Data, TensorRef};

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok((t, e, h)) =
        (|| Ok::<_, arbitrary::Error>((u.int_in_range(0..=12usize)?, u.int_in_range(0..=6usize)?, u.int_in_range(0..=3usize)?)))()
    else {
        return;
    };
    let map: Vec<u8> = (0..t * e).map(|_| u.arbitrary::<u8>().unwrap_or(0) % 3).collect(); // 2 = a non-0/1 bool byte
    let tokens: Vec<f32> = (0..t * h).map(|i| i as f32 + 0.5).collect();
    let probs: Vec<f32> = (0..t * e).map(|_| f32::from_bits(u.arbitrary::<u32>().unwrap_or(0x3f80_0000))).collect();
    let drop_and_pad = u.arbitrary::<bool>().unwrap_or(false);
    let num_out = if u.arbitrary::<bool>().unwrap_or(false) { Some(u.int_in_range(0..=80usize).unwrap_or(0)) } else { None };
    let with_probs = u.arbitrary::<bool>().unwrap_or(false);

    let tokens_t = TensorRef::of("tokens", vec![t, h], &tokens).unwrap();
    let Ok(map_t) = TensorRef::new("routingMap", moe_core::DType::Bool, vec![t, e], &map) else { return };
    let probs_t = TensorRef::of("probs", vec![t, e], &probs).unwrap();
    let options = PermuteOptions { num_out_tokens: num_out, drop_and_pad };
    let Ok(out) = permute::permute(&tokens_t, &map_t, with_probs.then_some(&probs_t), options) else { return };

    let Data::I32(sorted) = &out.sorted_indices.data else { panic!("sortedIndices is not int32") };
    let n = sorted.len();
    assert_eq!(out.permuted_tokens.shape, vec![n, h]);
    assert!(sorted.iter().all(|&s| s >= 0 && (s as usize) < t), "token id out of range");
    let Data::I32(per_expert) = &out.tokens_per_expert.data else { panic!() };
    assert_eq!(per_expert.iter().map(|&c| c as usize).sum::<usize>(), n);

    // Unpermute without probs: every token gets the sum of its copies.
    let Data::F32(permuted) = &out.permuted_tokens.data else { panic!() };
    let sorted_t = TensorRef::of("sortedIndices", vec![n], sorted.as_slice()).unwrap();
    let permuted_t = TensorRef::of("permuted", vec![n, h], permuted.as_slice()).unwrap();
    let merged = permute::unpermute(&permuted_t, &sorted_t, [t, h], None, None, UnpermuteOptions { drop_and_pad })
        .expect("unpermute of permute's own output");
    let Data::F32(m) = &merged.data else { panic!() };
    let mut copies = vec![0f32; t];
    for &s in sorted {
        copies[s as usize] += 1.0;
    }
    for tok in 0..t {
        for j in 0..h {
            assert_eq!(m[tok * h + j], tokens[tok * h + j] * copies[tok], "round trip of token {tok}");
        }
    }
    // The other entry points on the same plan, with dense probs: Ok or a typed error.
    let _ = permute::unpermute(&permuted_t, &sorted_t, [t, h], Some(&probs_t), Some(&map_t), UnpermuteOptions { drop_and_pad });
    let _ = permute::permute_backward(&permuted_t, &sorted_t, t, None, Some(&map_t), UnpermuteOptions { drop_and_pad });
});
