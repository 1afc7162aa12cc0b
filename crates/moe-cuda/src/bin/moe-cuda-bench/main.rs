//! moe-cuda-bench: checks and times the CUDA kernels on the GPU machine.
//!
//!   moe-cuda-bench info                 is CUDA available here (and why not)
//!   moe-cuda-bench compile [ARCH]       compile kernels/*.cu with NVRTC only (no GPU needed), default sm_90
//!   moe-cuda-bench run [--iters N] [--out FILE] [--shapes deepseek,mixtral]
//!   moe-cuda-bench experts [--iters N] [--out FILE] [--shapes LAYER]
//!   moe-cuda-bench train [--iters N] [--out FILE] [--shapes LAYER]
//!   moe-cuda-bench ggemm [--iters N] [--out FILE] [--shapes LAYER] [--tile 128,256,bulk] [--small-only] [--no-small]
//!   moe-cuda-bench act [--iters N] [--out FILE] [--shapes LAYER]
//!   moe-cuda-bench host [--calls N] [--out FILE]
//!
//! The shapes are bench/shapes.json's (shapes.rs): `run`'s its dispatch shapes, LAYER a comma list
//! of its layer shapes (fine-grained, mixtral, deepseek-v3-ep8), its byDefault ones when absent.
//!
//! `host`: see host.rs beside this file (the host's time a call of the backend's building blocks,
//! from Rust).
//!
//! `act`: see act.rs beside this file (the activation kernels' variants byte for byte, and the
//! experts' bf16 passes timed).
//!
//! `ggemm`: see ggemm.rs beside this file (our Hopper grouped GEMM against a host reference and
//! the cuBLAS per-expert path, and timed).
//!
//! `experts`: see experts.rs beside this file (expert GEMMs vs the measured bf16
//! rate, experts forward/backward, the dispatch + experts layer).
//!
//! `run`, for each shape: builds a random top-k routing, runs permute (with probs) and
//! unpermute (with probs, and without) on the GPU, checks them bit for bit against moe-core on
//! the CPU (and unpermute against itself, run twice), then times with CUDA events: permute
//! (token-major scatter, and slot-major gather), unpermute with and without probs, and a
//! device-to-device copy moving the same number of bytes. Bytes count what must be read plus
//! written: permute reads T*H and writes N*H token elements, unpermute the reverse. Prints a
//! table and writes JSON.

use std::time::Instant;

use half::bf16;
use moe_core::permute::{apply_plan, plan, plan as plan_fn, unpermute, PermuteOptions, UnpermuteOptions};
use moe_core::routing::{route, topk, RouteOptions, ScoreFunction};
use moe_core::tensor::{DType, Data, Float, TensorRef};
use moe_cuda::device_ops::{
    build_plan, launch_route, launch_topk, permute_device, route_device, route_launch, set_fused_permute, topk_device, unpermute_device,
};
use moe_cuda::permute::{launch_permute, launch_unpermute, DevicePlan, PermuteKernel};
use moe_cuda::DeviceTensor;
use moe_cuda::{compile, Device};

mod act;
mod experts;
mod ggemm;
mod host;
mod shapes;
mod train;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match args.first().map(|s| s.as_str()) {
        Some("info") => info(),
        Some("compile") => compile_only(args.get(1).map(|s| s.as_str()).unwrap_or("sm_90")),
        Some("run") => run(&args[1..]),
        Some("experts") => experts(&args[1..]),
        Some("train") => train(&args[1..]),
        Some("ggemm") => ggemm::bench(&args[1..]),
        Some("act") => act::bench(&args[1..]),
        Some("host") => host::bench(&args[1..]),
        _ => {
            eprintln!("usage: moe-cuda-bench info | compile [ARCH] | run [--iters N] [--out FILE] [--shapes deepseek,mixtral] | experts [--iters N] [--out FILE] [--shapes LAYER] | train [--iters N] [--out FILE] [--shapes LAYER] | ggemm [--iters N] [--out FILE] [--shapes LAYER] [--tile 128,256,bulk] [--small-only] [--no-small] | act [--iters N] [--out FILE] [--shapes LAYER] | host [--calls N] [--out FILE]\n(shapes: bench/shapes.json; LAYER a comma list of its layer shapes, fine-grained, mixtral, deepseek-v3-ep8; its byDefault ones when absent; none: no shape)");
            2
        }
    };
    std::process::exit(code);
}

fn info() -> i32 {
    match moe_cuda::availability() {
        Ok(i) => {
            println!(
                "CUDA available: {} (cc {}, {}), driver CUDA {}, {:.1} GiB, kernels: {}",
                i.name,
                i.compute_capability,
                i.arch,
                i.driver_version,
                i.total_memory as f64 / (1u64 << 30) as f64,
                i.kernels
            );
            0
        }
        Err(reason) => {
            println!("CUDA unavailable: {reason}");
            0
        }
    }
}

fn compile_only(arch: &str) -> i32 {
    let mut rc = 0;
    for src in compile::ALL {
        let t0 = Instant::now();
        match compile::compile_cubin(src, arch) {
            Ok(cubin) => {
                println!("kernels/{} -> {} bytes of CUBIN for {arch} in {:.2} s", src.file, cubin.len(), t0.elapsed().as_secs_f64());
                // MOE_DISPATCH_CUBIN_OUT=DIR: the cubins kept (DIR/FILE.ARCH.cubin), to compare a
                // kernel's machine code across a change: scripts/cubin-diff.py)
                if let Ok(dir) = std::env::var("MOE_DISPATCH_CUBIN_OUT") {
                    let path = std::path::Path::new(&dir).join(format!("{}.{arch}.cubin", src.file));
                    if let Err(e) = std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&path, &cubin)) {
                        println!("writing {}: {e}", path.display());
                        rc = 1;
                    }
                }
            }
            Err(e) => {
                println!("kernels/{}: {e}", src.file);
                rc = 1;
            }
        }
    }
    rc
}

