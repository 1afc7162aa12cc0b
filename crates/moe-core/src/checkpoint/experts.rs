//! Expert weights in the key schemes of the model families, to and from the stacked layout of
//! the grouped experts (`gateAndUpProjs [E, dim, width]`, `downProjs [E, inter, dim]`).
//!
//! With `p` the experts module (`model.layers.0.mlp.experts`), `E` experts, Linear weights
//! `[out, in]`:
//!
//! | format | keys | shapes | gate / up |
//! |---|---|---|---|
//! | `stacked` | `p.gate_and_up_projs`, `p.down_projs` (+ `p.gate_up_proj_bias`, `p.down_proj_bias`) | `[E, dim, width]`, `[E, inter, dim]` | the activation's own layout |
//! | `hf` | `p.{i}.gate_proj.weight`, `p.{i}.up_proj.weight`, `p.{i}.down_proj.weight` (+ `.bias`) | `[inter, dim]`, `[dim, inter]` | separate |
//! | `mixtral` | `p.{i}.w1.weight` (gate), `p.{i}.w3.weight` (up), `p.{i}.w2.weight` (down) (+ `.bias`) | as `hf` | separate |
//! | `gpt_oss` | `p.gate_up_proj`, `p.gate_up_proj_bias`, `p.down_proj`, `p.down_proj_bias` | `[E, dim, 2 * inter]`, `[E, 2 * inter]`, `[E, inter, dim]`, `[E, dim]` | interleaved (gate at even columns) |
//! | `llama4` | `p.gate_up_proj`, `p.down_proj` | `[E, dim, 2 * inter]`, `[E, inter, dim]` | halves |
//! | `hf_fused` (transformers 5) | `p.gate_up_proj`, `p.down_proj` | `[E, 2 * inter, dim]`, `[E, dim, inter]` | halves (rows) |
//! | `granite` | `p.input_linear.weight`, `p.output_linear.weight` | `[E, 2 * inter, dim]`, `[E, dim, inter]` | halves (rows) |
//!
//! Auto-detection (no `format`): `stacked` if `p.gate_and_up_projs` exists; if
//! `p.gate_up_proj` exists, its and `p.down_proj`'s shapes tell `[E, dim, 2 * inter]` (then
//! `gpt_oss` when `p.gate_up_proj_bias` exists; without biases GPT-OSS and Llama 4 cannot be
//! told apart, and `format` must say) from `[E, 2 * inter, dim]` (`hf_fused`); `granite` if
//! `p.input_linear.weight` exists; else `hf`, then `mixtral` per-expert keys.
//!
//! A load checks before reading any data: every expert's keys are present (from the header or
//! the index: no file is opened for it), and every expert entry of each opened file has the
//! dtype and shape of the others. Then it reads only the rank's bytes: a row range of each
//! fused tensor, or the rank's per-expert tensors, opening only the shards that hold them.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use super::{key, Checkpoint};
use crate::activations::ActivationKind;
use crate::error::{Error, Result};
use crate::sharding::{expert_range_for_rank, ExpertRange};
use crate::tensor::{DType, Tensor, TensorRef};

/// A key scheme for expert weights (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertFormat {
    Stacked,
    Hf,
    Mixtral,
    GptOss,
    Llama4,
    HfFused,
    Granite,
}

impl ExpertFormat {
    pub const ALL: [ExpertFormat; 7] = [
        ExpertFormat::Stacked,
        ExpertFormat::Hf,
        ExpertFormat::Mixtral,
        ExpertFormat::GptOss,
        ExpertFormat::Llama4,
        ExpertFormat::HfFused,
        ExpertFormat::Granite,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ExpertFormat::Stacked => "stacked",
            ExpertFormat::Hf => "hf",
            ExpertFormat::Mixtral => "mixtral",
            ExpertFormat::GptOss => "gpt_oss",
            ExpertFormat::Llama4 => "llama4",
            ExpertFormat::HfFused => "hf_fused",
            ExpertFormat::Granite => "granite",
        }
    }

    /// `None` stays `None` (auto-detect); an unknown name is a RangeError listing the known ones.
    pub fn parse(value: Option<&str>) -> Result<Option<ExpertFormat>> {
        let Some(s) = value else { return Ok(None) };
        Self::ALL.into_iter().find(|f| f.name() == s).map(Some).ok_or_else(|| {
            let names: Vec<String> = Self::ALL.iter().map(|f| format!("'{}'", f.name())).collect();
            Error::range("format", format!("expected one of {}, got '{s}'", names.join(", ")))
        })
    }

    fn scheme(self) -> Scheme {
        match self {
            ExpertFormat::Stacked => Scheme::Fused(STACKED),
            ExpertFormat::Hf => Scheme::PerExpert(HF),
            ExpertFormat::Mixtral => Scheme::PerExpert(MIXTRAL),
            ExpertFormat::GptOss => Scheme::Fused(GPT_OSS),
            ExpertFormat::Llama4 => Scheme::Fused(LLAMA4),
            ExpertFormat::HfFused => Scheme::Fused(HF_FUSED),
            ExpertFormat::Granite => Scheme::Fused(GRANITE),
        }
    }

    /// The keys and shapes of the scheme, for error messages.
    fn describe(self, p: &str) -> String {
        let k = |rest: &str| format!("'{}'", key(p, rest));
        let n = self.name();
        match self {
            ExpertFormat::Stacked => format!("{n}: {} [E, dim, 2 * inter] and {} [E, inter, dim]", k("gate_and_up_projs"), k("down_projs")),
            ExpertFormat::Hf => format!(
                "{n}: {}, {} [inter, dim] and {} [dim, inter]",
                k("{i}.gate_proj.weight"),
                k("{i}.up_proj.weight"),
                k("{i}.down_proj.weight")
            ),
            ExpertFormat::Mixtral => format!(
                "{n}: {} (gate), {} (up) [inter, dim] and {} (down) [dim, inter]",
                k("{i}.w1.weight"),
                k("{i}.w3.weight"),
                k("{i}.w2.weight")
            ),
            ExpertFormat::GptOss => {
                format!(
                    "{n}: {} [E, dim, 2 * inter] (gate, up interleaved), {} [E, 2 * inter], {} [E, inter, dim], {} [E, dim]",
                    k("gate_up_proj"),
                    k("gate_up_proj_bias"),
                    k("down_proj"),
                    k("down_proj_bias")
                )
            }
            ExpertFormat::Llama4 => {
                format!("{n}: {} [E, dim, 2 * inter] (gate | up halves) and {} [E, inter, dim]", k("gate_up_proj"), k("down_proj"))
            }
            ExpertFormat::HfFused => {
                format!("{n} (transformers 5): {} [E, 2 * inter, dim] and {} [E, dim, inter]", k("gate_up_proj"), k("down_proj"))
            }
            ExpertFormat::Granite => {
                format!("{n}: {} [E, 2 * inter, dim] and {} [E, dim, inter]", k("input_linear.weight"), k("output_linear.weight"))
            }
        }
    }
}

/// Where gate and up columns sit in a width-`2 * inter` row (or up only, width `inter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arr {
    Halves,
    Interleaved,
    UpOnly,
}

impl Arr {
    /// Column `c` -> (is up, j).
    fn split(self, inter: usize, c: usize) -> (bool, usize) {
        match self {
            Arr::Halves => {
                if c < inter {
                    (false, c)
                } else {
                    (true, c - inter)
                }
            }
            Arr::Interleaved => (c % 2 == 1, c / 2),
            Arr::UpOnly => (true, c),
        }
    }

    /// (is up, j) -> column.
    fn join(self, inter: usize, up: bool, j: usize) -> usize {
        match self {
            Arr::Halves => {
                if up {
                    inter + j
                } else {
                    j
                }
            }
            Arr::Interleaved => 2 * j + up as usize,
            Arr::UpOnly => j,
        }
    }
}

