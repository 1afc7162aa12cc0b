//! Expert activations, forward and backward: the gated units applied between an expert's
//! up-projection and its down-projection, optionally weighted by the routing prob of each row.
//!
//! | kind             | input `x`            | unweighted output `a`                                        |
//! |------------------|----------------------|--------------------------------------------------------------|
//! | `swiglu`         | `[gate \| up]` halves | `silu(gate) * up`                                            |
//! | `quick_geglu`    | interleaved pairs    | `g * sigmoid(alpha * g) * (u + linearOffset)`, `g`/`u` clamped |
//! | `swiglu_oai`     | `[gate \| up]` halves | the quick_geglu formula                                      |
//! | `swiglu_clamped` | `[gate \| up]` halves | `silu(g) * u`, `g`/`u` clamped                               |
//! | `relu2`          | `[N, I]`, not gated  | `relu(x)^2`                                                  |
//!
//! Clamping: `g = min(gate, limit)`, `u = clamp(up, -limit, limit)`. With probs `p` (one per
//! row) the output is `a * p`.
//!
//! Arithmetic follows the references operation by operation, in float32: `sigmoid(v) = 1 /
//! (1 + exp(-v))`, `silu(v) = v / (1 + exp(-v))` (PyTorch's CPU formulas), products left to
//! right as written above. 16-bit inputs are widened to float32 and each result is rounded once
//! to the input dtype. `exp` is the crate's deterministic one (basic IEEE operations, see [`expf`]), so that
//! every backend, native or WebAssembly, gets the same bits.

use half::{bf16, f16};

use crate::alloc::filled_vec;
use crate::error::{Error, Result};
use crate::par::for_each_row;
use crate::tensor::{DType, Float, Meta, Tensor, TensorRef};

/// Which activation to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActivationKind {
    /// Megatron-Core's swiglu: `[gate | up]` halves, `silu(gate) * up`.
    Swiglu,
    /// GPT-OSS style quick-GEGLU on interleaved `gate, up` pairs, with clamping.
    QuickGeglu,
    /// The quick-GEGLU formula on `[gate | up]` halves (NeMo Automodel's swiglu_oai).
    SwigluOai,
    /// `silu(min(gate, limit)) * clamp(up, -limit, limit)` on halves (DeepSeek-V4 style).
    SwigluClamped,
    /// `relu(x)^2`, not gated.
    Relu2,
}

/// Where the gate and up values of output column `j` sit in an input row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// `[gate | up]`: gate at `j`, up at `inter + j`.
    Halves,
    /// `gate, up, gate, up, ...`: gate at `2j`, up at `2j + 1`.
    Interleaved,
    /// No gate: the value at `j`.
    Single,
}

impl ActivationKind {
    pub const ALL: [ActivationKind; 5] = [
        ActivationKind::Swiglu,
        ActivationKind::QuickGeglu,
        ActivationKind::SwigluOai,
        ActivationKind::SwigluClamped,
        ActivationKind::Relu2,
    ];

    /// The JavaScript name.
    pub fn name(self) -> &'static str {
        match self {
            ActivationKind::Swiglu => "swiglu",
            ActivationKind::QuickGeglu => "quick_geglu",
            ActivationKind::SwigluOai => "swiglu_oai",
            ActivationKind::SwigluClamped => "swiglu_clamped",
            ActivationKind::Relu2 => "relu2",
        }
    }

    fn names() -> String {
        let names: Vec<String> = Self::ALL.iter().map(|k| format!("'{}'", k.name())).collect();
        names.join(", ")
    }

    /// Reads the `kind` argument: a missing kind is a TypeError, an unknown name a RangeError.
    pub fn parse(kind: Option<&str>) -> Result<ActivationKind> {
        let Some(name) = kind else {
            return Err(Error::type_error("kind", format!("one of {}", Self::names()), "undefined"));
        };
        Self::ALL
            .into_iter()
            .find(|k| k.name() == name)
            .ok_or_else(|| Error::range("kind", format!("expected one of {}, got '{name}'", Self::names())))
    }

    fn layout(self) -> Layout {
        match self {
            ActivationKind::QuickGeglu => Layout::Interleaved,
            ActivationKind::Relu2 => Layout::Single,
            _ => Layout::Halves,
        }
    }

    /// Whether the input holds a gate and an up value per output column (width `2 * inter`).
    pub fn is_gated(self) -> bool {
        self.layout() != Layout::Single
    }

    /// Whether the input row is `[gate | up]` halves (gate of column `j` at `j`, up at `inter + j`).
    pub fn has_halves(self) -> bool {
        self.layout() == Layout::Halves
    }

    fn takes_alpha(self) -> bool {
        matches!(self, ActivationKind::QuickGeglu | ActivationKind::SwigluOai)
    }

    fn takes_limit(self) -> bool {
        matches!(self, ActivationKind::QuickGeglu | ActivationKind::SwigluOai | ActivationKind::SwigluClamped)
    }

    fn takes_linear_offset(self) -> bool {
        self.takes_alpha()
    }
}