fn experts(args: &[String]) -> i32 {
    per_shape(args, "experts", true, experts::bench)
}

fn train(args: &[String]) -> i32 {
    per_shape(args, "train", false, |dev, s, iters, _| train::bench(dev, s, iters))
}

/// A command over the experts' shapes (`--iters N`, `--out FILE`, `--shapes a,b`): one JSON row
/// each, with the measured bf16 GEMM rate first when `with_peak`.
fn per_shape(
    args: &[String],
    what: &str,
    with_peak: bool,
    row: impl Fn(&Device, &shapes::ExpertShape, usize, f64) -> moe_cuda::Result<experts::flat_json::Obj>,
) -> i32 {
    let opts = match ShapeOptions::parse(args, |_, _| None) {
        Ok(o) => o,
        Err(rc) => return rc,
    };
    let iters = opts.iters;
    let dev = match global_device() {
        Ok(d) => d,
        Err(rc) => return rc,
    };
    let result = (|| -> moe_cuda::Result<String> {
        let peak = if with_peak { experts::bf16_peak(dev, iters)? } else { f64::NAN };
        if with_peak {
            println!("bf16 GEMM rate (8192^3, cuBLAS): {peak:.0} TFLOP/s");
        }
        let mut rows = Vec::new();
        for &s in &opts.shapes {
            // each shape starts with the memory pool's cached memory released (as a user switching
            // shapes should: on an H200 the fine-grained GEMMs ran at 62-67% of the bf16 rate
            // after the Mixtral-like shape with its memory still in the pool, 72-82% with it
            // released); MOE_BENCH_KEEP_POOL=1 keeps it
            if std::env::var_os("MOE_BENCH_KEEP_POOL").is_none() {
                dev.release_cached_memory()?;
            }
            rows.push(row(dev, s, iters, peak)?.to_json());
        }
        let peak_field = if with_peak { format!(", \"bf16PeakTflops\": {peak}") } else { String::new() };
        Ok(format!("{{\"device\": {:?}{peak_field}, \"iters\": {iters}, \"rows\": [{}]}}", dev.info().name, rows.join(", ")))
    })();
    match result {
        Ok(json) => {
            opts.write(&json);
            0
        }
        Err(e) => {
            println!("{what} bench failed: {e}");
            1
        }
    }
}

/// The options of the commands over the experts' shapes: `--iters N` (10 by default),
/// `--out FILE`, `--shapes a,b` (bench/shapes.json's layer shapes; its byDefault ones when absent).
struct ShapeOptions {
    iters: usize,
    out: Option<String>,
    shapes: Vec<&'static shapes::ExpertShape>,
}

impl ShapeOptions {
    /// Parses `args`: the options above, and a command's own through `own(flag, value)`, which
    /// takes the flag (and the value when it has one) and returns how many arguments it took,
    /// or None when the flag is not one of its own. Err(2), the exit code, after an unknown or
    /// incomplete argument.
    fn parse(args: &[String], mut own: impl FnMut(&str, Option<&String>) -> Option<usize>) -> Result<ShapeOptions, i32> {
        let mut opts = ShapeOptions { iters: 10, out: None, shapes: Vec::new() };
        let mut names: Option<Vec<String>> = None;
        let mut i = 0;
        while i < args.len() {
            match (args[i].as_str(), args.get(i + 1)) {
                ("--iters", Some(v)) => opts.iters = v.parse().expect("--iters N"),
                ("--out", Some(v)) => opts.out = Some(v.clone()),
                ("--shapes", Some(v)) => names = Some(v.split(',').map(String::from).collect()),
                (other, value) => match own(other, value) {
                    Some(taken) => {
                        i += taken;
                        continue;
                    }
                    None => {
                        eprintln!("unknown or incomplete argument {other}");
                        return Err(2);
                    }
                },
            }
            i += 2;
        }
        opts.shapes = shapes::select_layer(names.as_deref()).map_err(|e| {
            eprintln!("{e}");
            2
        })?;
        Ok(opts)
    }

    /// Writes `json` to the `--out` file, or prints it.
    fn write(&self, json: &str) {
        match &self.out {
            Some(path) => std::fs::write(path, json).expect("writing --out"),
            None => println!("{json}"),
        }
    }
}

/// A checking command's exit code: its JSON written (`--out` or printed) and 0, or 1 after
/// printing how many checks failed, or 1 after printing the error that stopped it.
fn finish(opts: &ShapeOptions, what: &str, result: moe_cuda::Result<(String, usize)>) -> i32 {
    match result {
        Ok((json, failures)) => {
            opts.write(&json);
            if failures > 0 {
                println!("{failures} check(s) failed");
                1
            } else {
                0
            }
        }
        Err(e) => {
            println!("{what} failed: {e}");
            1
        }
    }
}

/// The process's device, or the exit code 1 after printing why there is none.
fn global_device() -> Result<&'static Device, i32> {
    Device::global().map_err(|e| {
        println!("{e}");
        1
    })
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    xs[xs.len() / 2]
}

/// Median and minimum of `iters` timed runs of `f` (CUDA events around each), after 3 warm-ups.
fn time_ms(dev: &Device, iters: usize, mut f: impl FnMut() -> moe_cuda::Result<()>) -> moe_cuda::Result<(f64, f64)> {
    for _ in 0..3 {
        f()?;
    }
    dev.synchronize("warm-up")?;
    let ctx = dev.context();
    let stream = dev.stream();
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let start =
            ctx.new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| moe_cuda::Error::driver("event", e))?;
        let end =
            ctx.new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| moe_cuda::Error::driver("event", e))?;
        start.record(stream).map_err(|e| moe_cuda::Error::driver("event", e))?;
        f()?;
        end.record(stream).map_err(|e| moe_cuda::Error::driver("event", e))?;
        end.synchronize().map_err(|e| moe_cuda::Error::driver("event", e))?;
        times.push(start.elapsed_ms(&end).map_err(|e| moe_cuda::Error::driver("event", e))? as f64);
    }
    let min = times.iter().cloned().fold(f64::INFINITY, f64::min);
    Ok((median(times), min))
}

