//! Checkpoints in the safetensors format (Hugging Face's `safetensors` crate parses the
//! header and writes files), and the mapping between Hugging Face per-expert weights and the
//! stacked expert layout of the grouped experts.
//!
//! Keys, with `prefix` the experts module (e.g. `model.layers.0.mlp.experts`):
//!
//! | layout | keys | shapes |
//! |---|---|---|
//! | Hugging Face | `{prefix}.{i}.gate_proj.weight`, `.up_proj.weight` | `[inter, dim]` (Linear: `[out, in]`) |
//! |              | `{prefix}.{i}.down_proj.weight` | `[dim, inter]` |
//! |              | optional `.gate_proj.bias`, `.up_proj.bias` `[inter]`, `.down_proj.bias` `[dim]` | |
//! | stacked | `{prefix}.gate_and_up_projs` | `[E, dim, 2 * inter]` (`[E, dim, inter]` for relu2) |
//! |         | `{prefix}.down_projs` | `[E, inter, dim]` |
//! |         | optional `{prefix}.gate_up_proj_bias` `[E, 2 * inter]`, `{prefix}.down_proj_bias` `[E, dim]` | |
//!
//! The stacked up-projection holds gate then up as halves of its last dimension, or as
//! interleaved `gate, up` pairs for quick_geglu (the activations module's layouts); relu2 has
//! no gate (its Hugging Face experts have only `up_proj`). Stacked = Hugging Face transposed.
//!
//! Loading one expert-parallel rank's experts reads the header and then only the byte ranges
//! of that rank's experts (a row range of each stacked tensor, or the rank's per-expert
//! tensors), from a file with seek + read (native) or from an in-memory buffer (wasm too).

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use bytemuck::Pod;
use safetensors::tensor::{Metadata, TensorInfo};

use crate::activations::ActivationKind;
use crate::error::{Error, Result};
use crate::sharding::{expert_range_for_rank, ExpertRange};
use crate::tensor::{DType, Tensor, TensorRef};

// ---------------------------------------------------------------------------------------
// Byte sources.

/// Where checkpoint bytes come from. Every read is counted, so callers (and tests) can see
/// that a per-rank load touched only the header and its own experts.
pub trait ByteSource {
    /// Total length in bytes.
    fn len(&self) -> u64;
    /// Fills `buf` from `offset`; an error names the source.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Bytes read so far.
    fn bytes_read(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A checkpoint held in memory.
pub struct SliceSource<'a> {
    bytes: &'a [u8],
    read: u64,
}

impl<'a> SliceSource<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        SliceSource { bytes, read: 0 }
    }
}

impl ByteSource for SliceSource<'_> {
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset.checked_add(buf.len() as u64).filter(|&e| e <= self.len());
        let Some(end) = end else {
            return Err(Error::range("bytes", format!("the checkpoint ends at byte {}, a read needs {offset}..{}", self.len(), offset + buf.len() as u64)));
        };
        buf.copy_from_slice(&self.bytes[offset as usize..end as usize]);
        self.read += buf.len() as u64;
        Ok(())
    }

    fn bytes_read(&self) -> u64 {
        self.read
    }
}

/// A checkpoint file, read with seek + read (not on wasm32, which has no files).
#[cfg(not(target_arch = "wasm32"))]
pub struct FileSource {
    file: std::fs::File,
    path: String,
    len: u64,
    read: u64,
}

#[cfg(not(target_arch = "wasm32"))]
impl FileSource {
    pub fn open(path: &str) -> Result<FileSource> {
        let file = std::fs::File::open(path).map_err(|e| Error::range("path", format!("cannot open '{path}': {e}")))?;
        let len = file.metadata().map_err(|e| Error::range("path", format!("cannot stat '{path}': {e}")))?.len();
        Ok(FileSource { file, path: path.to_string(), len, read: 0 })
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl ByteSource for FileSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        use std::io::{Read, Seek, SeekFrom};
        self.file
            .seek(SeekFrom::Start(offset))
            .and_then(|_| self.file.read_exact(buf))
            .map_err(|e| Error::range("path", format!("reading {} bytes at {offset} of '{}': {e}", buf.len(), self.path)))?;
        self.read += buf.len() as u64;
        Ok(())
    }

    fn bytes_read(&self) -> u64 {
        self.read
    }
}

// ---------------------------------------------------------------------------------------
// The header.

/// One tensor of a checkpoint: where its bytes are (absolute offsets in the file).
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub start: u64,
    pub end: u64,
}

/// A parsed safetensors header.
#[derive(Debug, Clone)]
pub struct Header {
    /// Tensors by offset.
    pub tensors: Vec<Entry>,
    /// The `__metadata__` strings.
    pub metadata: BTreeMap<String, String>,
    index: HashMap<String, usize>,
}

impl Header {
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }
}

/// The safetensors header cap (100 MB, as the safetensors crate).
const MAX_HEADER: u64 = 100_000_000;

