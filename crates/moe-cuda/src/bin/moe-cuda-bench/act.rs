//! `moe-cuda-bench act`: the activation kernels around the expert GEMMs (a module of the
//! moe-cuda-bench binary).
//!
//! Checks, byte for byte on small random problems: the vectorised kernels with their loop
//! specialised to the kind (the default) against the same kernels' generic loop
//! (`set_by_kind(Some(false))`) and against the one-column kernels, for every activation kind,
//! both exp maths and three dtype pairs: the forward (with and without probs), the backward (with
//! probs and its gradient, and without), and the one-pass backward with the probs gradient
//! (against its generic loop, its grid capped, and a warp a row: the two-pass gradient sums in
//! another order). Only the fast bf16
//! kernels are split by kind; for the others the comparison checks that the generic flag is
//! cleared (the same kernel both ways). Then times the bf16
//! passes of the experts (fast exp, probs) at the experts' shapes, specialised against generic,
//! interleaved. Exit code 1 when a check fails.

use half::bf16;
use moe_core::activations::{ActivationKind, ActivationOptions, DEFAULT_ALPHA, DEFAULT_LIMIT, DEFAULT_LINEAR_OFFSET};
use moe_core::tensor::DType;
use moe_cuda::activations::{
    launch_activation, launch_activation_backward, set_by_kind, set_fused_probs_gradient, set_probs_gradient_blocks,
    set_probs_gradient_warp, set_vectorised, ExpMath,
};
use moe_cuda::{Buffer, Device};

use crate::{finish, global_device, median, time_ms, Rng, ShapeOptions};

/// The three ways a vectorised pass can run: the specialised loop, the generic loop, one column
/// a thread.
#[derive(Clone, Copy, Debug)]
enum Variant {
    ByKind,
    Generic,
    Column,
}

impl Variant {
    fn select(self) {
        set_vectorised(Some(!matches!(self, Variant::Column)));
        set_by_kind(Some(matches!(self, Variant::ByKind)));
        // the one-pass backward a block a row, unless a case asks for a warp a row
        set_probs_gradient_warp(Some(false));
    }
}

fn restore() {
    set_probs_gradient_blocks(None);
    set_probs_gradient_warp(None);
    set_vectorised(None);
    set_by_kind(None);
    set_fused_probs_gradient(None);
}

fn options(kind: ActivationKind) -> ActivationOptions {
    ActivationOptions { kind, alpha: DEFAULT_ALPHA as f32, limit: DEFAULT_LIMIT as f32, linear_offset: DEFAULT_LINEAR_OFFSET as f32 }
}

/// `n` random values of `dtype` in [-scale, scale) as bytes (a few exact zeros and values past
/// the clamps' limit among them).
fn random_bytes(rng: &mut Rng, dtype: DType, n: usize, scale: f32) -> Vec<u8> {
    let v: Vec<f32> = (0..n).map(|i| if i % 97 == 0 { 0.0 } else { (rng.uniform() * 2.0 - 1.0) * scale }).collect();
    match dtype {
        DType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        _ => v.iter().flat_map(|x| bf16::from_f32(*x).to_bits().to_le_bytes()).collect(),
    }
}

fn download(dev: &Device, buf: &Buffer, bytes: usize) -> moe_cuda::Result<Vec<u8>> {
    dev.download_new::<u8>("act check", buf, bytes)
}

/// The bytes one pass writes, per output buffer.
type Outputs = Vec<Vec<u8>>;

/// One small problem: rows x width inputs of `dtype`, outputs of `out`.
struct Problem<'a> {
    dev: &'a Device,
    act: ActivationOptions,
    math: ExpMath,
    dtype: DType,
    out: DType,
    rows: usize,
    width: usize,
    inter: usize,
    x: Buffer,
    grad: Buffer,
    probs: Buffer,
}