/// The kind and its numeric options, as float32 (the precision the formulas run in).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ActivationOptions {
    pub kind: ActivationKind,
    /// Slope inside the sigmoid of quick_geglu / swiglu_oai (default 1.702).
    pub alpha: f32,
    /// Clamp bound of quick_geglu / swiglu_oai / swiglu_clamped (default 7.0), > 0.
    pub limit: f32,
    /// Added to the clamped up value of quick_geglu / swiglu_oai (default 1.0).
    pub linear_offset: f32,
}

pub const DEFAULT_ALPHA: f64 = 1.702;
pub const DEFAULT_LIMIT: f64 = 7.0;
pub const DEFAULT_LINEAR_OFFSET: f64 = 1.0;

impl ActivationOptions {
    /// A kind with the default options.
    pub fn new(kind: ActivationKind) -> ActivationOptions {
        ActivationOptions { kind, alpha: DEFAULT_ALPHA as f32, limit: DEFAULT_LIMIT as f32, linear_offset: DEFAULT_LINEAR_OFFSET as f32 }
    }

    /// Reads the options as the bindings receive them. An option the kind does not use is a
    /// TypeError (it would otherwise be ignored silently); a non-finite value, one beyond the
    /// float32 range, or a limit that is not positive is a RangeError.
    pub fn from_args(kind: Option<&str>, alpha: Option<f64>, limit: Option<f64>, linear_offset: Option<f64>) -> Result<ActivationOptions> {
        let kind = ActivationKind::parse(kind)?;
        let mut options = ActivationOptions::new(kind);
        let users = |arg: &str| -> &'static str {
            match arg {
                "alpha" | "linearOffset" => "quick_geglu and swiglu_oai",
                _ => "quick_geglu, swiglu_oai and swiglu_clamped",
            }
        };
        let read = |arg: &'static str, value: Option<f64>, takes: bool| -> Result<Option<f32>> {
            let Some(v) = value else { return Ok(None) };
            if !takes {
                return Err(Error::type_error(
                    arg,
                    format!("no {arg} with kind '{}' (only {} take it)", kind.name(), users(arg)),
                    js_number(v),
                ));
            }
            let v32 = v as f32;
            if !v32.is_finite() {
                return Err(Error::range(arg, format!("expected a finite number within the float32 range, got {}", js_number(v))));
            }
            Ok(Some(v32))
        };
        if let Some(a) = read("alpha", alpha, kind.takes_alpha())? {
            options.alpha = a;
        }
        if let Some(l) = read("limit", limit, kind.takes_limit())? {
            if l.is_nan() || l <= 0.0 {
                return Err(Error::range(
                    "limit",
                    format!("expected a positive number (the clamp bound), got {}", js_number(limit.unwrap_or(f64::NAN))),
                ));
            }
            options.limit = l;
        }
        if let Some(o) = read("linearOffset", linear_offset, kind.takes_linear_offset())? {
            options.linear_offset = o;
        }
        Ok(options)
    }
}

/// A number as JavaScript would print it, roughly: `Infinity`, `NaN`, `1e39` (not 39 digits).
fn js_number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else if v != 0.0 && (v.abs() >= 1e21 || v.abs() < 1e-6) {
        format!("{v:e}")
    } else {
        format!("{v}")
    }
}