fn dtype_of(name: &str, d: safetensors::Dtype) -> Result<DType> {
    use safetensors::Dtype as S;
    Ok(match d {
        S::F32 => DType::F32,
        S::BF16 => DType::BF16,
        S::F16 => DType::F16,
        S::I32 => DType::I32,
        S::I64 => DType::I64,
        S::BOOL => DType::Bool,
        other => return Err(Error::type_error(format!("{name}.dtype"), "F32, BF16, F16, I32, I64 or BOOL", format!("{other:?}"))),
    })
}

fn st_dtype(d: DType) -> safetensors::Dtype {
    use safetensors::Dtype as S;
    match d {
        DType::F32 => S::F32,
        DType::BF16 => S::BF16,
        DType::F16 => S::F16,
        DType::I32 => S::I32,
        DType::I64 => S::I64,
        DType::Bool => S::BOOL,
    }
}

/// Reads and checks the header: the 8-byte length, the JSON (parsed by the safetensors
/// crate, which checks that the tensors tile the data without gaps), and that the source
/// holds all the data the header describes. Reads only `8 + header length` bytes.
pub fn read_header<S: ByteSource + ?Sized>(src: &mut S) -> Result<Header> {
    let total = src.len();
    if total < 8 {
        return Err(Error::range("checkpoint", format!("not a safetensors file: {total} bytes, the header length alone takes 8")));
    }
    let mut n = [0u8; 8];
    src.read_at(0, &mut n)?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER || n > total - 8 {
        return Err(Error::range("checkpoint", format!("not a safetensors file: a header of {n} bytes does not fit in {total} bytes")));
    }
    let mut json = crate::alloc::try_vec(0u8, n as usize, "checkpoint")?;
    src.read_at(8, &mut json)?;
    let meta: Metadata = serde_json::from_slice(&json).map_err(|e| Error::range("checkpoint", format!("not a safetensors header: {e}")))?;
    let data_start = 8 + n;
    let data_len = meta.data_len() as u64;
    if data_start + data_len > total {
        return Err(Error::range("checkpoint", format!("truncated: the header describes {data_len} bytes of data after byte {data_start}, the checkpoint has {total} bytes")));
    }
    let infos: HashMap<String, &TensorInfo> = meta.tensors().into_iter().collect();
    let mut tensors = Vec::with_capacity(infos.len());
    for name in meta.offset_keys() {
        let info = infos[&name];
        tensors.push(Entry {
            dtype: dtype_of(&name, info.dtype)?,
            shape: info.shape.clone(),
            start: data_start + info.data_offsets.0 as u64,
            end: data_start + info.data_offsets.1 as u64,
            name,
        });
    }
    let index = tensors.iter().enumerate().map(|(i, e)| (e.name.clone(), i)).collect();
    let metadata = meta.metadata().as_ref().map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default();
    Ok(Header { tensors, metadata, index })
}

/// Bytes per row along dim 0 of an entry (1 for a scalar).
fn row_bytes(e: &Entry) -> u64 {
    e.shape.iter().skip(1).product::<usize>() as u64 * e.dtype.size() as u64
}

/// Reads rows `rows` (dim 0) of a tensor, or all of it; only those bytes are read.
fn read_rows<S: ByteSource + ?Sized>(src: &mut S, e: &Entry, rows: Option<Range<usize>>) -> Result<Vec<u8>> {
    let (start, len) = match rows {
        Some(r) => (e.start + r.start as u64 * row_bytes(e), r.len() as u64 * row_bytes(e)),
        None => (e.start, e.end - e.start),
    };
    let mut buf = crate::alloc::try_vec(0u8, len as usize, &e.name)?;
    src.read_at(start, &mut buf)?;
    Ok(buf)
}

/// An owned tensor from little-endian bytes.
fn tensor_from_bytes(name: &str, dtype: DType, shape: Vec<usize>, bytes: &[u8]) -> Result<Tensor> {
    Ok(match dtype {
        DType::F32 => Tensor::f32(shape, bytemuck::pod_collect_to_vec(bytes)),
        DType::BF16 | DType::F16 => Tensor::u16(dtype, shape, bytemuck::pod_collect_to_vec(bytes)),
        DType::I32 => Tensor::i32(shape, bytemuck::pod_collect_to_vec(bytes)),
        DType::Bool => {
            if let Some(i) = bytes.iter().position(|&b| b > 1) {
                return Err(Error::range(name, format!("a BOOL tensor holds {} at element {i}", bytes[i])));
            }
            Tensor::bool(shape, bytes.to_vec())
        }
        DType::I64 => return Err(Error::type_error(format!("{name}.dtype"), "F32, BF16, F16, I32 or BOOL (int64 tensors cannot be returned)", "I64")),
    })
}

fn tensor_bytes(t: &Tensor) -> &[u8] {
    match &t.data {
        crate::tensor::Data::F32(v) => bytemuck::cast_slice(v),
        crate::tensor::Data::U16(v) => bytemuck::cast_slice(v),
        crate::tensor::Data::I32(v) => bytemuck::cast_slice(v),
        crate::tensor::Data::Bool(v) => v,
    }
}

