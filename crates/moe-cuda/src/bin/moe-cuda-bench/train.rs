//! `moe-cuda-bench train`: a whole MoE training step driven from Rust, the peer of
//! `bench/gpu_torch_train.py` (same shapes, same step): float32 master weights with bf16 copies
//! for compute; the router `x Wr` (bf16 GEMM, logits widened to float32), route (softmax top-k
//! on the logits), the Switch aux loss on the scores; permute with the routing probs, swiglu
//! experts (cuBLAS), unpermute; the loss `sum(out * g)`: its gradient `g` is given; unpermute
//! backward, experts backward, permute backward (with the probs' gradient), routeBackward (with
//! the aux loss's gradient), the router weight's gradient `x^T dlogits` (bf16 GEMM); AdamW with
//! global gradient-norm clipping (1.0) over the three parameters, updating the masters and their
//! bf16 copies. Times are medians of CUDA-event timings of whole steps; the peak is the most
//! device memory this process's tensors held during the timed steps.
//!
//! Host waits inside a step: route's error word, the aux loss's value, the per-expert counts the
//! expert GEMMs size themselves by, routeBackward's error word.

use half::bf16;
use moe_core::activations::{ActivationKind, ActivationOptions};
use moe_core::aux_loss::SwitchLossOptions;
use moe_core::permute::{PermuteOptions, UnpermuteOptions};
use moe_core::routing::{RouteOptions, ScoreFunction};
use moe_core::tensor::{DType, Tensor};
use moe_cuda::activations::{read_device_loss, switch_load_balancing_loss_device_lazy, DeviceLoss};
use moe_cuda::device::{peak_memory, reset_peak_memory};
use moe_cuda::device_ops::{permute_backward_device, permute_device, route_backward_device, route_device, unpermute_device};
use moe_cuda::experts::{
    experts_backward_device_gathering, experts_backward_device_over_tokens, experts_forward_device_gathering,
    experts_forward_device_saving, grads_over_tokens, matmul_device, DeviceExpertsInputs, GradOutput, SavedArg, SavedSlots,
};
use moe_cuda::experts_grouped::gathers_on_load;
use moe_cuda::layout::indices_to_multihot_device;
use moe_cuda::tensor::tensor_ref;
use moe_cuda::train::{
    adamw_norm, adamw_step, adamw_updates, cast, gather_picks, optimizer_state, read_state, zeros_f32, AdamWOptions, AdamWParam,
};
use moe_cuda::{Device, DeviceTensor};

use crate::experts::flat_json;
use crate::shapes::ExpertShape;
use crate::{time_ms, Rng};

/// Aux loss coefficient (as the PyTorch peer).
const AUX_COEFF: f64 = 1e-2;

/// A parameter: its float32 master, bf16 copy and moments.
struct Param {
    name: &'static str,
    master: DeviceTensor,
    low: DeviceTensor,
    m: DeviceTensor,
    v: DeviceTensor,
}

impl Param {
    fn new(dev: &Device, rng: &mut Rng, name: &'static str, shape: Vec<usize>, scale: f32) -> moe_cuda::Result<Param> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| (rng.uniform() * 2.0 - 1.0) * scale).collect();
        let master = DeviceTensor::upload_owned(dev, name, &Tensor::f32(shape.clone(), v))?;
        Ok(Param {
            name,
            low: cast(dev, &master, DType::BF16)?,
            m: zeros_f32(dev, name, shape.clone())?,
            v: zeros_f32(dev, name, shape)?,
            master,
        })
    }
}

fn bf16_input(dev: &Device, rng: &mut Rng, shape: Vec<usize>, scale: f32) -> moe_cuda::Result<DeviceTensor> {
    let n: usize = shape.iter().product();
    let v: Vec<u16> = (0..n).map(|_| bf16::from_f32((rng.uniform() * 2.0 - 1.0) * scale).to_bits()).collect();
    DeviceTensor::upload_owned(dev, "input", &Tensor::u16(DType::BF16, shape, v))
}

