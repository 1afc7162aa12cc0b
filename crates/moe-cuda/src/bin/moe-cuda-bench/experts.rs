//! `moe-cuda-bench experts`: the grouped experts and the dispatch + experts layer on the GPU
//! (a module of the moe-cuda-bench binary).
//!
//! For each shape (bf16, swiglu, routing probs): the GPU's bf16 GEMM rate (one large square
//! cuBLAS GEMM), the expert GEMMs alone (the per-expert cuBLAS calls of forward + backward),
//! experts forward, experts backward, and the layer (permute with probs -> experts ->
//! unpermute, then unpermute backward -> experts backward -> permute backward) with a fixed
//! top-k routing (the layer's forward keeps h and a for its backward: saveForBackward). Times are medians of CUDA-event timings; GEMM efficiency = GEMM FLOPs /
//! GEMM time / the measured bf16 rate. Each shape starts with the memory pool's cached memory
//! released (`MOE_BENCH_KEEP_POOL=1`: kept). `MOE_BENCH_AB_ONLY=1`: only the first A/B (the backward
//! GEMMs with the weight gradients beside the token-side ones, or a step at a time), for a quick
//! look.

use half::bf16;
use moe_core::activations::{ActivationKind, ActivationOptions};
use moe_core::permute::{PermuteOptions, UnpermuteOptions};
use moe_core::tensor::{DType, Tensor};
use moe_cuda::activations::{launch_activation, launch_activation_backward, ExpMath};
use moe_cuda::blas::{gemm, mark, set_side_streams, Operand, Output, Problem};
use moe_cuda::device_ops::{permute_backward_device, permute_device, unpermute_backward_device, unpermute_device};
use moe_cuda::experts::{
    experts_backward_device, experts_backward_device_saved, experts_forward_device, experts_forward_device_saving, run_gemms,
    set_grouped_gemm, set_row_blocks, set_side_by_side, set_weight_gradients_beside, use_grouped, weight_gradients_beside,
    DeviceExpertsInputs, SavedArg,
};
use moe_cuda::{Device, DeviceTensor};

use crate::{back_to_back_ms, time_ms, Rng};

/// One GEMM step of the experts: its problems and the (dtype, transposed) of A and B.
type Step = (Vec<Problem>, (DType, bool), (DType, bool));

use crate::shapes::ExpertShape;

fn bf16_tensor(dev: &Device, rng: &mut Rng, shape: Vec<usize>, scale: f32) -> moe_cuda::Result<DeviceTensor> {
    let n: usize = shape.iter().product();
    let v: Vec<u16> = (0..n).map(|_| bf16::from_f32((rng.uniform() * 2.0 - 1.0) * scale).to_bits()).collect();
    DeviceTensor::upload_owned(dev, "input", &Tensor::u16(DType::BF16, shape, v))
}

/// The measured bf16 rate (TFLOP/s) of one `size`^3 GEMM with bf16 output.
pub fn bf16_peak(dev: &Device, iters: usize) -> moe_cuda::Result<f64> {
    let size = 8192;
    let mut rng = Rng(7);
    let a = bf16_tensor(dev, &mut rng, vec![size, size], 1.0)?;
    let b = bf16_tensor(dev, &mut rng, vec![size, size], 1.0)?;
    let c = DeviceTensor::alloc(dev, "c", DType::BF16, vec![size, size])?;
    let (ms, _) = time_ms(dev, iters, || {
        gemm(
            dev,
            size,
            size,
            size,
            Operand { ptr: a.buf.device_ptr(dev), dtype: DType::BF16, trans: false },
            Operand { ptr: b.buf.device_ptr(dev), dtype: DType::BF16, trans: false },
            Output { ptr: c.buf.device_ptr(dev), dtype: DType::BF16 },
            0.0,
        )
    })?;
    Ok(2.0 * (size as f64).powi(3) / (ms * 1e-3) / 1e12)
}

