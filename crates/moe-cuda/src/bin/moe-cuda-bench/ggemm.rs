//! `moe-cuda-bench ggemm`: our grouped GEMM (crates/moe-cuda/src/grouped_gemm.rs, kernels/grouped_gemm.cu)
//! checked and timed on the GPU (a module of the moe-cuda-bench binary).
//!
//! 1. Small problems against a host reference (f64 sums of the bf16 products): empty experts,
//!    one expert holding every row, row counts not a multiple of the 128-row tile, K and N not
//!    multiples of the tile, more experts than the block has threads, counts adding up to less
//!    than M (the rows past them must stay untouched), both weight layouts, bf16 and f32
//!    outputs; each run twice and compared bit for bit.
//! 2. At the experts' shapes (fine-grained: T=8192 k=6 E=64 dim 2048 inter 1408; Mixtral-like:
//!    T=8192 k=2 E=8 dim 4096 inter 14336; a random top-k routing's counts), the four token-side
//!    GEMMs of the experts (x @ W1, a @ W2, dy @ W2^T, dh @ W1^T): ours against the cuBLAS
//!    per-expert path the experts use (`run_gemms`, host counts), element by element to a
//!    tolerance, ours run to run bit for bit, then both timed (CUDA events, median) as TFLOP/s
//!    and % of the dense bf16 cuBLAS rate (8192^3).
//!
//! 3. The weight-gradient kernel (`launch_wgrad`: dw[e] = x_e^T dy_e, every expert in one launch)
//!    on the small cases and at both shapes (dW1 = x^T dh, dW2 = a^T dy) against cuBLAS's
//!    per-expert GEMMs (side by side, as the experts' backward runs them); `--no-wgrad` skips it.
//!
//! Options: `--iters N`, `--tile 128,256,bulk,ring,ring-half,mc,mc4,mcring,tma-store` (kernels, by
//! `TileN::ALL`'s short names: 128 or 256 columns, 256 with the bulk-copy epilogue through a
//! staging buffer or through the ring's stages, the latter also with tails of <= 64 rows as two
//! 64 x 128 halves, and in 2-CTA clusters sharing B tiles by multicast: the staged one, with 4
//! stages and register stores, with the ring's epilogue; the staged rows stored by TMA tensor
//! stores; default all nine), `--shapes a,b`, `--out FILE`,
//! `--small-only`, `--no-small` (the shapes only: for a profiler), `--act` (the first GEMM with the
//! activation fused, `launch_act`: its small checks against the plain kernel + activation kernel,
//! and x W1 + swiglu both ways at the shapes), `--gather` (the kernels gathering their rows on
//! load, `launch_gather` and `launch_wgrad_gather`, bulk and TMA-store epilogues: their small
//! checks against the same epilogue's plain kernel on rows the host gathered, and x W1 and x^T dh
//! at the shapes from the tokens in their own order against permute's kernel + the plain kernel),
//! `--groups 4,8` (at the shapes, each kernel timed
//! again with each of these raster groups, `grouped_gemm::set_group_n`, in interleaved rounds in
//! this one process, its bytes checked against the default group's), `--tails` (at the shapes,
//! each token-side kernel timed with its second warpgroup idle in tiles of at most 64 rows, the
//! default, and multiplying those rows as before, `grouped_gemm::set_idle_tails`, interleaved the
//! same way, the bytes checked against each other), `--narrow` (at the shapes, each 256-column
//! token-side kernel timed with a column tile whose output ends within its first 128 columns
//! multiplying those only, the default, and all 256 as before, `grouped_gemm::set_narrow`,
//! interleaved the same way, the bytes checked against each other), `--rows-per-expert N` (every expert of the
//! timed shapes N rows instead of a random top-k routing's counts: 768 against 767 at the
//! fine-grained shape times a partial last tile and weight-gradient k-step against none, the same
//! multiplications). Exit code 1 when a check fails.

use half::bf16;
use moe_core::tensor::DType;
use moe_cuda::blas::Problem;
use moe_cuda::experts::run_gemms;
use moe_cuda::grouped_gemm::{self, TileN, WeightLayout};
use moe_cuda::{Buffer, Device};
use rayon::prelude::*;

use crate::experts::bf16_peak;
use crate::{finish, global_device, time_ms, Rng, ShapeOptions};

type R<T> = moe_cuda::Result<T>;

/// Random bf16 values in [-scale, scale), generated in parallel (chunks with their own seeds).
fn random_bf16(len: usize, seed: u64, scale: f32) -> Vec<u16> {
    let mut v = vec![0u16; len];
    v.par_chunks_mut(1 << 16).enumerate().for_each(|(i, c)| {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9).wrapping_add(i as u64));
        for x in c.iter_mut() {
            *x = bf16::from_f32((rng.uniform() * 2.0 - 1.0) * scale).to_bits();
        }
    });
    v
}

fn f(bits: u16) -> f64 {
    bf16::from_bits(bits).to_f32() as f64
}

/// One small check: host reference and the GPU, twice.
struct Case {
    name: &'static str,
    counts: Vec<i32>,
    /// rows past the sum of the counts
    spare: usize,
    k: usize,
    n: usize,
    /// a NaN and an infinity among x's values (`specials`): the plain and weight-gradient checks
    specials: bool,
}

impl Case {
    /// (experts, rows of the experts: the sum of the counts, M: those and the spare rows)
    fn sizes(&self) -> (usize, usize, usize) {
        let rows: usize = self.counts.iter().map(|&c| c as usize).sum();
        (self.counts.len(), rows, rows + self.spare)
    }
}

/// Runs `launch` (its argument: the output's address) twice, each time on a new output buffer
/// of `bytes` bytes filled with 0xff bytes first; the two outputs as read back.
fn run_twice(dev: &Device, what: &str, bytes: usize, launch: impl Fn(u64) -> R<()>) -> R<Vec<Vec<u8>>> {
    let mut runs = Vec::new();
    for _ in 0..2 {
        let out = dev.alloc(what, bytes)?;
        dev.memset_u32(what, &out, 0xffff_ffff, bytes / 4)?;
        launch(out.device_ptr(dev))?;
        runs.push(dev.download_new(what, &out, bytes)?);
    }
    Ok(runs)
}

fn small_cases() -> Vec<Case> {
    let mut rng = Rng(99);
    let many: Vec<i32> = (0..400).map(|_| rng.below(9) as i32).collect();
    let mixed: Vec<i32> = (0..70).map(|i| if i % 7 == 0 { 0 } else { rng.below(300) as i32 }).collect();
    vec![
        Case { name: "mixed counts, K and N off the tile", counts: vec![0, 1, 127, 129, 300], spare: 3, k: 200, n: 200, specials: false },
        Case { name: "one expert holds every row", counts: vec![0, 700, 0], spare: 0, k: 128, n: 512, specials: false },
        Case { name: "every expert empty", counts: vec![0, 0, 0, 0], spare: 40, k: 64, n: 64, specials: false },
        Case { name: "70 experts, random counts", counts: mixed, spare: 0, k: 72, n: 264, specials: false },
        Case { name: "400 experts (more than the block's threads)", counts: many, spare: 5, k: 64, n: 136, specials: false },
        Case { name: "one expert, 1 row, K = 8", counts: vec![1], spare: 0, k: 8, n: 8, specials: false },
        // (the cluster kernel: an odd count of row tiles, whose last row's tiles go unpaired, and
        // more column tiles than a raster group, with an odd count of tiles padded)
        Case { name: "odd row tiles, 9 column tiles", counts: vec![300, 0, 129], spare: 2, k: 64, n: 2304, specials: false },
        // (a last column tile of exactly 128 columns: the kernels multiply it 64 x 128 a warpgroup)
        Case { name: "N = 384: a last column tile of 128", counts: vec![130, 7, 64], spare: 0, k: 72, n: 384, specials: false },
        // (the epilogues convert to bf16 in hardware and, where a thread meets a NaN, convert all of
        // its values again the exact way: NaN and infinite outputs, and finite ones beside them)
        Case { name: "a NaN and an infinity in x", counts: vec![5, 130, 0, 70], spare: 1, k: 64, n: 264, specials: true },
    ]
}