// ---------------------------------------------------------------------------------------
// Element formulas (float32).

/// `e^x` rounded to float32: the crate's deterministic f64 `exp` (basic IEEE operations only,
/// error a few f64 ulps), rounded once. So native and WebAssembly builds get the same bits, and
/// the result is the correctly rounded one except where e^x lies within about 1e-15 (relative)
/// of a float32 rounding boundary.
pub fn expf(x: f32) -> f32 {
    crate::detmath::exp(x as f64) as f32
}

#[inline(always)]
fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + expf(-v))
}

#[inline(always)]
fn silu(v: f32) -> f32 {
    v / (1.0 + expf(-v))
}

/// `min(v, limit)`, NaN stays NaN (as torch.clamp).
#[inline(always)]
fn clamp_max(v: f32, limit: f32) -> f32 {
    if v > limit {
        limit
    } else {
        v
    }
}

/// `clamp(v, -limit, limit)`, NaN stays NaN.
#[inline(always)]
fn clamp_sym(v: f32, limit: f32) -> f32 {
    if v > limit {
        limit
    } else if v < -limit {
        -limit
    } else {
        v
    }
}

/// The unweighted activation of one output column.
#[inline(always)]
fn unit(o: &ActivationOptions, gate: f32, up: f32) -> f32 {
    match o.kind {
        ActivationKind::Swiglu => silu(gate) * up,
        ActivationKind::QuickGeglu | ActivationKind::SwigluOai => {
            let g = clamp_max(gate, o.limit);
            let u = clamp_sym(up, o.limit);
            g * sigmoid(o.alpha * g) * (u + o.linear_offset)
        }
        ActivationKind::SwigluClamped => silu(clamp_max(gate, o.limit)) * clamp_sym(up, o.limit),
        ActivationKind::Relu2 => {
            // relu that keeps NaN (as torch.relu); -0 and 0 square to +0 either way.
            let r = if gate <= 0.0 { 0.0 } else { gate };
            r * r
        }
    }
}

/// Gradients of `gw * unit(gate, up)` with respect to gate and up (up's is 0 for relu2).
/// Through a clamp the derivative is 1 on the closed range (`gate <= limit`, `-limit <= up <=
/// limit`) and 0 outside it, as torch.clamp's backward; NaN inputs get 0 there too.
#[inline(always)]
fn unit_grad(o: &ActivationOptions, gate: f32, up: f32, gw: f32) -> (f32, f32) {
    match o.kind {
        ActivationKind::Swiglu => {
            // Megatron-Core's swiglu_back, operation by operation.
            let d = 1.0 + expf(-gate);
            let s = 1.0 / d;
            (gw * s * (1.0 + gate * (1.0 - s)) * up, gw * (gate / d))
        }
        ActivationKind::QuickGeglu | ActivationKind::SwigluOai => {
            let g = clamp_max(gate, o.limit);
            let u = clamp_sym(up, o.limit);
            let z = o.alpha * g;
            let s = sigmoid(z);
            let d_gate = if gate <= o.limit { gw * s * (1.0 + z * (1.0 - s)) * (u + o.linear_offset) } else { 0.0 };
            let d_up = if up >= -o.limit && up <= o.limit { gw * (g * s) } else { 0.0 };
            (d_gate, d_up)
        }
        ActivationKind::SwigluClamped => {
            let g = clamp_max(gate, o.limit);
            let u = clamp_sym(up, o.limit);
            let d = 1.0 + expf(-g);
            let s = 1.0 / d;
            let d_gate = if gate <= o.limit { gw * s * (1.0 + g * (1.0 - s)) * u } else { 0.0 };
            let d_up = if up >= -o.limit && up <= o.limit { gw * (g / d) } else { 0.0 };
            (d_gate, d_up)
        }
        ActivationKind::Relu2 => (if gate > 0.0 { gw * 2.0 * gate } else { 0.0 }, 0.0),
    }
}

#[inline(always)]
fn pair<T: Float>(layout: Layout, row: &[T], inter: usize, j: usize) -> (f32, f32) {
    match layout {
        Layout::Halves => (row[j].to_f32(), row[inter + j].to_f32()),
        Layout::Interleaved => (row[2 * j].to_f32(), row[2 * j + 1].to_f32()),
        Layout::Single => (row[j].to_f32(), 0.0),
    }
}