/// The stacked layout of an activation: relu2 has no gate, quick_geglu interleaves.
fn layout(kind: ActivationKind) -> Arr {
    match kind {
        ActivationKind::Relu2 => Arr::UpOnly,
        ActivationKind::QuickGeglu => Arr::Interleaved,
        _ => Arr::Halves,
    }
}

/// Column `c` of arrangement `from` -> its column in `to`.
fn remap(from: Arr, to: Arr, inter: usize) -> impl Fn(usize) -> usize {
    move |c| {
        let (up, j) = from.split(inter, c);
        to.join(inter, up, j)
    }
}

#[derive(Clone, Copy)]
struct PerExpert {
    gate: &'static str,
    up: &'static str,
    down: &'static str,
    gate_bias: &'static str,
    up_bias: &'static str,
    down_bias: &'static str,
}

const HF: PerExpert = PerExpert {
    gate: "gate_proj.weight",
    up: "up_proj.weight",
    down: "down_proj.weight",
    gate_bias: "gate_proj.bias",
    up_bias: "up_proj.bias",
    down_bias: "down_proj.bias",
};
const MIXTRAL: PerExpert =
    PerExpert { gate: "w1.weight", up: "w3.weight", down: "w2.weight", gate_bias: "w1.bias", up_bias: "w3.bias", down_bias: "w2.bias" };

impl PerExpert {
    fn tails(&self) -> [&'static str; 6] {
        [self.gate, self.up, self.down, self.gate_bias, self.up_bias, self.down_bias]
    }
}

#[derive(Clone, Copy)]
struct Fused {
    up: &'static str,
    down: &'static str,
    up_bias: Option<&'static str>,
    down_bias: Option<&'static str>,
    /// `[E, width, dim]` / `[E, dim, inter]` (Linear-style) instead of `[E, dim, width]` / `[E, inter, dim]`.
    transposed: bool,
    /// The columns' arrangement; `None`: the activation's own layout (stacked).
    cols: Option<Arr>,
}

const STACKED: Fused = Fused {
    up: "gate_and_up_projs",
    down: "down_projs",
    up_bias: Some("gate_up_proj_bias"),
    down_bias: Some("down_proj_bias"),
    transposed: false,
    cols: None,
};
const GPT_OSS: Fused = Fused {
    up: "gate_up_proj",
    down: "down_proj",
    up_bias: Some("gate_up_proj_bias"),
    down_bias: Some("down_proj_bias"),
    transposed: false,
    cols: Some(Arr::Interleaved),
};
const LLAMA4: Fused = Fused {
    up: "gate_up_proj",
    down: "down_proj",
    up_bias: Some("gate_up_proj_bias"),
    down_bias: Some("down_proj_bias"),
    transposed: false,
    cols: Some(Arr::Halves),
};
const HF_FUSED: Fused = Fused {
    up: "gate_up_proj",
    down: "down_proj",
    up_bias: Some("gate_up_proj_bias"),
    down_bias: Some("down_proj_bias"),
    transposed: true,
    cols: Some(Arr::Halves),
};
const GRANITE: Fused = Fused {
    up: "input_linear.weight",
    down: "output_linear.weight",
    up_bias: None,
    down_bias: None,
    transposed: true,
    cols: Some(Arr::Halves),
};

enum Scheme {
    PerExpert(PerExpert),
    Fused(Fused),
}

// ---------------------------------------------------------------------------------------
// Tensors by name: a checkpoint (files opened on demand) or tensors in memory.

#[derive(Debug, Clone)]
struct Info {
    dtype: Option<DType>,
    dtype_name: String,
    shape: Vec<usize>,
}

trait Store {
    /// Every name (nothing is opened).
    fn names(&self) -> Vec<&str>;
    fn has(&self, name: &str) -> bool;
    /// The entry, opening its file if needed.
    fn entry(&mut self, name: &str) -> Result<Option<Info>>;
    /// The entry if its file is open already.
    fn entry_if_open(&self, name: &str) -> Option<Info>;
    fn read_into(&mut self, name: &str, rows: Option<Range<usize>>, buf: &mut [u8]) -> Result<()>;
}

fn info_of(e: &super::Entry) -> Info {
    Info { dtype: e.dtype, dtype_name: e.dtype_name(), shape: e.shape.clone() }
}

impl Store for Checkpoint<'_> {
    fn names(&self) -> Vec<&str> {
        Checkpoint::names(self).collect()
    }
    fn has(&self, name: &str) -> bool {
        self.contains(name)
    }
    fn entry(&mut self, name: &str) -> Result<Option<Info>> {
        Ok(Checkpoint::entry(self, name)?.map(info_of))
    }
    fn entry_if_open(&self, name: &str) -> Option<Info> {
        self.open_entry(name).map(info_of)
    }
    fn read_into(&mut self, name: &str, rows: Option<Range<usize>>, buf: &mut [u8]) -> Result<()> {
        Checkpoint::read_into(self, name, rows, buf)
    }
}

struct MemStore<'a, 'b> {
    order: Vec<&'b str>,
    tensors: HashMap<&'b str, &'b TensorRef<'a>>,
}