/// x [m, width] of a case with `specials`: a NaN at row 7, column 0 and +infinity at row 140,
/// column 1 (rows of the second and fourth experts of its counts).
fn with_specials(case: &Case, mut x: Vec<u16>, width: usize) -> Vec<u16> {
    if case.specials {
        x[7 * width] = 0x7fc0;
        x[140 * width + 1] = 0x7f80;
    }
    x
}

/// An element outside the tolerance: where, ours, the host's and the tolerance.
struct Mismatch {
    index: usize,
    got: f64,
    want: f64,
    tolerance: f64,
}

/// Our two runs' outputs against the host reference (each element's f64 sum and sum of
/// |products|): the first run element by element (f32: to the f32 sums' error; bf16: a rounding
/// to bf16 too), and the second the same bytes as the first.
struct HostCheck {
    /// elements outside the tolerance
    bad: usize,
    max_rel: f64,
    first: Option<Mismatch>,
    same: bool,
}

impl HostCheck {
    /// `runs`: the two outputs of `od` (bf16 or f32, little-endian).
    fn new(runs: &[Vec<u8>], od: DType, reference: &[(f64, f64)]) -> HostCheck {
        let got = &runs[0];
        let (mut bad, mut max_rel, mut first) = (0usize, 0f64, None);
        for (i, &(r, a)) in reference.iter().enumerate() {
            let bits = u16::from_le_bytes([got[2 * i], got[2 * i + 1]]);
            let g = if od == DType::F32 {
                f32::from_le_bytes([got[4 * i], got[4 * i + 1], got[4 * i + 2], got[4 * i + 3]]) as f64
            } else {
                f(bits)
            };
            if !r.is_finite() {
                // a NaN (bf16: quiet, as BF16::from_f32 leaves every NaN) or the same infinity
                let ok = if r.is_nan() { g.is_nan() && (od == DType::F32 || bits & 0x7fc0 == 0x7fc0) } else { g == r };
                if !ok {
                    bad += 1;
                    first.get_or_insert(Mismatch { index: i, got: g, want: r, tolerance: 0.0 });
                }
                continue;
            }
            let tol = if od == DType::F32 { 1e-5 * a + 1e-6 } else { r.abs() / 256.0 * 1.001 + 1e-5 * a + 1e-6 };
            let err = (g - r).abs();
            if r != 0.0 {
                max_rel = max_rel.max(err / r.abs().max(1e-3));
            }
            if err.is_nan() || err > tol {
                bad += 1;
                first.get_or_insert(Mismatch { index: i, got: g, want: r, tolerance: tol });
            }
        }
        HostCheck { bad, max_rel, first, same: runs[0] == runs[1] }
    }

    /// Prints the check's line (`what` the case; `first` says where and what the first element
    /// outside the tolerance is; `extra` a failed check of the caller's, "" when it passed) and
    /// returns whether everything passed.
    fn report(&self, what: std::fmt::Arguments, first: impl Fn(&Mismatch) -> String, extra: &str) -> bool {
        let ok = self.bad == 0 && extra.is_empty() && self.same;
        println!(
            "  {} {what} max rel err {:.2e}, {} outside tolerance{}{extra}{}",
            if ok { "ok  " } else { "FAIL" },
            self.max_rel,
            self.bad,
            self.first.as_ref().map(first).unwrap_or_default(),
            if self.same { ", run to run identical" } else { ", RUNS DIFFER" },
        );
        ok
    }
}

/// Runs the small cases for one tile width; returns the number of failures.
fn small_checks(dev: &Device, tile: TileN) -> R<usize> {
    let mut failures = 0;
    for (ci, case) in small_cases().iter().enumerate() {
        let (e, rows, m) = case.sizes();
        let (k, n) = (case.k, case.n);
        let x = with_specials(case, random_bf16(m * k, 1000 + ci as u64, 1.0), k);
        let w = random_bf16(e * k * n, 2000 + ci as u64, 1.0);
        let d_x = dev.upload("x", &x)?;
        let d_w = dev.upload("w", &w)?;
        let d_counts = dev.upload("counts", &case.counts)?;
        // (f32 output: the 256-column kernels with direct stores)
        let outs: &[DType] = if tile == TileN::N256 { &[DType::BF16, DType::F32] } else { &[DType::BF16] };
        for layout in [WeightLayout::KN, WeightLayout::NK] {
            // the host reference: out[r, j] = sum_i x[r, i] * B[e](i, j) (f64), and sum |.| for the tolerance
            let b = |ex: usize, i: usize, j: usize| match layout {
                WeightLayout::KN => w[(ex * k + i) * n + j],
                WeightLayout::NK => w[(ex * n + j) * k + i],
            };
            let mut reference = vec![(0f64, 0f64); rows * n];
            let mut r0 = 0;
            for (ex, &c) in case.counts.iter().enumerate() {
                for r in r0..r0 + c as usize {
                    for j in 0..n {
                        let (mut s, mut a) = (0f64, 0f64);
                        for i in 0..k {
                            let p = f(x[r * k + i]) * f(b(ex, i, j));
                            s += p;
                            a += p.abs();
                        }
                        reference[r * n + j] = (s, a);
                    }
                }
                r0 += c as usize;
            }
            for &od in outs {
                let size = od.size();
                // (whole 4-byte words, so that the sentinel fill covers every byte)
                let bytes = (m * n * size).next_multiple_of(4);
                let s = |buf: &Buffer| buf.device_ptr(dev);
                let runs = run_twice(dev, "out", bytes, |out| {
                    grouped_gemm::launch(dev, s(&d_x), s(&d_w), layout, s(&d_counts), out, od, e, m, n, k, tile)
                })?;
                let check = HostCheck::new(&runs, od, &reference);
                // the spare rows stay as they were (0xff bytes)
                let untouched = runs[0][rows * n * size..m * n * size].iter().all(|&byte| byte == 0xff);
                let ok = check.report(
                    format_args!("{} {:?} -> {}: {} [E={e}, M={m}, K={k}, N={n}]", tile.name(), layout, od.name(), case.name),
                    |b| {
                        format!(
                            " (first: row {} col {}: got {}, want {} (tolerance {:.3e}))",
                            b.index / n,
                            b.index % n,
                            b.got,
                            b.want,
                            b.tolerance
                        )
                    },
                    if untouched { "" } else { ", spare rows written" },
                );
                if !ok {
                    failures += 1;
                }
            }
        }
    }
    Ok(failures)
}

/// The probs of the fused activation's checks and timings: `m` values in [0.05, 1), none alike
/// in any run of 17 rows.
fn act_probs(m: usize) -> Vec<f32> {
    (0..m).map(|i| 0.05 + (i % 17) as f32 / 17.0).collect()
}