/// routeBackward's kernel against the core, bit for bit: every score function, with and without
/// the normalisation and a gradient of the scores, at `t` tokens of `e` experts. Returns the
/// number of cases; an error names the first case that differs.
pub fn check_route_backward(dev: &Device, t: usize, e: usize, k: usize) -> moe_cuda::Result<usize> {
    let mut rng = Rng(0xb4c4 ^ (t * e) as u64);
    let mut cases = 0;
    for sf in ScoreFunction::ALL {
        for (norm, with_scores, scale) in [(false, false, 1.0), (true, false, 2.5), (false, true, 1.0), (true, true, 0.75)] {
            let logits: Vec<f32> = (0..t * e).map(|_| (rng.uniform() * 2.0 - 1.0) * 6.0).collect();
            let lt = Tensor::f32(vec![t, e], logits);
            let bias = matches!(sf, ScoreFunction::SoftmaxWithBias | ScoreFunction::SigmoidWithBias)
                .then(|| Tensor::f32(vec![e], (0..e).map(|_| rng.uniform() - 0.5).collect()));
            let mut o = RouteOptions::new(k);
            o.score_function = sf;
            o.norm_topk_prob = norm;
            o.route_scale = scale;
            let lr = tensor_ref("logits", &lt)?;
            let br = bias.as_ref().map(|b| tensor_ref("expertBias", b)).transpose()?;
            let routed = moe_core::routing::route(&lr, br.as_ref(), None, o)?;
            let gw = Tensor::f32(vec![t, k], (0..t * k).map(|_| rng.uniform() * 2.0 - 1.0).collect());
            let gs = with_scores.then(|| Tensor::f32(vec![t, e], (0..t * e).map(|_| rng.uniform() - 0.5).collect()));
            let want = moe_core::routing::route_backward(
                &tensor_ref("gradWeights", &gw)?,
                &lr,
                &tensor_ref("indices", &routed.indices)?,
                gs.as_ref().map(|g| tensor_ref("gradScores", g)).transpose()?.as_ref(),
                br.as_ref(),
                None,
                o,
            )?;
            let up = |name: &'static str, t: &Tensor| DeviceTensor::upload_owned(dev, name, t);
            let d_bias = bias.as_ref().map(|b| up("expertBias", b)).transpose()?;
            let d_gs = gs.as_ref().map(|g| up("gradScores", g)).transpose()?;
            let got = route_backward_device(
                dev,
                &up("gradWeights", &gw)?,
                &up("logits", &lt)?,
                &up("indices", &routed.indices)?,
                d_gs.as_ref(),
                d_bias.as_ref(),
                None,
                o,
            )?
            .download(dev, "gradLogits")?;
            let (g, w) = (got.data.as_f32().expect("f32"), want.data.as_f32().expect("f32"));
            if let Some(i) = (0..g.len()).find(|&i| g[i].to_bits() != w[i].to_bits()) {
                return Err(moe_cuda::Error::Cuda(format!(
                    "routeBackward on the GPU differs from the core ({} norm={norm} gradScores={with_scores}): gradLogits[{}][{}] = {:e}, core {:e}",
                    sf.name(),
                    i / e,
                    i % e,
                    g[i],
                    w[i]
                )));
            }
            cases += 1;
        }
    }
    Ok(cases)
}