impl Store for MemStore<'_, '_> {
    fn names(&self) -> Vec<&str> {
        self.order.clone()
    }
    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    fn entry(&mut self, name: &str) -> Result<Option<Info>> {
        Ok(self.entry_if_open(name))
    }
    fn entry_if_open(&self, name: &str) -> Option<Info> {
        self.tensors.get(name).map(|t| Info { dtype: Some(t.dtype), dtype_name: t.dtype.name().to_string(), shape: t.shape.clone() })
    }
    fn read_into(&mut self, name: &str, rows: Option<Range<usize>>, buf: &mut [u8]) -> Result<()> {
        let t = self.tensors.get(name).ok_or_else(|| Error::Internal(format!("{name}: no such tensor")))?;
        let row: usize = t.shape.iter().skip(1).product::<usize>() * t.dtype.size();
        let src = match rows {
            Some(r) => t.bytes().get(r.start * row..r.end * row),
            None => Some(t.bytes()),
        };
        match src {
            Some(s) if s.len() == buf.len() => {
                buf.copy_from_slice(s);
                Ok(())
            }
            _ => Err(Error::Internal(format!("{name}: a read of {} bytes", buf.len()))),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Element buffers (2- or 4-byte elements, aligned) and the copies between layouts.

enum Buf {
    U16(Vec<u16>),
    U32(Vec<u32>),
}

impl Buf {
    fn new(dtype: DType, len: usize, arg: &str) -> Result<Buf> {
        Ok(match dtype.size() {
            2 => Buf::U16(crate::alloc::try_vec(0u16, len, arg)?),
            4 => Buf::U32(crate::alloc::try_vec(0u32, len, arg)?),
            _ => return Err(Error::Internal(format!("{arg}: a buffer of {}", dtype.name()))),
        })
    }

    fn of(t: &TensorRef) -> Result<Buf> {
        Ok(match t.dtype.size() {
            2 => Buf::U16(bytemuck::pod_collect_to_vec(t.bytes())),
            4 => Buf::U32(bytemuck::pod_collect_to_vec(t.bytes())),
            _ => return Err(Error::Internal(format!("{}: a buffer of {}", t.name, t.dtype.name()))),
        })
    }

    /// The bytes of elements `[start, start + len)`.
    fn bytes_mut(&mut self, start: usize, len: usize) -> &mut [u8] {
        match self {
            Buf::U16(v) => bytemuck::cast_slice_mut(&mut v[start..start + len]),
            Buf::U32(v) => bytemuck::cast_slice_mut(&mut v[start..start + len]),
        }
    }

    fn len(&self) -> usize {
        match self {
            Buf::U16(v) => v.len(),
            Buf::U32(v) => v.len(),
        }
    }

    fn into_tensor(self, dtype: DType, shape: Vec<usize>) -> Tensor {
        match self {
            Buf::U16(v) => Tensor::u16(dtype, shape, v),
            Buf::U32(v) => Tensor::f32(shape, bytemuck::allocation::cast_vec(v)),
        }
    }
}

/// `dst[c * width + col(r)] = src[r * cols + c]`: a `[rows, cols]` block transposed into
/// `[cols, width]`, source row `r` landing in column `col(r)`. In tasks of 64 destination rows
/// (on all cores with the `parallel` feature), each sweeping the source 8 rows at a time, so the
/// destination lines being filled stay in L1 (about 2 GB/s a core for bf16 Hugging Face weights).
fn transpose<T: Copy + Send + Sync>(src: &[T], rows: usize, cols: usize, dst: &mut [T], width: usize, col: &dyn Fn(usize) -> usize) {
    const ROWS: usize = 8;
    const TASK: usize = 64;
    if rows == 0 || cols == 0 || width == 0 {
        return;
    }
    let dst_col: Vec<usize> = (0..rows).map(col).collect();
    let work = 2 * rows * cols * std::mem::size_of::<T>();
    crate::par::for_each_row(
        &mut dst[..cols * width],
        TASK * width,
        work,
        || (),
        |_, task, chunk| {
            let first = task * TASK;
            let n = chunk.len() / width;
            for r0 in (0..rows).step_by(ROWS) {
                let r1 = (r0 + ROWS).min(rows);
                for k in 0..n {
                    let c = first + k;
                    let drow = &mut chunk[k * width..(k + 1) * width];
                    for r in r0..r1 {
                        drow[dst_col[r]] = src[r * cols + c];
                    }
                }
            }
        },
    );
}

/// `dst[r * width + col(c)] = src[r * width + c]`: the columns of `[rows, width]` rearranged.
fn permute_cols<T: Copy>(src: &[T], rows: usize, width: usize, dst: &mut [T], col: &dyn Fn(usize) -> usize) {
    let to: Vec<usize> = (0..width).map(col).collect();
    for r in 0..rows {
        let (s, d) = (&src[r * width..(r + 1) * width], &mut dst[r * width..(r + 1) * width]);
        for (c, &v) in s.iter().enumerate() {
            d[to[c]] = v;
        }
    }
}

/// [`transpose`] of `src[s_off..]` into `dst[d_off..]`.
#[allow(clippy::too_many_arguments)]
fn transpose_buf(
    src: &Buf,
    s_off: usize,
    rows: usize,
    cols: usize,
    dst: &mut Buf,
    d_off: usize,
    width: usize,
    col: &dyn Fn(usize) -> usize,
) -> Result<()> {
    match (src, dst) {
        (Buf::U16(s), Buf::U16(d)) => {
            transpose(&s[s_off..s_off + rows * cols], rows, cols, &mut d[d_off..d_off + cols * width], width, col)
        }
        (Buf::U32(s), Buf::U32(d)) => {
            transpose(&s[s_off..s_off + rows * cols], rows, cols, &mut d[d_off..d_off + cols * width], width, col)
        }
        _ => return Err(Error::Internal("a transpose between element sizes".into())),
    }
    Ok(())
}

/// [`permute_cols`] of the whole of `src` (rows of `width`) into `dst`.
fn permute_buf(src: &Buf, width: usize, dst: &mut Buf, col: &dyn Fn(usize) -> usize) -> Result<()> {
    let rows = src.len().checked_div(width).unwrap_or(0);
    match (src, dst) {
        (Buf::U16(s), Buf::U16(d)) => permute_cols(s, rows, width, d, col),
        (Buf::U32(s), Buf::U32(d)) => permute_cols(s, rows, width, d, col),
        _ => return Err(Error::Internal("a permutation between element sizes".into())),
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Checks and errors.

fn shape_str(s: &[usize]) -> String {
    format!("[{}]", s.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "))
}

/// Checks an entry's dtype (a token dtype, equal to `dtype` once known) and shape.
fn expect(info: &Info, name: &str, shape: &[usize], what: &str, dtype: &mut Option<DType>) -> Result<()> {
    let dt = match info.dtype {
        Some(d) if DType::TOKENS.contains(&d) => d,
        _ => return Err(Error::type_error(format!("{name}.dtype"), "F32, BF16 or F16", info.dtype_name.clone())),
    };
    match dtype {
        Some(d) if *d != dt => {
            return Err(Error::type_error(format!("{name}.dtype"), format!("{} like the other expert weights", d.name()), dt.name()))
        }
        _ => *dtype = Some(dt),
    }
    if info.shape != shape {
        return Err(Error::range(name, format!("expected shape {} ({what}), got {}", shape_str(shape), shape_str(&info.shape))));
    }
    Ok(())
}

fn missing_key(name: &str, what: &str) -> Error {
    Error::range(name, format!("missing from the checkpoint (expected {what})"))
}

/// `{head}rest` with every all-digit dotted component after `head` written `{i}`.
fn pattern(name: &str, head: &str) -> String {
    let rest = &name[head.len()..];
    let parts: Vec<&str> =
        rest.split('.').map(|c| if !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()) { "{i}" } else { c }).collect();
    format!("{head}{}", parts.join("."))
}

/// The error when no scheme's keys are found: what is under the prefix (or its parent), and
/// what was looked for.
fn nothing_found(store: &dyn Store, prefix: &str, looked: &[ExpertFormat]) -> Error {
    let head = |p: &str| if p.is_empty() { String::new() } else { format!("{p}.") };
    let under = |p: &str| -> BTreeMap<String, usize> {
        let h = head(p);
        let mut m = BTreeMap::new();
        for n in store.names() {
            if n.starts_with(&h) {
                *m.entry(pattern(n, &h)).or_insert(0) += 1;
            }
        }
        m
    };
    let mut found = under(prefix);
    let mut place = format!("under '{}'", head(prefix));
    if found.is_empty() && !prefix.is_empty() {
        let parent = prefix.rsplit_once('.').map_or("", |(a, _)| a);
        found = under(parent);
        place = if parent.is_empty() {
            format!("(none under '{}'; all of them)", head(prefix))
        } else {
            format!("(none under '{}'; under its parent '{}')", head(prefix), head(parent))
        };
    }
    let shown: Vec<String> =
        found.iter().take(12).map(|(p, n)| if *n > 1 { format!("'{p}' ({n} keys)") } else { format!("'{p}'") }).collect();
    let more = if found.len() > 12 { format!(", ... ({} key patterns in all)", found.len()) } else { String::new() };
    let schemes: Vec<String> = looked.iter().map(|f| f.describe(prefix)).collect();
    Error::range(
        if prefix.is_empty() { "prefix" } else { prefix },
        format!(
            "no expert weights found in {} (looked for {}). The checkpoint's keys {place}: {}{more}",
            if looked.len() == 1 { format!("the '{}' key scheme", looked[0].name()) } else { "a known key scheme".to_string() },
            schemes.join("; "),
            if shown.is_empty() { "none".to_string() } else { shown.join(", ") },
        ),
    )
}

/// The expert ids that have keys of `s` under `prefix` (`{prefix}.{i}.{tail}`), with a name each.
fn expert_ids(store: &dyn Store, prefix: &str, s: &PerExpert) -> Vec<(usize, String)> {
    let head = if prefix.is_empty() { String::new() } else { format!("{prefix}.") };
    let tails = s.tails();
    let mut ids: Vec<(usize, String)> = store
        .names()
        .into_iter()
        .filter_map(|n| {
            let rest = n.strip_prefix(&head)?;
            let (id, tail) = rest.split_once('.')?;
            if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) || !tails.contains(&tail) {
                return None;
            }
            Some((id.parse::<usize>().ok()?, n.to_string()))
        })
        .collect();
    ids.sort();
    ids
}

/// Which scheme the checkpoint uses under `prefix` (see the module docs).
fn detect(store: &mut dyn Store, prefix: &str) -> Result<ExpertFormat> {
    if store.has(&key(prefix, STACKED.up)) {
        return Ok(ExpertFormat::Stacked);
    }
    let gu = key(prefix, "gate_up_proj");
    if store.has(&gu) {
        let dn = key(prefix, "down_proj");
        let up = store.entry(&gu)?.ok_or_else(|| Error::Internal(gu.clone()))?;
        let Some(down) = store.entry(&dn)? else {
            return Err(missing_key(&dn, &format!("the down projection beside '{gu}'")));
        };
        if up.shape.len() == 3 && down.shape.len() == 3 {
            let (a, b, c, d) = (up.shape[1], up.shape[2], down.shape[1], down.shape[2]);
            if b == 2 * c && a == d && c > 0 {
                if store.has(&key(prefix, "gate_up_proj_bias")) {
                    return Ok(ExpertFormat::GptOss);
                }
                return Err(Error::range(
                    gu.as_str(),
                    format!(
                        "{} [E, dim, 2 * inter] without '{}': GPT-OSS (gate, up interleaved) and Llama 4 (gate | up halves) store this alike; pass format 'gpt_oss' or 'llama4'",
                        shape_str(&up.shape),
                        key(prefix, "gate_up_proj_bias")
                    ),
                ));
            }
            if a == 2 * d && b == c && d > 0 {
                return Ok(ExpertFormat::HfFused);
            }
        }
        return Err(Error::range(
            gu.as_str(),
            format!(
                "shape {} beside '{dn}' {} fits neither GPT-OSS / Llama 4 ([E, dim, 2 * inter] and [E, inter, dim]) nor transformers 5's fused experts ([E, 2 * inter, dim] and [E, dim, inter])",
                shape_str(&up.shape),
                shape_str(&down.shape)
            ),
        ));
    }
    if store.has(&key(prefix, GRANITE.up)) {
        return Ok(ExpertFormat::Granite);
    }
    if !expert_ids(store, prefix, &HF).is_empty() {
        return Ok(ExpertFormat::Hf);
    }
    if !expert_ids(store, prefix, &MIXTRAL).is_empty() {
        return Ok(ExpertFormat::Mixtral);
    }
    Err(nothing_found(store, prefix, &ExpertFormat::ALL))
}

// ---------------------------------------------------------------------------------------
// Loading.

/// Stacked experts of one rank, and what was read to get them.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedExperts {
    /// `[end - start, dim, 2 * inter]` (`[.., dim, inter]` for relu2).
    pub gate_and_up: Tensor,
    /// `[end - start, inter, dim]`.
    pub down: Tensor,
    pub gate_up_bias: Option<Tensor>,
    pub down_bias: Option<Tensor>,
    pub range: ExpertRange,
    /// The key scheme found in the checkpoint (or asked for).
    pub format: ExpertFormat,
    /// Bytes read from the source (headers included).
    pub bytes_read: u64,
}

struct Stacked {
    w1: Tensor,
    w2: Tensor,
    b1: Option<Tensor>,
    b2: Option<Tensor>,
    format: ExpertFormat,
}

fn load_from_store(
    store: &mut dyn Store,
    prefix: &str,
    num_experts: usize,
    range: ExpertRange,
    kind: ActivationKind,
    format: Option<ExpertFormat>,
) -> Result<Stacked> {
    let fmt = match format {
        Some(f) => f,
        None => detect(store, prefix)?,
    };
    match fmt.scheme() {
        Scheme::PerExpert(s) => load_per_expert(store, prefix, &s, fmt, num_experts, range, kind),
        Scheme::Fused(f) => load_fused(store, prefix, &f, fmt, num_experts, range, kind),
    }
}

fn relu2_refusal(kind: ActivationKind, fmt: ExpertFormat, name: &str) -> Error {
    Error::range(name, format!("activation '{}' has no gate projection, and the '{}' key scheme stores gate and up together (relu2 experts load from 'stacked' or per-expert up / down keys)", kind.name(), fmt.name()))
}

fn load_fused(
    store: &mut dyn Store,
    prefix: &str,
    f: &Fused,
    fmt: ExpertFormat,
    e: usize,
    range: ExpertRange,
    kind: ActivationKind,
) -> Result<Stacked> {
    let ours = layout(kind);
    let file = f.cols.unwrap_or(ours);
    let (upk, dnk) = (key(prefix, f.up), key(prefix, f.down));
    let Some(up) = store.entry(&upk)? else {
        return Err(nothing_found(store, prefix, &[fmt]));
    };
    if ours == Arr::UpOnly && file != Arr::UpOnly {
        return Err(relu2_refusal(kind, fmt, &upk));
    }
    let up_what = if f.transposed { "[numExperts, width, dim]" } else { "[numExperts, dim, width]" };
    if up.shape.len() != 3 {
        return Err(Error::range(upk.as_str(), format!("expected 3 dimensions {up_what}, got {}", shape_str(&up.shape))));
    }
    if up.shape[0] != e {
        return Err(Error::range(
            upk.as_str(),
            format!("holds {} experts (dim 0 of {}), expected numExperts = {e}", up.shape[0], shape_str(&up.shape)),
        ));
    }
    let (dim, width) = if f.transposed { (up.shape[2], up.shape[1]) } else { (up.shape[1], up.shape[2]) };
    if ours != Arr::UpOnly && width % 2 != 0 {
        return Err(Error::range(upk.as_str(), format!("{} needs an even width (gate and up), got {}", kind.name(), shape_str(&up.shape))));
    }
    let inter = if ours == Arr::UpOnly { width } else { width / 2 };
    let mut dtype = None;
    expect(&up, &upk, &up.shape.clone(), up_what, &mut dtype)?;
    let (down_shape, down_what) =
        if f.transposed { (vec![e, dim, inter], "[numExperts, dim, inter]") } else { (vec![e, inter, dim], "[numExperts, inter, dim]") };
    let Some(down) = store.entry(&dnk)? else {
        return Err(missing_key(&dnk, &format!("{down_what} {}", shape_str(&down_shape))));
    };
    expect(&down, &dnk, &down_shape, down_what, &mut dtype)?;
    let b1k = f.up_bias.map(|k| key(prefix, k)).filter(|k| store.has(k));
    let b2k = f.down_bias.map(|k| key(prefix, k)).filter(|k| store.has(k));
    let (mut bt1, mut bt2) = (None, None);
    if let Some(k) = &b1k {
        let info = store.entry(k)?.ok_or_else(|| Error::Internal(k.clone()))?;
        expect(&info, k, &[e, width], "[numExperts, width]", &mut bt1)?;
    }
    if let Some(k) = &b2k {
        let info = store.entry(k)?.ok_or_else(|| Error::Internal(k.clone()))?;
        expect(&info, k, &[e, dim], "[numExperts, dim]", &mut bt2)?;
    }
    // Everything is checked: read the rank's rows.
    let dtype = dtype.unwrap_or(DType::F32);
    let local = range.len();
    let rows = || Some(range.start..range.end);
    let map = remap(file, ours, inter);
    let mut src = Buf::new(dtype, local * dim * width, "gateAndUpProjs")?;
    store.read_into(&upk, rows(), src.bytes_mut(0, local * dim * width))?;
    let w1 = if f.transposed {
        let mut dst = Buf::new(dtype, local * dim * width, "gateAndUpProjs")?;
        for l in 0..local {
            transpose_buf(&src, l * width * dim, width, dim, &mut dst, l * dim * width, width, &map)?;
        }
        dst
    } else if file != ours {
        let mut dst = Buf::new(dtype, local * dim * width, "gateAndUpProjs")?;
        permute_buf(&src, width, &mut dst, &map)?;
        dst
    } else {
        src
    };
    let mut dsrc = Buf::new(dtype, local * inter * dim, "downProjs")?;
    store.read_into(&dnk, rows(), dsrc.bytes_mut(0, local * inter * dim))?;
    let w2 = if f.transposed {
        let mut dst = Buf::new(dtype, local * inter * dim, "downProjs")?;
        for l in 0..local {
            transpose_buf(&dsrc, l * dim * inter, dim, inter, &mut dst, l * inter * dim, dim, &|j| j)?;
        }
        dst
    } else {
        dsrc
    };
    let b1 = match (&b1k, bt1) {
        (Some(k), Some(bt)) => {
            let mut b = Buf::new(bt, local * width, "gateUpProjBias")?;
            store.read_into(k, rows(), b.bytes_mut(0, local * width))?;
            if file != ours {
                let mut dst = Buf::new(bt, local * width, "gateUpProjBias")?;
                permute_buf(&b, width, &mut dst, &map)?;
                b = dst;
            }
            Some(b.into_tensor(bt, vec![local, width]))
        }
        _ => None,
    };
    let b2 = match (&b2k, bt2) {
        (Some(k), Some(bt)) => {
            let mut b = Buf::new(bt, local * dim, "downProjBias")?;
            store.read_into(k, rows(), b.bytes_mut(0, local * dim))?;
            Some(b.into_tensor(bt, vec![local, dim]))
        }
        _ => None,
    };
    Ok(Stacked {
        w1: w1.into_tensor(dtype, vec![local, dim, width]),
        w2: w2.into_tensor(dtype, vec![local, inter, dim]),
        b1,
        b2,
        format: fmt,
    })
}

fn load_per_expert(
    store: &mut dyn Store,
    prefix: &str,
    s: &PerExpert,
    fmt: ExpertFormat,
    e: usize,
    range: ExpertRange,
    kind: ActivationKind,
) -> Result<Stacked> {
    let ours = layout(kind);
    let gated = ours != Arr::UpOnly;
    let k = |i: usize, t: &str| key(prefix, &format!("{i}.{t}"));
    let ids = expert_ids(store, prefix, s);
    if ids.is_empty() {
        return Err(nothing_found(store, prefix, &[fmt]));
    }
    if let Some((id, name)) = ids.iter().find(|(id, _)| *id >= e) {
        return Err(Error::range(
            name.as_str(),
            format!("expert {id} is outside [0, numExperts = {e}): the checkpoint has more experts than expected"),
        ));
    }
    let mut weights: Vec<(&str, &str)> = Vec::new();
    if gated {
        weights.push((s.gate, "[inter, dim]"));
    }
    weights.push((s.up, "[inter, dim]"));
    weights.push((s.down, "[dim, inter]"));
    let first = if range.is_empty() { 0 } else { range.start };
    let has_bias = store.has(&k(first, s.down_bias));
    let mut biases: Vec<(&str, &str)> = Vec::new();
    if has_bias {
        if gated {
            biases.push((s.gate_bias, "[inter]"));
        }
        biases.push((s.up_bias, "[inter]"));
        biases.push((s.down_bias, "[dim]"));
    }
    // 1. Every expert's keys are there (names only: nothing is opened for this).
    for i in 0..e {
        for (t, what) in weights.iter().chain(&biases) {
            let name = k(i, t);
            if !store.has(&name) {
                return Err(missing_key(&name, what));
            }
        }
    }
    // 2. The rank's entries (this opens the shards that hold them, and only those).
    for i in range.start..range.end {
        for (t, _) in weights.iter().chain(&biases) {
            store.entry(&k(i, t))?;
        }
    }
    // 3. dim and inter from expert 0 when its file is open, else from the rank's first expert.
    let reference = if store.entry_if_open(&k(0, s.down)).is_some() { 0 } else { first };
    let down0 = k(reference, s.down);
    let d0 = store.entry(&down0)?.ok_or_else(|| missing_key(&down0, "[dim, inter]"))?;
    if d0.shape.len() != 2 {
        return Err(Error::range(down0.as_str(), format!("expected [dim, inter], got {}", shape_str(&d0.shape))));
    }
    let (dim, inter) = (d0.shape[0], d0.shape[1]);
    let width = if gated { 2 * inter } else { inter };
    // 4. Every entry that is open (all of the rank's; others when their file was opened anyway).
    let shape_of = |t: &str| -> Vec<usize> {
        if t == s.down {
            vec![dim, inter]
        } else if t == s.down_bias {
            vec![dim]
        } else if t == s.gate_bias || t == s.up_bias {
            vec![inter]
        } else {
            vec![inter, dim]
        }
    };
    let (mut dtype, mut bias_dtype) = (None, None);
    for i in 0..e {
        for (t, what) in &weights {
            if let Some(info) = store.entry_if_open(&k(i, t)) {
                expect(&info, &k(i, t), &shape_of(t), what, &mut dtype)?;
            }
        }
        for (t, what) in &biases {
            if let Some(info) = store.entry_if_open(&k(i, t)) {
                expect(&info, &k(i, t), &shape_of(t), what, &mut bias_dtype)?;
            }
        }
    }
    // 5. Read the rank's tensors into place.
    let dtype = dtype.unwrap_or(DType::F32);
    let local = range.len();
    let mut w1 = Buf::new(dtype, local * dim * width, "gateAndUpProjs")?;
    let mut w2 = Buf::new(dtype, local * inter * dim, "downProjs")?;
    let mut tmp = Buf::new(dtype, inter * dim, "experts")?;
    let bt = bias_dtype.unwrap_or(dtype);
    let (mut b1, mut b2) = if has_bias {
        (Some(Buf::new(bt, local * width, "gateUpProjBias")?), Some(Buf::new(bt, local * dim, "downProjBias")?))
    } else {
        (None, None)
    };
    let mut btmp = Buf::new(bt, if has_bias { inter } else { 0 }, "experts")?;
    for (l, i) in (range.start..range.end).enumerate() {
        let n = inter * dim;
        if gated {
            store.read_into(&k(i, s.gate), None, tmp.bytes_mut(0, n))?;
            transpose_buf(&tmp, 0, inter, dim, &mut w1, l * dim * width, width, &|j| ours.join(inter, false, j))?;
        }
        store.read_into(&k(i, s.up), None, tmp.bytes_mut(0, n))?;
        transpose_buf(&tmp, 0, inter, dim, &mut w1, l * dim * width, width, &|j| ours.join(inter, true, j))?;
        // down [dim, inter] -> stacked [inter, dim]: a transpose.
        store.read_into(&k(i, s.down), None, tmp.bytes_mut(0, n))?;
        transpose_buf(&tmp, 0, dim, inter, &mut w2, l * inter * dim, dim, &|j| j)?;
        if let (Some(b1), Some(b2)) = (b1.as_mut(), b2.as_mut()) {
            // A bias is a [inter, 1] block transposed into one row: the same column rule.
            if gated {
                store.read_into(&k(i, s.gate_bias), None, btmp.bytes_mut(0, inter))?;
                transpose_buf(&btmp, 0, inter, 1, b1, l * width, width, &|j| ours.join(inter, false, j))?;
            }
            store.read_into(&k(i, s.up_bias), None, btmp.bytes_mut(0, inter))?;
            transpose_buf(&btmp, 0, inter, 1, b1, l * width, width, &|j| ours.join(inter, true, j))?;
            store.read_into(&k(i, s.down_bias), None, b2.bytes_mut(l * dim, dim))?;
        }
    }
    Ok(Stacked {
        w1: w1.into_tensor(dtype, vec![local, dim, width]),
        w2: w2.into_tensor(dtype, vec![local, inter, dim]),
        b1: b1.map(|b| b.into_tensor(bt, vec![local, width])),
        b2: b2.map(|b| b.into_tensor(bt, vec![local, dim])),
        format: fmt,
    })
}

/// Loads the experts of rank `epRank` (of `epSize`; the range of [`expert_range_for_rank`])
/// as stacked tensors, from a checkpoint in any key scheme (`format`, or detected). Every
/// expert's keys and the entries of the files it opens are checked first (so a wrong expert
/// count or shape is an error naming the key); then only the rank's bytes are read.
pub fn load_experts(
    ck: &mut Checkpoint,
    prefix: &str,
    num_experts: usize,
    ep_size: usize,
    ep_rank: usize,
    kind: ActivationKind,
    format: Option<ExpertFormat>,
) -> Result<LoadedExperts> {
    let range = expert_range_for_rank(num_experts, ep_size, ep_rank)?;
    let s = load_from_store(ck, prefix, num_experts, range, kind, format)?;
    Ok(LoadedExperts {
        gate_and_up: s.w1,
        down: s.w2,
        gate_up_bias: s.b1,
        down_bias: s.b2,
        range,
        format: s.format,
        bytes_read: ck.bytes_read(),
    })
}

/// Stacks expert tensors held in memory, in any key scheme (all experts `0..numExperts`).
pub fn stack_experts(
    tensors: &[(String, TensorRef)],
    prefix: &str,
    num_experts: usize,
    kind: ActivationKind,
    format: Option<ExpertFormat>,
) -> Result<LoadedExperts> {
    let mut store = MemStore {
        order: tensors.iter().map(|(n, _)| n.as_str()).collect(),
        tensors: tensors.iter().map(|(n, t)| (n.as_str(), t)).collect(),
    };
    let range = ExpertRange { start: 0, end: num_experts };
    let s = load_from_store(&mut store, prefix, num_experts, range, kind, format)?;
    Ok(LoadedExperts { gate_and_up: s.w1, down: s.w2, gate_up_bias: s.b1, down_bias: s.b2, range, format: s.format, bytes_read: 0 })
}

// ---------------------------------------------------------------------------------------
// Unstacking.

/// Stacked experts to the tensors of a key scheme (bit-exact copies). Per-expert keys are
/// named with global ids from `firstExpert` (a rank's range start); fused tensors hold the
/// given experts as they are. The inverse of [`stack_experts`].
#[allow(clippy::too_many_arguments)]
pub fn unstack_experts(
    prefix: &str,
    gate_and_up: &TensorRef,
    down: &TensorRef,
    gate_up_bias: Option<&TensorRef>,
    down_bias: Option<&TensorRef>,
    kind: ActivationKind,
    first_expert: usize,
    format: ExpertFormat,
) -> Result<Vec<(String, Tensor)>> {
    let ours = layout(kind);
    let s = gate_and_up.expect_rank(3, "[numLocalExperts, dim, width]")?.to_vec();
    gate_and_up.expect_dtype(DType::TOKENS)?;
    let (local, dim, width) = (s[0], s[1], s[2]);
    if ours != Arr::UpOnly && width % 2 != 0 {
        return Err(Error::range(
            format!("{}.shape[2]", gate_and_up.name),
            format!("{} needs an even width (gate and up), got {width}", kind.name()),
        ));
    }
    let inter = if ours == Arr::UpOnly { width } else { width / 2 };
    down.expect_rank(3, "[numLocalExperts, inter, dim]")?;
    down.expect_shape(&[local, inter, dim], "([numLocalExperts, inter, dim])")?;
    if down.dtype != gate_and_up.dtype {
        return Err(Error::type_error(
            format!("{}.dtype", down.name),
            format!("{} (the dtype of {})", gate_and_up.dtype.name(), gate_and_up.name),
            down.dtype.name(),
        ));
    }
    if let Some(b) = gate_up_bias {
        b.expect_dtype(DType::TOKENS)?;
        b.expect_shape(&[local, width], "([numLocalExperts, width])")?;
    }
    if let Some(b) = down_bias {
        b.expect_dtype(DType::TOKENS)?;
        b.expect_shape(&[local, dim], "([numLocalExperts, dim])")?;
    }
    let dt = gate_and_up.dtype;
    let w1 = Buf::of(gate_and_up)?;
    let w2 = Buf::of(down)?;
    let b1 = gate_up_bias.map(Buf::of).transpose()?;
    let b2 = down_bias.map(Buf::of).transpose()?;
    let mut out = Vec::new();
    match format.scheme() {
        Scheme::PerExpert(s) => {
            for l in 0..local {
                let id = first_expert + l;
                let p = |rest: &str| key(prefix, &format!("{id}.{rest}"));
                // stacked [dim, width] block -> [inter, dim] at column col(j): dst[j, d] = blk[d, col(j)],
                // i.e. a transpose of the block's columns picked by `col`.
                let take = |src: &Buf, off: usize, rows: usize, w: usize, n: usize, up: bool, dtype: DType| -> Result<Tensor> {
                    // gather the n columns into a [rows, n] block, then transpose it to [n, rows].
                    let mut cols = Buf::new(dtype, rows * n, "experts")?;
                    let mut res = Buf::new(dtype, rows * n, "experts")?;
                    match (src, &mut cols) {
                        (Buf::U16(s), Buf::U16(c)) => gather(&s[off..off + rows * w], rows, w, c, n, &|j| ours.join(inter, up, j)),
                        (Buf::U32(s), Buf::U32(c)) => gather(&s[off..off + rows * w], rows, w, c, n, &|j| ours.join(inter, up, j)),
                        _ => return Err(Error::Internal("sizes".into())),
                    }
                    transpose_buf(&cols, 0, rows, n, &mut res, 0, rows, &|r| r)?;
                    Ok(res.into_tensor(dtype, if rows == 1 { vec![n] } else { vec![n, rows] }))
                };
                if ours != Arr::UpOnly {
                    out.push((p(s.gate), take(&w1, l * dim * width, dim, width, inter, false, dt)?));
                }
                out.push((p(s.up), take(&w1, l * dim * width, dim, width, inter, true, dt)?));
                // stacked down [inter, dim] -> [dim, inter].
                let mut d = Buf::new(dt, dim * inter, "experts")?;
                transpose_buf(&w2, l * inter * dim, inter, dim, &mut d, 0, inter, &|j| j)?;
                out.push((p(s.down), d.into_tensor(dt, vec![dim, inter])));
                if let (Some(b), Some(t)) = (&b1, gate_up_bias) {
                    if ours != Arr::UpOnly {
                        out.push((p(s.gate_bias), take(b, l * width, 1, width, inter, false, t.dtype)?));
                    }
                    out.push((p(s.up_bias), take(b, l * width, 1, width, inter, true, t.dtype)?));
                }
                if let (Some(b), Some(t)) = (&b2, down_bias) {
                    let mut d = Buf::new(t.dtype, dim, "experts")?;
                    transpose_buf(b, l * dim, 1, dim, &mut d, 0, 1, &|_| 0)?;
                    out.push((p(s.down_bias), d.into_tensor(t.dtype, vec![dim])));
                }
            }
        }
        Scheme::Fused(f) => {
            let file = f.cols.unwrap_or(ours);
            if ours == Arr::UpOnly && file != Arr::UpOnly {
                return Err(relu2_refusal(kind, format, "format"));
            }
            if f.up_bias.is_none() && (gate_up_bias.is_some() || down_bias.is_some()) {
                return Err(Error::range("biases", format!("the '{}' key scheme has no expert biases", format.name())));
            }
            let map = remap(ours, file, inter);
            // Columns rearranged to the file's arrangement.
            let mut cols = Buf::new(dt, local * dim * width, "gateAndUpProjs")?;
            permute_buf(&w1, width, &mut cols, &map)?;
            let (up, dn) = if f.transposed {
                let mut up = Buf::new(dt, local * dim * width, "gateAndUpProjs")?;
                let mut dn = Buf::new(dt, local * inter * dim, "downProjs")?;
                for l in 0..local {
                    transpose_buf(&cols, l * dim * width, dim, width, &mut up, l * width * dim, dim, &|j| j)?;
                    transpose_buf(&w2, l * inter * dim, inter, dim, &mut dn, l * dim * inter, inter, &|j| j)?;
                }
                (up.into_tensor(dt, vec![local, width, dim]), dn.into_tensor(dt, vec![local, dim, inter]))
            } else {
                (cols.into_tensor(dt, vec![local, dim, width]), w2.into_tensor(dt, vec![local, inter, dim]))
            };
            out.push((key(prefix, f.up), up));
            out.push((key(prefix, f.down), dn));
            if let (Some(b), Some(t), Some(k)) = (&b1, gate_up_bias, f.up_bias) {
                let mut d = Buf::new(t.dtype, local * width, "gateUpProjBias")?;
                permute_buf(b, width, &mut d, &map)?;
                out.push((key(prefix, k), d.into_tensor(t.dtype, vec![local, width])));
            }
            if let (Some(b), Some(t), Some(k)) = (b2, down_bias, f.down_bias) {
                out.push((key(prefix, k), b.into_tensor(t.dtype, vec![local, dim])));
            }
        }
    }
    Ok(out)
}

/// `dst[r * n + j] = src[r * w + col(j)]`: `n` columns of `[rows, w]` picked by `col`.
fn gather<T: Copy>(src: &[T], rows: usize, w: usize, dst: &mut [T], n: usize, col: &dyn Fn(usize) -> usize) {
    let from: Vec<usize> = (0..n).map(col).collect();
    for r in 0..rows {
        let (s, d) = (&src[r * w..(r + 1) * w], &mut dst[r * n..(r + 1) * n]);
        for (j, &c) in from.iter().enumerate() {
            d[j] = s[c];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{save, save_owned, SliceSource};
    use super::*;
    use crate::tensor::Data;

    fn f32s(t: &Tensor) -> &[f32] {
        match &t.data {
            Data::F32(v) => v,
            _ => panic!("f32"),
        }
    }

    fn refs(ts: &[(String, Tensor)]) -> Vec<(String, TensorRef<'_>)> {
        ts.iter().map(|(n, t)| (n.clone(), TensorRef::new("t", t.dtype, t.shape.clone(), super::super::tensor_bytes(t)).unwrap())).collect()
    }

    fn single(bytes: &[u8]) -> Checkpoint<'_> {
        Checkpoint::single("", Box::new(SliceSource::new(bytes))).unwrap()
    }

    fn header_len(f: &[u8]) -> u64 {
        8 + u64::from_le_bytes(f[..8].try_into().unwrap())
    }

    #[test]
    fn every_scheme_round_trips_and_rank_slices_read_only_their_bytes() {
        let (e, dim, inter) = (6usize, 3usize, 2usize);
        for kind in [ActivationKind::Swiglu, ActivationKind::QuickGeglu, ActivationKind::Relu2] {
            let width = if kind == ActivationKind::Relu2 { inter } else { 2 * inter };
            let w1: Vec<f32> = (0..e * dim * width).map(|i| i as f32).collect();
            let w2: Vec<f32> = (0..e * inter * dim).map(|i| -(i as f32)).collect();
            let b1: Vec<f32> = (0..e * width).map(|i| 0.5 + i as f32).collect();
            let b2: Vec<f32> = (0..e * dim).map(|i| -0.5 - i as f32).collect();
            let w1r = TensorRef::of("gateAndUpProjs", vec![e, dim, width], &w1).unwrap();
            let w2r = TensorRef::of("downProjs", vec![e, inter, dim], &w2).unwrap();
            let b1r = TensorRef::of("gateUpProjBias", vec![e, width], &b1).unwrap();
            let b2r = TensorRef::of("downProjBias", vec![e, dim], &b2).unwrap();
            for fmt in ExpertFormat::ALL {
                let gated_only = matches!(fmt.scheme(), Scheme::Fused(Fused { cols: Some(_), .. }));
                let with_bias = fmt != ExpertFormat::Granite;
                let (bb1, bb2) = if with_bias { (Some(&b1r), Some(&b2r)) } else { (None, None) };
                let unstacked = unstack_experts("m.experts", &w1r, &w2r, bb1, bb2, kind, 0, fmt);
                if kind == ActivationKind::Relu2 && gated_only {
                    assert!(unstacked.unwrap_err().to_string().contains("has no gate projection"));
                    continue;
                }
                let keys = unstacked.unwrap();
                // Auto-detection finds the scheme (Llama 4 without biases is ambiguous: stated).
                let auto = if fmt == ExpertFormat::Llama4 { Some(fmt) } else { None };
                let stacked = stack_experts(&refs(&keys), "m.experts", e, kind, auto).unwrap();
                assert_eq!(stacked.format, fmt, "{fmt:?} {kind:?}");
                assert_eq!(f32s(&stacked.gate_and_up), &w1[..], "{fmt:?} {kind:?}");
                assert_eq!(f32s(&stacked.down), &w2[..], "{fmt:?} {kind:?}");
                if with_bias {
                    assert_eq!(f32s(stacked.gate_up_bias.as_ref().unwrap()), &b1[..], "{fmt:?} {kind:?}");
                    assert_eq!(f32s(stacked.down_bias.as_ref().unwrap()), &b2[..], "{fmt:?} {kind:?}");
                }
                let file = save_owned(&keys, &[]).unwrap();
                for ep in 1..=4 {
                    for rank in 0..ep {
                        let got = load_experts(&mut single(&file), "m.experts", e, ep, rank, kind, auto).unwrap();
                        let r = got.range;
                        assert_eq!(f32s(&got.gate_and_up), &w1[r.start * dim * width..r.end * dim * width]);
                        assert_eq!(f32s(&got.down), &w2[r.start * inter * dim..r.end * inter * dim]);
                        let bias = if with_bias { r.len() * (width + dim) * 4 } else { 0 };
                        assert_eq!(
                            got.bytes_read,
                            header_len(&file) + (r.len() * (dim * width + inter * dim) * 4 + bias) as u64,
                            "{fmt:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn transposes_large_enough_for_threads_match_the_definition() {
        // 1.7 MB of traffic: above the parallel threshold when the feature is on; odd sizes.
        let (rows, cols) = (301usize, 699usize);
        let width = 2 * rows + 3;
        let src: Vec<u32> = (0..rows * cols).map(|i| i as u32 * 7 + 1).collect();
        let mut dst = vec![0u32; cols * width];
        let col = |r: usize| 2 * r + 1;
        transpose(&src, rows, cols, &mut dst, width, &col);
        for c in 0..cols {
            for r in 0..rows {
                assert_eq!(dst[c * width + col(r)], src[r * cols + c], "[{r}, {c}]");
            }
            assert_eq!(dst[c * width], 0);
        }
    }

    #[test]
    fn layouts_match_their_definitions() {
        // gate_proj of expert 1, row j, column d = stacked[1, d, gate column of j].
        let (e, dim, inter) = (2usize, 3usize, 2usize);
        let w1: Vec<f32> = (0..e * dim * 2 * inter).map(|i| i as f32).collect();
        let w2: Vec<f32> = (0..e * inter * dim).map(|i| i as f32).collect();
        let w1r = TensorRef::of("a", vec![e, dim, 2 * inter], &w1).unwrap();
        let w2r = TensorRef::of("b", vec![e, inter, dim], &w2).unwrap();
        let hf = unstack_experts("x", &w1r, &w2r, None, None, ActivationKind::Swiglu, 0, ExpertFormat::Mixtral).unwrap();
        let w1_1 = &hf.iter().find(|(n, _)| n == "x.1.w1.weight").unwrap().1;
        assert_eq!(w1_1.shape, vec![inter, dim]);
        assert_eq!(f32s(w1_1)[dim + 2], w1[dim * 2 * inter + 2 * 2 * inter + 1]);
        let w3_1 = &hf.iter().find(|(n, _)| n == "x.1.w3.weight").unwrap().1;
        assert_eq!(f32s(w3_1)[dim + 2], w1[dim * 2 * inter + 2 * 2 * inter + inter + 1]);
        // GPT-OSS under swiglu: the file interleaves, stacked swiglu has halves.
        let g = unstack_experts("x", &w1r, &w2r, None, None, ActivationKind::Swiglu, 0, ExpertFormat::GptOss).unwrap();
        let gu = &g.iter().find(|(n, _)| n == "x.gate_up_proj").unwrap().1;
        assert_eq!(gu.shape, vec![e, dim, 2 * inter]);
        // file[0, 0, 2j] = gate j = stacked[0, 0, j]; file[0, 0, 2j + 1] = up j = stacked[0, 0, inter + j].
        assert_eq!(&f32s(gu)[..4], &[w1[0], w1[2], w1[1], w1[3]]);
        // Under quick_geglu the stacked layout is the GPT-OSS one: a plain copy.
        let q = unstack_experts("x", &w1r, &w2r, None, None, ActivationKind::QuickGeglu, 0, ExpertFormat::GptOss).unwrap();
        assert_eq!(f32s(&q[0].1), &w1[..]);
        // transformers 5: [E, 2 * inter, dim], row j = gate j (halves), down [E, dim, inter].
        let t = unstack_experts("x", &w1r, &w2r, None, None, ActivationKind::Swiglu, 0, ExpertFormat::HfFused).unwrap();
        assert_eq!(t[0].1.shape, vec![e, 2 * inter, dim]);
        assert_eq!(f32s(&t[0].1)[inter * dim + 1], w1[2 * inter + inter]); // up 0, d = 1 = stacked[0, 1, inter + 0]
        assert_eq!(t[1].1.shape, vec![e, dim, inter]);
        assert_eq!(f32s(&t[1].1)[1], w2[dim]); // down[0, 0, 1] = stacked down[0, 1, 0]
    }

    #[test]
    fn expert_count_shape_and_scheme_errors_name_the_key() {
        let (e, dim, inter) = (4usize, 3usize, 2usize);
        let w1 = vec![0f32; e * dim * 2 * inter];
        let w2 = vec![0f32; e * inter * dim];
        let t = vec![
            ("x.gate_and_up_projs".to_string(), TensorRef::of("a", vec![e, dim, 2 * inter], &w1).unwrap()),
            ("x.down_projs".to_string(), TensorRef::of("b", vec![e, inter, dim], &w2).unwrap()),
        ];
        let bytes = save(&t, &[]).unwrap();
        let err = load_experts(&mut single(&bytes), "x", 5, 1, 0, ActivationKind::Swiglu, None).unwrap_err();
        assert!(err.to_string().starts_with("x.gate_and_up_projs: holds 4 experts"), "{err}");
        let err = load_experts(&mut single(&bytes), "x", 4, 1, 0, ActivationKind::Relu2, None).unwrap_err();
        assert!(err.to_string().starts_with("x.down_projs: expected shape [4, 4, 3]"), "{err}");
        let ok = load_experts(&mut single(&bytes), "x", 4, 3, 2, ActivationKind::Swiglu, None).unwrap();
        assert_eq!(ok.format, ExpertFormat::Stacked);
        assert_eq!(ok.gate_and_up.shape, vec![1, dim, 2 * inter]);
        // Nothing under the prefix: the keys under its parent, and every scheme looked for.
        let err = load_experts(&mut single(&bytes), "x.experts", 4, 1, 0, ActivationKind::Swiglu, None).unwrap_err().to_string();
        assert!(
            err.starts_with("x.experts: no expert weights found in a known key scheme (looked for stacked: 'x.experts.gate_and_up_projs'"),
            "{err}"
        );
        assert!(
            err.ends_with("The checkpoint's keys (none under 'x.experts.'; under its parent 'x.'): 'x.down_projs', 'x.gate_and_up_projs'"),
            "{err}"
        );
        // A forced scheme that is not there lists what is.
        let err =
            load_experts(&mut single(&bytes), "x", 4, 1, 0, ActivationKind::Swiglu, Some(ExpertFormat::Mixtral)).unwrap_err().to_string();
        assert!(
            err.starts_with("x: no expert weights found in the 'mixtral' key scheme (looked for mixtral: 'x.{i}.w1.weight' (gate)"),
            "{err}"
        );
        // GPT-OSS keys without biases are ambiguous with Llama 4.
        let g = vec![
            ("x.gate_up_proj".to_string(), TensorRef::of("a", vec![e, dim, 2 * inter], &w1).unwrap()),
            ("x.down_proj".to_string(), TensorRef::of("b", vec![e, inter, dim], &w2).unwrap()),
        ];
        let err = stack_experts(&g, "x", 4, ActivationKind::Swiglu, None).unwrap_err().to_string();
        assert!(err.contains("pass format 'gpt_oss' or 'llama4'"), "{err}");
        assert_eq!(stack_experts(&g, "x", 4, ActivationKind::Swiglu, Some(ExpertFormat::GptOss)).unwrap().format, ExpertFormat::GptOss);
        assert!(ExpertFormat::parse(Some("deepseek")).unwrap_err().to_string().starts_with("format: expected one of 'stacked', 'hf'"));
    }

    #[test]
    fn sharded_per_rank_loads_open_only_the_rank_shards() {
        // 8 experts over 3 shards: experts 0-2 in s1, 3-5 in s2 (expert 5's down in s3), 6-7 in s3.
        let (e, dim, inter) = (8usize, 4usize, 2usize);
        let w1: Vec<f32> = (0..e * dim * 2 * inter).map(|i| i as f32 * 0.25).collect();
        let w2: Vec<f32> = (0..e * inter * dim).map(|i| i as f32 * -0.5).collect();
        let w1r = TensorRef::of("a", vec![e, dim, 2 * inter], &w1).unwrap();
        let w2r = TensorRef::of("b", vec![e, inter, dim], &w2).unwrap();
        let hf = unstack_experts("m", &w1r, &w2r, None, None, ActivationKind::Swiglu, 0, ExpertFormat::Hf).unwrap();
        let shard_of = |n: &str| -> usize {
            let id: usize = n.split('.').nth(1).unwrap().parse().unwrap();
            if id < 3 {
                0
            } else if id < 5 || (id == 5 && !n.contains("down")) {
                1
            } else {
                2
            }
        };
        let files: Vec<Vec<u8>> =
            (0..3).map(|s| save_owned(&hf.iter().filter(|(n, _)| shard_of(n) == s).cloned().collect::<Vec<_>>(), &[]).unwrap()).collect();
        let wm: Vec<String> = hf.iter().map(|(n, _)| format!("\"{n}\":\"s{}.safetensors\"", shard_of(n) + 1)).collect();
        let index = format!("{{\"weight_map\":{{{}}}}}", wm.join(","));
        for (ep, rank, opened) in
            [(4usize, 1usize, vec![0usize, 1]), (4, 2, vec![1, 2]), (4, 3, vec![2]), (2, 0, vec![0, 1]), (1, 0, vec![0, 1, 2])]
        {
            let log = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
            let l2 = log.clone();
            let files2 = &files;
            let opener: super::super::Opener = Box::new(move |name: &str| {
                let i: usize = name[1..2].parse::<usize>().unwrap() - 1;
                l2.borrow_mut().push(i);
                Ok(Some(Box::new(SliceSource::new(&files2[i])) as Box<dyn super::super::ByteSource + '_>))
            });
            let mut ck = Checkpoint::sharded(index.as_bytes(), opener).unwrap();
            let got = load_experts(&mut ck, "m", e, ep, rank, ActivationKind::Swiglu, None).unwrap();
            let r = got.range;
            assert_eq!(f32s(&got.gate_and_up), &w1[r.start * dim * 2 * inter..r.end * dim * 2 * inter]);
            assert_eq!(f32s(&got.down), &w2[r.start * inter * dim..r.end * inter * dim]);
            let mut seen = log.borrow().clone();
            seen.sort();
            assert_eq!(seen, opened, "ep {ep} rank {rank}");
            let headers: u64 = opened.iter().map(|&i| header_len(&files[i])).sum();
            assert_eq!(got.bytes_read, headers + (r.len() * 3 * dim * inter * 4) as u64);
        }
        // An absent shard names itself and the tensor that needs it.
        let opener: super::super::Opener = Box::new(|name: &str| {
            Ok(if name == "s2.safetensors" {
                Some(Box::new(SliceSource::new(&files[1])) as Box<dyn super::super::ByteSource + '_>)
            } else {
                None
            })
        });
        let mut ck = Checkpoint::sharded(index.as_bytes(), opener).unwrap();
        let err = load_experts(&mut ck, "m", e, 4, 2, ActivationKind::Swiglu, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "s3.safetensors: this shard holds 'm.5.down_proj.weight', which this call needs, and is not among the given shards"
        );
    }
}