/// One row of results as JSON.
pub fn bench(dev: &Device, s: &ExpertShape, iters: usize, peak: f64) -> moe_cuda::Result<flat_json::Obj> {
    let mut rng = Rng(0x5eed ^ s.experts as u64);
    let (t, e, k, dim, inter) = (s.tokens, s.experts, s.topk, s.dim, s.inter);
    let width = 2 * inter;
    // a random top-k routing: k distinct experts per token, probs summing to 1
    let mut map = vec![0u8; t * e];
    let mut dense = vec![0f32; t * e];
    for tok in 0..t {
        let mut picked = Vec::with_capacity(k);
        while picked.len() < k {
            let x = rng.below(e);
            if !picked.contains(&x) {
                picked.push(x);
            }
        }
        let w: Vec<f32> = picked.iter().map(|_| 0.5 + rng.uniform()).collect();
        let sum: f32 = w.iter().sum();
        for (x, wv) in picked.iter().zip(w) {
            map[tok * e + x] = 1;
            dense[tok * e + x] = wv / sum;
        }
    }
    let d_map = DeviceTensor::upload_owned(dev, "routingMap", &Tensor::bool(vec![t, e], map))?;
    let d_dense = DeviceTensor::upload_owned(dev, "probs", &Tensor::f32(vec![t, e], dense))?;
    let hidden = bf16_tensor(dev, &mut rng, vec![t, dim], 1.0)?;
    let w1 = bf16_tensor(dev, &mut rng, vec![e, dim, width], 1.0 / (dim as f32).sqrt())?;
    let w2 = bf16_tensor(dev, &mut rng, vec![e, inter, dim], 1.0 / (inter as f32).sqrt())?;
    let act = ActivationOptions::new(ActivationKind::Swiglu);
    let popts = PermuteOptions { num_out_tokens: Some(t * k), drop_and_pad: false };
    let perm = permute_device(dev, &hidden, &d_map, Some(&d_dense), popts)?;
    let n = t * k;
    let counts: Vec<i32> = dev.download_new("tokensPerExpert", &perm.tokens_per_expert.buf, e)?;
    let probs = perm.permuted_probs.as_ref().expect("permute with probs");
    let inp = DeviceExpertsInputs {
        tokens: &perm.permuted_tokens,
        tokens_per_expert: &perm.tokens_per_expert,
        gate_and_up: &w1,
        gate_and_up_name: "gateAndUpProjs",
        down: &w2,
        probs: Some(probs),
        gate_up_bias: None,
        down_bias: None,
    };
    let grad_out = bf16_tensor(dev, &mut rng, vec![n, dim], 1.0)?;
    let grad_hidden = bf16_tensor(dev, &mut rng, vec![t, dim], 1.0)?;

    // the expert GEMMs alone, into scratch buffers of the shapes the experts use
    let sc_h = dev.alloc("scratch", n * width * 4)?;
    let sc_a = dev.alloc("scratch", n * width * 2)?;
    let sc_o = dev.alloc("scratch", n * dim.max(width) * 4)?;
    let sc_w = dev.alloc("scratch", e * dim * width * 2)?;

    let x_ptr = perm.permuted_tokens.buf.device_ptr(dev);
    // the expert GEMMs of one pass, as the experts issue them (run_gemms)
    let b16 = |trans: bool| (DType::BF16, trans);
    let build = |backward: bool| -> Vec<Step> {
        let mut steps: Vec<Step> = vec![(vec![], b16(false), b16(false)); if backward { 5 } else { 2 }];
        let mut r0 = 0usize;
        for (ex, &c) in counts.iter().enumerate() {
            let c = c as usize;
            if c == 0 {
                continue;
            }
            let xe = x_ptr + (r0 * dim * 2) as u64;
            let w1e = w1.buf.device_ptr(dev) + (ex * dim * width * 2) as u64;
            let w2e = w2.buf.device_ptr(dev) + (ex * inter * dim * 2) as u64;
            // each expert's rows (and weight gradients) at their own place, as in the experts
            let a_s = sc_a.device_ptr(dev) + (r0 * width * 2) as u64;
            let h_s = sc_h.device_ptr(dev) + (r0 * width * 2) as u64;
            let o_s = sc_o.device_ptr(dev) + (r0 * dim.max(inter) * 2) as u64;
            let w_s = sc_w.device_ptr(dev) + (ex * dim * width * 2) as u64;
            // forward (and the backward's recompute): h = x W1, y = a W2
            steps[0].0.push(Problem { m: c, n: width, k: dim, a: xe, b: w1e, c: h_s });
            if !backward {
                steps[1].0.push(Problem { m: c, n: dim, k: inter, a: a_s, b: w2e, c: o_s });
            } else {
                steps[1] = (steps[1].0.clone(), b16(true), b16(false));
                steps[1].0.push(Problem { m: inter, n: dim, k: c, a: a_s, b: xe, c: w_s });
                steps[2] = (steps[2].0.clone(), b16(false), b16(true));
                steps[2].0.push(Problem { m: c, n: inter, k: dim, a: xe, b: w2e, c: o_s });
                steps[3] = (steps[3].0.clone(), b16(true), b16(false));
                steps[3].0.push(Problem { m: dim, n: width, k: c, a: xe, b: a_s, c: w_s });
                steps[4] = (steps[4].0.clone(), b16(false), b16(true));
                steps[4].0.push(Problem { m: c, n: dim, k: width, a: a_s, b: w1e, c: o_s });
            }
            r0 += c;
        }
        steps
    };
    let (steps_fwd, steps_bwd) = (build(false), build(true));
    let run_steps = |steps: &[Step]| -> moe_cuda::Result<()> {
        for (problems, a, b) in steps {
            run_gemms(dev, problems, *a, *b, DType::BF16)?;
        }
        Ok(())
    };
    // the backward's GEMMs as the experts queue them: where the weight gradients go beside
    // (weight_gradients_beside), the token-side steps on the device's stream first, then the
    // weight gradients on the side streams, each after what it reads
    let backward_gemms = || -> moe_cuda::Result<()> {
        let st = &steps_bwd;
        let Some(side) = weight_gradients_beside(dev, st[1].0.len()) else { return run_steps(st) };
        run_steps(&st[0..1])?;
        let after_h = mark(dev)?;
        run_steps(&st[2..3])?;
        let after_da = mark(dev)?;
        run_steps(&st[4..5])?;
        let mut queue = side.queue(dev)?;
        queue.push(&after_h, &st[1].0, st[1].1, st[1].2, DType::BF16)?;
        queue.push(&after_da, &st[3].0, st[3].1, st[3].2, DType::BF16)?;
        queue.join()
    };
    let gemms = |backward: bool| if backward { backward_gemms() } else { run_steps(&steps_fwd) };
    // A/B, interleaved: the backward GEMMs with the weight gradients beside the token-side
    // ones (the default) against a step at a time; the experts' backward both ways
    let mut ab: Vec<(String, f64)> = Vec::new();
    let fl_bwd_steps: f64 = steps_bwd.iter().flat_map(|st| st.0.iter()).map(|q| 2.0 * (q.m * q.n * q.k) as f64).sum();
    // three rounds of both ways, interleaved; `later`: the second time (no experts backward)
    let ab_rounds = |ab: &mut Vec<(String, f64)>, later: bool| -> moe_cuda::Result<String> {
        let mut rows: Vec<String> = Vec::new();
        for round in 0..3 {
            for beside in [true, false] {
                set_weight_gradients_beside(Some(beside));
                let (g, _) = time_ms(dev, iters, || gemms(true))?;
                let what = if beside { "beside" } else { "steps" };
                let pct = 100.0 * fl_bwd_steps / (g * 1e-3) / 1e12 / peak;
                ab.push((format!("gemmBackwardMs{}_{what}_r{round}", if later { "Later" } else { "" }), g));
                if later {
                    rows.push(format!("r{round} {what}: GEMMs {g:.3} ms {pct:.1}%"));
                } else {
                    let (x, _) = time_ms(dev, iters, || experts_backward_device(dev, &grad_out, &inp, &act).map(drop))?;
                    rows.push(format!("r{round} {what}: GEMMs {g:.3} ms {pct:.1}%, experts bwd {x:.3} ms"));
                    ab.push((format!("expertsBackwardMs_{what}_r{round}"), x));
                }
            }
        }
        set_weight_gradients_beside(None);
        Ok(rows.join("; "))
    };
    println!(
        "{:>13} backward, weight gradients beside the token-side GEMMs (side streams at high priority) / a step at a time: {}",
        s.name,
        ab_rounds(&mut ab, false)?
    );
    if std::env::var_os("MOE_BENCH_AB_ONLY").is_some() {
        // (a quick look: the A/B above only)
        let mut o = flat_json::Obj::default();
        o.str("shape", s.name);
        return Ok(o);
    }
    // host time to queue a pass's GEMMs (no synchronize inside) against their GPU time: a pass
    // whose queueing takes about as long as its GPU time leaves the GPU waiting for the host
    for backward in [false, true] {
        let mut host = Vec::new();
        for _ in 0..iters {
            dev.synchronize("queue timing")?;
            let t0 = std::time::Instant::now();
            gemms(backward)?;
            host.push(t0.elapsed().as_secs_f64() * 1e3);
            dev.synchronize("queue timing")?;
        }
        host.sort_by(|a, b| a.total_cmp(b));
        println!(
            "{:>13} queueing the {} GEMMs (side by side: {}): host {:.3} ms (median of {iters})",
            s.name,
            if backward { "backward" } else { "forward" },
            e >= 16,
            host[host.len() / 2]
        );
    }
    // where the queueing time goes: one cuBLAS call per GEMM on the device's stream, the real
    // (varying) shapes against the first expert's shape repeated
    {
        let blas = dev.blas()?;
        let st = &steps_fwd[0];
        let same: Vec<Problem> = st.0.iter().map(|q| Problem { m: st.0[0].m, ..*q }).collect();
        for (what, probs) in [("varying m", &st.0), ("one m", &same)] {
            let mut host = Vec::new();
            for _ in 0..iters {
                dev.synchronize("queue timing")?;
                let t0 = std::time::Instant::now();
                for q in probs.iter() {
                    moe_cuda::blas::gemm_problem(blas, q, st.1, st.2, DType::BF16)?;
                }
                host.push(t0.elapsed().as_secs_f64() * 1e6 / probs.len() as f64);
                dev.synchronize("queue timing")?;
            }
            host.sort_by(|a, b| a.total_cmp(b));
            println!(
                "{:>13} cublasGemmEx host time per call, {what}: {:.1} us (median of {iters} passes of {})",
                s.name,
                host[host.len() / 2],
                probs.len()
            );
        }
        // a handle in cuBLAS's default math mode (ours is pedantic)
        let plain = cudarc::cublas::CudaBlas::new(dev.stream().clone()).map_err(|e| moe_cuda::Error::Cuda(format!("{e}")))?;
        let mut host = Vec::new();
        for _ in 0..iters {
            dev.synchronize("queue timing")?;
            let t0 = std::time::Instant::now();
            for q in st.0.iter() {
                moe_cuda::blas::gemm_problem(&plain, q, st.1, st.2, DType::BF16)?;
            }
            host.push(t0.elapsed().as_secs_f64() * 1e6 / st.0.len() as f64);
            dev.synchronize("queue timing")?;
        }
        host.sort_by(|a, b| a.total_cmp(b));
        println!("{:>13} cublasGemmEx host time per call, default math mode: {:.1} us", s.name, host[host.len() / 2]);
        // cuBLASLt with its descriptors and algorithm chosen once
        if let Ok(lt) = moe_cuda::blaslt::Lt::open(dev) {
            let q = st.0[0];
            if let Some(c0) = lt.candidates(q.m, q.n, q.k, st.1, st.2, DType::BF16, 1)?.first().copied() {
                let mut host = Vec::new();
                for _ in 0..iters {
                    dev.synchronize("queue timing")?;
                    let t0 = std::time::Instant::now();
                    lt.run_repeated(dev, &q, st.1, st.2, DType::BF16, &c0, st.0.len())?;
                    host.push(t0.elapsed().as_secs_f64() * 1e6 / st.0.len() as f64);
                    dev.synchronize("queue timing")?;
                }
                host.sort_by(|a, b| a.total_cmp(b));
                let (ms, _) = time_ms(dev, iters, || lt.run_repeated(dev, &q, st.1, st.2, DType::BF16, &c0, st.0.len()))?;
                println!(
                    "{:>13} cublasLtMatmul host time per call, descriptors and algorithm made once: {:.1} us; GPU {ms:.3} ms for {} calls",
                    s.name,
                    host[host.len() / 2],
                    st.0.len()
                );
            }
        }
    }
    let (gemm_fwd, _) = time_ms(dev, iters, || gemms(false))?;
    let (gemm_bwd, _) = time_ms(dev, iters, || gemms(true))?;
    let fl_fwd = 2.0 * n as f64 * dim as f64 * width as f64 + 2.0 * n as f64 * inter as f64 * dim as f64;
    let fl_bwd = 2.0 * n as f64 * dim as f64 * width as f64 * 3.0 + 2.0 * n as f64 * inter as f64 * dim as f64 * 2.0;
    // the same passes queued back to back (the host ahead of the GPU, as in a training step),
    // three times each, alternating
    let mut b2b: Vec<(f64, f64)> = Vec::new();
    for _ in 0..3 {
        b2b.push((back_to_back_ms(dev, iters, || gemms(false))?, back_to_back_ms(dev, iters, || gemms(true))?));
    }
    let pct = |fl: f64, ms: f64| 100.0 * fl / (ms * 1e-3) / 1e12 / peak;
    println!(
        "{:>13} GEMMs queued back to back ({iters} passes, 3 times): fwd {} ms ({}% of the bf16 rate), bwd {} ms ({}%)",
        s.name,
        b2b.iter().map(|b| format!("{:.3}", b.0)).collect::<Vec<_>>().join("/"),
        b2b.iter().map(|b| format!("{:.0}", pct(fl_fwd, b.0))).collect::<Vec<_>>().join("/"),
        b2b.iter().map(|b| format!("{:.3}", b.1)).collect::<Vec<_>>().join("/"),
        b2b.iter().map(|b| format!("{:.0}", pct(fl_bwd, b.1))).collect::<Vec<_>>().join("/"),
    );
    for (i, b) in b2b.iter().enumerate() {
        ab.push((format!("gemmForwardMsBackToBack_r{i}"), b.0));
        ab.push((format!("gemmBackwardMsBackToBack_r{i}"), b.1));
    }
    // the same A/B again here, after the host-time measurements: on an H200 this headline
    // measurement of the default backward gave 63-75% where the interleaved rounds above gave
    // 68-84% (fifth session, not explained); both, side by side, at this position too
    // (sixth session: both ways ran 61-68% here, 67-77% in the first rounds, with the SM clock
    // between 1170 and 1980 MHz during the bench: the bf16 rate measured again beside them says
    // whether the GPU itself is slower at this point)
    let rows = ab_rounds(&mut ab, true)?;
    let peak_now = bf16_peak(dev, iters)?;
    ab.push(("bf16TflopsLater".to_string(), peak_now));
    let later_pcts: Vec<f64> = ab
        .iter()
        .filter(|(k, _)| k.starts_with("gemmBackwardMsLater"))
        .map(|(_, g)| 100.0 * fl_bwd_steps / (g * 1e-3) / 1e12 / peak_now)
        .collect();
    println!(
        "{:>13} backward GEMMs after the host-time measurements, beside / a step at a time: {rows} (headline, default: {gemm_bwd:.3} ms); bf16 rate now {peak_now:.0} TFLOP/s (at the start {peak:.0}): the later rounds at {:.0}-{:.0}% of it",
        s.name,
        later_pcts.iter().copied().fold(f64::INFINITY, f64::min),
        later_pcts.iter().copied().fold(0.0, f64::max),
    );
    // the same GEMMs side by side on four streams sized for a quarter of the SMs each (opt-in)
    set_side_by_side(Some(true));
    let (gemm_fwd_side, _) = time_ms(dev, iters, || gemms(false))?;
    let (gemm_bwd_side, _) = time_ms(dev, iters, || gemms(true))?;
    set_side_by_side(None);
    // each way of running the GEMMs, and each step alone under it (where the time goes): one
    // cuBLAS call a GEMM, the token-side GEMMs cut into row blocks and batched (gemm_row_blocks),
    // side by side on four streams, cuBLAS's grouped GEMM
    let step_flops = |st: &Step| st.0.iter().map(|q| 2.0 * (q.m * q.n * q.k) as f64).sum::<f64>();
    let mut block_rows: Vec<(String, f64, f64)> = Vec::new();
    for (mode, blk, side, grouped) in [
        ("one call each", 0usize, false, false),
        ("row blocks 128", 128, false, false),
        ("row blocks 256", 256, false, false),
        ("side by side", 0, true, false),
        ("grouped", 0, false, true),
    ] {
        set_row_blocks(Some(blk));
        set_side_by_side(Some(side));
        set_grouped_gemm(Some(grouped));
        let (f, _) = time_ms(dev, iters, || gemms(false))?;
        let (b, _) = time_ms(dev, iters, || gemms(true))?;
        let mut parts = Vec::new();
        for (pass, steps) in [("fwd", &steps_fwd), ("bwd", &steps_bwd)] {
            for st in steps.iter() {
                let (ms, _) = time_ms(dev, iters, || run_steps(std::slice::from_ref(st)))?;
                parts.push(format!(
                    "{pass} {}{} m~{} {ms:.3} ms {:.0}%",
                    if st.1 .1 { "T" } else { "N" },
                    if st.2 .1 { "T" } else { "N" },
                    st.0.first().map_or(0, |q| q.m),
                    100.0 * step_flops(st) / (ms * 1e-3) / 1e12 / peak
                ));
            }
        }
        println!("{:>13} {mode}: GEMMs fwd {f:.3} ms, bwd {b:.3} ms; steps (A, B transposed): {}", s.name, parts.join(", "));
        block_rows.push((mode.replace(' ', ""), f, b));
    }
    set_side_by_side(None);
    set_grouped_gemm(None);
    // side by side: how many streams, SM target or not; three measurements each (the spread)
    if e >= 16 {
        for streams in [2usize, 3, 4, 6, 8] {
            for target in [true, false] {
                set_side_streams(streams, target);
                let mut f = Vec::new();
                let mut b = Vec::new();
                for _ in 0..3 {
                    f.push(time_ms(dev, iters, || gemms(false))?.0);
                    b.push(time_ms(dev, iters, || gemms(true))?.0);
                }
                let pcts = |v: &[f64], fl: f64| {
                    v.iter().map(|ms| format!("{:.0}", 100.0 * fl / (ms * 1e-3) / 1e12 / peak)).collect::<Vec<_>>().join("/")
                };
                let fl_f: f64 = steps_fwd.iter().map(step_flops).sum();
                let fl_b: f64 = steps_bwd.iter().map(step_flops).sum();
                println!(
                    "{:>13} side by side, {streams} streams, SM target {}: fwd {}%, bwd {}% of the bf16 rate",
                    s.name,
                    if target { "SMs/streams" } else { "none" },
                    pcts(&f, fl_f),
                    pcts(&b, fl_b)
                );
            }
        }
        set_side_streams(0, true);
    }
    // cuBLASLt's candidate algorithms for each step (chosen for its first problem's shape, run
    // for all of its problems): cuBLAS's pick is the heuristic's first; is another faster?
    match moe_cuda::blaslt::Lt::open(dev) {
        Err(e) => println!("{:>13} cuBLASLt: {e}", s.name),
        Ok(lt) => {
            for (pass, steps) in [("fwd", &steps_fwd), ("bwd", &steps_bwd)] {
                for st in steps.iter() {
                    let Some(q) = st.0.first() else { continue };
                    let cands = match lt.candidates(q.m, q.n, q.k, st.1, st.2, DType::BF16, 16) {
                        Ok(c) => c,
                        Err(e) => {
                            println!("{:>13} cuBLASLt {pass}: {e}", s.name);
                            continue;
                        }
                    };
                    let mut timed: Vec<(usize, f64)> = Vec::new();
                    for (i, cand) in cands.iter().enumerate() {
                        if let Ok((ms, _)) = time_ms(dev, iters, || lt.run(dev, &st.0, st.1, st.2, DType::BF16, cand)) {
                            timed.push((i, ms));
                        }
                    }
                    let pct = |ms: f64| 100.0 * step_flops(st) / (ms * 1e-3) / 1e12 / peak;
                    let first = timed.iter().find(|t| t.0 == 0).map_or("failed".to_string(), |t| format!("{:.3} ms {:.0}%", t.1, pct(t.1)));
                    let best =
                        timed.iter().cloned().fold(None::<(usize, f64)>, |b, t| if b.is_none_or(|b| t.1 < b.1) { Some(t) } else { b });
                    let best =
                        best.map_or("none ran".to_string(), |(i, ms)| format!("#{i} {ms:.3} ms {:.0}% ({})", pct(ms), cands[i].describe()));
                    println!(
                        "{:>13} cuBLASLt {pass} {}{} [{}x{}x{}]: {} candidates, {} ran; heuristic's first {first} ({}); best {best}",
                        s.name,
                        if st.1 .1 { "T" } else { "N" },
                        if st.2 .1 { "T" } else { "N" },
                        q.m,
                        q.n,
                        q.k,
                        cands.len(),
                        timed.len(),
                        cands.first().map_or(String::new(), |c| c.describe()),
                    );
                }
            }
        }
    }
    set_row_blocks(None);
    // the element passes around the GEMMs, alone
    let sc_da = dev.alloc("scratch", n * inter * 4)?;
    let sc_gp = dev.alloc("scratch", n * 4)?;
    let pb = &probs.buf;
    // the activation's passes over the scratch buffers (the backward with or without the probs gradient)
    let act_fwd = || launch_activation(dev, &act, ExpMath::Fast, DType::BF16, &sc_h, n, width, Some(pb), DType::BF16, &sc_a);
    let act_bwd =
        |gp| launch_activation_backward(dev, &act, ExpMath::Fast, DType::BF16, &sc_da, &sc_h, n, width, Some(pb), DType::BF16, &sc_a, gp);
    let (act_fwd_ms, _) = time_ms(dev, iters, act_fwd)?;
    let (act_bwd_ms, _) = time_ms(dev, iters, || act_bwd(None))?;
    let (act_bwd_gp_ms, _) = time_ms(dev, iters, || act_bwd(Some(&sc_gp)))?;
    println!(
        "{:>13} element passes: activation fwd {act_fwd_ms:.3} ms, bwd {act_bwd_ms:.3} ms, bwd + probs gradient {act_bwd_gp_ms:.3} ms",
        s.name
    );
    // the vectorised activation kernels (the default where they apply) against one column a
    // thread, interleaved, with the bytes each pass moves (bf16: the forward reads h and writes
    // a; the backward reads h and the gradient and writes h's gradient)
    let (fwd_gb, bwd_gb) = (((n * width + n * inter) * 2) as f64 / 1e9, ((2 * n * width + n * inter) * 2) as f64 / 1e9);
    let mut act_rows: Vec<String> = Vec::new();
    for round in 0..3 {
        // vectorised with the probs gradient in the backward's pass, vectorised in two passes,
        // one column a thread (two passes)
        for (what, vector, fused) in [("vector", true, true), ("vector2pass", true, false), ("column", false, false)] {
            moe_cuda::activations::set_vectorised(Some(vector));
            moe_cuda::activations::set_fused_probs_gradient(Some(fused));
            let (f, _) = time_ms(dev, iters, act_fwd)?;
            let (b, _) = time_ms(dev, iters, || act_bwd(None))?;
            let (bg, _) = time_ms(dev, iters, || act_bwd(Some(&sc_gp)))?;
            act_rows.push(format!(
                "r{round} {what}: fwd {f:.3} ms ({:.0} GB/s), bwd {b:.3} ms ({:.0} GB/s), bwd + probs gradient {bg:.3} ms",
                fwd_gb / (f * 1e-3),
                bwd_gb / (b * 1e-3)
            ));
            ab.push((format!("activationForwardMs_{what}_r{round}"), f));
            ab.push((format!("activationBackwardMs_{what}_r{round}"), b));
            ab.push((format!("activationBackwardWithProbsGradMs_{what}_r{round}"), bg));
        }
    }
    moe_cuda::activations::set_vectorised(None);
    moe_cuda::activations::set_fused_probs_gradient(None);
    println!(
        "{:>13} activation kernels, vectorised (probs gradient in one pass) / vectorised in two passes / one column a thread: {}",
        s.name,
        act_rows.join("; ")
    );
    // experts forward and backward, the per-expert GEMMs one call each and as one grouped call
    set_grouped_gemm(Some(false));
    let (fwd_loop, _) = time_ms(dev, iters, || experts_forward_device(dev, &inp, &act).map(drop))?;
    let (bwd_loop, _) = time_ms(dev, iters, || experts_backward_device(dev, &grad_out, &inp, &act).map(drop))?;
    set_grouped_gemm(Some(true));
    let (fwd_grouped, _) = time_ms(dev, iters, || experts_forward_device(dev, &inp, &act).map(drop))?;
    let (bwd_grouped, _) = time_ms(dev, iters, || experts_backward_device(dev, &grad_out, &inp, &act).map(drop))?;
    set_grouped_gemm(None);
    let (fwd, _) = time_ms(dev, iters, || experts_forward_device(dev, &inp, &act).map(drop))?;
    let (bwd, _) = time_ms(dev, iters, || experts_backward_device(dev, &grad_out, &inp, &act).map(drop))?;
    let (fwd_saving, saved) = {
        let (ms, _) = time_ms(dev, iters, || experts_forward_device_saving(dev, &inp, &act, true).map(drop))?;
        (ms, experts_forward_device_saving(dev, &inp, &act, true)?.1)
    };
    let saved_ref = saved.as_ref().map(|s| s.as_ref());
    let (bwd_saved, _) =
        time_ms(dev, iters, || experts_backward_device_saved(dev, &grad_out, &inp, &act, saved_ref.map(SavedArg::Lent)).map(drop))?;
    println!("{:>13} with saveForBackward: experts fwd {fwd_saving:.3} ms, bwd {bwd_saved:.3} ms (no recompute of h)", s.name);
    println!("{:>13} experts fwd {fwd_loop:.3} ms per-expert GEMMs, {fwd_grouped:.3} ms grouped; bwd {bwd_loop:.3} / {bwd_grouped:.3} ms; default (auto: grouped {}): fwd {fwd:.3}, bwd {bwd:.3}", s.name, use_grouped(counts.iter().filter(|&&c| c > 0).count()));
    let layer = || -> moe_cuda::Result<()> {
        let p = permute_device(dev, &hidden, &d_map, Some(&d_dense), popts)?;
        let pp = p.permuted_probs.as_ref().expect("probs");
        let li = DeviceExpertsInputs { tokens: &p.permuted_tokens, tokens_per_expert: &p.tokens_per_expert, probs: Some(pp), ..inp };
        // the forward keeps h and a for the backward (saveForBackward), as an autograd layer does
        let (y, saved) = experts_forward_device_saving(dev, &li, &act, true)?;
        let _out = unpermute_device(dev, &y, &p.sorted_indices, [t, dim], None, None, UnpermuteOptions::default())?;
        let (g_perm, _) = unpermute_backward_device(dev, &grad_hidden, &y, &p.sorted_indices, None, None, UnpermuteOptions::default())?;
        let grads = experts_backward_device_saved(dev, &g_perm, &li, &act, saved.as_ref().map(|s| SavedArg::Lent(s.as_ref())))?;
        let _ = permute_backward_device(dev, &grads.grad_tokens, &p.sorted_indices, t, None, None, UnpermuteOptions::default())?;
        Ok(())
    };
    let (layer_ms, _) = time_ms(dev, iters, layer)?;
    let tf = |fl: f64, ms: f64| fl / (ms * 1e-3) / 1e12;
    println!(
        "{:>13} T={t} dim={dim} inter={inter} E={e} k={k}: GEMMs fwd {gemm_fwd:.3} ms ({:.0} TFLOP/s, {:.0}% of {peak:.0}), bwd {gemm_bwd:.3} ms ({:.0} TFLOP/s, {:.0}%); experts fwd {fwd:.3} ms, bwd {bwd:.3} ms; layer fwd+bwd {layer_ms:.3} ms",
        s.name,
        tf(fl_fwd, gemm_fwd),
        100.0 * tf(fl_fwd, gemm_fwd) / peak,
        tf(fl_bwd, gemm_bwd),
        100.0 * tf(fl_bwd, gemm_bwd) / peak,
    );
    println!(
        "{:>13} the same GEMMs, side by side forced on (16+ experts; row blocks as by default): fwd {gemm_fwd_side:.3} ms ({:.0}%), bwd {gemm_bwd_side:.3} ms ({:.0}%)",
        s.name,
        100.0 * tf(fl_fwd, gemm_fwd_side) / peak,
        100.0 * tf(fl_bwd, gemm_bwd_side) / peak,
    );
    for (mode, f, b) in &block_rows {
        println!(
            "{:>13} {mode}: fwd {:.0}%, bwd {:.0}% of the bf16 rate",
            s.name,
            100.0 * tf(fl_fwd, *f) / peak,
            100.0 * tf(fl_bwd, *b) / peak
        );
    }
    let mut o = flat_json::Obj::default();
    for (mode, f, b) in &block_rows {
        o.num(&format!("gemmForwardMs_{mode}"), *f);
        o.num(&format!("gemmBackwardMs_{mode}"), *b);
    }
    for (key, v) in &ab {
        o.num(key, *v);
    }
    o.str("shape", s.name);
    for (key, v) in [("tokens", t), ("dim", dim), ("inter", inter), ("experts", e), ("topk", k)] {
        o.num(key, v as f64);
    }
    for (key, v) in [
        ("gemmForwardMs", gemm_fwd),
        ("gemmBackwardMs", gemm_bwd),
        ("gemmForwardTflops", tf(fl_fwd, gemm_fwd)),
        ("gemmBackwardTflops", tf(fl_bwd, gemm_bwd)),
        ("gemmForwardMsSideBySide", gemm_fwd_side),
        ("gemmBackwardMsSideBySide", gemm_bwd_side),
        ("gemmForwardTflopsSideBySide", tf(fl_fwd, gemm_fwd_side)),
        ("gemmBackwardTflopsSideBySide", tf(fl_bwd, gemm_bwd_side)),
        ("gemmForwardOfPeak", tf(fl_fwd, gemm_fwd) / peak),
        ("gemmBackwardOfPeak", tf(fl_bwd, gemm_bwd) / peak),
        ("activationForwardMs", act_fwd_ms),
        ("activationBackwardMs", act_bwd_ms),
        ("activationBackwardWithProbsGradMs", act_bwd_gp_ms),
        ("expertsForwardPerExpertGemmsMs", fwd_loop),
        ("expertsBackwardPerExpertGemmsMs", bwd_loop),
        ("expertsForwardGroupedGemmMs", fwd_grouped),
        ("expertsBackwardGroupedGemmMs", bwd_grouped),
        ("expertsForwardSavingMs", fwd_saving),
        ("expertsBackwardWithSavedMs", bwd_saved),
        ("expertsForwardMs", fwd),
        ("expertsBackwardMs", bwd),
        ("expertsForwardTflops", tf(fl_fwd, fwd)),
        ("expertsBackwardTflops", tf(fl_bwd, bwd)),
        ("layerForwardBackwardMs", layer_ms),
    ] {
        o.num(key, v);
    }
    Ok(o)
}

/// A flat JSON object (string, number and boolean fields), as the experts rows need.
pub mod flat_json {
    #[derive(Default)]
    pub struct Obj(Vec<(String, String)>);
    impl Obj {
        pub fn str(&mut self, k: &str, v: &str) {
            self.0.push((k.into(), format!("{v:?}")));
        }
        pub fn bool(&mut self, k: &str, v: bool) {
            self.0.push((k.into(), v.to_string()));
        }
        pub fn num(&mut self, k: &str, v: f64) {
            self.0.push((k.into(), if v.is_finite() { format!("{v}") } else { "null".into() }));
        }
        pub fn to_json(&self) -> String {
            let body: Vec<String> = self.0.iter().map(|(k, v)| format!("{k:?}: {v}")).collect();
            format!("{{{}}}", body.join(", "))
        }
    }
}
