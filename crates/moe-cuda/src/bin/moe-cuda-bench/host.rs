//! `moe-cuda-bench host [--calls N] [--out FILE]`: the host's time a call of the CUDA backend's
//! building blocks, from Rust (no JavaScript, no N-API), at the fine-grained layer's shape (T =
//! 8192, dim 2048, E = 64, k = 6, bf16). `bench/actmem-gpu.mjs --host-costs` clocks the same
//! device entries as the layer calls them from JavaScript: the difference is what the binding
//! and the facade add; the driver's own rows (an allocation, a memset, a launch, an event) say
//! what a call cannot go below.
//!
//! Each row: N calls to warm up (the memory pool then holds what N calls' results need), a
//! synchronize, then N calls clocked on the host with nothing waited for between them (what a
//! call's results hold is kept until the synchronize after the N), the mean in microseconds. N is kept small enough (at most 200
//! calls, fewer for several launches a call) that the driver's launch queue never fills: a full
//! queue would make the host wait for the GPU and the row measure the GPU.

use std::time::Instant;

use half::bf16;
use moe_core::permute::PermuteOptions;
use moe_core::routing::RouteOptions;
use moe_core::tensor::{DType, TensorRef};
use moe_cuda::device_ops::{permute_device, route_device_lazy};
use moe_cuda::layout::indices_to_multihot_device;
use moe_cuda::train::{cast, matmul_f32_out};
use moe_cuda::{Device, DeviceTensor};

use crate::{global_device, Rng};

struct Row {
    what: &'static str,
    launches: usize,
    us: f64,
}

/// The host's mean time of `calls` calls of `f` (after as many to warm up), what they return
/// kept alive until the GPU has caught up.
fn per_call<T>(dev: &Device, calls: usize, mut f: impl FnMut() -> moe_cuda::Result<T>) -> moe_cuda::Result<f64> {
    let mut keep = Vec::with_capacity(calls);
    for _ in 0..calls {
        keep.push(f()?);
    }
    dev.synchronize("the warm-up")?;
    keep.clear();
    let t0 = Instant::now();
    for _ in 0..calls {
        keep.push(f()?);
    }
    let us = t0.elapsed().as_secs_f64() * 1e6 / calls as f64;
    dev.synchronize("the timed calls")?;
    drop(keep);
    Ok(us)
}

pub fn bench(args: &[String]) -> i32 {
    let mut calls = 200usize;
    let mut out: Option<String> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--calls" => match it.next().and_then(|v| v.parse().ok()) {
                Some(n) if n > 0 => calls = n,
                _ => {
                    eprintln!("--calls: expected a count (1 or more)");
                    return 2;
                }
            },
            "--out" => out = it.next().cloned(),
            other => {
                eprintln!("host: unknown option {other}");
                return 2;
            }
        }
    }
    let dev = match global_device() {
        Ok(d) => d,
        Err(code) => return code,
    };
    match rows(dev, calls) {
        Ok(rows) => {
            println!("host time a call (mean of {calls} calls after as many; a quarter of that for permute; no waits between them), fine-grained shape:");
            for r in &rows {
                println!("  {:<64} {:>3} launch(es) {:>8.1} us", r.what, r.launches, r.us);
            }
            if let Some(path) = out {
                let body: Vec<String> = rows
                    .iter()
                    .map(|r| format!("{{\"what\":{:?},\"launches\":{},\"usPerCall\":{:.2}}}", r.what, r.launches, r.us))
                    .collect();
                let doc = format!("{{\"device\":{:?},\"calls\":{calls},\"rows\":[{}]}}\n", dev.info().name, body.join(","));
                if let Err(e) = std::fs::write(&path, doc) {
                    eprintln!("writing {path}: {e}");
                    return 1;
                }
            }
            0
        }
        Err(e) => {
            eprintln!("host: {e}");
            1
        }
    }
}

fn rows(dev: &Device, calls: usize) -> moe_cuda::Result<Vec<Row>> {
    let (t, dim, e, k) = (8192usize, 2048usize, 64usize, 6usize);
    let mut rng = Rng(7);
    let x: Vec<bf16> = (0..t * dim).map(|_| bf16::from_f32(rng.uniform() * 2.0 - 1.0)).collect();
    let w: Vec<bf16> = (0..dim * e).map(|_| bf16::from_f32((rng.uniform() * 2.0 - 1.0) / 45.0)).collect();
    let logits: Vec<f32> = (0..t * e).map(|_| rng.uniform() * 4.0 - 2.0).collect();
    let dx = DeviceTensor::upload(dev, &TensorRef::of("x", vec![t, dim], &x[..])?)?;
    let dw = DeviceTensor::upload(dev, &TensorRef::of("routerWeight", vec![dim, e], &w[..])?)?;
    let dlogits = DeviceTensor::upload(dev, &TensorRef::of("logits", vec![t, e], &logits[..])?)?;
    let four: Vec<bf16> = vec![bf16::ONE; 4];
    let dfour = DeviceTensor::upload(dev, &TensorRef::of("four", vec![4], &four[..])?)?;
    let small = dev.alloc("a word", 4)?;
    let route = RouteOptions::new(k);
    let (routed, _) = route_device_lazy(dev, &dlogits, None, None, route)?;
    let mh = indices_to_multihot_device(dev, &routed.indices, &routed.weights, e)?;
    let known = PermuteOptions { num_out_tokens: Some(t * k), drop_and_pad: false };
    let few = calls.div_ceil(4).max(1);
    let mut rows = vec![];
    let mut row = |what: &'static str, launches: usize, us: f64| rows.push(Row { what, launches, us });
    row("allocate + free 4 B (cuMemAllocAsync, cuMemFreeAsync)", 0, per_call(dev, calls, || dev.alloc("x", 4).map(drop))?);
    row("allocate + free 96 MiB", 0, per_call(dev, calls, || dev.alloc("x", 96 << 20).map(drop))?);
    row("memset 4 B (cuMemsetD32Async)", 0, per_call(dev, calls, || dev.memset_u32("a word", &small, 0, 1))?);
    row("cast [4] bf16 -> f32 (allocate, one kernel)", 1, per_call(dev, calls, || cast(dev, &dfour, DType::F32))?);
    row(
        "matmulToFloat32 [8192, 2048] x [2048, 64] (allocate, cublasGemmEx)",
        1,
        per_call(dev, calls, || matmul_f32_out(dev, &dx, &dw, false, false))?,
    );
    row(
        "route, lazy check (softmax top-6 of 64; memset, kernel, event)",
        2,
        per_call(dev, calls, || route_device_lazy(dev, &dlogits, None, None, route))?,
    );
    row(
        "indicesToMultihot (memset, kernel)",
        2,
        per_call(dev, calls, || indices_to_multihot_device(dev, &routed.indices, &routed.weights, e))?,
    );
    row(
        "permute, plan only ([T, 0] rows; numOutTokens given)",
        5,
        per_call(dev, few, || {
            let none = DeviceTensor::alloc(dev, "tokens", DType::BF16, vec![t, 0])?;
            permute_device(dev, &none, &mh.routing_map, Some(&mh.probs), known)
        })?,
    );
    row(
        "permute with probs (plan, scatter; numOutTokens given)",
        5,
        per_call(dev, few, || permute_device(dev, &dx, &mh.routing_map, Some(&mh.probs), known))?,
    );
    Ok(rows)
}