// ---------------------------------------------------------------------------------------
// Ops.

/// activation's (and activationBackward's) arguments once checked: rows, input width, output width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActivationCheck {
    pub rows: usize,
    pub width: usize,
    pub inter: usize,
}

fn check_input(x: Meta, kind: ActivationKind) -> Result<ActivationCheck> {
    let dims = x.expect_rank(2, if kind.is_gated() { "[numRows, 2 * inter]" } else { "[numRows, inter]" })?;
    let (rows, width) = (dims[0], dims[1]);
    x.expect_dtype(DType::TOKENS)?;
    if kind.is_gated() && width % 2 != 0 {
        let what = if kind.layout() == Layout::Interleaved { "interleaved gate, up pairs" } else { "[gate | up] halves" };
        return Err(Error::range(
            format!("{}.shape", x.name),
            format!("{} needs an even last dimension ({what}), got [{rows}, {width}]", kind.name()),
        ));
    }
    let inter = if kind.is_gated() { width / 2 } else { width };
    Ok(ActivationCheck { rows, width, inter })
}

/// Checks per-row probs: float32, `[numRows]` or `[numRows, 1]`.
fn check_probs(probs: Option<Meta>, rows: usize) -> Result<()> {
    let Some(p) = probs else { return Ok(()) };
    p.expect_dtype(&[DType::F32])?;
    if p.shape.len() == 1 {
        p.expect_shape(&[rows], "([numRows]: one prob per row of x)")
    } else {
        p.expect_rank(2, "[numRows] or [numRows, 1]")?;
        p.expect_shape(&[rows, 1], "([numRows, 1]: one prob per row of x)")
    }
}

/// Every check of [`activation`], in its order.
pub fn check_activation(x: Meta, probs: Option<Meta>, options: &ActivationOptions) -> Result<ActivationCheck> {
    let c = check_input(x, options.kind)?;
    check_probs(probs, c.rows)?;
    Ok(c)
}

/// Every check of [`activation_backward`], in its order.
pub fn check_activation_backward(grad: Meta, x: Meta, probs: Option<Meta>, options: &ActivationOptions) -> Result<ActivationCheck> {
    let c = check_input(x, options.kind)?;
    grad.expect_rank(2, "[numRows, inter]")?;
    grad.expect_shape(&[c.rows, c.inter], "([numRows, inter]: the shape of the forward output)")?;
    if grad.dtype != x.dtype {
        return Err(Error::type_error(
            format!("{}.dtype", grad.name),
            format!("{} (the dtype of {})", x.dtype.name(), x.name),
            grad.dtype.name(),
        ));
    }
    check_probs(probs, c.rows)?;
    Ok(c)
}

/// `x [N, 2 * I]` (or `[N, I]` for relu2) to `[N, I]` in the dtype of `x`, each row times its
/// prob when `probs` (`[N]` or `[N, 1]`, float32) is given.
pub fn activation(x: &TensorRef, probs: Option<&TensorRef>, options: &ActivationOptions) -> Result<Tensor> {
    let dims = check_activation(x.meta(), probs.map(|p| p.meta()), options)?;
    let p = probs.map(|p| p.typed::<f32>()).transpose()?;
    match x.dtype {
        DType::F32 => forward::<f32>(x, p.as_deref(), options, &dims),
        DType::BF16 => forward::<bf16>(x, p.as_deref(), options, &dims),
        DType::F16 => forward::<f16>(x, p.as_deref(), options, &dims),
        _ => Err(Error::Internal("activation: dtype checked above".into())),
    }
}