/// The first GEMM with the activation fused (`grouped_gemm::launch_act`) against the plain kernel
/// followed by the activation kernel (ExpMath::Fast), which the layer runs today: h and a equal
/// byte for byte on every row of the experts, the spare rows untouched, run to run identical; for
/// each `[gate | up]` kind, with and without probs, on the small cases (inter: the case's n / 2
/// down to a multiple of 8, at least 8: column tiles cut short). Returns the failures.
fn act_checks(dev: &Device) -> R<usize> {
    use moe_core::activations::{ActivationKind, ActivationOptions};
    use moe_cuda::activations::{launch_activation, ExpMath};
    let mut failures = 0;
    for (ci, case) in small_cases().iter().enumerate() {
        let (e, rows, m) = case.sizes();
        let k = case.k;
        let inter = (case.n / 2 / 8 * 8).max(8);
        let width = 2 * inter;
        let d_x = dev.upload("x", &random_bf16(m * k, 3000 + ci as u64, 1.0))?;
        let d_w = dev.upload("w", &random_bf16(e * k * width, 4000 + ci as u64, 1.0))?;
        let d_counts = dev.upload("counts", &case.counts)?;
        let d_probs = dev.upload("probs", &act_probs(m))?;
        let p = |b: &Buffer| b.device_ptr(dev);
        // the plain GEMM's h, for every kind
        let h_ref = dev.alloc("h", m * width * 2)?;
        dev.memset_u32("h", &h_ref, 0xffff_ffff, (m * width * 2).div_ceil(4))?;
        grouped_gemm::launch(dev, p(&d_x), p(&d_w), WeightLayout::KN, p(&d_counts), p(&h_ref), DType::BF16, e, m, width, k, TileN::N256)?;
        let want_h: Vec<u16> = dev.download_new("h", &h_ref, m * width)?;
        for kind in [ActivationKind::Swiglu, ActivationKind::SwigluOai, ActivationKind::SwigluClamped] {
            let opts = ActivationOptions::new(kind);
            for with_probs in [false, true] {
                let a_ref = dev.alloc("a", m * inter * 2)?;
                let pr = with_probs.then_some(&d_probs);
                launch_activation(dev, &opts, ExpMath::Fast, DType::BF16, &h_ref, m, width, pr, DType::BF16, &a_ref)?;
                let want_a: Vec<u16> = dev.download_new("a", &a_ref, m * inter)?;
                let mut runs = Vec::new();
                for _ in 0..2 {
                    let (h, a) = (dev.alloc("h", m * width * 2)?, dev.alloc("a", m * inter * 2)?);
                    dev.memset_u32("h", &h, 0xffff_ffff, (m * width * 2).div_ceil(4))?;
                    dev.memset_u32("a", &a, 0xffff_ffff, (m * inter * 2).div_ceil(4))?;
                    let probs_ptr = if with_probs { p(&d_probs) } else { 0 };
                    grouped_gemm::launch_act(dev, p(&d_x), p(&d_w), p(&d_counts), p(&h), p(&a), probs_ptr, &opts, e, m, inter, k)?;
                    runs.push((dev.download_new::<u16>("h", &h, m * width)?, dev.download_new::<u16>("a", &a, m * inter)?));
                }
                let (h, a) = &runs[0];
                let h_same = h[..rows * width] == want_h[..rows * width];
                let a_same = a[..rows * inter] == want_a[..rows * inter];
                let untouched = h[rows * width..].iter().all(|&v| v == 0xffff) && a[rows * inter..].iter().all(|&v| v == 0xffff);
                let repeat = runs[0] == runs[1];
                let ok = h_same && a_same && untouched && repeat;
                if !ok {
                    failures += 1;
                }
                let first_a = (0..rows * inter).find(|&i| a[i] != want_a[i]);
                println!(
                    "  {}  fused activation {} {}: {} [E={e}, M={m}, K={k}, inter={inter}]: h {}, a {}{}, spare rows {}, run to run {}",
                    if ok { "ok  " } else { "FAIL" },
                    kind.name(),
                    if with_probs { "with probs" } else { "no probs" },
                    case.name,
                    if h_same { "equal" } else { "DIFFERENT" },
                    if a_same { "equal" } else { "DIFFERENT" },
                    first_a
                        .map(|i| format!(" (first at row {} col {}: {} against {})", i / inter, i % inter, f(a[i]), f(want_a[i])))
                        .unwrap_or_default(),
                    if untouched { "untouched" } else { "WRITTEN" },
                    if repeat { "identical" } else { "DIFFERENT" },
                );
            }
        }
    }
    Ok(failures)
}

/// x W1 and swiglu with probs as the layer runs them today (the bulk kernel, then the activation
/// kernel in ExpMath::Fast) against the first GEMM with the activation fused: both timed, h and a
/// compared byte for byte; prints a line, returns its JSON row.
#[allow(clippy::too_many_arguments)]
fn fused_act_timing(
    dev: &Device,
    iters: usize,
    shape: &str,
    x: &Buffer,
    w: &Buffer,
    counts: &Buffer,
    e: usize,
    m: usize,
    k: usize,
    inter: usize,
) -> R<String> {
    use moe_core::activations::{ActivationKind, ActivationOptions};
    use moe_cuda::activations::{launch_activation, ExpMath};
    let width = 2 * inter;
    let opts = ActivationOptions::new(ActivationKind::Swiglu);
    let d_probs = dev.upload("probs", &act_probs(m))?;
    let p = |b: &Buffer| b.device_ptr(dev);
    let (h1, a1) = (dev.alloc("h", m * width * 2)?, dev.alloc("a", m * inter * 2)?);
    let (h2, a2) = (dev.alloc("h", m * width * 2)?, dev.alloc("a", m * inter * 2)?);
    let unfused = || -> R<()> {
        grouped_gemm::launch(dev, p(x), p(w), WeightLayout::KN, p(counts), p(&h1), DType::BF16, e, m, width, k, TileN::N256Bulk)?;
        launch_activation(dev, &opts, ExpMath::Fast, DType::BF16, &h1, m, width, Some(&d_probs), DType::BF16, &a1)?;
        Ok(())
    };
    let fused = || -> R<()> { grouped_gemm::launch_act(dev, p(x), p(w), p(counts), p(&h2), p(&a2), p(&d_probs), &opts, e, m, inter, k) };
    unfused()?;
    fused()?;
    let same = dev.download_new::<u16>("h", &h1, m * width)? == dev.download_new::<u16>("h", &h2, m * width)?
        && dev.download_new::<u16>("a", &a1, m * inter)? == dev.download_new::<u16>("a", &a2, m * inter)?;
    let (u_ms, _) = time_ms(dev, iters, unfused)?;
    let (f_ms, _) = time_ms(dev, iters, fused)?;
    println!(
        "  x @ W1 + swiglu (probs): bulk kernel + activation kernel {u_ms:.3} ms, fused {f_ms:.3} ms ({:.2}x); h and a {}",
        u_ms / f_ms,
        if same { "equal" } else { "DIFFERENT" }
    );
    Ok(format!(
        "{{\"shape\": {shape:?}, \"gemm\": \"x @ W1 + swiglu (probs)\", \"unfusedMs\": {u_ms}, \"fusedMs\": {f_ms}, \"sameBits\": {same}}}"
    ))
}

/// A small case's rows to gather: `x [x_rows, k]` of about half as many rows as the case has (so
/// rows repeat, as a token's k picks do), the source of each of the `m` rows in a random order,
/// two of them outside x (-1 and x_rows + 7: rows of zeros), and the rows gathered on the host.
struct GatherCase {
    x_rows: usize,
    x: Vec<u16>,
    rows_of: Vec<i32>,
    gathered: Vec<u16>,
}

fn gather_case(ci: usize, rows: usize, m: usize, k: usize) -> GatherCase {
    let x_rows = rows / 2 + 5;
    let x = random_bf16(x_rows * k, 5000 + ci as u64, 1.0);
    let mut rng = Rng(6000 + ci as u64);
    let mut rows_of: Vec<i32> = (0..m).map(|_| rng.below(x_rows) as i32).collect();
    if rows >= 4 {
        rows_of[1] = -1;
        rows_of[rows - 2] = x_rows as i32 + 7;
    }
    let mut gathered = vec![0u16; m * k];
    for (r, &src) in rows_of.iter().enumerate() {
        if (0..x_rows as i32).contains(&src) {
            let src = src as usize;
            gathered[r * k..(r + 1) * k].copy_from_slice(&x[src * k..(src + 1) * k]);
        }
    }
    GatherCase { x_rows, x, rows_of, gathered }
}