/// Reads every tensor (or the named ones; a missing name is a RangeError naming it).
pub fn load<S: ByteSource + ?Sized>(src: &mut S, names: Option<&[String]>) -> Result<Vec<(String, Tensor)>> {
    let header = read_header(src)?;
    let wanted: Vec<&Entry> = match names {
        None => header.tensors.iter().collect(),
        Some(names) => names.iter().map(|n| header.get(n).ok_or_else(|| missing(n, &header))).collect::<Result<_>>()?,
    };
    wanted
        .into_iter()
        .map(|e| {
            let bytes = read_rows(src, e, None)?;
            Ok((e.name.clone(), tensor_from_bytes(&e.name, e.dtype, e.shape.clone(), &bytes)?))
        })
        .collect()
}

fn missing(name: &str, header: &Header) -> Error {
    let mut near: Vec<&str> = header.tensors.iter().map(|e| e.name.as_str()).take(4).collect();
    if header.tensors.len() > 4 {
        near.push("...");
    }
    Error::range(name, format!("no such tensor in the checkpoint (it has {} tensors: {})", header.tensors.len(), near.join(", ")))
}

/// A tensor to write: name, dtype, shape and little-endian bytes.
struct Out<'a> {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    bytes: &'a [u8],
}

impl safetensors::View for Out<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Writes tensors (and optional `__metadata__` strings) as a safetensors buffer, through the
/// safetensors crate (tensors ordered by dtype alignment, then name; header padded to 8).
/// Names must be unique and non-empty (a RangeError naming the duplicate).
pub fn save(tensors: &[(String, TensorRef)], metadata: &[(String, String)]) -> Result<Vec<u8>> {
    let mut seen = HashMap::new();
    for (i, (name, _)) in tensors.iter().enumerate() {
        if name.is_empty() || name == "__metadata__" {
            return Err(Error::range(format!("names[{i}]"), format!("'{name}' cannot name a tensor")));
        }
        if let Some(j) = seen.insert(name.as_str(), i) {
            return Err(Error::range(name.as_str(), format!("given twice (names[{j}] and names[{i}])")));
        }
    }
    let views = tensors.iter().map(|(name, t)| (name.clone(), Out { dtype: st_dtype(t.dtype), shape: t.shape.clone(), bytes: t.bytes() }));
    let meta = if metadata.is_empty() { None } else { Some(metadata.iter().cloned().collect()) };
    safetensors::serialize(views, meta).map_err(|e| Error::range("tensors", format!("cannot write the checkpoint: {e}")))
}

/// [`save`] for owned tensors.
pub fn save_owned(tensors: &[(String, Tensor)], metadata: &[(String, String)]) -> Result<Vec<u8>> {
    let refs: Vec<(String, TensorRef)> =
        tensors.iter().map(|(n, t)| Ok((n.clone(), TensorRef::new("tensor", t.dtype, t.shape.clone(), tensor_bytes(t))?))).collect::<Result<_>>()?;
    save(&refs, metadata)
}

/// Re-labels an error about the binding's generic argument `arg` (e.g. `tensors`) with the
/// checkpoint key it was about, so list arguments still name what was wrong.
pub fn for_key(e: Error, arg: &str, key: &str) -> Error {
    let relabel = |a: String| match a.strip_prefix(arg) {
        Some(rest) => format!("{key}{rest}"),
        None => a,
    };
    match e {
        Error::Type { arg: a, expected, got } => Error::Type { arg: relabel(a), expected, got },
        Error::Range { arg: a, message } => Error::Range { arg: relabel(a), message },
        other => other,
    }
}

/// Pairs names with tensors of a list argument (`names[i]` names `tensors[i]`).
pub fn named<'a>(names: &[String], tensors: Vec<TensorRef<'a>>) -> Result<Vec<(String, TensorRef<'a>)>> {
    if names.len() != tensors.len() {
        return Err(Error::range("names", format!("{} names for {} tensors", names.len(), tensors.len())));
    }
    Ok(names.iter().cloned().zip(tensors).collect())
}

// ---------------------------------------------------------------------------------------
// Experts: Hugging Face per-expert keys <-> stacked.

/// `{prefix}.{rest}` (just `rest` for an empty prefix).
pub fn key(prefix: &str, rest: &str) -> String {
    if prefix.is_empty() {
        rest.to_string()
    } else {
        format!("{prefix}.{rest}")
    }
}

/// Where the gate and up rows of Hugging Face's `[inter, dim]` weights go in a stacked row.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    Halves,
    Interleaved,
    UpOnly,
}

fn layout(kind: ActivationKind) -> Layout {
    match kind {
        ActivationKind::Relu2 => Layout::UpOnly,
        ActivationKind::QuickGeglu => Layout::Interleaved,
        _ => Layout::Halves,
    }
}

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
    /// `"stacked"` or `"hf"`: the layout found in the checkpoint.
    pub format: &'static str,
    /// Bytes read from the source (header included).
    pub bytes_read: u64,
}

/// Tensors by name with a way to read rows of them: a checkpoint, or tensors in memory.
trait Store {
    fn entry(&self, name: &str) -> Option<(DType, Vec<usize>)>;
    fn names(&self) -> Vec<String>;
    fn read(&mut self, name: &str, rows: Option<Range<usize>>) -> Result<Vec<u8>>;
}