fn forward<T: Float>(x: &TensorRef, probs: Option<&[f32]>, o: &ActivationOptions, dims: &ActivationCheck) -> Result<Tensor> {
    let src = x.typed::<T>()?;
    let ActivationCheck { rows, width, inter } = *dims;
    let layout = o.kind.layout();
    let work = rows * (width + inter) * std::mem::size_of::<T>();
    let out = filled_vec(rows * inter, |out| {
        for_each_row(
            out,
            inter,
            work,
            || (),
            |_, r, row| {
                let xr = &src[r * width..(r + 1) * width];
                let p = probs.map(|p| p[r]);
                for (j, slot) in row.iter_mut().enumerate() {
                    let (gate, up) = pair(layout, xr, inter, j);
                    let a = unit(o, gate, up);
                    slot.write(T::from_f32(match p {
                        Some(p) => a * p,
                        None => a,
                    }));
                }
            },
        )
    });
    Ok(Tensor::from_elements(vec![rows, inter], out))
}

/// Output of [`activation_backward`].
#[derive(Debug, Clone, PartialEq)]
pub struct ActivationGrads {
    /// Shaped and typed like `x`: the gradient through the activation of `grad * prob`.
    pub grad_input: Tensor,
    /// Shaped like `probs` (float32), when probs were given: per row,
    /// `sum_j unweighted_activation[j] * grad[j]` (products in float32, summed in f64).
    pub grad_probs: Option<Tensor>,
}

/// Backward of [`activation`]: `grad [N, I]` (the dtype of `x`) to the gradients of `x` and,
/// when `probs` is given, of the probs.
pub fn activation_backward(
    grad: &TensorRef,
    x: &TensorRef,
    probs: Option<&TensorRef>,
    options: &ActivationOptions,
) -> Result<ActivationGrads> {
    let dims = check_activation_backward(grad.meta(), x.meta(), probs.map(|p| p.meta()), options)?;
    let p = probs.map(|p| p.typed::<f32>()).transpose()?;
    let grad_probs_shape = probs.map(|p| p.shape.clone());
    let (grad_input, grad_probs) = match x.dtype {
        DType::F32 => backward::<f32>(grad, x, p.as_deref(), options, &dims)?,
        DType::BF16 => backward::<bf16>(grad, x, p.as_deref(), options, &dims)?,
        DType::F16 => backward::<f16>(grad, x, p.as_deref(), options, &dims)?,
        _ => return Err(Error::Internal("activation_backward: dtype checked above".into())),
    };
    Ok(ActivationGrads { grad_input, grad_probs: grad_probs.zip(grad_probs_shape).map(|(data, shape)| Tensor::f32(shape, data)) })
}