/// The kernels gathering their rows on load against the bulk kernels on the rows gathered by
/// the host (the permuted copy the layer makes today), on the small cases: the first GEMM
/// (`launch_gather`, x W1: the spare rows untouched) and the weight gradient
/// (`launch_wgrad_gather`, x^T dh: every element of dw), each equal byte for byte and run to run
/// identical. Returns the failures.
fn gather_checks(dev: &Device) -> R<usize> {
    let mut failures = 0;
    for (ci, case) in small_cases().iter().enumerate() {
        let (e, rows, m) = case.sizes();
        let (k, n) = (case.k, case.n);
        let g = gather_case(ci, rows, m, k);
        let x_rows = g.x_rows;
        let d_x = dev.upload("x", &g.x)?;
        let d_gathered = dev.upload("the gathered rows", &g.gathered)?;
        let d_rows = dev.upload("rows_of", &g.rows_of)?;
        let d_w = dev.upload("w", &random_bf16(e * k * n, 7000 + ci as u64, 1.0))?;
        let d_dy = dev.upload("dy", &random_bf16(m * n, 8000 + ci as u64, 1.0))?;
        let d_counts = dev.upload("counts", &case.counts)?;
        let p = |b: &Buffer| b.device_ptr(dev);
        for tile in [TileN::N256Bulk, TileN::N256Tma] {
            let bytes = (m * n * 2).next_multiple_of(4);
            let want = run_twice(dev, "out", bytes, |out| {
                grouped_gemm::launch(dev, p(&d_gathered), p(&d_w), WeightLayout::KN, p(&d_counts), out, DType::BF16, e, m, n, k, tile)
            })?;
            let runs = run_twice(dev, "out", bytes, |out| {
                grouped_gemm::launch_gather(dev, p(&d_x), x_rows, p(&d_rows), p(&d_w), p(&d_counts), out, e, m, n, k, tile)
            })?;
            let untouched = runs[0][rows * n * 2..m * n * 2].iter().all(|&b| b == 0xff);
            let dw_bytes = (e * k * n * 2).next_multiple_of(4);
            let want_dw = run_twice(dev, "dw", dw_bytes, |dw| {
                grouped_gemm::launch_wgrad(dev, p(&d_gathered), p(&d_dy), p(&d_counts), dw, DType::BF16, e, m, k, n, tile)
            })?;
            let runs_dw = run_twice(dev, "dw", dw_bytes, |dw| {
                grouped_gemm::launch_wgrad_gather(dev, p(&d_x), x_rows, p(&d_rows), p(&d_dy), p(&d_counts), dw, e, m, k, n, tile)
            })?;
            for (what, runs, want, extra_ok) in [("x W1", &runs, &want, untouched), ("x^T dh", &runs_dw, &want_dw, true)] {
                let same = runs[0] == want[0];
                let repeat = runs[0] == runs[1];
                let ok = same && repeat && extra_ok;
                if !ok {
                    failures += 1;
                }
                let first = (0..runs[0].len() / 2).find(|&i| runs[0][2 * i..2 * i + 2] != want[0][2 * i..2 * i + 2]);
                println!(
                "  {}  gather on load, {what}, {}: {} [E={e}, M={m}, K={k}, N={n}, x rows {x_rows}]: against the same epilogue's kernel on the gathered rows {}{}{}, run to run {}",
                if ok { "ok  " } else { "FAIL" },
                tile.name(),
                case.name,
                if same { "equal" } else { "DIFFERENT" },
                first.map(|i| format!(" (first at element {i})")).unwrap_or_default(),
                if extra_ok { "" } else { ", spare rows WRITTEN" },
                if repeat { "identical" } else { "DIFFERENT" },
            );
            }
        }
    }
    Ok(failures)
}

/// dW1 = x^T dh as the layer runs it today (the bulk weight-gradient kernel on the permuted copy of
/// the tokens, which permute's kernel makes: timed with and without that copy) against the kernel
/// gathering x's rows on load, at a shape; outputs compared byte for byte; prints a line, returns
/// its JSON row.
#[allow(clippy::too_many_arguments)]
fn wgrad_gather_timing(
    dev: &Device,
    iters: usize,
    shape: &str,
    x_rows: usize,
    rows_of: &[i32],
    counts: &[i32],
    d_counts: &Buffer,
    e: usize,
    ko: usize,
    n: usize,
    tile: TileN,
) -> R<String> {
    let m = rows_of.len();
    let (x, d_plan, permuted) = permuted_tokens(dev, x_rows, rows_of, counts, e, ko)?;
    let dy = dev.upload("dh", &random_bf16(m * n, 401, 1.0))?;
    let d_rows = dev.upload("rows_of", rows_of)?;
    let (o1, o2) = (dev.alloc("dw", e * ko * n * 2)?, dev.alloc("dw", e * ko * n * 2)?);
    let p = |b: &Buffer| b.device_ptr(dev);
    let bulk = || grouped_gemm::launch_wgrad(dev, p(&permuted), p(&dy), p(d_counts), p(&o1), DType::BF16, e, m, ko, n, tile);
    let copy_then_bulk = || -> R<()> {
        moe_cuda::permute::launch_permute(
            dev,
            moe_cuda::permute::PermuteKernel::Scatter,
            &x,
            ko * 2,
            &d_plan,
            None,
            None,
            &permuted,
            None,
        )?;
        bulk()
    };
    let gather = || grouped_gemm::launch_wgrad_gather(dev, p(&x), x_rows, p(&d_rows), p(&dy), p(d_counts), p(&o2), e, m, ko, n, tile);
    copy_then_bulk()?;
    gather()?;
    let first: Vec<u16> = dev.download_new("dw", &o2, e * ko * n)?;
    let same = dev.download_new::<u16>("dw", &o1, e * ko * n)? == first;
    let (c_ms, _) = time_ms(dev, iters, copy_then_bulk)?;
    let (b_ms, _) = time_ms(dev, iters, bulk)?;
    let (g_ms, _) = time_ms(dev, iters, gather)?;
    let again = dev.download_new::<u16>("dw", &o2, e * ko * n)? == first;
    println!(
        "  x^T @ dh gathering x's rows, {}: permute + kernel {c_ms:.3} ms (the kernel alone {b_ms:.3}), gather on load {g_ms:.3} ms ({:.2}x the pair, {:.2}x the kernel alone); dw {}, run to run {}",
        tile.name(),
        c_ms / g_ms,
        b_ms / g_ms,
        if same { "equal" } else { "DIFFERENT" },
        if again { "identical" } else { "DIFFERENT" },
    );
    Ok(format!(
        "{{\"shape\": {shape:?}, \"gemm\": \"x^T @ dh gathering x's rows\", \"kernel\": {:?}, \"permuteAndBulkMs\": {c_ms}, \"bulkMs\": {b_ms}, \"gatherMs\": {g_ms}, \"sameBits\": {same}, \"runToRunIdentical\": {again}}}",
        tile.name()
    ))
}

/// Random tokens `x [x_rows, k]` on the device, the plan of the routing `rows_of` / `counts` on the
/// device, and x's permuted copy made by permute's kernel (as the layer makes it).
fn permuted_tokens(
    dev: &Device,
    x_rows: usize,
    rows_of: &[i32],
    counts: &[i32],
    e: usize,
    k: usize,
) -> R<(Buffer, moe_cuda::permute::DevicePlan, Buffer)> {
    use moe_core::permute::DispatchPlan;
    use moe_cuda::permute::{launch_permute, DevicePlan, PermuteKernel};
    let plan = DispatchPlan {
        num_tokens: x_rows,
        num_experts: e,
        sorted_indices: rows_of.to_vec(),
        tokens_per_expert: counts.iter().map(|&c| c as usize).collect(),
    };
    let d_plan = DevicePlan::upload(dev, &plan)?;
    let x = dev.upload("x", &random_bf16(x_rows * k, 400, 1.0))?;
    let permuted = dev.alloc("the permuted tokens", rows_of.len() * k * 2)?;
    launch_permute(dev, PermuteKernel::Scatter, &x, k * 2, &d_plan, None, None, &permuted, None)?;
    Ok((x, d_plan, permuted))
}