/// The GPU time of one call of `f` with `iters` calls queued back to back (events around all of
/// them, one synchronisation): the host queues ahead of the GPU, as in a training step, so the
/// GPU does not wait for each call's first kernels to be queued (`time_ms` synchronises after
/// every call, and a pass that takes the host about as long to queue as the GPU to run measures
/// the host too).
fn back_to_back_ms(dev: &Device, iters: usize, mut f: impl FnMut() -> moe_cuda::Result<()>) -> moe_cuda::Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    dev.synchronize("warm-up")?;
    let ctx = dev.context();
    let stream = dev.stream();
    let event =
        || ctx.new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| moe_cuda::Error::driver("event", e));
    let (start, end) = (event()?, event()?);
    start.record(stream).map_err(|e| moe_cuda::Error::driver("event", e))?;
    for _ in 0..iters {
        f()?;
    }
    end.record(stream).map_err(|e| moe_cuda::Error::driver("event", e))?;
    end.synchronize().map_err(|e| moe_cuda::Error::driver("event", e))?;
    Ok(start.elapsed_ms(&end).map_err(|e| moe_cuda::Error::driver("event", e))? as f64 / iters as f64)
}

fn run(args: &[String]) -> i32 {
    let mut iters = 20usize;
    let mut out: Option<String> = None;
    let mut names: Option<Vec<String>> = None;
    let mut host_rows = true;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--iters" => {
                iters = args[i + 1].parse().expect("--iters N");
                i += 1;
            }
            "--out" => {
                out = Some(args[i + 1].clone());
                i += 1;
            }
            "--skip-host" => host_rows = false,
            "--shapes" => {
                names = Some(args[i + 1].split(',').map(String::from).collect());
                i += 1;
            }
            other => {
                eprintln!("unknown argument {other}");
                return 2;
            }
        }
        i += 1;
    }
    let shapes = match shapes::select_dispatch(names.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    let t_open = Instant::now();
    let dev = match global_device() {
        Ok(d) => d,
        Err(rc) => return rc,
    };
    let info = dev.info();
    println!(
        "device: {} (cc {}, {}), driver CUDA {}, kernels {} (open took {:.2} s)",
        info.name,
        info.compute_capability,
        info.arch,
        info.driver_version,
        info.kernels,
        t_open.elapsed().as_secs_f64()
    );
    let mut rows = Vec::new();
    let mut checks = Vec::new();
    let mut ok = true;
    for shape in shapes {
        match bench_shape(dev, shape, iters, host_rows) {
            Ok((r, c)) => {
                ok &= c.iter().all(|(_, pass)| *pass);
                rows.extend(r);
                checks.extend(c);
            }
            Err(e) => {
                println!("{}: {e}", shape.name);
                ok = false;
            }
        }
    }
    match bench_route(dev, iters) {
        Ok((r, c)) => {
            ok &= c.iter().all(|(_, pass)| *pass);
            rows.extend(r);
            checks.extend(c);
        }
        Err(e) => {
            println!("route: {e}");
            ok = false;
        }
    }
    println!();
    println!("{:<9} {:<26} {:>9} {:>9} {:>8} {:>8}", "shape", "op", "ms(med)", "ms(min)", "GB/s", "vs copy");
    for r in &rows {
        println!("{:<9} {:<26} {:>9.3} {:>9.3} {:>8.0} {:>7.0}%", r.shape, r.op, r.ms, r.ms_min, r.gbps, r.ratio * 100.0);
    }
    let passed = checks.iter().filter(|(_, p)| *p).count();
    println!("checks: {passed} passed, {} failed", checks.len() - passed);
    for (name, pass) in &checks {
        if !pass {
            println!("  FAILED {name}");
        }
    }
    let json = format!(
        "{{\"device\":{{\"name\":{:?},\"computeCapability\":{:?},\"arch\":{:?},\"driverCuda\":{:?},\"totalMemory\":{}}},\"kernels\":{:?},\"iters\":{iters},\"rows\":[{}],\"checks\":{{\"passed\":{passed},\"failed\":{},\"names\":[{}]}}}}",
        info.name,
        info.compute_capability,
        info.arch,
        info.driver_version,
        info.total_memory,
        info.kernels,
        rows.iter().map(|r| r.json()).collect::<Vec<_>>().join(","),
        checks.len() - passed,
        checks.iter().map(|(n, p)| format!("{{\"name\":{n:?},\"pass\":{p}}}")).collect::<Vec<_>>().join(","),
    );
    if let Some(path) = out {
        std::fs::write(&path, &json).expect("writing --out");
        println!("wrote {path}");
    } else {
        println!("{json}");
    }
    if ok {
        0
    } else {
        1
    }
}

struct Row {
    shape: &'static str,
    op: String,
    ms: f64,
    ms_min: f64,
    bytes: usize,
    gbps: f64,
    ratio: f64,
    dims: String,
}

impl Row {
    fn json(&self) -> String {
        format!(
            "{{\"shape\":{:?},\"dims\":{:?},\"op\":{:?},\"msMedian\":{:.4},\"msMin\":{:.4},\"bytes\":{},\"gbPerSecond\":{:.1},\"fractionOfCopy\":{:.3}}}",
            self.shape, self.dims, self.op, self.ms, self.ms_min, self.bytes, self.gbps, self.ratio
        )
    }
}

type Checks = Vec<(String, bool)>;

