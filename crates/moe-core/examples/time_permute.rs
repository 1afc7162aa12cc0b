//! Times the core permute/unpermute at the benchmark shape without any binding in between:
//! `cargo run --release -p moe-core --features parallel --example time_permute`.
use std::time::Instant;

use moe_core::permute::{permute, unpermute, PermuteOptions, UnpermuteOptions};
use moe_core::{DType, Data, TensorRef};

fn main() {
    let (t, h, e, k) = (4096usize, 1024usize, 64usize, 4usize);
    let tokens: Vec<f32> = (0..t * h).map(|i| (i % 97) as f32).collect();
    let mut map = vec![0u8; t * e];
    for tok in 0..t {
        for j in 0..k {
            map[tok * e + (tok * 7 + j * 13) % e] = 1;
        }
    }
    let tok = TensorRef::of("tokens", vec![t, h], &tokens).unwrap();
    let rm = TensorRef::new("routingMap", DType::Bool, vec![t, e], &map).unwrap();
    for _ in 0..5 {
        let t0 = Instant::now();
        let out = permute(&tok, &rm, None, PermuteOptions::default()).unwrap();
        let dt = t0.elapsed().as_secs_f64();
        let n = out.permuted_tokens.shape[0];
        let Data::F32(rows) = &out.permuted_tokens.data else { unreachable!() };
        let Data::I32(sorted) = &out.sorted_indices.data else { unreachable!() };
        let perm = TensorRef::of("permutedTokens", vec![n, h], rows).unwrap();
        let si = TensorRef::of("sortedIndices", vec![n], sorted).unwrap();
        let t1 = Instant::now();
        let merged = unpermute(&perm, &si, [t, h], None, None, UnpermuteOptions::default()).unwrap();
        let du = t1.elapsed().as_secs_f64();
        println!(
            "permute {:.2} ms ({:.2} GB/s)  unpermute {:.2} ms ({:.2} GB/s)  [{}]",
            dt * 1e3,
            (2 * n * h * 4) as f64 / dt / 1e9,
            du * 1e3,
            ((n + t) * h * 4) as f64 / du / 1e9,
            merged.shape[0]
        );
    }
}