/// x W1 as the layer runs it today (permute's kernel makes the expert-major copy of the tokens,
/// then the bulk kernel) against the GEMM gathering its rows on load, at a shape: `x_rows` tokens
/// of `k`, `rows_of` the routing's expert-major tokens. Both timed (and the bulk kernel alone), the
/// outputs compared byte for byte; prints a line, returns its JSON row.
#[allow(clippy::too_many_arguments)]
fn gather_timing(
    dev: &Device,
    iters: usize,
    shape: &str,
    x_rows: usize,
    rows_of: &[i32],
    w: &Buffer,
    counts: &[i32],
    d_counts: &Buffer,
    e: usize,
    k: usize,
    n: usize,
    tile: TileN,
) -> R<String> {
    use moe_cuda::permute::{launch_permute, PermuteKernel};
    let m = rows_of.len();
    let (x, d_plan, permuted) = permuted_tokens(dev, x_rows, rows_of, counts, e, k)?;
    let d_rows = dev.upload("rows_of", rows_of)?;
    let (o1, o2) = (dev.alloc("out", m * n * 2)?, dev.alloc("out", m * n * 2)?);
    let p = |b: &Buffer| b.device_ptr(dev);
    let bulk = || grouped_gemm::launch(dev, p(&permuted), p(w), WeightLayout::KN, p(d_counts), p(&o1), DType::BF16, e, m, n, k, tile);
    let copy_then_bulk = || -> R<()> {
        launch_permute(dev, PermuteKernel::Scatter, &x, k * 2, &d_plan, None, None, &permuted, None)?;
        bulk()
    };
    let gather = || grouped_gemm::launch_gather(dev, p(&x), x_rows, p(&d_rows), p(w), p(d_counts), p(&o2), e, m, n, k, tile);
    copy_then_bulk()?;
    gather()?;
    let same = dev.download_new::<u16>("out", &o1, m * n)? == dev.download_new::<u16>("out", &o2, m * n)?;
    let (c_ms, _) = time_ms(dev, iters, copy_then_bulk)?;
    let (b_ms, _) = time_ms(dev, iters, bulk)?;
    let (g_ms, _) = time_ms(dev, iters, gather)?;
    let again = {
        let o3 = dev.alloc("out", m * n * 2)?;
        grouped_gemm::launch_gather(dev, p(&x), x_rows, p(&d_rows), p(w), p(d_counts), p(&o3), e, m, n, k, tile)?;
        dev.download_new::<u16>("out", &o3, m * n)? == dev.download_new::<u16>("out", &o2, m * n)?
    };
    println!(
        "  x @ W1 gathering its rows, {}: permute + kernel {c_ms:.3} ms (the kernel alone {b_ms:.3}), gather on load {g_ms:.3} ms ({:.2}x the pair, {:.2}x the kernel alone); outputs {}, run to run {}; the permuted copy saved: {:.1} MiB",
        tile.name(),
        c_ms / g_ms,
        b_ms / g_ms,
        if same { "equal" } else { "DIFFERENT" },
        if again { "identical" } else { "DIFFERENT" },
        (m * k * 2) as f64 / (1u64 << 20) as f64
    );
    Ok(format!(
        "{{\"shape\": {shape:?}, \"gemm\": \"x @ W1 gathering its rows\", \"kernel\": {:?}, \"permuteAndBulkMs\": {c_ms}, \"bulkMs\": {b_ms}, \"gatherMs\": {g_ms}, \"sameBits\": {same}, \"runToRunIdentical\": {again}, \"permutedCopyBytes\": {}}}",
        tile.name(),
        m * k * 2
    ))
}

/// The weight-gradient kernel on the small cases: dw[e] = x_e^T dy_e (x [M, K], dy [M, N]) against
/// the host, every element of dw (experts with no rows: zeros), run twice; returns the failures.
fn wgrad_checks(dev: &Device) -> R<usize> {
    let mut failures = 0;
    for (ci, case) in small_cases().iter().enumerate() {
        let (e, _, m) = case.sizes();
        let (ko, n) = (case.k, case.n);
        let x = with_specials(case, random_bf16(m * ko, 3000 + ci as u64, 1.0), ko);
        let dy = random_bf16(m * n, 4000 + ci as u64, 1.0);
        let (d_x, d_dy, d_counts) = (dev.upload("x", &x)?, dev.upload("dy", &dy)?, dev.upload("counts", &case.counts)?);
        let mut reference = vec![(0f64, 0f64); e * ko * n];
        let mut r0 = 0;
        for (ex, &c) in case.counts.iter().enumerate() {
            for r in r0..r0 + c as usize {
                for i in 0..ko {
                    let xv = f(x[r * ko + i]);
                    for j in 0..n {
                        let p = xv * f(dy[r * n + j]);
                        let slot = &mut reference[(ex * ko + i) * n + j];
                        slot.0 += p;
                        slot.1 += p.abs();
                    }
                }
            }
            r0 += c as usize;
        }
        for (od, tile) in [
            (DType::BF16, TileN::N256),
            (DType::F32, TileN::N256),
            (DType::BF16, TileN::N256Bulk),
            (DType::BF16, TileN::N256Ring),
            (DType::BF16, TileN::N256Tma),
        ] {
            let size = od.size();
            let bytes = (e * ko * n * size).next_multiple_of(4);
            let p = |buf: &Buffer| buf.device_ptr(dev);
            let runs = run_twice(dev, "dw", bytes, |out| {
                grouped_gemm::launch_wgrad(dev, p(&d_x), p(&d_dy), p(&d_counts), out, od, e, m, ko, n, tile)
            })?;
            let check = HostCheck::new(&runs, od, &reference);
            let ok = check.report(
                format_args!("wgrad {} -> {}: {} [E={e}, M={m}, K={ko}, N={n}]", tile.name(), od.name(), case.name),
                |b| {
                    format!(
                        " (first: expert {} row {} col {}: got {}, want {})",
                        b.index / (ko * n),
                        (b.index / n) % ko,
                        b.index % n,
                        b.got,
                        b.want
                    )
                },
                "",
            );
            if !ok {
                failures += 1;
            }
        }
    }
    Ok(failures)
}

/// A random top-k routing (k distinct experts a token): the counts of each expert and the token of
/// each expert-major row (experts in turn, tokens ascending: permute's sortedIndices).
fn routing(tokens: usize, experts: usize, topk: usize, seed: u64) -> (Vec<i32>, Vec<i32>) {
    let mut rng = Rng(seed);
    let mut rows: Vec<Vec<i32>> = vec![Vec::new(); experts];
    let mut picked = Vec::with_capacity(topk);
    for t in 0..tokens {
        picked.clear();
        while picked.len() < topk {
            let x = rng.below(experts);
            if !picked.contains(&x) {
                picked.push(x);
            }
        }
        for &x in &picked {
            rows[x].push(t as i32);
        }
    }
    (rows.iter().map(|r| r.len() as i32).collect(), rows.concat())
}

/// The cuBLAS problems of a GEMM per expert with rows: `problem(c, r0, ex)` is expert ex's, its
/// c > 0 rows from row r0 on (the rows expert-major, `counts` of them).
fn per_expert(counts: &[i32], problem: impl Fn(usize, usize, usize) -> Problem) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut r0 = 0usize;
    for (ex, &c) in counts.iter().enumerate() {
        let c = c as usize;
        if c > 0 {
            problems.push(problem(c, r0, ex));
        }
        r0 += c;
    }
    problems
}

/// One GEMM of the experts at a shape: x [m, k] @ B[e] -> [m, n].
struct Gemm {
    name: &'static str,
    k: usize,
    n: usize,
    layout: WeightLayout,
    /// which weight tensor: 1 (W1 [E, dim, 2 inter]) or 2 (W2 [E, inter, dim])
    weight: u8,
    forward: bool,
}