struct FileStore<'s, S: ByteSource + ?Sized> {
    src: &'s mut S,
    header: Header,
}

impl<S: ByteSource + ?Sized> Store for FileStore<'_, S> {
    fn entry(&self, name: &str) -> Option<(DType, Vec<usize>)> {
        self.header.get(name).map(|e| (e.dtype, e.shape.clone()))
    }
    fn names(&self) -> Vec<String> {
        self.header.tensors.iter().map(|e| e.name.clone()).collect()
    }
    fn read(&mut self, name: &str, rows: Option<Range<usize>>) -> Result<Vec<u8>> {
        let e = self.header.get(name).ok_or_else(|| missing(name, &self.header))?.clone();
        read_rows(self.src, &e, rows)
    }
}

struct MemStore<'a, 'b> {
    tensors: HashMap<String, &'b TensorRef<'a>>,
}

impl Store for MemStore<'_, '_> {
    fn entry(&self, name: &str) -> Option<(DType, Vec<usize>)> {
        self.tensors.get(name).map(|t| (t.dtype, t.shape.clone()))
    }
    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }
    fn read(&mut self, name: &str, rows: Option<Range<usize>>) -> Result<Vec<u8>> {
        let t = self.tensors.get(name).ok_or_else(|| Error::range(name, "no such tensor"))?;
        let row: usize = t.shape.iter().skip(1).product::<usize>() * t.dtype.size();
        Ok(match rows {
            Some(r) => t.bytes()[r.start * row..r.end * row].to_vec(),
            None => t.bytes().to_vec(),
        })
    }
}