impl Problem<'_> {
    fn forward(&self, probs: bool) -> moe_cuda::Result<Outputs> {
        let out = self.dev.alloc("act out", self.rows * self.inter * self.out.size())?;
        let p = probs.then_some(&self.probs);
        launch_activation(self.dev, &self.act, self.math, self.dtype, &self.x, self.rows, self.width, p, self.out, &out)?;
        Ok(vec![download(self.dev, &out, self.rows * self.inter * self.out.size())?])
    }

    /// The backward: `probs` 0 none, 1 with probs, 2 with probs and their gradient.
    fn backward(&self, probs: u8) -> moe_cuda::Result<Outputs> {
        let gi = self.dev.alloc("act grad in", self.rows * self.width * self.out.size())?;
        let gp = self.dev.alloc("act grad probs", self.rows * 4)?;
        let p = (probs > 0).then_some(&self.probs);
        let g = (probs > 1).then_some(&gp);
        launch_activation_backward(
            self.dev, &self.act, self.math, self.dtype, &self.grad, &self.x, self.rows, self.width, p, self.out, &gi, g,
        )?;
        let mut outs = vec![download(self.dev, &gi, self.rows * self.width * self.out.size())?];
        if probs > 1 {
            outs.push(download(self.dev, &gp, self.rows * 4)?);
        }
        Ok(outs)
    }
}

/// The checks; returns (cases, failures).
fn check(dev: &Device) -> moe_cuda::Result<(usize, usize)> {
    let mut rng = Rng(0xac7);
    let (mut cases, mut failures) = (0, 0);
    for kind in ActivationKind::ALL {
        for math in [ExpMath::Fast, ExpMath::Exact] {
            for (dtype, out) in [(DType::BF16, DType::BF16), (DType::F32, DType::F32), (DType::F32, DType::BF16)] {
                for (rows, inter) in [(1, 64), (37, 1408), (300, 256)] {
                    let act = options(kind);
                    let width = if kind == ActivationKind::Relu2 { inter } else { 2 * inter };
                    let upload = |bytes: Vec<u8>| dev.upload::<u8>("act check", &bytes);
                    let x = upload(random_bytes(&mut rng, dtype, rows * width, 10.0))?;
                    let grad = upload(random_bytes(&mut rng, dtype, rows * inter, 1.0))?;
                    let probs: Vec<f32> = (0..rows).map(|_| rng.uniform()).collect();
                    let probs = dev.upload::<f32>("act check", &probs)?;
                    let p = Problem { dev, act, math, dtype, out, rows, width, inter, x, grad, probs };
                    let label = format!("{} {math:?} {}->{} {rows}x{inter}", kind.name(), dtype.name(), out.name());
                    // every pass, under each variant (the one-pass probs gradient: fast exp only, vectorised)
                    for what in ["forward", "forward with probs", "backward", "backward with probs"] {
                        set_fused_probs_gradient(Some(false));
                        let runs: Vec<Outputs> = [Variant::ByKind, Variant::Generic, Variant::Column]
                            .iter()
                            .map(|v| {
                                v.select();
                                match what {
                                    "forward" => p.forward(false),
                                    "forward with probs" => p.forward(true),
                                    "backward" => p.backward(0),
                                    _ => p.backward(1),
                                }
                            })
                            .collect::<moe_cuda::Result<_>>()?;
                        cases += 1;
                        if runs[0] != runs[1] || runs[0] != runs[2] {
                            failures += 1;
                            println!("  act check FAILED: {label} {what}: specialised / generic / one column differ");
                        }
                    }
                    if matches!(math, ExpMath::Fast) {
                        set_fused_probs_gradient(Some(true));
                        let runs: Vec<Outputs> = [Variant::ByKind, Variant::Generic]
                            .iter()
                            .map(|v| {
                                v.select();
                                p.backward(2)
                            })
                            .collect::<moe_cuda::Result<_>>()?;
                        // and with the grid capped below the rows (blocks walking several rows)
                        Variant::ByKind.select();
                        set_probs_gradient_blocks(Some(rows.div_ceil(3)));
                        let capped = p.backward(2)?;
                        set_probs_gradient_blocks(None);
                        // a warp a row (bf16; elsewhere the block kernel again), specialised and generic
                        set_probs_gradient_warp(Some(true));
                        let warp = p.backward(2)?;
                        // (the generic loop with one block: its 8 warps walk every row)
                        Variant::Generic.select();
                        set_probs_gradient_warp(Some(true));
                        set_probs_gradient_blocks(Some(1));
                        let warp_generic = p.backward(2)?;
                        set_probs_gradient_blocks(None);
                        set_probs_gradient_warp(None);
                        cases += 1;
                        if runs[0] != runs[1] || runs[0] != capped || runs[0] != warp || runs[0] != warp_generic {
                            failures += 1;
                            println!("  act check FAILED: {label} one-pass backward with the probs gradient: specialised / generic / capped grid / a warp a row differ");
                        }
                    }
                    restore();
                }
            }
        }
    }
    Ok((cases, failures))
}