/// Compares two bf16 outputs: (elements outside tolerance, max relative difference, first bad).
fn compare_bf16(a: &[u16], b: &[u16]) -> (usize, f64, Option<usize>) {
    let bad_max = a
        .par_chunks(1 << 16)
        .zip(b.par_chunks(1 << 16))
        .enumerate()
        .map(|(ci, (x, y))| {
            let mut bad = 0usize;
            let mut max_rel = 0f64;
            let mut first = None;
            for (i, (&p, &q)) in x.iter().zip(y).enumerate() {
                let (p, q) = (f(p), f(q));
                let d = (p - q).abs();
                let mag = p.abs().max(q.abs());
                // both are f32 sums rounded once to bf16: a rounding each (2^-8 relative) plus the
                // f32 sums' different orders
                let tol = mag / 128.0 + 1e-3;
                if mag > 1e-2 {
                    max_rel = max_rel.max(d / mag);
                }
                if d.is_nan() || d > tol {
                    bad += 1;
                    first.get_or_insert(ci * (1 << 16) + i);
                }
            }
            (bad, max_rel, first)
        })
        .reduce(|| (0, 0.0, None), |a, b| (a.0 + b.0, a.1.max(b.1), a.2.or(b.2)));
    bad_max
}

pub fn bench(args: &[String]) -> i32 {
    let (mut act, mut gather) = (false, false);
    let mut groups: Vec<i32> = Vec::new();
    let (mut tails, mut narrow) = (false, false);
    let mut rows_per_expert: Option<usize> = None;
    let (mut tiles, mut small_only, mut small, mut wgrad) = (TileN::ALL.iter().map(|(t, _)| *t).collect::<Vec<_>>(), false, true, true);
    let opts = ShapeOptions::parse(args, |flag, value| match (flag, value) {
        ("--tile", Some(v)) => {
            tiles = v.split(',').filter_map(TileN::from_short).collect();
            if tiles.len() != v.split(',').count() {
                let names: Vec<_> = TileN::ALL.iter().map(|(_, n)| *n).collect();
                eprintln!("ggemm: --tile: expected names of {}, got {v}", names.join(", "));
                tiles.clear();
            }
            Some(2)
        }
        ("--groups", Some(v)) => {
            groups = v.split(',').filter_map(|g| g.parse::<i32>().ok().filter(|&g| g >= 1)).collect();
            if groups.len() != v.split(',').count() {
                eprintln!("ggemm: --groups: expected column tiles a raster group, integers >= 1 separated by commas, got {v}");
                return None;
            }
            Some(2)
        }
        ("--tails", _) => {
            tails = true;
            Some(1)
        }
        ("--narrow", _) => {
            narrow = true;
            Some(1)
        }
        ("--rows-per-expert", Some(v)) => match v.parse::<usize>() {
            Ok(r) if r >= 1 => {
                rows_per_expert = Some(r);
                Some(2)
            }
            _ => {
                eprintln!("ggemm: --rows-per-expert: expected a row count (1 or more), got {v}");
                None
            }
        },
        ("--no-wgrad", _) => {
            wgrad = false;
            Some(1)
        }
        ("--act", _) => {
            act = true;
            Some(1)
        }
        ("--gather", _) => {
            gather = true;
            Some(1)
        }
        ("--small-only", _) => {
            small_only = true;
            Some(1)
        }
        ("--no-small", _) => {
            small = false;
            Some(1)
        }
        _ => None,
    });
    let opts = match opts {
        Ok(o) => o,
        Err(rc) => return rc,
    };
    if tiles.is_empty() {
        println!("ggemm: no kernel to run (--tile)");
        return 2;
    }
    let dev = match global_device() {
        Ok(d) => d,
        Err(rc) => return rc,
    };
    if let Err(e) = grouped_gemm::arch(dev) {
        println!("{e}");
        return 1;
    }
    let result = run(
        dev,
        &opts,
        &tiles,
        small_only,
        small,
        wgrad,
        Fusions {
            act,
            gather,
            settings: [(!groups.is_empty()).then(|| Settings::groups(groups)), tails.then(Settings::tails), narrow.then(Settings::narrow)]
                .into_iter()
                .flatten()
                .collect(),
            rows_per_expert,
        },
    );
    grouped_gemm::set_group_n(None);
    grouped_gemm::set_idle_tails(None);
    grouped_gemm::set_narrow(None);
    finish(&opts, "ggemm", result)
}

/// The fused kernels a run checks and times beside the plain ones (`--act`, `--gather`), the
/// settings it times each kernel with (`--groups`, `--tails`, `--narrow`), and the rows of the timed shapes'
/// experts (`--rows-per-expert N`: N rows each, where a random top-k routing's counts are the
/// default; 768 against 767 at the fine-grained shape, say, times an expert's partial last tile or
/// k-step against none at the same multiplications).
struct Fusions {
    act: bool,
    gather: bool,
    settings: Vec<Settings>,
    rows_per_expert: Option<usize>,
}

/// Settings of the launches that change how the work is done, not its sums: each kernel at the
/// shapes timed again with each (`--groups`: raster groups; `--tails`: idle or full tails, and
/// `--narrow`: narrow or full last column tiles, the token-side kernels only).
struct Settings {
    /// the JSON keys' stem (`groupsMs`, `groupsIdentical`) and the printed line's words
    key: &'static str,
    words: &'static str,
    labels: Vec<String>,
    token_side_only: bool,
    /// `Some(i)` puts setting i in place, `None` the default back
    apply: Box<dyn Fn(Option<usize>)>,
}

impl Settings {
    fn groups(groups: Vec<i32>) -> Settings {
        Settings {
            key: "groups",
            words: "raster groups (column tiles a group)",
            labels: groups.iter().map(|g| g.to_string()).collect(),
            token_side_only: false,
            apply: Box::new(move |i| grouped_gemm::set_group_n(i.map(|i| groups[i]))),
        }
    }
    /// A token-side launch flag on (the default, `on`'s label) against off (`off`'s): `set`
    /// takes `Some(on)`, or `None` for the default.
    fn on_off(key: &'static str, words: &'static str, on: &str, off: &str, set: fn(Option<bool>)) -> Settings {
        Settings {
            key,
            words,
            labels: vec![on.into(), off.into()],
            token_side_only: true,
            apply: Box::new(move |i| set(i.map(|i| i == 0))),
        }
    }
    fn tails() -> Settings {
        Settings::on_off("tails", "tails of <= 64 rows", "idle", "full", grouped_gemm::set_idle_tails)
    }
    fn narrow() -> Settings {
        Settings::on_off("narrow", "last column tiles of <= 128 columns", "narrow", "full", grouped_gemm::set_narrow)
    }
}

/// The kernel at the shapes timed again with each of `settings`' settings that apply to it (a
/// weight gradient: `weight`), three interleaved rounds (medians), its output (`len` bf16 values
/// into `out`) checked against `reference` (the default's) each time; prints a line a kind of
/// setting, counts a failure when a setting changed the bytes, and returns the JSON fields to add
/// (each with its leading comma); "" where none applies.
#[allow(clippy::too_many_arguments)]
fn settings_timing(
    dev: &Device,
    iters: usize,
    settings: &[Settings],
    weight: bool,
    out: &Buffer,
    len: usize,
    reference: &[u16],
    failures: &mut usize,
    what: &str,
    launch: impl Fn(&Buffer) -> R<()>,
) -> R<String> {
    let mut fields = String::new();
    for st in settings.iter().filter(|st| !(weight && st.token_side_only)) {
        let mut ms: Vec<Vec<f64>> = vec![Vec::new(); st.labels.len()];
        let mut same = true;
        for _round in 0..3 {
            for (i, times) in ms.iter_mut().enumerate() {
                (st.apply)(Some(i));
                launch(out)?;
                let got: Vec<u16> = dev.download_new("ours (a setting)", out, len)?;
                same &= got == reference;
                times.push(time_ms(dev, iters, || launch(out))?.0);
            }
        }
        (st.apply)(None);
        if !same {
            *failures += 1;
        }
        let med: Vec<f64> = ms.into_iter().map(crate::median).collect();
        let text = st.labels.iter().zip(&med).map(|(l, m)| format!("{l}: {m:.3} ms")).collect::<Vec<_>>().join(", ");
        println!("  {what:<10} {}: {text}; bytes as the default's: {}", st.words, if same { "yes" } else { "NO" });
        let json = st.labels.iter().zip(&med).map(|(l, m)| format!("\"{l}\": {m}")).collect::<Vec<_>>().join(", ");
        fields += &format!(", \"{0}Ms\": {{{json}}}, \"{0}Identical\": {same}", st.key);
    }
    Ok(fields)
}