fn bench_shape(dev: &Device, s: &shapes::DispatchShape, iters: usize, host_rows: bool) -> moe_cuda::Result<(Vec<Row>, Checks)> {
    let (t, h, e, k) = (s.tokens, s.hidden, s.experts, s.topk);
    let t0 = Instant::now();
    let mut rng = Rng(0x5eed ^ (t * 31 + h * 7 + e) as u64);
    let mut map = vec![0u8; t * e];
    let mut dense = vec![0f32; t * e];
    let mut experts: Vec<usize> = (0..e).collect();
    for tok in 0..t {
        for j in 0..k {
            let r = j + rng.below(e - j);
            experts.swap(j, r);
            map[tok * e + experts[j]] = 1;
            dense[tok * e + experts[j]] = rng.uniform();
        }
    }
    let tokens: Vec<u16> = (0..t * h).map(|_| <bf16 as Float>::from_f32(rng.uniform() * 4.0 - 2.0).to_bits()).collect();
    let map_ref = TensorRef::new("routingMap", DType::Bool, vec![t, e], &map)?;
    let plan = plan(&map_ref, t, PermuteOptions::default())?;
    let n = plan.num_slots();
    let experts_of = plan.slot_experts();
    let slot_probs: Vec<f32> = (0..n).map(|i| dense[plan.sorted_indices[i] as usize * e + experts_of[i]]).collect();
    println!("{}: T={t} H={h} E={e} k={k} -> N={n} slots (inputs made in {:.1} s)", s.name, t0.elapsed().as_secs_f64());

    let d_plan = DevicePlan::upload(dev, &plan)?;
    let d_sorted = dev.upload("sortedIndices", &plan.sorted_indices)?;
    let d_tokens = dev.upload("tokens", &tokens)?;
    let d_dense = dev.upload("probs", &dense)?;
    let d_slot_probs = dev.upload("slot probs", &slot_probs)?;
    let d_perm = dev.alloc("permutedTokens", n * h * 2)?;
    let d_perm_probs = dev.alloc("permutedProbs", n * 4)?;
    let d_out = dev.alloc("unpermuted", t * h * 2)?;
    let csr = moe_cuda::permute::token_csr(&plan.sorted_indices, t)?;

    // --- correctness at this shape, against the CPU core
    let mut checks: Checks = Vec::new();
    let tc = Instant::now();
    let tok_ref = TensorRef::of("tokens", vec![t, h], bytemuck::cast_slice::<u16, bf16>(&tokens))?;
    let cpu = apply_plan(&tok_ref, h, &plan, Some(&dense))?;
    for kernel in [PermuteKernel::Scatter, PermuteKernel::Gather] {
        launch_permute(dev, kernel, &d_tokens, h * 2, &d_plan, Some(&d_sorted), Some(&d_dense), &d_perm, Some(&d_perm_probs))?;
        let mut got = vec![0u16; n * h];
        dev.download("permutedTokens", &d_perm, &mut got)?;
        let mut got_probs = vec![0f32; n];
        dev.download("permutedProbs", &d_perm_probs, &mut got_probs)?;
        let same_tokens = matches!(&cpu.permuted_tokens.data, Data::U16(v) if *v == got);
        let same_probs = matches!(&cpu.permuted_probs.as_ref().map(|p| &p.data), Some(Data::F32(v)) if v.iter().zip(&got_probs).all(|(a, b)| a.to_bits() == b.to_bits()));
        checks.push((format!("{} permute {kernel:?} tokens bit-exact vs CPU", s.name), same_tokens));
        checks.push((format!("{} permute {kernel:?} probs bit-exact vs CPU", s.name), same_probs));
    }
    // unpermute the permuted rows back, with per-slot probs and without
    let Data::U16(perm_host) = &cpu.permuted_tokens.data else { unreachable!() };
    let perm_ref = TensorRef::of("permutedTokens", vec![n, h], bytemuck::cast_slice::<u16, bf16>(perm_host))?;
    let sorted_ref = TensorRef::of("sortedIndices", vec![n], &plan.sorted_indices[..])?;
    let probs_ref = TensorRef::of("probs", vec![n], &slot_probs[..])?;
    for with_probs in [true, false] {
        let want = unpermute(&perm_ref, &sorted_ref, [t, h], with_probs.then_some(&probs_ref), None, UnpermuteOptions::default())?;
        let mut runs = Vec::new();
        for _ in 0..2 {
            launch_unpermute(dev, DType::BF16, &d_perm, h, t, &d_plan.row_ptr, &d_plan.slots, with_probs.then_some(&d_slot_probs), &d_out)?;
            let mut got = vec![0u16; t * h];
            dev.download("unpermuted", &d_out, &mut got)?;
            runs.push(got);
        }
        let label = if with_probs { "with probs" } else { "without probs" };
        checks.push((format!("{} unpermute {label} bit-exact vs CPU", s.name), matches!(&want.data, Data::U16(v) if *v == runs[0])));
        checks.push((format!("{} unpermute {label} identical on a second run", s.name), runs[0] == runs[1]));
    }
    println!(
        "{}: checks done in {:.1} s: {}",
        s.name,
        tc.elapsed().as_secs_f64(),
        checks
            .iter()
            .map(|(n, p)| format!("{}={}", n.rsplit(' ').next().unwrap_or(n), if *p { "ok" } else { "FAIL" }))
            .collect::<Vec<_>>()
            .join(" ")
    );

    // --- timings
    let bytes = (t * h + n * h) * 2;
    let copy_bytes = bytes / 2;
    let d_copy_src = dev.alloc("copy source", copy_bytes)?;
    let d_copy_dst = dev.alloc("copy destination", copy_bytes)?;
    dev.copy(&d_copy_src, &d_perm, copy_bytes.min(n * h * 2))?;
    let (copy_ms, copy_min) = time_ms(dev, iters, || dev.copy(&d_copy_dst, &d_copy_src, copy_bytes))?;
    let dims = format!("T={t} H={h} E={e} k={k} bf16, N={n}");
    let mut rows = vec![];
    let mut row = |op: &str, (ms, ms_min): (f64, f64)| {
        rows.push(Row {
            shape: s.name,
            op: op.into(),
            ms,
            ms_min,
            bytes,
            gbps: bytes as f64 / ms / 1e6,
            ratio: copy_ms / ms,
            dims: dims.clone(),
        });
    };
    row("copy (same bytes)", (copy_ms, copy_min));
    // the permute's writes alone (N rows, no reads): how close to the copy's time any permute
    // can come, its traffic being mostly writes (DeepSeek-V3: 1.88 GB written for 0.24 GB read)
    row("memset of the permuted rows (writes alone)", time_ms(dev, iters, || dev.memset_u32("permutedTokens", &d_perm, 0, n * h / 2))?);
    row(
        "permute+probs scatter",
        time_ms(dev, iters, || {
            launch_permute(dev, PermuteKernel::Scatter, &d_tokens, h * 2, &d_plan, None, Some(&d_dense), &d_perm, Some(&d_perm_probs))
        })?,
    );
    row(
        "permute+probs gather",
        time_ms(dev, iters, || {
            launch_permute(
                dev,
                PermuteKernel::Gather,
                &d_tokens,
                h * 2,
                &d_plan,
                Some(&d_sorted),
                Some(&d_dense),
                &d_perm,
                Some(&d_perm_probs),
            )
        })?,
    );
    row(
        "permute (no probs)",
        time_ms(dev, iters, || launch_permute(dev, PermuteKernel::Scatter, &d_tokens, h * 2, &d_plan, None, None, &d_perm, None))?,
    );
    row(
        "unpermute+probs",
        time_ms(dev, iters, || {
            launch_unpermute(dev, DType::BF16, &d_perm, h, t, &d_plan.row_ptr, &d_plan.slots, Some(&d_slot_probs), &d_out)
        })?,
    );
    row(
        "unpermute (no probs)",
        time_ms(dev, iters, || launch_unpermute(dev, DType::BF16, &d_perm, h, t, &d_plan.row_ptr, &d_plan.slots, None, &d_out))?,
    );
    // --- device tensors: the plan built on the GPU, permute and unpermute end to end
    let gp = build_plan(dev, &d_map_of(dev, &map)?, t, e, None)?;
    let gpu_sorted: Vec<i32> = dev.download_new("sortedIndices", &gp.sorted_indices, n)?;
    let gpu_tpe: Vec<i32> = dev.download_new("tokensPerExpert", &gp.tokens_per_expert, e)?;
    let gpu_row_ptr: Vec<i32> = dev.download_new("row_ptr", &gp.plan.row_ptr, t + 1)?;
    let gpu_slots: Vec<i32> = dev.download_new("slots", &gp.plan.slots, n)?;
    checks.push((format!("{} GPU plan sortedIndices == CPU", s.name), gpu_sorted == plan.sorted_indices));
    checks.push((
        format!("{} GPU plan tokensPerExpert == CPU", s.name),
        gpu_tpe.iter().zip(&plan.tokens_per_expert).all(|(a, b)| *a as usize == *b),
    ));
    checks.push((format!("{} GPU plan token CSR == CPU", s.name), gpu_row_ptr == csr.start && gpu_slots == csr.slots));
    let cap = n / e;
    let gp_cap = build_plan(dev, &d_map_of(dev, &map)?, t, e, Some(cap))?;
    let cpu_cap = plan_fn(&map_ref, t, PermuteOptions { num_out_tokens: Some(cap * e), drop_and_pad: true })?;
    let gpu_cap_sorted: Vec<i32> = dev.download_new("sortedIndices", &gp_cap.sorted_indices, cap * e)?;
    checks.push((format!("{} GPU drop-and-pad plan (capacity {cap}) == CPU", s.name), gpu_cap_sorted == cpu_cap.sorted_indices));
    drop((gp, gp_cap));
    let dt_tokens = DeviceTensor::upload(dev, &tok_ref)?;
    let dt_map = DeviceTensor::upload(dev, &map_ref)?;
    let dense_ref = TensorRef::of("probs", vec![t, e], &dense[..])?;
    let dt_dense = DeviceTensor::upload(dev, &dense_ref)?;
    let dmap = d_map_of(dev, &map)?;
    row("plan on the GPU (map -> CSR)", time_ms(dev, iters, || build_plan(dev, &dmap, t, e, None).map(|_| ()))?);
    let dperm = permute_device(dev, &dt_tokens, &dt_map, Some(&dt_dense), PermuteOptions::default())?;
    let dperm_host = dperm.permuted_tokens.download(dev, "permutedTokens")?;
    checks.push((format!("{} device permute (GPU plan) tokens bit-exact vs CPU", s.name), dperm_host == cpu.permuted_tokens));
    row(
        "device permute+probs (plan+kernel)",
        time_ms(dev, iters, || permute_device(dev, &dt_tokens, &dt_map, Some(&dt_dense), PermuteOptions::default()).map(|_| ()))?,
    );
    // with numOutTokens (= T * k, as a top-k router knows it): the plan's size is not waited for
    let known = PermuteOptions { num_out_tokens: Some(t * s.topk), drop_and_pad: false };
    let wrong = PermuteOptions { num_out_tokens: Some(t * s.topk - 1), drop_and_pad: false };
    // the fused permute (plan and copy in one kernel, where it applies: E <= 32) and the plan
    // kernels + permute kernel, interleaved
    let mut timed = Vec::new();
    for round in 0..2 {
        for fused in [true, false] {
            set_fused_permute(Some(fused));
            let how = if fused { "" } else { ", unfused" };
            if round == 0 {
                let dknown = permute_device(dev, &dt_tokens, &dt_map, Some(&dt_dense), known)?;
                let got = (
                    dknown.permuted_tokens.download(dev, "permutedTokens")?,
                    dknown.permuted_probs.as_ref().map(|p| p.download(dev, "permutedProbs")).transpose()?,
                    dknown.sorted_indices.download(dev, "sortedIndices")?,
                    dknown.tokens_per_expert.download(dev, "tokensPerExpert")?,
                );
                let same = got.0 == cpu.permuted_tokens
                    && got.1 == cpu.permuted_probs
                    && got.2 == cpu.sorted_indices
                    && got.3 == cpu.tokens_per_expert;
                checks.push((format!("{} device permute with numOutTokens{how}: every output bit-exact vs CPU", s.name), same));
                let plan = dknown.sorted_indices.plan.as_ref().expect("permute_device carries its plan");
                let gpu_row_ptr: Vec<i32> = dev.download_new("row_ptr", &plan.row_ptr, t + 1)?;
                let gpu_slots: Vec<i32> = dev.download_new("slots", &plan.slots, n)?;
                checks.push((
                    format!("{} device permute with numOutTokens{how}: token CSR == CPU", s.name),
                    gpu_row_ptr == csr.start && gpu_slots == csr.slots,
                ));
                drop(dknown);
                checks.push((
                    format!("{} device permute with a wrong numOutTokens is an error{how}", s.name),
                    permute_device(dev, &dt_tokens, &dt_map, Some(&dt_dense), wrong).is_err(),
                ));
            }
            timed.push((fused, time_ms(dev, iters, || permute_device(dev, &dt_tokens, &dt_map, Some(&dt_dense), known).map(|_| ()))?));
        }
    }
    set_fused_permute(None);
    for fused in [true, false] {
        let runs: Vec<(f64, f64)> = timed.iter().filter(|(f, _)| *f == fused).map(|(_, m)| *m).collect();
        let best = runs.iter().cloned().fold((f64::INFINITY, f64::INFINITY), |a, b| (a.0.min(b.0), a.1.min(b.1)));
        let how = if fused { "" } else { ", unfused" };
        row(&format!("device permute+probs (plan+kernel, numOutTokens given{how})"), best);
    }
    let dunperm = unpermute_device(
        dev,
        &dperm.permuted_tokens,
        &dperm.sorted_indices,
        [t, h],
        dperm.permuted_probs.as_ref(),
        None,
        UnpermuteOptions::default(),
    )?;
    let want_unperm = unpermute(&perm_ref, &sorted_ref, [t, h], Some(&probs_ref), None, UnpermuteOptions::default())?;
    checks.push((format!("{} device unpermute (carried plan) bit-exact vs CPU", s.name), dunperm.download(dev, "out")? == want_unperm));
    drop(dunperm);
    row(
        "device unpermute+probs (carried plan)",
        time_ms(dev, iters, || {
            unpermute_device(
                dev,
                &dperm.permuted_tokens,
                &dperm.sorted_indices,
                [t, h],
                dperm.permuted_probs.as_ref(),
                None,
                UnpermuteOptions::default(),
            )
            .map(|_| ())
        })?,
    );
    // programmatic dependent launches on and off, interleaved (3 rounds, best medians): the
    // device permute with numOutTokens given (route's picks: the plan's kernels, then permute's)
    // timed one call between events, and back to back (`iters` calls queued, one pair of events:
    // the host ahead of the GPU, as in a layer step), beside the copy timed both ways
    let mut pdl_times: Vec<(bool, [f64; 4])> = Vec::new();
    moe_cuda::device::set_programmatic_launch(Some(true));
    let pdl_on = moe_cuda::device::programmatic_launch(dev);
    for _ in 0..3 {
        for pdl in [true, false] {
            moe_cuda::device::set_programmatic_launch(Some(pdl));
            let call = || permute_device(dev, &dt_tokens, &dt_map, Some(&dt_dense), known).map(|_| ());
            let one = time_ms(dev, iters, call)?.0;
            let b2b = back_to_back_ms(dev, iters, call)?;
            let copy_one = time_ms(dev, iters, || dev.copy(&d_copy_dst, &d_copy_src, copy_bytes))?.0;
            let copy_b2b = back_to_back_ms(dev, iters, || dev.copy(&d_copy_dst, &d_copy_src, copy_bytes))?;
            pdl_times.push((pdl, [one, b2b, copy_one, copy_b2b]));
        }
    }
    moe_cuda::device::set_programmatic_launch(None);
    let best = |pdl: bool, i: usize| pdl_times.iter().filter(|(p, _)| *p == pdl).map(|(_, m)| m[i]).fold(f64::INFINITY, f64::min);
    for pdl in [true, false] {
        let tag = if pdl { "PDL on" } else { "PDL off" };
        let (copy_one, copy_b2b) = (best(pdl, 2), best(pdl, 3));
        for (op, ms, base) in [
            (format!("copy (same bytes), one call, {tag}"), copy_one, copy_one),
            (format!("copy (same bytes), back to back, {tag}"), copy_b2b, copy_b2b),
            (format!("device permute+probs (plan+kernel, numOutTokens given), one call, {tag}"), best(pdl, 0), copy_one),
            (format!("device permute+probs (plan+kernel, numOutTokens given), back to back, {tag}"), best(pdl, 1), copy_b2b),
        ] {
            let op = if pdl && !pdl_on { format!("{op} (not supported here: as off)") } else { op };
            rows.push(Row {
                shape: s.name,
                op,
                ms,
                ms_min: ms,
                bytes,
                gbps: bytes as f64 / ms / 1e6,
                ratio: base / ms,
                dims: dims.clone(),
            });
        }
    }
    drop((dperm, dt_tokens, dt_map, dt_dense, dmap));
    if !host_rows {
        return Ok((rows, checks));
    }
    // --- the host-tensor path (moe_cuda::host: upload, the device entry, download), wall clock, and its parts
    let wall = |f: &mut dyn FnMut() -> moe_cuda::Result<()>| -> moe_cuda::Result<(f64, f64)> {
        f()?;
        let mut ts = Vec::new();
        for _ in 0..3 {
            let t0 = Instant::now();
            f()?;
            ts.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        let min = ts.iter().cloned().fold(f64::INFINITY, f64::min);
        Ok((median(ts), min))
    };
    let mut host_row = |op: &str, bytes: usize, (ms, ms_min): (f64, f64)| {
        rows.push(Row { shape: s.name, op: op.into(), ms, ms_min, bytes, gbps: bytes as f64 / ms / 1e6, ratio: 0.0, dims: dims.clone() });
    };
    host_row(
        "host: permute (all)",
        bytes,
        wall(&mut || moe_cuda::host::permute(dev, &tok_ref, &map_ref, Some(&dense_ref), PermuteOptions::default()).map(|_| ()))?,
    );
    host_row(
        "host: unpermute (all)",
        bytes,
        wall(&mut || {
            moe_cuda::host::unpermute(dev, &perm_ref, &sorted_ref, [t, h], Some(&probs_ref), None, UnpermuteOptions::default()).map(|_| ())
        })?,
    );
    host_row("host: upload tokens", t * h * 2, wall(&mut || dev.upload("tokens", &tokens).map(|_| ()))?);
    host_row("host: download new vec", n * h * 2, wall(&mut || dev.download_new::<u16>("permutedTokens", &d_perm, n * h).map(|_| ()))?);
    host_row("host: download registered", n * h * 2, wall(&mut || download_registered(dev, &d_perm, n * h).map(|_| ()))?);
    let mut reused = vec![0u16; n * h];
    host_row("host: download reused vec", n * h * 2, wall(&mut || dev.download("permutedTokens", &d_perm, &mut reused))?);
    host_row(
        "host: cpu permute (core)",
        bytes,
        wall(&mut || apply_plan(&tok_ref, h, &plan, Some(&dense)).map(|_| ()).map_err(Into::into))?,
    );
    Ok((rows, checks))
}

/// A download variant to compare with `Device::download_new`: pre-fault the fresh vector,
/// page-lock it (cuMemHostRegister), copy by DMA, unlock.
fn download_registered(dev: &Device, buf: &moe_cuda::Buffer, len: usize) -> moe_cuda::Result<Vec<u16>> {
    use cudarc::driver::sys;
    let mut v: Vec<u16> = Vec::with_capacity(len);
    moe_cuda::device::prefault(v.spare_capacity_mut());
    let bytes = len * 2;
    let err = |what: &str, r: sys::CUresult| moe_cuda::Error::driver(what, cudarc::driver::DriverError(r));
    unsafe {
        let p = v.as_mut_ptr() as *mut std::ffi::c_void;
        let r = sys::cuMemHostRegister_v2(p, bytes, 0);
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(err("cuMemHostRegister", r));
        }
        let r = sys::cuMemcpyDtoHAsync_v2(p, buf.device_ptr(dev), bytes, dev.stream().cu_stream());
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(err("cuMemcpyDtoHAsync", r));
        }
        dev.synchronize("download")?;
        sys::cuMemHostUnregister(p);
        v.set_len(len);
    }
    Ok(v)
}