fn shape_str(s: &[usize]) -> String {
    format!("[{}]", s.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "))
}

/// Checks a tensor's presence, dtype (must equal `dtype` once known) and shape.
fn expect(store: &dyn Store, name: &str, shape: &[usize], what: &str, dtype: &mut Option<DType>) -> Result<()> {
    let Some((dt, got)) = store.entry(name) else {
        return Err(Error::range(name, format!("missing from the checkpoint (expected {what} {})", shape_str(shape))));
    };
    if !DType::TOKENS.contains(&dt) {
        return Err(Error::type_error(format!("{name}.dtype"), "F32, BF16 or F16", dt.name()));
    }
    match dtype {
        Some(d) if *d != dt => return Err(Error::type_error(format!("{name}.dtype"), format!("{} like the other expert weights", d.name()), dt.name())),
        _ => *dtype = Some(dt),
    }
    if got != shape {
        return Err(Error::range(name, format!("expected shape {} ({what}), got {}", shape_str(shape), shape_str(&got))));
    }
    Ok(())
}

/// The expert ids that have Hugging Face keys under `prefix` (from `{prefix}.{i}.` names).
fn hf_expert_ids(names: &[String], prefix: &str) -> Vec<(usize, String)> {
    let head = if prefix.is_empty() { String::new() } else { format!("{prefix}.") };
    let mut ids: Vec<(usize, String)> = names
        .iter()
        .filter_map(|n| {
            let rest = n.strip_prefix(&head)?;
            let (id, tail) = rest.split_once('.')?;
            if !id.bytes().all(|b| b.is_ascii_digit()) || id.is_empty() || !tail.ends_with("_proj.weight") && !tail.ends_with("_proj.bias") {
                return None;
            }
            Some((id.parse::<usize>().ok()?, n.clone()))
        })
        .collect();
    ids.sort();
    ids
}

/// Copies a Hugging Face `[rows, cols]` (out, in) weight transposed into the stacked
/// `[cols, width]` block of one expert, at column `col(j)` for source row `j`.
fn transpose_into<T: Pod>(src: &[T], rows: usize, cols: usize, dst: &mut [T], width: usize, col: impl Fn(usize) -> usize) {
    for j in 0..rows {
        let c = col(j);
        for (d, &v) in src[j * cols..(j + 1) * cols].iter().enumerate() {
            dst[d * width + c] = v;
        }
    }
}

/// Bit-exact element copy of a transposition, for any 2- or 4-byte dtype.
fn transpose_bytes(src: &[u8], rows: usize, cols: usize, dst: &mut [u8], width: usize, size: usize, col: impl Fn(usize) -> usize) {
    match size {
        2 => transpose_into::<u16>(&bytemuck::pod_collect_to_vec(src), rows, cols, bytemuck::cast_slice_mut(dst), width, col),
        _ => transpose_into::<u32>(&bytemuck::pod_collect_to_vec(src), rows, cols, bytemuck::cast_slice_mut(dst), width, col),
    }
}

/// Stacked up-projection, down-projection, their biases, and the layout found.
type Stacked = (Tensor, Tensor, Option<Tensor>, Option<Tensor>, &'static str);

fn load_from_store(store: &mut dyn Store, prefix: &str, num_experts: usize, range: ExpertRange, kind: ActivationKind) -> Result<Stacked> {
    let lay = layout(kind);
    let local = range.len();
    let stacked = key(prefix, "gate_and_up_projs");
    if let Some((_, s)) = store.entry(&stacked) {
        // Stacked: validate the whole tensors, read the rank's rows.
        if s.len() != 3 {
            return Err(Error::range(stacked.as_str(), format!("expected 3 dimensions [numExperts, dim, width], got {}", shape_str(&s))));
        }
        if s[0] != num_experts {
            return Err(Error::range(stacked.as_str(), format!("holds {} experts (dim 0 of {}), expected numExperts = {num_experts}", s[0], shape_str(&s))));
        }
        let (dim, width) = (s[1], s[2]);
        if lay != Layout::UpOnly && width % 2 != 0 {
            return Err(Error::range(stacked.as_str(), format!("{} needs an even width (gate and up), got {}", kind.name(), shape_str(&s))));
        }
        let inter = if lay == Layout::UpOnly { width } else { width / 2 };
        let mut dtype = None;
        expect(store, &stacked, &s, "[numExperts, dim, width]", &mut dtype)?;
        let down = key(prefix, "down_projs");
        expect(store, &down, &[num_experts, inter, dim], "[numExperts, inter, dim]", &mut dtype)?;
        let dtype = dtype.unwrap_or(DType::F32);
        let w1 = store.read(&stacked, Some(range.start..range.end))?;
        let w2 = store.read(&down, Some(range.start..range.end))?;
        let b1k = key(prefix, "gate_up_proj_bias");
        let b2k = key(prefix, "down_proj_bias");
        let mut bt = None;
        let b1 = if store.entry(&b1k).is_some() {
            expect(store, &b1k, &[num_experts, width], "[numExperts, width]", &mut bt)?;
            Some(tensor_from_bytes(&b1k, bt.unwrap_or(dtype), vec![local, width], &store.read(&b1k, Some(range.start..range.end))?)?)
        } else {
            None
        };
        let mut bt2 = None;
        let b2 = if store.entry(&b2k).is_some() {
            expect(store, &b2k, &[num_experts, dim], "[numExperts, dim]", &mut bt2)?;
            Some(tensor_from_bytes(&b2k, bt2.unwrap_or(dtype), vec![local, dim], &store.read(&b2k, Some(range.start..range.end))?)?)
        } else {
            None
        };
        return Ok((
            tensor_from_bytes(&stacked, dtype, vec![local, dim, width], &w1)?,
            tensor_from_bytes(&down, dtype, vec![local, inter, dim], &w2)?,
            b1,
            b2,
            "stacked",
        ));
    }
    // Hugging Face per-expert keys: validate every expert's header entries, read the rank's.
    let names = store.names();
    let ids = hf_expert_ids(&names, prefix);
    if ids.is_empty() {
        return Err(Error::range(
            if prefix.is_empty() { "prefix" } else { prefix },
            format!("the checkpoint has neither '{stacked}' nor Hugging Face expert keys '{}'", key(prefix, "{i}.down_proj.weight")),
        ));
    }
    if let Some((id, name)) = ids.iter().find(|(id, _)| *id >= num_experts) {
        return Err(Error::range(name.as_str(), format!("expert {id} is outside [0, numExperts = {num_experts}): the checkpoint has more experts than expected")));
    }
    let down0 = key(prefix, "0.down_proj.weight");
    let Some((_, s0)) = store.entry(&down0) else {
        return Err(Error::range(down0.as_str(), "missing from the checkpoint (expert 0's down projection, [dim, inter])"));
    };
    if s0.len() != 2 {
        return Err(Error::range(down0.as_str(), format!("expected [dim, inter], got {}", shape_str(&s0))));
    }
    let (dim, inter) = (s0[0], s0[1]);
    let width = if lay == Layout::UpOnly { inter } else { 2 * inter };
    let has_bias = store.entry(&key(prefix, "0.down_proj.bias")).is_some();
    let mut dtype = None;
    let mut bias_dtype = None;
    for i in 0..num_experts {
        let p = |rest: &str| key(prefix, &format!("{i}.{rest}"));
        if lay != Layout::UpOnly {
            expect(store, &p("gate_proj.weight"), &[inter, dim], "[inter, dim]", &mut dtype)?;
        }
        expect(store, &p("up_proj.weight"), &[inter, dim], "[inter, dim]", &mut dtype)?;
        expect(store, &p("down_proj.weight"), &[dim, inter], "[dim, inter]", &mut dtype)?;
        if has_bias {
            if lay != Layout::UpOnly {
                expect(store, &p("gate_proj.bias"), &[inter], "[inter]", &mut bias_dtype)?;
            }
            expect(store, &p("up_proj.bias"), &[inter], "[inter]", &mut bias_dtype)?;
            expect(store, &p("down_proj.bias"), &[dim], "[dim]", &mut bias_dtype)?;
        }
    }
    let dtype = dtype.unwrap_or(DType::F32);
    let size = dtype.size();
    let mut w1 = crate::alloc::try_vec(0u8, local * dim * width * size, "gateAndUpProjs")?;
    let mut w2 = crate::alloc::try_vec(0u8, local * inter * dim * size, "downProjs")?;
    let bsize = bias_dtype.map_or(0, |d| d.size());
    let mut b1 = crate::alloc::try_vec(0u8, if has_bias { local * width * bsize } else { 0 }, "gateUpProjBias")?;
    let mut b2 = crate::alloc::try_vec(0u8, if has_bias { local * dim * bsize } else { 0 }, "downProjBias")?;
    for (l, i) in (range.start..range.end).enumerate() {
        let p = |rest: &str| key(prefix, &format!("{i}.{rest}"));
        let blk = &mut w1[l * dim * width * size..(l + 1) * dim * width * size];
        let up = store.read(&p("up_proj.weight"), None)?;
        match lay {
            Layout::UpOnly => transpose_bytes(&up, inter, dim, blk, width, size, |j| j),
            Layout::Halves => {
                transpose_bytes(&store.read(&p("gate_proj.weight"), None)?, inter, dim, blk, width, size, |j| j);
                transpose_bytes(&up, inter, dim, blk, width, size, |j| inter + j);
            }
            Layout::Interleaved => {
                transpose_bytes(&store.read(&p("gate_proj.weight"), None)?, inter, dim, blk, width, size, |j| 2 * j);
                transpose_bytes(&up, inter, dim, blk, width, size, |j| 2 * j + 1);
            }
        }
        // down_proj.weight [dim, inter] -> stacked [inter, dim]: a transpose.
        let dblk = &mut w2[l * inter * dim * size..(l + 1) * inter * dim * size];
        transpose_bytes(&store.read(&p("down_proj.weight"), None)?, dim, inter, dblk, dim, size, |j| j);
        if has_bias {
            let row = &mut b1[l * width * bsize..(l + 1) * width * bsize];
            let upb = store.read(&p("up_proj.bias"), None)?;
            // A bias is a [1, inter] "weight" transposed into one row: the same column rule.
            match lay {
                Layout::UpOnly => transpose_bytes(&upb, inter, 1, row, width, bsize, |j| j),
                Layout::Halves => {
                    transpose_bytes(&store.read(&p("gate_proj.bias"), None)?, inter, 1, row, width, bsize, |j| j);
                    transpose_bytes(&upb, inter, 1, row, width, bsize, |j| inter + j);
                }
                Layout::Interleaved => {
                    transpose_bytes(&store.read(&p("gate_proj.bias"), None)?, inter, 1, row, width, bsize, |j| 2 * j);
                    transpose_bytes(&upb, inter, 1, row, width, bsize, |j| 2 * j + 1);
                }
            }
            b2[l * dim * bsize..(l + 1) * dim * bsize].copy_from_slice(&store.read(&p("down_proj.bias"), None)?);
        }
    }
    let bias_dtype = bias_dtype.unwrap_or(dtype);
    Ok((
        tensor_from_bytes("gateAndUpProjs", dtype, vec![local, dim, width], &w1)?,
        tensor_from_bytes("downProjs", dtype, vec![local, inter, dim], &w2)?,
        if has_bias { Some(tensor_from_bytes("gateUpProjBias", bias_dtype, vec![local, width], &b1)?) } else { None },
        if has_bias { Some(tensor_from_bytes("downProjBias", bias_dtype, vec![local, dim], &b2)?) } else { None },
        "hf",
    ))
}

/// Loads the experts of rank `epRank` (of `epSize`; the range of [`expert_range_for_rank`])
/// as stacked tensors, from a checkpoint in either layout. The header is read and every
/// expert tensor's presence, dtype and shape checked against it (so a wrong expert count or
/// shape is an error naming the key); then only the rank's bytes are read.
pub fn load_experts<S: ByteSource + ?Sized>(src: &mut S, prefix: &str, num_experts: usize, ep_size: usize, ep_rank: usize, kind: ActivationKind) -> Result<LoadedExperts> {
    let range = expert_range_for_rank(num_experts, ep_size, ep_rank)?;
    let header = read_header(src)?;
    let mut store = FileStore { src, header };
    let (gate_and_up, down, gate_up_bias, down_bias, format) = load_from_store(&mut store, prefix, num_experts, range, kind)?;
    Ok(LoadedExperts { gate_and_up, down, gate_up_bias, down_bias, range, format, bytes_read: store.src.bytes_read() })
}

/// Stacks Hugging Face per-expert tensors held in memory (all experts `0..numExperts`).
pub fn stack_experts(tensors: &[(String, TensorRef)], prefix: &str, num_experts: usize, kind: ActivationKind) -> Result<LoadedExperts> {
    let mut store = MemStore { tensors: tensors.iter().map(|(n, t)| (n.clone(), t)).collect() };
    let range = ExpertRange { start: 0, end: num_experts };
    let (gate_and_up, down, gate_up_bias, down_bias, format) = load_from_store(&mut store, prefix, num_experts, range, kind)?;
    Ok(LoadedExperts { gate_and_up, down, gate_up_bias, down_bias, range, format, bytes_read: 0 })
}

/// Stacked experts to Hugging Face per-expert tensors (bit-exact transposes), named with
/// global ids from `firstExpert` (a rank's range start). The inverse of [`stack_experts`].
pub fn unstack_experts(
    prefix: &str,
    gate_and_up: &TensorRef,
    down: &TensorRef,
    gate_up_bias: Option<&TensorRef>,
    down_bias: Option<&TensorRef>,
    kind: ActivationKind,
    first_expert: usize,
) -> Result<Vec<(String, Tensor)>> {
    let lay = layout(kind);
    let s = gate_and_up.expect_rank(3, "[numLocalExperts, dim, width]")?.to_vec();
    gate_and_up.expect_dtype(DType::TOKENS)?;
    let (local, dim, width) = (s[0], s[1], s[2]);
    if lay != Layout::UpOnly && width % 2 != 0 {
        return Err(Error::range(format!("{}.shape[2]", gate_and_up.name), format!("{} needs an even width (gate and up), got {width}", kind.name())));
    }
    let inter = if lay == Layout::UpOnly { width } else { width / 2 };
    down.expect_rank(3, "[numLocalExperts, inter, dim]")?;
    down.expect_shape(&[local, inter, dim], "([numLocalExperts, inter, dim])")?;
    if down.dtype != gate_and_up.dtype {
        return Err(Error::type_error(format!("{}.dtype", down.name), format!("{} (the dtype of {})", gate_and_up.dtype.name(), gate_and_up.name), down.dtype.name()));
    }
    if let Some(b) = gate_up_bias {
        b.expect_dtype(DType::TOKENS)?;
        b.expect_shape(&[local, width], "([numLocalExperts, width])")?;
    }
    if let Some(b) = down_bias {
        b.expect_dtype(DType::TOKENS)?;
        b.expect_shape(&[local, dim], "([numLocalExperts, dim])")?;
    }
    let size = gate_and_up.dtype.size();
    let dt = gate_and_up.dtype;
    let w1 = gate_and_up.bytes();
    let w2 = down.bytes();
    let mut out = Vec::new();
    // stacked [dim, width] block -> HF [inter, dim] at column col(j): a transpose back.
    let take = |blk: &[u8], col: &dyn Fn(usize) -> usize, w: usize, rows: usize, cols: usize, sz: usize| -> Vec<u8> {
        let mut dst = vec![0u8; rows * cols * sz];
        // dst[j, d] = blk[d, col(j)]
        for j in 0..rows {
            let c = col(j);
            for d in 0..cols {
                let s0 = (d * w + c) * sz;
                dst[(j * cols + d) * sz..(j * cols + d + 1) * sz].copy_from_slice(&blk[s0..s0 + sz]);
            }
        }
        dst
    };
    for l in 0..local {
        let id = first_expert + l;
        let p = |rest: &str| key(prefix, &format!("{id}.{rest}"));
        let blk = &w1[l * dim * width * size..(l + 1) * dim * width * size];
        let gate_col = |j: usize| if lay == Layout::Interleaved { 2 * j } else { j };
        let up_col = |j: usize| match lay {
            Layout::Halves => inter + j,
            Layout::Interleaved => 2 * j + 1,
            Layout::UpOnly => j,
        };
        if lay != Layout::UpOnly {
            out.push((p("gate_proj.weight"), tensor_from_bytes("gate", dt, vec![inter, dim], &take(blk, &gate_col, width, inter, dim, size))?));
        }
        out.push((p("up_proj.weight"), tensor_from_bytes("up", dt, vec![inter, dim], &take(blk, &up_col, width, inter, dim, size))?));
        // stacked down [inter, dim] -> HF [dim, inter].
        let dblk = &w2[l * inter * dim * size..(l + 1) * inter * dim * size];
        out.push((p("down_proj.weight"), tensor_from_bytes("down", dt, vec![dim, inter], &take(dblk, &|j| j, dim, dim, inter, size))?));
        if let Some(b) = gate_up_bias {
            let bs = b.dtype.size();
            let row = &b.bytes()[l * width * bs..(l + 1) * width * bs];
            if lay != Layout::UpOnly {
                out.push((p("gate_proj.bias"), tensor_from_bytes("bias", b.dtype, vec![inter], &take(row, &gate_col, width, inter, 1, bs))?));
            }
            out.push((p("up_proj.bias"), tensor_from_bytes("bias", b.dtype, vec![inter], &take(row, &up_col, width, inter, 1, bs))?));
        }
        if let Some(b) = down_bias {
            let bs = b.dtype.size();
            out.push((p("down_proj.bias"), tensor_from_bytes("bias", b.dtype, vec![dim], &b.bytes()[l * dim * bs..(l + 1) * dim * bs])?));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Data;

    fn f32s(t: &Tensor) -> &[f32] {
        match &t.data {
            Data::F32(v) => v,
            _ => panic!("f32"),
        }
    }

    #[test]
    fn save_and_load_round_trip_with_metadata() {
        let a: Vec<f32> = (0..6).map(|i| i as f32 * 0.5).collect();
        let b = [1i32, -2, 3];
        let tensors = vec![
            ("a".to_string(), TensorRef::of("a", vec![2, 3], &a).unwrap()),
            ("b".to_string(), TensorRef::of("b", vec![3], &b).unwrap()),
        ];
        let bytes = save(&tensors, &[("format".into(), "pt".into())]).unwrap();
        // The safetensors crate itself reads what we wrote.
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("a").unwrap().shape(), &[2, 3]);
        let mut src = SliceSource::new(&bytes);
        let header = read_header(&mut src).unwrap();
        assert_eq!(header.metadata.get("format").map(String::as_str), Some("pt"));
        let loaded = load(&mut SliceSource::new(&bytes), None).unwrap();
        let a2 = &loaded.iter().find(|(n, _)| n == "a").unwrap().1;
        assert_eq!(f32s(a2), &a[..]);
        let err = load(&mut SliceSource::new(&bytes), Some(&["c".to_string()])).unwrap_err();
        assert!(err.to_string().starts_with("c: no such tensor in the checkpoint"), "{err}");
        let err = read_header(&mut SliceSource::new(&bytes[..bytes.len() - 1])).unwrap_err();
        assert!(err.to_string().starts_with("checkpoint: truncated"), "{err}");
        let err = save(&[tensors[0].clone(), tensors[0].clone()], &[]).unwrap_err();
        assert!(err.to_string().starts_with("a: given twice"), "{err}");
    }

    #[test]
    fn hf_stacked_round_trip_and_rank_slices_read_only_their_bytes() {
        let (e, dim, inter) = (6usize, 3usize, 2usize);
        for kind in [ActivationKind::Swiglu, ActivationKind::QuickGeglu, ActivationKind::Relu2] {
            let width = if kind == ActivationKind::Relu2 { inter } else { 2 * inter };
            let w1: Vec<f32> = (0..e * dim * width).map(|i| i as f32).collect();
            let w2: Vec<f32> = (0..e * inter * dim).map(|i| -(i as f32)).collect();
            let w1r = TensorRef::of("gateAndUpProjs", vec![e, dim, width], &w1).unwrap();
            let w2r = TensorRef::of("downProjs", vec![e, inter, dim], &w2).unwrap();
            let hf = unstack_experts("m.experts", &w1r, &w2r, None, None, kind, 0).unwrap();
            let hf_refs: Vec<(String, TensorRef)> = hf
                .iter()
                .map(|(n, t)| (n.clone(), TensorRef::new("t", t.dtype, t.shape.clone(), tensor_bytes(t)).unwrap()))
                .collect();
            // gate_proj of expert 1, row j, column d = stacked[1, d, gate column of j].
            if kind == ActivationKind::Swiglu {
                let g1 = &hf.iter().find(|(n, _)| n == "m.experts.1.gate_proj.weight").unwrap().1;
                assert_eq!(g1.shape, vec![inter, dim]);
                assert_eq!(f32s(g1)[dim + 2], w1[dim * width + 2 * width + 1]);
            }
            let stacked = stack_experts(&hf_refs, "m.experts", e, kind).unwrap();
            assert_eq!(f32s(&stacked.gate_and_up), &w1[..]);
            assert_eq!(f32s(&stacked.down), &w2[..]);
            let file = save_owned(&hf, &[]).unwrap();
            let header_len = 8 + u64::from_le_bytes(file[..8].try_into().unwrap());
            for ep in 1..=4 {
                for rank in 0..ep {
                    let mut src = SliceSource::new(&file);
                    let got = load_experts(&mut src, "m.experts", e, ep, rank, kind).unwrap();
                    let r = got.range;
                    assert_eq!(got.format, "hf");
                    assert_eq!(f32s(&got.gate_and_up), &w1[r.start * dim * width..r.end * dim * width]);
                    assert_eq!(f32s(&got.down), &w2[r.start * inter * dim..r.end * inter * dim]);
                    assert_eq!(got.bytes_read, header_len + (r.len() * (dim * width + inter * dim) * 4) as u64);
                }
            }
        }
    }

    #[test]
    fn expert_count_and_shape_errors_name_the_key() {
        let (e, dim, inter) = (4usize, 3usize, 2usize);
        let w1 = vec![0f32; e * dim * 2 * inter];
        let w2 = vec![0f32; e * inter * dim];
        let t = vec![
            ("x.gate_and_up_projs".to_string(), TensorRef::of("a", vec![e, dim, 2 * inter], &w1).unwrap()),
            ("x.down_projs".to_string(), TensorRef::of("b", vec![e, inter, dim], &w2).unwrap()),
        ];
        let bytes = save(&t, &[]).unwrap();
        let err = load_experts(&mut SliceSource::new(&bytes), "x", 5, 1, 0, ActivationKind::Swiglu).unwrap_err();
        assert!(err.to_string().starts_with("x.gate_and_up_projs: holds 4 experts"), "{err}");
        let err = load_experts(&mut SliceSource::new(&bytes), "x", 4, 1, 0, ActivationKind::Relu2).unwrap_err();
        assert!(err.to_string().starts_with("x.down_projs: expected shape [4, 4, 3]"), "{err}");
        let ok = load_experts(&mut SliceSource::new(&bytes), "x", 4, 3, 2, ActivationKind::Swiglu).unwrap();
        assert_eq!(ok.format, "stacked");
        assert_eq!(ok.gate_and_up.shape, vec![1, dim, 2 * inter]);
    }
}