fn run(
    dev: &Device,
    opts: &ShapeOptions,
    tiles: &[TileN],
    small_only: bool,
    small: bool,
    wgrad: bool,
    fusions: Fusions,
) -> R<(String, usize)> {
    let Fusions { act, gather, settings, rows_per_expert } = fusions;
    use std::io::Write;
    let iters = opts.iters;
    let info = dev.info();
    println!(
        "{} (cc {}), {} SMs; grouped GEMM kernels for {}",
        info.name,
        info.compute_capability,
        dev.sm_count(),
        grouped_gemm::arch(dev)?
    );
    // the cluster kernel's grid: its co-resident clusters (with 64 experts' shared memory)
    for &tile in tiles.iter() {
        match grouped_gemm::co_resident_clusters(dev, tile, 64) {
            Ok(Some(c)) => println!("{}: {c} clusters of 2 blocks run at once ({} blocks of {} SMs)", tile.name(), 2 * c, dev.sm_count()),
            Ok(None) => {}
            // (its launches will say the same; the other kernels' checks still run)
            Err(e) => println!("{}: co-resident clusters unknown: {e}", tile.name()),
        }
    }
    let mut failures = 0;
    for &tile in tiles.iter().filter(|_| small) {
        println!("small checks, tile {}:", tile.name());
        let _ = std::io::stdout().flush();
        failures += small_checks(dev, tile)?;
    }
    if wgrad && small {
        println!("small checks, weight gradients (tile 128x256):");
        let _ = std::io::stdout().flush();
        failures += wgrad_checks(dev)?;
    }
    if act && small {
        println!("small checks, the first GEMM with the activation fused:");
        let _ = std::io::stdout().flush();
        failures += act_checks(dev)?;
    }
    if gather && small {
        println!("small checks, the first GEMM gathering its rows on load:");
        let _ = std::io::stdout().flush();
        failures += gather_checks(dev)?;
    }
    if small_only {
        return Ok((format!("{{\"device\": {:?}, \"smallCheckFailures\": {failures}}}", info.name), failures));
    }
    let peak = bf16_peak(dev, iters)?;
    println!("bf16 GEMM rate (8192^3, cuBLAS): {peak:.0} TFLOP/s");
    let mut rows: Vec<String> = Vec::new();
    for s in &opts.shapes {
        dev.release_cached_memory()?;
        let (t, e, topk, dim, inter) = (s.tokens, s.experts, s.topk, s.dim, s.inter);
        let width = 2 * inter;
        let (counts, rows_of) = match rows_per_expert {
            // (row i of the experts is token i mod T: the gathering kernels' rows)
            Some(r) => (vec![r as i32; e], (0..e * r).map(|i| (i % t) as i32).collect()),
            None => routing(t, e, topk, 0x5eed ^ e as u64),
        };
        let m = rows_of.len();
        let d_counts = dev.upload("counts", &counts)?;
        let w1 = dev.upload("W1", &random_bf16(e * dim * width, 11, 1.0 / (dim as f32).sqrt()))?;
        let w2 = dev.upload("W2", &random_bf16(e * inter * dim, 12, 1.0 / (inter as f32).sqrt()))?;
        let gemms = [
            Gemm { name: "x @ W1", k: dim, n: width, layout: WeightLayout::KN, weight: 1, forward: true },
            Gemm { name: "a @ W2", k: inter, n: dim, layout: WeightLayout::KN, weight: 2, forward: true },
            Gemm { name: "dy @ W2^T", k: dim, n: inter, layout: WeightLayout::NK, weight: 2, forward: false },
            Gemm { name: "dh @ W1^T", k: width, n: dim, layout: WeightLayout::NK, weight: 1, forward: false },
        ];
        println!(
            "{}: T={t} k={topk} -> {m} rows, E={e}, dim {dim}, inter {inter}; rows an expert {}..{}",
            s.name,
            counts.iter().min().unwrap_or(&0),
            counts.iter().max().unwrap_or(&0)
        );
        let mut sums = [[0f64; 3]; 2]; // [forward, input grads] x [flops, ours ms (best tile), cuBLAS ms]
        for (gi, g) in gemms.iter().enumerate() {
            let w = if g.weight == 1 { &w1 } else { &w2 };
            let x = dev.upload("x", &random_bf16(m * g.k, 100 + gi as u64, 1.0))?;
            let flops = 2.0 * (m * g.n * g.k) as f64;
            // cuBLAS, per expert, as the experts run it
            let c_out = dev.alloc("cuBLAS out", m * g.n * 2)?;
            let problems = per_expert(&counts, |c, r0, ex| Problem {
                m: c,
                n: g.n,
                k: g.k,
                a: x.device_ptr(dev) + (r0 * g.k * 2) as u64,
                b: w.device_ptr(dev) + (ex * g.k * g.n * 2) as u64,
                c: c_out.device_ptr(dev) + (r0 * g.n * 2) as u64,
            });
            let trans_b = g.layout == WeightLayout::NK;
            let cublas = || run_gemms(dev, &problems, (DType::BF16, false), (DType::BF16, trans_b), DType::BF16);
            cublas()?;
            let c_host: Vec<u16> = dev.download_new("cuBLAS out", &c_out, m * g.n)?;
            let (c_ms, _) = time_ms(dev, iters, cublas)?;
            let c_tf = flops / (c_ms * 1e-3) / 1e12;
            println!(
                "  {:<10} K={:<5} N={:<5} cuBLAS per expert: {c_ms:.3} ms, {c_tf:.0} TFLOP/s ({:.1}% of bf16 rate)",
                g.name,
                g.k,
                g.n,
                100.0 * c_tf / peak
            );
            let _ = std::io::stdout().flush();
            let mut best = f64::INFINITY;
            for &tile in tiles {
                let o1 = dev.alloc("ours", m * g.n * 2)?;
                let o2 = dev.alloc("ours", m * g.n * 2)?;
                let ours = |o: &Buffer| {
                    grouped_gemm::launch(
                        dev,
                        x.device_ptr(dev),
                        w.device_ptr(dev),
                        g.layout,
                        d_counts.device_ptr(dev),
                        o.device_ptr(dev),
                        DType::BF16,
                        e,
                        m,
                        g.n,
                        g.k,
                        tile,
                    )
                };
                ours(&o1)?;
                ours(&o2)?;
                let a: Vec<u16> = dev.download_new("ours", &o1, m * g.n)?;
                let b: Vec<u16> = dev.download_new("ours", &o2, m * g.n)?;
                let same = a == b;
                let (bad, max_rel, first) = compare_bf16(&a, &c_host);
                let (ms, _) = time_ms(dev, iters, || ours(&o1))?;
                let tf = flops / (ms * 1e-3) / 1e12;
                let ok = same && bad == 0;
                if !ok {
                    failures += 1;
                }
                if ok {
                    best = best.min(ms);
                }
                println!(
                    "  {:<10} ours, {:<18}: {ms:.3} ms, {tf:.0} TFLOP/s ({:.1}% of bf16 rate, {:.2}x cuBLAS); {} vs cuBLAS: max rel diff {max_rel:.2e}, {bad} outside tolerance{}; run to run {}",
                    g.name,
                    tile.name(),
                    100.0 * tf / peak,
                    c_ms / ms,
                    if ok { "ok" } else { "FAIL" },
                    first.map(|i| format!(" (first at row {} col {}: ours {} cuBLAS {})", i / g.n, i % g.n, f(a[i]), f(c_host[i]))).unwrap_or_default(),
                    if same { "identical" } else { "DIFFERENT" },
                );
                let _ = std::io::stdout().flush();
                let group_field = settings_timing(dev, iters, &settings, false, &o2, m * g.n, &a, &mut failures, g.name, ours)?;
                rows.push(format!(
                    "{{\"shape\": {:?}, \"gemm\": {:?}, \"kernel\": {:?}, \"m\": {m}, \"k\": {}, \"n\": {}, \"experts\": {e}, \"oursMs\": {ms}, \"oursTflops\": {tf}, \"oursPctOfBf16\": {}, \"cublasMs\": {c_ms}, \"cublasTflops\": {c_tf}, \"cublasPctOfBf16\": {}, \"maxRelDiff\": {max_rel}, \"outsideTolerance\": {bad}, \"runToRunIdentical\": {same}{group_field}}}",
                    s.name,
                    g.name,
                    tile.name(),
                    g.k,
                    g.n,
                    100.0 * tf / peak,
                    100.0 * c_tf / peak
                ));
            }
            if act && g.name == "x @ W1" {
                rows.push(fused_act_timing(dev, iters, s.name, &x, w, &d_counts, e, m, g.k, inter)?);
            }
            if gather && g.name == "x @ W1" {
                for tile in [TileN::N256Bulk, TileN::N256Tma] {
                    rows.push(gather_timing(dev, iters, s.name, t, &rows_of, w, &counts, &d_counts, e, g.k, g.n, tile)?);
                }
            }
            let slot = if g.forward { 0 } else { 1 };
            sums[slot][0] += flops;
            sums[slot][1] += best;
            sums[slot][2] += c_ms;
        }
        // the weight gradients: dW1 = x^T dh [E, dim, width], dW2 = a^T dy [E, inter, dim]
        let mut wsum = [0f64; 3];
        for (wi, (name, ko, nn)) in [("x^T @ dh", dim, width), ("a^T @ dy", inter, dim)].into_iter().enumerate() {
            if !wgrad {
                break;
            }
            let x = dev.upload("x", &random_bf16(m * ko, 200 + wi as u64, 1.0))?;
            let dy = dev.upload("dy", &random_bf16(m * nn, 300 + wi as u64, 1.0))?;
            let flops = 2.0 * (m * ko * nn) as f64;
            let c_out = dev.alloc("cuBLAS dw", e * ko * nn * 2)?;
            dev.memset_zero("cuBLAS dw", &c_out, e * ko * nn * 2)?;
            let problems = per_expert(&counts, |c, r0, ex| Problem {
                m: ko,
                n: nn,
                k: c,
                a: x.device_ptr(dev) + (r0 * ko * 2) as u64,
                b: dy.device_ptr(dev) + (r0 * nn * 2) as u64,
                c: c_out.device_ptr(dev) + (ex * ko * nn * 2) as u64,
            });
            let cublas = || run_gemms(dev, &problems, (DType::BF16, true), (DType::BF16, false), DType::BF16);
            cublas()?;
            let c_host: Vec<u16> = dev.download_new("cuBLAS dw", &c_out, e * ko * nn)?;
            let (c_ms, _) = time_ms(dev, iters, cublas)?;
            let c_tf = flops / (c_ms * 1e-3) / 1e12;
            let mut best = f64::INFINITY;
            for &tile in tiles.iter().filter(|t| t.columns() == 256) {
                let o1 = dev.alloc("ours dw", e * ko * nn * 2)?;
                let o2 = dev.alloc("ours dw", e * ko * nn * 2)?;
                let ours = |o: &Buffer| {
                    grouped_gemm::launch_wgrad(
                        dev,
                        x.device_ptr(dev),
                        dy.device_ptr(dev),
                        d_counts.device_ptr(dev),
                        o.device_ptr(dev),
                        DType::BF16,
                        e,
                        m,
                        ko,
                        nn,
                        tile,
                    )
                };
                ours(&o1)?;
                ours(&o2)?;
                let a: Vec<u16> = dev.download_new("ours dw", &o1, e * ko * nn)?;
                let b: Vec<u16> = dev.download_new("ours dw", &o2, e * ko * nn)?;
                let same = a == b;
                let (bad, max_rel, first) = compare_bf16(&a, &c_host);
                let (ms, _) = time_ms(dev, iters, || ours(&o1))?;
                let tf = flops / (ms * 1e-3) / 1e12;
                let ok = same && bad == 0;
                if ok {
                    best = best.min(ms);
                } else {
                    failures += 1;
                }
                println!(
                    "  {name:<10} K={m:<5} [{ko} x {nn}] x {e}: cuBLAS per expert {c_ms:.3} ms, {c_tf:.0} TFLOP/s ({:.1}%); ours {}: {ms:.3} ms, {tf:.0} TFLOP/s ({:.1}% of bf16 rate, {:.2}x cuBLAS); {} vs cuBLAS: max rel diff {max_rel:.2e}, {bad} outside tolerance{}; run to run {}",
                    100.0 * c_tf / peak,
                    tile.name(),
                    100.0 * tf / peak,
                    c_ms / ms,
                    if ok { "ok" } else { "FAIL" },
                    first.map(|i| format!(" (first at {i}: ours {} cuBLAS {})", f(a[i]), f(c_host[i]))).unwrap_or_default(),
                    if same { "identical" } else { "DIFFERENT" },
                );
                let _ = std::io::stdout().flush();
                let group_field = settings_timing(dev, iters, &settings, true, &o2, e * ko * nn, &a, &mut failures, name, ours)?;
                rows.push(format!(
                    "{{\"shape\": {:?}, \"gemm\": {name:?}, \"kernel\": {:?}, \"m\": {m}, \"k\": {ko}, \"n\": {nn}, \"experts\": {e}, \"oursMs\": {ms}, \"oursTflops\": {tf}, \"oursPctOfBf16\": {}, \"cublasMs\": {c_ms}, \"cublasTflops\": {c_tf}, \"cublasPctOfBf16\": {}, \"maxRelDiff\": {max_rel}, \"outsideTolerance\": {bad}, \"runToRunIdentical\": {same}{group_field}}}",
                    s.name,
                    format!("wgrad {}", tile.name()),
                    100.0 * tf / peak,
                    100.0 * c_tf / peak
                ));
            }
            if gather && wi == 0 {
                for tile in [TileN::N256Bulk, TileN::N256Tma] {
                    rows.push(wgrad_gather_timing(dev, iters, s.name, t, &rows_of, &counts, &d_counts, e, ko, nn, tile)?);
                }
            }
            if best.is_finite() {
                wsum[0] += flops;
                wsum[1] += best;
                wsum[2] += c_ms;
            }
        }
        // [flops, ours ms, cuBLAS ms] of a group of GEMMs as % of the bf16 rate
        let summary = |what: &str, [fl, ours, cub]: [f64; 3]| {
            println!(
                "  {} {what}: ours {:.1}% of the bf16 rate, cuBLAS {:.1}% ({:.2}x)",
                s.name,
                100.0 * fl / (ours * 1e-3) / 1e12 / peak,
                100.0 * fl / (cub * 1e-3) / 1e12 / peak,
                cub / ours
            )
        };
        if wsum[1] > 0.0 {
            summary("weight gradients (x^T dh + a^T dy)", wsum);
        }
        for (slot, what) in [(0, "forward (x W1 + a W2)"), (1, "input gradients (dy W2^T + dh W1^T)")] {
            summary(what, sums[slot]);
        }
    }
    let json = format!("{{\"device\": {:?}, \"bf16PeakTflops\": {peak}, \"iters\": {iters}, \"rows\": [{}]}}", info.name, rows.join(", "));
    Ok((json, failures))
}