/// The routing map's bytes on the GPU.
fn d_map_of(dev: &Device, map: &[u8]) -> moe_cuda::Result<moe_cuda::Buffer> {
    dev.upload("routingMap", map)
}

/// Routing at the DeepSeek-V3 shape (T=16384, E=256, k=8, sigmoid with expert bias, 8 groups of
/// which 4 kept, normTopkProb, routeScale 2.5): the fused kernel against the CPU core, and timed.
fn bench_route(dev: &Device, iters: usize) -> moe_cuda::Result<(Vec<Row>, Checks)> {
    let (t, e, k) = (16384usize, 256usize, 8usize);
    let mut rng = Rng(0xdeed);
    let logits: Vec<f32> = (0..t * e).map(|_| rng.uniform() * 8.0 - 4.0).collect();
    let bias: Vec<f32> = (0..e).map(|_| rng.uniform() * 0.1).collect();
    let l_ref = TensorRef::of("logits", vec![t, e], &logits[..])?;
    let b_ref = TensorRef::of("expertBias", vec![e], &bias[..])?;
    let mut o = RouteOptions::new(k);
    o.score_function = ScoreFunction::Sigmoid;
    o.num_groups = 8;
    o.topk_groups = Some(4);
    o.norm_topk_prob = true;
    o.route_scale = 2.5;
    let cpu = route(&l_ref, Some(&b_ref), None, o)?;
    let d_l = DeviceTensor::upload(dev, &l_ref)?;
    let d_b = DeviceTensor::upload(dev, &b_ref)?;
    let got = route_device(dev, &d_l, Some(&d_b), None, o)?;
    let mut checks: Checks = vec![
        ("route DeepSeek-V3 indices == CPU".into(), got.indices.download(dev, "indices")? == cpu.indices),
        ("route DeepSeek-V3 weights bit-exact vs CPU".into(), got.weights.download(dev, "weights")? == cpu.weights),
        ("route DeepSeek-V3 scores bit-exact vs CPU".into(), got.scores.download(dev, "scores")? == cpu.scores),
        ("route DeepSeek-V3 tokensPerExpert == CPU".into(), got.tokens_per_expert.download(dev, "tpe")? == cpu.tokens_per_expert),
    ];
    let scores_ref = TensorRef::of("values", vec![t, e], cpu.scores.data.as_f32().unwrap_or(&[]))?;
    let tk = topk(&scores_ref, k)?;
    let (tv, ti) = topk_device(dev, &got.scores, k)?;
    checks.push(("topk [16384, 256] k=8 == CPU".into(), ti.download(dev, "i")? == tk.indices && tv.download(dev, "v")? == tk.values));
    println!(
        "route: checks {}",
        checks.iter().map(|(n, p)| format!("{n}={}", if *p { "ok" } else { "FAIL" })).collect::<Vec<_>>().join("; ")
    );
    let bytes = t * e * 4 * 2 + t * k * 8;
    let dims = format!("T={t} E={e} k={k} sigmoid+bias, groups 4/8, norm, scale 2.5");
    let mut rows = Vec::new();
    let mut row = |op: &str, (ms, ms_min): (f64, f64)| {
        rows.push(Row {
            shape: "deepseek",
            op: op.into(),
            ms,
            ms_min,
            bytes,
            gbps: bytes as f64 / ms / 1e6,
            ratio: 0.0,
            dims: dims.clone(),
        })
    };
    row("route (fused kernel + check readback)", time_ms(dev, iters, || route_device(dev, &d_l, Some(&d_b), None, o).map(|_| ()))?);
    let (warps, stride) = route_launch(e, 8, k, o.score_function);
    row(
        "route kernels only (no readback)",
        time_ms(dev, iters, || launch_route(dev, &d_l, Some(&d_b), None, o, (8, 4, true), warps, stride).map(|_| ()))?,
    );
    let mut o_plain = o;
    o_plain.norm_topk_prob = false;
    row(
        "route kernels only, no normTopkProb",
        time_ms(dev, iters, || launch_route(dev, &d_l, Some(&d_b), None, o_plain, (8, 4, true), warps, stride).map(|_| ()))?,
    );
    let mut o_soft = RouteOptions::new(k);
    o_soft.score_function = ScoreFunction::Softmax;
    row("route softmax k=8 (op)", time_ms(dev, iters, || route_device(dev, &d_l, None, None, o_soft).map(|_| ()))?);
    row("topk [16384, 256] k=8", time_ms(dev, iters, || topk_device(dev, &got.scores, k).map(|_| ()))?);
    // where the route kernel's time goes: the selection alone (topk), scores without groups
    row("topk kernels only (no readback)", time_ms(dev, iters, || launch_topk(dev, &got.scores, k, 4, 0).map(|_| ()))?);
    let mut o_flat = o;
    (o_flat.num_groups, o_flat.topk_groups) = (1, None);
    let (w1, s1) = route_launch(e, 1, k, o.score_function);
    row(
        "route kernels only, no groups",
        time_ms(dev, iters, || launch_route(dev, &d_l, Some(&d_b), None, o_flat, (1, 1, false), w1, s1).map(|_| ()))?,
    );
    let mut o_sp = o_flat;
    o_sp.score_function = ScoreFunction::SqrtSoftplus;
    row(
        "route kernels only, sqrtsoftplus, no groups, no bias",
        time_ms(dev, iters, || launch_route(dev, &d_l, None, None, o_sp, (1, 1, false), w1, s1).map(|_| ()))?,
    );
    row("synchronize + 16-byte readback", time_ms(dev, iters, || dev.read_head::<u64, 2>("x", &got.scores.buf, 0).map(|_| ()))?);
    let wall = Instant::now();
    let mut n = 0;
    while n < 200 {
        route_device(dev, &d_l, Some(&d_b), None, o)?;
        n += 1;
    }
    let per = wall.elapsed().as_secs_f64() * 1e3 / n as f64;
    row("route wall clock per call (Rust)", (per, per));
    // the tiny op of test/gpu/overhead.mjs from Rust (T=4 H=8 E=4 k=2 f32): what a call costs
    // below the JS binding (allocation, launch; asynchronous), and the kernel itself (events)
    let tiny_tokens: Vec<f32> = (0..32).map(|i| i as f32 * 0.25).collect();
    let tiny_map: Vec<u8> = vec![1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 1];
    let tiny_probs: Vec<f32> = (0..16).map(|i| i as f32 / 16.0).collect();
    let tt = DeviceTensor::upload(dev, &TensorRef::of("tokens", vec![4, 8], &tiny_tokens[..])?)?;
    let tm = DeviceTensor::upload(dev, &TensorRef::new("routingMap", DType::Bool, vec![4, 4], &tiny_map)?)?;
    let tp = DeviceTensor::upload(dev, &TensorRef::of("probs", vec![4, 4], &tiny_probs[..])?)?;
    let tperm = permute_device(dev, &tt, &tm, Some(&tp), PermuteOptions::default())?;
    let tiny = || {
        unpermute_device(
            dev,
            &tperm.permuted_tokens,
            &tperm.sorted_indices,
            [4, 8],
            tperm.permuted_probs.as_ref(),
            None,
            UnpermuteOptions::default(),
        )
        .map(|_| ())
    };
    let kernel = time_ms(dev, 200, tiny)?;
    for _ in 0..100 {
        tiny()?;
    }
    dev.synchronize("tiny")?;
    let wall = Instant::now();
    for _ in 0..5000 {
        tiny()?;
    }
    let per = wall.elapsed().as_secs_f64() * 1e3 / 5000.0;
    dev.synchronize("tiny")?;
    let mut tiny_row = |op: &str, (ms, ms_min): (f64, f64)| {
        rows.push(Row { shape: "tiny", op: op.into(), ms, ms_min, bytes: 0, gbps: 0.0, ratio: 0.0, dims: "T=4 H=8 E=4 k=2 f32".into() })
    };
    tiny_row("tiny unpermute+probs, events (GPU)", kernel);
    tiny_row("tiny unpermute+probs, Rust call (async)", (per, per));
    Ok((rows, checks))
}