/// The experts' bf16 passes (fast exp, probs) at one shape: specialised against generic,
/// interleaved rounds; JSON fields.
fn time_shape(dev: &Device, name: &str, rows: usize, inter: usize, iters: usize) -> moe_cuda::Result<String> {
    let act = options(ActivationKind::Swiglu);
    let width = 2 * inter;
    let mut rng = Rng(0x5eed);
    let x = dev.upload::<u8>("act bench", &random_bytes(&mut rng, DType::BF16, rows * width, 4.0))?;
    let grad = dev.upload::<u8>("act bench", &random_bytes(&mut rng, DType::BF16, rows * inter, 1.0))?;
    let probs: Vec<f32> = (0..rows).map(|_| rng.uniform()).collect();
    let probs = dev.upload::<f32>("act bench", &probs)?;
    let a = dev.alloc("act bench", rows * inter * 2)?;
    let dh = dev.alloc("act bench", rows * width * 2)?;
    let gp = dev.alloc("act bench", rows * 4)?;
    let fwd = || launch_activation(dev, &act, ExpMath::Fast, DType::BF16, &x, rows, width, Some(&probs), DType::BF16, &a);
    let bwd = |g: Option<&Buffer>| {
        launch_activation_backward(dev, &act, ExpMath::Fast, DType::BF16, &grad, &x, rows, width, Some(&probs), DType::BF16, &dh, g)
    };
    // bytes each pass moves: the forward reads h, writes a; the backward reads h and the gradient, writes dh
    let (fwd_gb, bwd_gb) = (((rows * width + rows * inter) * 2) as f64 / 1e9, ((2 * rows * width + rows * inter) * 2) as f64 / 1e9);
    let mut ms: Vec<[Vec<f64>; 3]> = vec![Default::default(), Default::default()];
    for _round in 0..3 {
        for (i, v) in [Variant::ByKind, Variant::Generic].into_iter().enumerate() {
            v.select();
            ms[i][0].push(time_ms(dev, iters, fwd)?.0);
            set_fused_probs_gradient(Some(false));
            ms[i][1].push(time_ms(dev, iters, || bwd(None))?.0);
            set_fused_probs_gradient(Some(true));
            ms[i][2].push(time_ms(dev, iters, || bwd(Some(&gp)))?.0);
        }
    }
    // the one-pass backward with its grid capped at 8 and 16 blocks an SM (blocks walking rows)
    let sms = dev.sm_count().max(1);
    let mut capped: Vec<(usize, Vec<f64>)> = [8, 16].iter().map(|b| (b * sms, Vec::new())).collect();
    Variant::ByKind.select();
    set_fused_probs_gradient(Some(true));
    for _round in 0..3 {
        for (blocks, times) in capped.iter_mut() {
            set_probs_gradient_blocks(Some(*blocks));
            times.push(time_ms(dev, iters, || bwd(Some(&gp)))?.0);
        }
    }
    // and a warp a row (8 rows a block, a block for every 8 rows), the specialised loop
    let mut warp = Vec::new();
    set_probs_gradient_blocks(None);
    set_probs_gradient_warp(Some(true));
    for _round in 0..3 {
        warp.push(time_ms(dev, iters, || bwd(Some(&gp)))?.0);
    }
    restore();
    let warp = median(warp);
    let capped: Vec<(usize, f64)> = capped.into_iter().map(|(b, t)| (b, median(t))).collect();
    let m: Vec<[f64; 3]> = ms.iter().map(|r| [median(r[0].clone()), median(r[1].clone()), median(r[2].clone())]).collect();
    println!(
        "{name:>13} {rows} x {inter} bf16 swiglu, fast exp, probs: forward {:.3} ms ({:.0} GB/s) / generic {:.3} ms; backward {:.3} ms ({:.0} GB/s) / generic {:.3}; backward + probs gradient in one pass {:.3} ms ({:.0} GB/s) / generic {:.3} ms",
        m[0][0],
        fwd_gb / (m[0][0] * 1e-3),
        m[1][0],
        m[0][1],
        bwd_gb / (m[0][1] * 1e-3),
        m[1][1],
        m[0][2],
        bwd_gb / (m[0][2] * 1e-3),
        m[1][2]
    );
    let capped_text: Vec<String> = capped.iter().map(|(b, ms)| format!("{b} blocks {ms:.3} ms")).collect();
    println!("{name:>13} the one-pass backward with its grid capped: {}; a warp a row: {warp:.3} ms", capped_text.join(", "));
    let list = |v: &[f64]| v.iter().map(|x| format!("{x}")).collect::<Vec<_>>().join(", ");
    Ok(format!(
        "{{\"shape\": {name:?}, \"rows\": {rows}, \"inter\": {inter}, \"forwardMs\": {}, \"forwardGenericMs\": {}, \"backwardMs\": {}, \"backwardGenericMs\": {}, \"backwardWithProbsGradMs\": {}, \"backwardWithProbsGradGenericMs\": {}, \"backwardWithProbsGradCappedMs\": {{{}}}, \"backwardWithProbsGradWarpMs\": {warp}, \"forwardBytes\": {}, \"backwardBytes\": {}, \"rounds\": {{\"forward\": [{}], \"forwardGeneric\": [{}], \"backward\": [{}], \"backwardGeneric\": [{}], \"backwardWithProbsGrad\": [{}], \"backwardWithProbsGradGeneric\": [{}]}}}}",
        m[0][0],
        m[1][0],
        m[0][1],
        m[1][1],
        m[0][2],
        m[1][2],
        capped.iter().map(|(b, ms)| format!("\"{b}\": {ms}")).collect::<Vec<_>>().join(", "),
        fwd_gb * 1e9,
        bwd_gb * 1e9,
        list(&ms[0][0]),
        list(&ms[1][0]),
        list(&ms[0][1]),
        list(&ms[1][1]),
        list(&ms[0][2]),
        list(&ms[1][2])
    ))
}

pub fn bench(args: &[String]) -> i32 {
    let opts = match ShapeOptions::parse(args, |_, _| None) {
        Ok(o) => o,
        Err(rc) => return rc,
    };
    let dev = match global_device() {
        Ok(d) => d,
        Err(rc) => return rc,
    };
    let result = (|| -> moe_cuda::Result<(String, usize)> {
        let (cases, failures) = check(dev)?;
        println!(
            "activation kernels: specialised loop = generic loop = one column a thread, byte for byte: {} of {cases} cases",
            cases - failures
        );
        let mut rows = Vec::new();
        for s in &opts.shapes {
            rows.push(time_shape(dev, s.name, s.tokens * s.topk, s.inter, opts.iters)?);
        }
        Ok((
            format!(
                "{{\"device\": {:?}, \"iters\": {}, \"checks\": {{\"cases\": {cases}, \"failures\": {failures}}}, \"rows\": [{}]}}",
                dev.info().name,
                opts.iters,
                rows.join(", ")
            ),
            failures,
        ))
    })();
    restore();
    finish(&opts, "act bench", result)
}