fn backward<T: Float>(
    grad: &TensorRef,
    x: &TensorRef,
    probs: Option<&[f32]>,
    o: &ActivationOptions,
    dims: &ActivationCheck,
) -> Result<(Tensor, Option<Vec<f32>>)> {
    let src = x.typed::<T>()?;
    let g = grad.typed::<T>()?;
    let ActivationCheck { rows, width, inter } = *dims;
    let layout = o.kind.layout();
    let work = rows * (2 * width + inter) * std::mem::size_of::<T>();
    let grad_input = filled_vec(rows * width, |out| {
        for_each_row(
            out,
            width,
            work,
            || (),
            |_, r, row| {
                let xr = &src[r * width..(r + 1) * width];
                let gr = &g[r * inter..(r + 1) * inter];
                let p = probs.map(|p| p[r]);
                for (j, &gj) in gr.iter().enumerate() {
                    let (gate, up) = pair(layout, xr, inter, j);
                    let gw = match p {
                        Some(p) => gj.to_f32() * p,
                        None => gj.to_f32(),
                    };
                    let (d_gate, d_up) = unit_grad(o, gate, up, gw);
                    match layout {
                        Layout::Halves => {
                            row[j].write(T::from_f32(d_gate));
                            row[inter + j].write(T::from_f32(d_up));
                        }
                        Layout::Interleaved => {
                            row[2 * j].write(T::from_f32(d_gate));
                            row[2 * j + 1].write(T::from_f32(d_up));
                        }
                        Layout::Single => {
                            row[j].write(T::from_f32(d_gate));
                        }
                    }
                }
            },
        )
    });
    let grad_probs = probs.map(|_| {
        let work = rows * (width + inter) * std::mem::size_of::<T>();
        filled_vec(rows, |out| {
            for_each_row(
                out,
                1,
                work,
                || (),
                |_, r, cell| {
                    let xr = &src[r * width..(r + 1) * width];
                    let gr = &g[r * inter..(r + 1) * inter];
                    let mut sum = 0f64;
                    for (j, &gj) in gr.iter().enumerate() {
                        let (gate, up) = pair(layout, xr, inter, j);
                        sum += (unit(o, gate, up) * gj.to_f32()) as f64;
                    }
                    cell[0].write(sum as f32);
                },
            )
        })
    });
    Ok((Tensor::from_elements(vec![rows, width], grad_input), grad_probs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::tensor::Data;

    fn f32s(t: &Tensor) -> &[f32] {
        t.data.as_f32().expect("f32 data")
    }

    fn close(got: f32, want: f64, rel: f64) -> bool {
        (got as f64 - want).abs() <= rel * want.abs() + 1e-30
    }

    fn sig(v: f64) -> f64 {
        1.0 / (1.0 + (-v).exp())
    }

    #[test]
    fn expf_is_correctly_rounded_on_a_sweep() {
        // Against f64::exp rounded to f32 (double rounding aside, both are correct roundings).
        let mut worst = 0u32;
        let mut v = -104.5f32;
        while v < 89.0 {
            let want = (v as f64).exp() as f32;
            let got = expf(v);
            let ulps = (got.to_bits() as i64 - want.to_bits() as i64).unsigned_abs() as u32;
            worst = worst.max(ulps);
            v += 0.000_731;
        }
        assert!(worst <= 1, "worst {worst} ulp");
        assert_eq!(expf(0.0), 1.0);
        assert_eq!(expf(f32::INFINITY), f32::INFINITY);
        assert_eq!(expf(f32::NEG_INFINITY), 0.0);
        assert!(expf(f32::NAN).is_nan());
        assert_eq!(expf(88.72), (88.72f32 as f64).exp() as f32);
        assert_eq!(expf(88.75), f32::INFINITY);
        assert_eq!(expf(-103.9), (-103.9f32 as f64).exp() as f32);
        assert!(expf(-103.9) > 0.0);
    }

    #[test]
    fn swiglu_forward_and_weighted() {
        // One row, inter 2: gate [1, -2], up [3, 0.5].
        let x = [1.0f32, -2.0, 3.0, 0.5];
        let xr = TensorRef::of("x", vec![1, 4], &x).unwrap();
        let o = ActivationOptions::new(ActivationKind::Swiglu);
        let out = activation(&xr, None, &o).unwrap();
        assert_eq!(out.shape, vec![1, 2]);
        let want = [1.0 * sig(1.0) * 3.0, -2.0 * sig(-2.0) * 0.5];
        for (g, w) in f32s(&out).iter().zip(want) {
            assert!(close(*g, w, 1e-6), "{g} vs {w}");
        }
        let p = [0.25f32];
        let pr = TensorRef::of("probs", vec![1, 1], &p).unwrap();
        let weighted = activation(&xr, Some(&pr), &o).unwrap();
        for (g, w) in f32s(&weighted).iter().zip(want) {
            assert!(close(*g, w * 0.25, 1e-6), "{g} vs {}", w * 0.25);
        }
    }

    #[test]
    fn layouts_and_clamps() {
        // the halves kinds (the grouped GEMM's fused epilogue takes exactly these)
        let halves_kinds: Vec<_> = ActivationKind::ALL.into_iter().filter(|k| k.has_halves()).collect();
        assert_eq!(halves_kinds, [ActivationKind::Swiglu, ActivationKind::SwigluOai, ActivationKind::SwigluClamped]);
        // gate 8 (clamped to 7), up -9 (clamped to -7) and gate -1, up 2.
        let halves = [8.0f32, -1.0, -9.0, 2.0];
        let interleaved = [8.0f32, -9.0, -1.0, 2.0];
        let qg = |g: f64, u: f64| {
            let (g, u) = (g.min(7.0), u.clamp(-7.0, 7.0));
            g * sig(1.702f32 as f64 * g) * (u + 1.0)
        };
        let want = [qg(8.0, -9.0), qg(-1.0, 2.0)];
        let o = ActivationOptions::new(ActivationKind::QuickGeglu);
        let out = activation(&TensorRef::of("x", vec![1, 4], &interleaved).unwrap(), None, &o).unwrap();
        for (g, w) in f32s(&out).iter().zip(want) {
            assert!(close(*g, w, 1e-6), "quick_geglu {g} vs {w}");
        }
        let o = ActivationOptions::new(ActivationKind::SwigluOai);
        let out = activation(&TensorRef::of("x", vec![1, 4], &halves).unwrap(), None, &o).unwrap();
        for (g, w) in f32s(&out).iter().zip(want) {
            assert!(close(*g, w, 1e-6), "swiglu_oai {g} vs {w}");
        }
        let o = ActivationOptions::new(ActivationKind::SwigluClamped);
        let out = activation(&TensorRef::of("x", vec![1, 4], &halves).unwrap(), None, &o).unwrap();
        let want = [7.0 * sig(7.0) * -7.0, -sig(-1.0) * 2.0];
        for (g, w) in f32s(&out).iter().zip(want) {
            assert!(close(*g, w, 1e-6), "swiglu_clamped {g} vs {w}");
        }
        let o = ActivationOptions::new(ActivationKind::Relu2);
        let out = activation(&TensorRef::of("x", vec![2, 2], &halves).unwrap(), None, &o).unwrap();
        assert_eq!(out.shape, vec![2, 2]);
        assert_eq!(f32s(&out), &[64.0, 0.0, 0.0, 4.0]);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let x: Vec<f32> = vec![0.3, -1.2, 2.5, 7.5, -0.7, 1.1, -8.0, 0.4, 1.9, -2.2, 0.05, 3.3];
        let grad: Vec<f32> = vec![0.5, -1.5, 2.0, 0.25, -0.75, 1.0, 1.25, -0.5, 0.8, -2.0, 0.3, 0.9];
        let probs = [0.6f32, -1.3];
        for kind in ActivationKind::ALL {
            let o = ActivationOptions { limit: 2.0, ..ActivationOptions::new(kind) };
            let (rows, width) = (2, 6);
            let inter = if kind.is_gated() { 3 } else { 6 };
            let g = &grad[..rows * inter];
            let f = |xs: &[f32], ps: &[f32]| -> f64 {
                let xr = TensorRef::of("x", vec![rows, width], xs).unwrap();
                let pr = TensorRef::of("probs", vec![rows], ps).unwrap();
                let out = activation(&xr, Some(&pr), &o).unwrap();
                f32s(&out).iter().zip(g).map(|(&a, &b)| a as f64 * b as f64).sum()
            };
            let xr = TensorRef::of("x", vec![rows, width], &x).unwrap();
            let gr = TensorRef::of("grad", vec![rows, inter], g).unwrap();
            let pr = TensorRef::of("probs", vec![rows], &probs).unwrap();
            let grads = activation_backward(&gr, &xr, Some(&pr), &o).unwrap();
            assert_eq!(grads.grad_input.shape, vec![rows, width]);
            let h = 1e-2f32;
            for i in 0..x.len() {
                let (mut xp, mut xm) = (x.clone(), x.clone());
                xp[i] += h;
                xm[i] -= h;
                let fd = (f(&xp, &probs) - f(&xm, &probs)) / ((xp[i] - xm[i]) as f64);
                let got = f32s(&grads.grad_input)[i] as f64;
                assert!((got - fd).abs() <= 2e-3 * (1.0 + fd.abs()), "{} dx[{i}] {got} vs {fd}", kind.name());
            }
            let gp = grads.grad_probs.expect("probs gradient");
            assert_eq!(gp.shape, vec![rows]);
            for r in 0..rows {
                let (mut pp, mut pm) = (probs, probs);
                pp[r] += h;
                pm[r] -= h;
                let fd = (f(&x, &pp) - f(&x, &pm)) / ((pp[r] - pm[r]) as f64);
                let got = f32s(&gp)[r] as f64;
                assert!((got - fd).abs() <= 1e-3 * (1.0 + fd.abs()), "{} dp[{r}] {got} vs {fd}", kind.name());
            }
        }
    }

    #[test]
    fn half_precision_rounds_the_f32_result_once() {
        let vals = [0.3f32, -1.25, 2.5, 7.5, -0.7, 1.1, -8.0, 0.4];
        let xb: Vec<bf16> = vals.iter().map(|&v| bf16::from_f32(v)).collect();
        let xf: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
        let p = [0.37f32, 1.9];
        for kind in ActivationKind::ALL {
            let o = ActivationOptions::new(kind);
            let pr = TensorRef::of("probs", vec![2], &p).unwrap();
            let b = activation(&TensorRef::of("x", vec![2, 4], &xb).unwrap(), Some(&pr), &o).unwrap();
            let f = activation(&TensorRef::of("x", vec![2, 4], &xf).unwrap(), Some(&pr), &o).unwrap();
            assert_eq!(b.dtype, DType::BF16);
            let Data::U16(bits) = &b.data else { unreachable!() };
            let want: Vec<u16> = f32s(&f).iter().map(|&v| <bf16 as Float>::from_f32(v).to_bits()).collect();
            assert_eq!(bits, &want, "{}", kind.name());
        }
    }

    #[test]
    fn options_are_checked() {
        let err = ActivationOptions::from_args(None, None, None, None).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TypeError);
        assert!(err.to_string().starts_with("kind: expected one of 'swiglu'"), "{err}");
        let err = ActivationOptions::from_args(Some("gelu"), None, None, None).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::RangeError);
        assert!(err.to_string().contains("got 'gelu'"), "{err}");
        let err = ActivationOptions::from_args(Some("swiglu"), Some(1.0), None, None).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TypeError);
        assert!(err.to_string().starts_with("alpha: expected no alpha with kind 'swiglu'"), "{err}");
        let err = ActivationOptions::from_args(Some("swiglu_clamped"), None, None, Some(1.0)).unwrap_err();
        assert!(err.to_string().starts_with("linearOffset:"), "{err}");
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e39] {
            let err = ActivationOptions::from_args(Some("quick_geglu"), None, Some(bad), None).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::RangeError, "{bad}");
            assert!(err.to_string().starts_with("limit:"), "{err}");
        }
        let err = ActivationOptions::from_args(Some("swiglu_oai"), Some(f64::NAN), None, None).unwrap_err();
        assert!(err.to_string().starts_with("alpha: expected a finite number"), "{err}");
        let o = ActivationOptions::from_args(Some("quick_geglu"), Some(1.5), Some(3.0), Some(0.5)).unwrap();
        assert_eq!((o.alpha, o.limit, o.linear_offset), (1.5, 3.0, 0.5));
    }

    #[test]
    fn shapes_and_dtypes_are_checked() {
        let x = [0f32; 6];
        let o = ActivationOptions::new(ActivationKind::Swiglu);
        let err = activation(&TensorRef::of("x", vec![2, 3], &x).unwrap(), None, &o).unwrap_err();
        assert!(err.to_string().starts_with("x.shape: swiglu needs an even last dimension"), "{err}");
        let xr = TensorRef::of("x", vec![3, 2], &x).unwrap();
        let p = [1f32; 2];
        let err = activation(&xr, Some(&TensorRef::of("probs", vec![2], &p).unwrap()), &o).unwrap_err();
        assert!(err.to_string().starts_with("probs.shape:"), "{err}");
        let g = [0f32; 4];
        let err = activation_backward(&TensorRef::of("grad", vec![2, 2], &g).unwrap(), &xr, None, &o).unwrap_err();
        assert!(err.to_string().starts_with("grad.shape:"), "{err}");
        let gb = [bf16::ZERO; 3];
        let err = activation_backward(&TensorRef::of("grad", vec![3, 1], &gb).unwrap(), &xr, None, &o).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TypeError);
        assert!(err.to_string().starts_with("grad.dtype: expected float32 (the dtype of x)"), "{err}");
        // Empty problems are fine.
        let empty: [f32; 0] = [];
        let out = activation(&TensorRef::of("x", vec![0, 4], &empty).unwrap(), None, &o).unwrap();
        assert_eq!(out.shape, vec![0, 2]);
        let out = activation(&TensorRef::of("x", vec![3, 0], &empty).unwrap(), None, &o).unwrap();
        assert_eq!(out.shape, vec![3, 0]);
    }
}