pub fn bench(dev: &Device, s: &ExpertShape, iters: usize) -> moe_cuda::Result<flat_json::Obj> {
    let checked = check_route_backward(dev, 4096, s.experts, s.topk)?;
    println!("{:>13} routeBackward on the GPU = the core, bit for bit: {checked} cases of 4096 tokens", s.name);
    let mut rng = Rng(0x7a1 ^ s.experts as u64);
    let (t, e, k, dim, inter) = (s.tokens, s.experts, s.topk, s.dim, s.inter);
    let router = Param::new(dev, &mut rng, "routerWeight", vec![dim, e], 1.0 / (dim as f32).sqrt())?;
    let w1 = Param::new(dev, &mut rng, "gateAndUpProjs", vec![e, dim, 2 * inter], 1.0 / (dim as f32).sqrt())?;
    let w2 = Param::new(dev, &mut rng, "downProjs", vec![e, inter, dim], 1.0 / (inter as f32).sqrt())?;
    let x = bf16_input(dev, &mut rng, vec![t, dim], 1.0)?;
    let g_out = bf16_input(dev, &mut rng, vec![t, dim], 1.0 / ((t * dim) as f32).sqrt())?;
    let state = optimizer_state(dev)?;
    let act = ActivationOptions::new(ActivationKind::Swiglu);
    let route_opts = RouteOptions::new(k);
    let adamw = AdamWOptions { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, max_grad_norm: Some(1.0) };
    // the last step's aux loss, left on the GPU (lazy: a step reads no number) and read at the end
    let aux_last = std::cell::RefCell::new(None);
    // where the experts gather their rows on load (MOE_DISPATCH_GG_FUSE=gather), as the library's
    // layer: permute makes the plan and probs only (rows of no columns), the experts read x
    // through its sortedIndices, forward and backward, and no permuted copy is made
    let gather = gathers_on_load(dev);
    let no_columns = DeviceTensor::alloc(dev, "rows of no columns", DType::BF16, vec![t, 0])?;
    // forward and backward: the three parameters' gradients (router, gate|up, down)
    let forward_backward = || -> moe_cuda::Result<[DeviceTensor; 3]> {
        // forward
        let logits = cast(dev, &matmul_device(dev, &x, &router.low, false, false)?, DType::F32)?;
        let r = route_device(dev, &logits, None, None, route_opts)?;
        let (aux, g_scores) = switch_load_balancing_loss_device_lazy(
            dev,
            &r.scores,
            &r.tokens_per_expert,
            None,
            SwitchLossOptions { topk: k, coeff: AUX_COEFF, num_tokens: None },
        )?;
        *aux_last.borrow_mut() = Some(aux);
        let mh = indices_to_multihot_device(dev, &r.indices, &r.weights, e)?;
        let rows = if gather { &no_columns } else { &x };
        let p = permute_device(
            dev,
            rows,
            &mh.routing_map,
            Some(&mh.probs),
            PermuteOptions { num_out_tokens: Some(t * k), drop_and_pad: false },
        )?;
        let inp = DeviceExpertsInputs {
            tokens: if gather { &x } else { &p.permuted_tokens },
            tokens_per_expert: &p.tokens_per_expert,
            gate_and_up: &w1.low,
            gate_and_up_name: "gateAndUpProjs",
            down: &w2.low,
            probs: p.permuted_probs.as_ref(),
            gate_up_bias: None,
            down_bias: None,
        };
        let (y, saved) = match gather {
            true => experts_forward_device_gathering(dev, &inp, &p.sorted_indices, &act, true)?,
            false => experts_forward_device_saving(dev, &inp, &act, true)?,
        };
        let _out = unpermute_device(dev, &y, &p.sorted_indices, [t, dim], None, None, UnpermuteOptions::default())?;
        // (the backward does not read the experts' output, as the library's layer does not keep it)
        drop(y);
        // backward: the experts' output gradient gathered from the tokens' by the experts' backward
        // (the unweighted unpermute's backward), which frees it after its last reader (as the layer)
        let g_y = GradOutput::Gathered { tokens: &g_out, rows: &p.sorted_indices };
        // h and a given to the backward, which frees each after its last reader (as the layer's freeSaved)
        let saved = saved.map(SavedSlots::new);
        let given = saved.as_ref().map(SavedArg::Given);
        // and so are the permuted tokens: dx is written over them once dW1 has read them (freeTokens)
        let grads = match gather {
            true => experts_backward_device_gathering(dev, g_y, &inp, &p.sorted_indices, &act, given)?,
            false => grads_over_tokens(experts_backward_device_over_tokens(dev, g_y, &inp, &act, given)?, p.permuted_tokens),
        };
        let (_g_x, g_probs) = permute_backward_device(
            dev,
            &grads.grad_tokens,
            &p.sorted_indices,
            t,
            grads.grad_probs.as_ref(),
            Some(&mh.routing_map),
            UnpermuteOptions::default(),
        )?;
        let g_weights = gather_picks(dev, g_probs.as_ref().expect("permute backward with probs"), &r.indices)?;
        let g_logits = route_backward_device(dev, &g_weights, &logits, &r.indices, Some(&g_scores), None, None, route_opts)?;
        let g_router = matmul_device(dev, &x, &cast(dev, &g_logits, DType::BF16)?, true, false)?;
        Ok([g_router, grads.grad_gate_and_up, grads.grad_down])
    };
    let params = [&router, &w1, &w2];
    let optimizer_step = |g: &[DeviceTensor; 3]| -> moe_cuda::Result<()> { adamw_step(dev, &optimizer_slots(params, g), &state, &adamw) };
    let mut step = || -> moe_cuda::Result<()> { optimizer_step(&forward_backward()?) };
    for _ in 0..3 {
        step()?;
    }
    dev.synchronize("warm-up")?;
    reset_peak_memory();
    let (ms, min) = time_ms(dev, iters, &mut step)?;
    let peak = peak_memory();
    // where the time goes: forward + backward alone, the optimizer alone (on one set of gradients)
    let (fb_ms, _) = time_ms(dev, iters, || forward_backward().map(drop))?;
    let g = forward_backward()?;
    let (opt_ms, _) = time_ms(dev, iters, || optimizer_step(&g))?;
    // and its two parts: the gradient norm (reads the gradients), the updates
    let (norm_ms, _) = time_ms(dev, iters, || adamw_norm(dev, &optimizer_slots(params, &g), &state, &adamw))?;
    let (update_ms, _) = time_ms(dev, iters, || adamw_updates(dev, &optimizer_slots(params, &g), &state))?;
    let grad_bytes: usize = g.iter().map(DeviceTensor::bytes).sum();
    let st = read_state(dev, &state)?;
    let aux_value = match aux_last.borrow_mut().take() {
        Some(DeviceLoss::Pending(words)) => read_device_loss(dev, &words)?.unwrap_or(f64::NAN),
        Some(DeviceLoss::Value(v)) => v,
        None => f64::NAN,
    };
    let opt_bytes: usize = [&router, &w1, &w2].iter().zip(&g).map(|(p, g)| p.master.numel() * (3 * 8 + 2) + g.bytes() * 2).sum();
    println!(
        "{:>13} T={t} dim={dim} inter={inter} E={e} k={k}{}: training step {ms:.3} ms (min {min:.3}), {:.0} tokens/s, peak {:.2} GiB; forward + backward {fb_ms:.3} ms, AdamW {opt_ms:.3} ms ({:.2} TB/s: norm {norm_ms:.3} ms {:.2} TB/s, updates {update_ms:.3} ms {:.2} TB/s); after {} steps: grad norm {:.4}, aux loss {:.5}, skipped {}",
        s.name,
        if gather { " (gathering on load)" } else { "" },
        t as f64 / (ms * 1e-3),
        peak as f64 / (1u64 << 30) as f64,
        opt_bytes as f64 / (opt_ms * 1e-3) / 1e12,
        grad_bytes as f64 / (norm_ms * 1e-3) / 1e12,
        (opt_bytes - grad_bytes) as f64 / (update_ms * 1e-3) / 1e12,
        st.step,
        st.grad_norm,
        aux_value,
        st.skipped
    );
    let mut o = flat_json::Obj::default();
    o.str("shape", s.name);
    o.str("dims", &format!("T={t} dim={dim} inter={inter} E={e} k={k} bf16 (float32 masters)"));
    o.num("rustStepMs", ms);
    o.num("rustStepMsMin", min);
    o.num("tokensPerSecond", t as f64 / (ms * 1e-3));
    o.num("peakBytes", peak as f64);
    o.bool("gathersOnLoad", gather);
    o.num("forwardBackwardMs", fb_ms);
    o.num("optimizerMs", opt_ms);
    o.num("optimizerTbPerSecond", opt_bytes as f64 / (opt_ms * 1e-3) / 1e12);
    o.num("gradNormMs", norm_ms);
    o.num("gradNormTbPerSecond", grad_bytes as f64 / (norm_ms * 1e-3) / 1e12);
    o.num("updatesMs", update_ms);
    o.num("updatesTbPerSecond", (opt_bytes - grad_bytes) as f64 / (update_ms * 1e-3) / 1e12);
    o.num("gradNorm", st.grad_norm);
    o.num("stepsApplied", st.step);
    Ok(o)
}

/// The optimizer's view of the three parameters with their gradients.
fn optimizer_slots<'a>(params: [&'a Param; 3], g: &'a [DeviceTensor; 3]) -> Vec<AdamWParam<'a>> {
    params
        .iter()
        .zip(g)
        .map(|(p, g)| AdamWParam {
            name: p.name,
            master: &p.master,
            exp_avg: &p.m,
            exp_avg_sq: &p.v,
            grad: g,
            low: Some(&p.low),
            decay: true,
        })
        .collect()
}
